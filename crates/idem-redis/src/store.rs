//! [`RedisStore`]: the [`DedupStore`] operations as script calls.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem_core::dedup::{Claim, Completion, DedupStore, OwnerToken, ScopedKey, StoreError};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::Script;

use crate::connection::{RedisConnection, Target};
use crate::scripts::Scripts;
use crate::RedisStoreBuilder;

/// A [`DedupStore`] on Redis or a Redis Cluster. See the [crate docs](crate) for the
/// key layout, failure handling and the durability caveat. Cheap to clone (clones
/// share one multiplexed connection).
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) conn: RedisConnection,
    pub(crate) prefix: Arc<str>,
    pub(crate) scripts: Arc<Scripts>,
    pub(crate) target: Arc<Target>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.target.redacted)
            .field("cluster", &self.conn.is_cluster())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Configures a store for `url` (`redis://[user:password@]host:port[/db]`,
    /// `rediss://` for TLS if built with the `tls` feature). Several URLs separated by
    /// commas (the seed nodes of a Redis Cluster, e.g.
    /// `redis://10.0.0.1:6379,redis://10.0.0.2:6379`) connect in cluster mode; a comma
    /// inside a password must be written `%2C`.
    pub fn builder(url: &str) -> RedisStoreBuilder {
        RedisStoreBuilder::new(url)
    }

    /// Connects with the default settings (a cluster if `url` lists several).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }

    /// A store on a single-node connection manager you configured yourself.
    pub fn from_manager(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        Self::from_connection(
            RedisConnection::single(conn),
            prefix,
            "redis://(configured manager)",
        )
    }

    /// A store on a Redis Cluster connection you configured yourself
    /// (`redis::cluster::ClusterClient::get_async_connection`).
    pub fn from_cluster(conn: ClusterConnection, prefix: impl Into<String>) -> Self {
        Self::from_connection(
            RedisConnection::cluster(conn),
            prefix,
            "redis://(configured cluster)",
        )
    }

    fn from_connection(conn: RedisConnection, prefix: impl Into<String>, label: &str) -> Self {
        let prefix: String = prefix.into();
        RedisStore {
            conn,
            prefix: prefix.into(),
            scripts: Arc::new(Scripts::new()),
            target: Arc::new(Target::new(&[label.to_owned()])),
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    /// The Redis key holding `key`'s record (for inspection, tests and benchmarks).
    pub fn redis_key(&self, key: &ScopedKey) -> String {
        record_key(&self.prefix, key)
    }

    /// The underlying connection (shared, multiplexed): for inspection and tests.
    pub fn connection(&self) -> RedisConnection {
        self.conn.clone()
    }

    /// Runs a script, retrying once at once if the connection had dropped (the
    /// connection reconnects in the background; see the crate docs for why a retry is
    /// safe for every script).
    async fn eval<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        script: &Script,
        key: &ScopedKey,
        args: &[Arg<'_>],
    ) -> Result<T, StoreError> {
        let rkey = self.redis_key(key);
        let starts = starts_key(&rkey);
        let mut conn = self.conn.clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Every script gets the record and its start counter (same hash slot).
            let mut inv = script.key(&rkey);
            inv.key(&starts);
            for a in args {
                match a {
                    Arg::Str(s) => inv.arg(*s),
                    Arg::Int(n) => inv.arg(*n),
                };
            }
            match inv.invoke_async::<T>(&mut conn).await {
                Ok(v) => return Ok(v),
                // A refusal is retried too: after an outage the manager hands out the
                // error of its last failed reconnect (stale, possibly minutes old) to
                // the first command, and only then reconnects. The retry waits for that
                // fresh reconnect. A timeout is not retried (it would double the wait).
                Err(e)
                    if attempt == 1
                        && (e.is_connection_dropped()
                            || e.is_unrecoverable_error()
                            || e.is_io_error())
                        && !e.is_timeout() =>
                {
                    tracing::debug!(op, error = %self.target.scrub(&e.to_string()), "Redis connection dropped or refused; retrying once after a reconnect");
                }
                Err(e) => return Err(self.target.error(&format!("Redis {op} failed"), &e)),
            }
        }
    }
}

fn record_key(prefix: &str, key: &ScopedKey) -> String {
    let consumer = key.consumer();
    format!("{prefix}:{{{}:{consumer}:{}}}", consumer.len(), key.key())
}

/// The message's start counter (crash counting): the record key plus `:n`. It
/// shares the record's hash tag, so it lives in the same cluster slot, and it cannot
/// equal any record key (those end with `}`).
fn starts_key(record: &str) -> String {
    format!("{record}:n")
}

/// A script argument, borrowed: no per-call `String`s.
#[derive(Clone, Copy)]
enum Arg<'a> {
    Str(&'a str),
    Int(u64),
}

fn millis(d: Duration) -> Arg<'static> {
    // PEXPIRE 0 deletes the key: keep at least 1 ms.
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Arg::Int(ms.clamp(1, i64::MAX as u64 / 2))
}

fn completion_code(c: Completion) -> &'static str {
    match c {
        Completion::Succeeded => "s",
        Completion::Poisoned => "p",
    }
}

fn parse_claim(reply: &[String]) -> Result<Claim, StoreError> {
    match reply.first().map(String::as_str) {
        Some("a") => Ok(Claim::Acquired),
        Some("d") if reply.len() == 4 => Ok(Claim::Done {
            completion: if reply[1] == "p" {
                Completion::Poisoned
            } else {
                Completion::Succeeded
            },
            fingerprint: (reply[2] == "1").then(|| reply[3].clone()),
        }),
        Some("b") if reply.len() == 2 => {
            // PTTL is -1 for a key without expiry (never written by this store).
            let ms = reply[1].parse::<i64>().map_err(|_| bad_reply(reply))?;
            let ms = u64::try_from(ms).unwrap_or(0).max(1);
            Ok(Claim::Busy {
                retry_in: Duration::from_millis(ms),
            })
        }
        _ => Err(bad_reply(reply)),
    }
}

fn bad_reply(reply: &[String]) -> StoreError {
    StoreError::new(format!("unexpected Redis claim reply {reply:?}"))
}

#[async_trait]
impl DedupStore for RedisStore {
    async fn claim(
        &self,
        key: &ScopedKey,
        owner: &OwnerToken,
        fingerprint: Option<&str>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let args = [
            Arg::Str(owner.as_str()),
            millis(lease),
            Arg::Str(if fingerprint.is_some() { "1" } else { "0" }),
            Arg::Str(fingerprint.unwrap_or("")),
        ];
        let reply: Vec<String> = self.eval("claim", &self.scripts.claim, key, &args).await?;
        parse_claim(&reply)
    }

    async fn claim_counting(
        &self,
        key: &ScopedKey,
        owner: &OwnerToken,
        fingerprint: Option<&str>,
        lease: Duration,
        memory: Duration,
    ) -> Result<(Claim, Option<u32>), StoreError> {
        let args = [
            Arg::Str(owner.as_str()),
            millis(lease),
            Arg::Str(if fingerprint.is_some() { "1" } else { "0" }),
            Arg::Str(fingerprint.unwrap_or("")),
            millis(memory),
        ];
        let reply: Vec<String> = self
            .eval("claim", &self.scripts.claim_counting, key, &args)
            .await?;
        match reply.first().map(String::as_str) {
            Some("a") if reply.len() == 2 => {
                let n = reply[1].parse::<u32>().map_err(|_| bad_reply(&reply))?;
                Ok((Claim::Acquired, Some(n)))
            }
            _ => Ok((parse_claim(&reply)?, Some(0))),
        }
    }

    async fn extend(
        &self,
        key: &ScopedKey,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let args = [Arg::Str(owner.as_str()), millis(lease)];
        let n: i64 = self
            .eval("extend", &self.scripts.extend, key, &args)
            .await?;
        Ok(n == 1)
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        owner: &OwnerToken,
        completion: Completion,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let args = [
            Arg::Str(owner.as_str()),
            Arg::Str(completion_code(completion)),
            millis(retention),
        ];
        let n: i64 = self
            .eval("complete", &self.scripts.complete, key, &args)
            .await?;
        Ok(n == 1)
    }

    async fn release(&self, key: &ScopedKey, owner: &OwnerToken) -> Result<bool, StoreError> {
        let args = [Arg::Str(owner.as_str())];
        let n: i64 = self
            .eval("release", &self.scripts.release, key, &args)
            .await?;
        Ok(n == 1)
    }

    async fn reopen_poisoned(
        &self,
        key: &ScopedKey,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let args = [Arg::Str(owner.as_str()), millis(lease)];
        let n: i64 = self
            .eval("reopen", &self.scripts.reopen, key, &args)
            .await?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unambiguous_and_one_slot() {
        let k = |c: &str, k: &str| record_key("idem", &ScopedKey::new(c, k));
        assert_ne!(k("a:b", "c"), k("a", "b:c"));
        assert_eq!(k("billing", "k1"), "idem:{7:billing:k1}");
        assert!(matches!(millis(Duration::ZERO), Arg::Int(1)));
    }
}
