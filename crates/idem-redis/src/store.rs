//! [`RedisStore`]: the [`DedupStore`] operations as script calls.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem_core::dedup::{
    Answers, BatchExecutor, Batcher, Claim, ClaimRequest, CompleteRequest, Completion,
    CountedClaim, DedupStore, HeldClaim, ScopedKey, StoreError, StoreResult, Terms,
    DEFAULT_MAX_BATCH,
};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, Script, Value};

use crate::connection::{RedisConnection, Target};
use crate::RedisStoreBuilder;

/// A [`DedupStore`] on Redis or a Redis Cluster. See the [crate docs](crate) for the
/// key layout, batching, failure handling and the durability caveat. Cheap to clone
/// (clones share one multiplexed connection and one batch queue).
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) conn: RedisConnection,
    pub(crate) prefix: Arc<str>,
    pub(crate) target: Arc<Target>,
    pub(crate) batcher: Batcher<Exec>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.target.redacted)
            .field("cluster", &self.conn.is_cluster())
            .field("prefix", &self.prefix)
            .field("max_batch", &self.batcher.max_batch())
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

    /// A store on a single-node connection manager you configured yourself (batches
    /// of at most [`DEFAULT_MAX_BATCH`] operations).
    pub fn from_manager(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        Self::from_connection(
            RedisConnection::single(conn),
            prefix,
            "redis://(configured manager)",
        )
    }

    /// A store on a Redis Cluster connection you configured yourself
    /// (`redis::cluster::ClusterClient::get_async_connection`; batches of at most
    /// [`DEFAULT_MAX_BATCH`] operations).
    pub fn from_cluster(conn: ClusterConnection, prefix: impl Into<String>) -> Self {
        Self::from_connection(
            RedisConnection::cluster(conn),
            prefix,
            "redis://(configured cluster)",
        )
    }

    fn from_connection(conn: RedisConnection, prefix: impl Into<String>, label: &str) -> Self {
        Self::assemble(
            conn,
            prefix.into(),
            Target::new(&[label.to_owned()]),
            DEFAULT_MAX_BATCH,
        )
    }

    pub(crate) fn assemble(
        conn: RedisConnection,
        prefix: String,
        target: Target,
        max_batch: usize,
    ) -> Self {
        let target = Arc::new(target);
        let exec = Exec {
            conn: conn.clone(),
            script: crate::scripts::batch(),
            target: target.clone(),
        };
        RedisStore {
            conn,
            prefix: prefix.into(),
            target,
            batcher: Batcher::new(exec, max_batch),
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

    /// The bound on operations per script call (see the [crate docs](crate#batching)).
    pub fn max_batch(&self) -> usize {
        self.batcher.max_batch()
    }

    /// The Redis key holding `key`'s record (for inspection, tests and benchmarks).
    pub fn redis_key(&self, key: &ScopedKey) -> String {
        record_key(&self.prefix, key)
    }

    /// The underlying connection (shared, multiplexed): for inspection and tests.
    pub fn connection(&self) -> RedisConnection {
        self.conn.clone()
    }

    /// Queues `op` for the next script call and returns its reply.
    async fn run<T: FromRedisValue>(&self, op: Op) -> Result<T, StoreError> {
        let name = op.name;
        let reply = if self.batcher.max_batch() == 1 {
            // Batching off: the operation's own script call, from the caller's task.
            let mut replies = self.batcher.executor().execute(vec![op]).await;
            replies
                .pop()
                .unwrap_or_else(|| Err(StoreError::new("Redis script call answered nothing")))?
        } else {
            self.batcher.submit(op).await?
        };
        typed(name, reply)
    }

    /// Operations of one `*_many` call, sent at once as script calls of their own
    /// (not through the queue): one call for up to [`max_batch`](Self::max_batch)
    /// operations, on a cluster one per hash slot among them, all in flight together.
    async fn run_many<T: FromRedisValue>(&self, ops: Vec<Op>) -> Vec<Result<T, StoreError>> {
        let names: Vec<&'static str> = ops.iter().map(|op| op.name).collect();
        let size = self.batcher.max_batch();
        let mut chunks: Vec<Vec<Op>> = Vec::new();
        for op in ops {
            match chunks.last_mut() {
                Some(chunk) if chunk.len() < size => chunk.push(op),
                _ => chunks.push(vec![op]),
            }
        }
        let exec = self.batcher.executor();
        let calls = chunks.into_iter().map(|chunk| exec.execute(chunk));
        let replies = futures_util::future::join_all(calls).await;
        replies
            .into_iter()
            .flatten()
            .zip(names)
            .map(|(reply, name)| reply.and_then(|r| typed(name, r)))
            .collect()
    }

    /// The operation `name` on the record of `held`: its arguments are the owner
    /// token, then `args`.
    fn op<const N: usize>(&self, name: &'static str, held: &HeldClaim, args: [Arg; N]) -> Op {
        let mut all = Vec::with_capacity(N + 1);
        all.push(text(held.owner.as_str()));
        all.extend(args);
        Op {
            name,
            record: self.redis_key(&held.key),
            args: all,
        }
    }

    /// The claim of `req`; a counting one (`claim_counting`, starts remembered for
    /// the retention) if `counting`.
    fn claim_op(&self, req: &ClaimRequest, terms: Terms, counting: bool) -> Op {
        let fingerprint = req.fingerprint.as_deref();
        let flag = text(if fingerprint.is_some() { "1" } else { "0" });
        let args = [millis(terms.lease), flag, text(fingerprint.unwrap_or(""))];
        let mut op = self.op("claim", &req.held, args);
        if counting {
            op.name = "claim_counting";
            op.args.push(millis(terms.retention));
        }
        op
    }

    /// The completion of `held` with `completion`, kept for the retention.
    fn complete_op(&self, held: &HeldClaim, completion: Completion, terms: Terms) -> Op {
        let args = [text(completion_code(completion)), millis(terms.retention)];
        self.op("complete", held, args)
    }

    /// Runs `op`, whose reply is 1 if it took effect.
    async fn run_bool(&self, op: Op) -> StoreResult<bool> {
        let n: i64 = self.run(op).await?;
        Ok(n == 1)
    }

    /// Runs `ops` at once (see [`run_many`](Self::run_many)); each reply is 1 if its
    /// operation took effect.
    async fn run_many_bool(&self, ops: Vec<Op>) -> Answers<bool> {
        let replies: Vec<Result<i64, StoreError>> = self.run_many(ops).await;
        replies.into_iter().map(|r| r.map(|n| n == 1)).collect()
    }
}

/// A script reply as `T`.
fn typed<T: FromRedisValue>(name: &str, reply: Value) -> Result<T, StoreError> {
    T::from_redis_value(reply)
        .map_err(|e| StoreError::new(format!("unexpected Redis {} reply: {e}", label(name))))
}

fn parse_counting(reply: &[String]) -> StoreResult<CountedClaim> {
    match reply.first().map(String::as_str) {
        Some("a") if reply.len() == 2 => {
            let n = reply[1].parse::<u32>().map_err(|_| bad_reply(reply))?;
            Ok((Claim::Acquired, Some(n)))
        }
        _ => Ok((parse_claim(reply)?, Some(0))),
    }
}

/// The names of the operations in the batch script (`lua/<name>.lua`).
#[cfg(test)]
pub(crate) const OPERATION_NAMES: [&str; 6] = [
    "claim",
    "claim_counting",
    "extend",
    "complete",
    "release",
    "reopen",
];

/// The name of an operation in errors and logs.
fn label(name: &str) -> &str {
    match name {
        "claim_counting" => "claim",
        other => other,
    }
}

/// One operation for the batch script: which, on which record, with which arguments.
pub(crate) struct Op {
    name: &'static str,
    record: String,
    args: Vec<Arg>,
}

/// A script argument.
enum Arg {
    Str(String),
    Int(u64),
}

fn text(s: &str) -> Arg {
    Arg::Str(s.to_owned())
}

/// Runs batches of [`Op`]s: one `EVALSHA` of the batch script per call on a single
/// Redis; on a cluster one per hash slot in the batch, all sent at once.
pub(crate) struct Exec {
    conn: RedisConnection,
    script: Script,
    target: Arc<Target>,
}

#[async_trait]
impl BatchExecutor for Exec {
    type Op = Op;
    type Output = Value;

    async fn execute(&self, ops: Vec<Op>) -> Vec<Result<Value, StoreError>> {
        if !self.conn.is_cluster() || ops.len() == 1 {
            let all: Vec<&Op> = ops.iter().collect();
            return self.call(&all).await;
        }
        // The keys of one script call must share a slot (else CROSSSLOT).
        let mut slots: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (i, op) in ops.iter().enumerate() {
            slots.entry(slot(&op.record)).or_default().push(i);
        }
        let calls = slots.values().map(|members| {
            let group: Vec<&Op> = members.iter().map(|&i| &ops[i]).collect();
            async move { self.call(&group).await }
        });
        let replies = futures_util::future::join_all(calls).await;
        let mut out: Vec<Option<Result<Value, StoreError>>> = ops.iter().map(|_| None).collect();
        for (members, group) in slots.values().zip(replies) {
            for (&i, reply) in members.iter().zip(group) {
                out[i] = Some(reply);
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::new("Redis batch lost an operation"))))
            .collect()
    }
}

impl Exec {
    /// One script call for `ops` (all in one slot on a cluster), retried once at once
    /// if the connection had dropped (the connection reconnects in the background; see
    /// the crate docs for why a retry is safe for every operation).
    async fn call(&self, ops: &[&Op]) -> Vec<Result<Value, StoreError>> {
        let mut inv = self.script.prepare_invoke();
        for op in ops {
            // Every operation gets its record and start counter (same hash slot).
            inv.key(&op.record);
            inv.key(starts_key(&op.record));
            inv.arg(op.name);
            inv.arg(op.args.len());
            for a in &op.args {
                match a {
                    Arg::Str(s) => inv.arg(s),
                    Arg::Int(n) => inv.arg(*n),
                };
            }
        }
        let mut conn = self.conn.clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match inv.invoke_async::<Vec<Value>>(&mut conn).await {
                Ok(replies) if replies.len() == ops.len() => {
                    return replies
                        .into_iter()
                        .zip(ops)
                        .map(|(reply, op)| op_reply(reply, op))
                        .collect();
                }
                Ok(replies) => {
                    let e = StoreError::new(format!(
                        "Redis batch script answered {} operations of {}",
                        replies.len(),
                        ops.len()
                    ));
                    return ops.iter().map(|_| Err(e.clone())).collect();
                }
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
                    tracing::debug!(operations = ops.len(), error = %self.target.scrub(&e.to_string()), "Redis connection dropped or refused; retrying once after a reconnect");
                }
                Err(e) => {
                    let others = ops.len() - 1;
                    return ops
                        .iter()
                        .map(|op| {
                            let what = match others {
                                0 => format!("Redis {} failed", label(op.name)),
                                n => format!(
                                    "Redis {} failed (in one script call with {n} other operations)",
                                    label(op.name)
                                ),
                            };
                            Err(self.target.error(&what, &e))
                        })
                        .collect();
                }
            }
        }
    }
}

/// One operation's entry in the batch reply: its own reply, or `{'e', message}` when
/// that operation raised an error in Redis.
fn op_reply(reply: Value, op: &Op) -> Result<Value, StoreError> {
    if let Value::Array(items) = &reply {
        if let [Value::BulkString(marker), detail] = items.as_slice() {
            if marker.as_slice() == b"e" {
                let detail = String::from_redis_value_ref(detail).unwrap_or_default();
                return Err(StoreError::new(format!(
                    "Redis {} of {} failed: {detail}",
                    label(op.name),
                    op.record
                )));
            }
        }
    }
    Ok(reply)
}

/// The Redis Cluster hash slot of `key`: CRC16 of its hash tag (the text between the
/// first `{` and the next `}`, if not empty) or of the whole key, modulo 16384.
fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tag = bytes
        .iter()
        .position(|&c| c == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|&c| c == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(bytes);
    crc16::State::<crc16::XMODEM>::calculate(tag) % 16384
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

fn millis(d: Duration) -> Arg {
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
    async fn claim(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<Claim> {
        let reply: Vec<String> = self.run(self.claim_op(req, terms, false)).await?;
        parse_claim(&reply)
    }

    async fn claim_counting(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<CountedClaim> {
        let reply: Vec<String> = self.run(self.claim_op(req, terms, true)).await?;
        parse_counting(&reply)
    }

    async fn claim_many(&self, requests: &[ClaimRequest], terms: Terms) -> Answers<CountedClaim> {
        let ops = requests
            .iter()
            .map(|r| self.claim_op(r, terms, true))
            .collect();
        let replies: Answers<Vec<String>> = self.run_many(ops).await;
        replies
            .into_iter()
            .map(|r| r.and_then(|reply| parse_counting(&reply)))
            .collect()
    }

    async fn complete_many(&self, requests: &[CompleteRequest], terms: Terms) -> Answers<bool> {
        let ops = requests
            .iter()
            .map(|r| self.complete_op(&r.held, r.completion, terms))
            .collect();
        self.run_many_bool(ops).await
    }

    async fn release_many(&self, claims: &[HeldClaim]) -> Answers<bool> {
        let ops = claims.iter().map(|h| self.op("release", h, [])).collect();
        self.run_many_bool(ops).await
    }

    async fn extend(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        self.run_bool(self.op("extend", held, [millis(terms.lease)]))
            .await
    }

    async fn complete(&self, held: &HeldClaim, how: Completion, terms: Terms) -> StoreResult<bool> {
        self.run_bool(self.complete_op(held, how, terms)).await
    }

    async fn release(&self, held: &HeldClaim) -> StoreResult<bool> {
        self.run_bool(self.op("release", held, [])).await
    }

    async fn reopen_poisoned(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        self.run_bool(self.op("reopen", held, [millis(terms.lease)]))
            .await
    }
}

#[cfg(test)]
mod tests;
