//! Redis dedup store for [idem](https://docs.rs/idem): [`RedisStore`] implements
//! [`DedupStore`] with one Redis hash per message and Lua scripts, so every state
//! change (claim, extend, complete, release, reopen) is one atomic step fenced by the
//! claim's owner token. Lease and retention expiry are Redis TTLs, measured by the Redis
//! server's clock, so workers need no synchronised clocks.
//!
//! ```no_run
//! use idem_core::{Consumer, IdempotencyKey};
//! use idem_redis::RedisStore;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! async fn charge(key: IdempotencyKey) {
//!     println!("charging once for {key}");
//! }
//!
//! let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
//! let store = RedisStore::builder(&url).prefix("myapp").connect().await?;
//! let consumer = Consumer::builder("billing").store(store).handler(charge)?;
//! # let _ = consumer; Ok(()) }
//! ```
//!
//! # Keys and Redis Cluster
//! A message's record is the single key `<prefix>:{<len>:<consumer>:<key>}` (a hash
//! with fields `s` state, `o` owner token, `f` payload fingerprint, `c` completion).
//! Every script touches only that one key (declared in `KEYS`), and the braces make it
//! a hash tag, so each message lives in exactly one Redis Cluster slot and the scripts
//! are cluster-safe. The consumer name is length-prefixed so that no two (consumer, key)
//! pairs share a key. Note: `RedisStore` itself connects through redis-rs's single-node
//! `ConnectionManager` (a standalone Redis, or a proxy such as Envoy/twemproxy in front
//! of a cluster); a cluster-aware client is not wired in yet.
//!
//! # Failures
//! Redis down, a dropped connection or a timeout is a [`StoreError`], which the dedup
//! layer treats as transient (retry later, never "duplicate") and the consumer's
//! circuit breaker counts (`idem_core::breaker`: after a few in a row the consumer
//! pauses instead of spending attempts). The connection manager reconnects by itself;
//! the first command after a dropped connection fails, and the first command after
//! Redis comes back gets the stale error of the manager's last failed reconnect
//! (`Connection refused`), so each operation is retried once at once when the
//! connection was dropped or refused (the retry waits for a fresh reconnect). That
//! retry is safe because every script is idempotent for its own owner token (a claim
//! that finds the key held by its own token reports `Acquired`, a completion that finds
//! its own completion reports success). Connecting and reconnecting are bounded (see
//! [`RedisStoreBuilder`]) so that a dead Redis fails in well under a second instead of
//! hanging. Passwords in `REDIS_URL` never appear in errors or logs ([`redact_url`]).
//!
//! # TLS
//! A `rediss://host:6380` URL connects over TLS (feature `tls`, on by default; rustls).
//! The server certificate is verified against the system roots and the URL's host name.
//! [`RedisStoreBuilder::tls`] takes an [`idem_core::TlsConfig`]: with a CA file, Redis
//! trusts *only* that CA (not the system roots); a client certificate and key are sent
//! for mutual TLS (`tls-auth-clients yes`). Verification cannot be turned off: a config
//! with `danger_accept_invalid_certs`, or a `rediss://...#insecure` URL, is refused. A
//! failed handshake is reported as such ("TLS handshake with Redis failed: certificate
//! signed by an unknown CA ..."), not as an unreachable Redis.
//!
//! # Durability
//! Redis acknowledges writes before they reach disk. A Redis without
//! `appendonly yes` + `appendfsync always` (or with `everysec`, the usual setting,
//! about one second of writes) can forget recent `done` records when it crashes or
//! fails over to a replica that had not received them; a redelivery of those messages
//! then runs the handler again (a duplicate effect). For effects that must never
//! repeat, use the SQL transactional inbox (`idem-sql`).

#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings), allow(dead_code, unused_variables))))]

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem_core::dedup::{Claim, Completion, DedupStore, OwnerToken, ScopedKey, StoreError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idem";

// Claim: absent -> processing(owner, lease). Done -> report it. Processing under our
// own token (a retried claim whose first reply was lost) -> acquired; else busy.
const CLAIM: &str = r"
local s = redis.call('HGET', KEYS[1], 's')
if not s then
  redis.call('DEL', KEYS[1])
  if ARGV[3] == '1' then
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1], 'f', ARGV[4])
  else
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'a'}
end
if s == 'd' then
  local c = redis.call('HGET', KEYS[1], 'c') or 's'
  local f = redis.call('HGET', KEYS[1], 'f')
  if f then return {'d', c, '1', f} end
  return {'d', c, '0', ''}
end
if redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'a'}
end
return {'b', tostring(redis.call('PTTL', KEYS[1]))}
";

// CLAIM, counting starts in KEYS[2] (the message's start counter, kept ARGV[5] ms):
// an acquisition adds one and reports the earlier count; a claim retried under its own
// token reports the count it saw the first time.
const CLAIM_COUNTING: &str = r"
local s = redis.call('HGET', KEYS[1], 's')
if not s then
  redis.call('DEL', KEYS[1])
  if ARGV[3] == '1' then
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1], 'f', ARGV[4])
  else
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local n = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
  redis.call('SET', KEYS[2], n + 1, 'PX', ARGV[5])
  return {'a', tostring(n)}
end
if s == 'd' then
  local c = redis.call('HGET', KEYS[1], 'c') or 's'
  local f = redis.call('HGET', KEYS[1], 'f')
  if f then return {'d', c, '1', f} end
  return {'d', c, '0', ''}
end
if redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local n = tonumber(redis.call('GET', KEYS[2]) or '1') or 1
  return {'a', tostring(math.max(n - 1, 0))}
end
return {'b', tostring(redis.call('PTTL', KEYS[1]))}
";

const EXTEND: &str = r"
if redis.call('HGET', KEYS[1], 's') == 'p' and redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

// A retried completion that finds its own completion already written succeeds.
const COMPLETE: &str = r"
local s = redis.call('HGET', KEYS[1], 's')
if s == 'p' and redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  redis.call('HSET', KEYS[1], 's', 'd', 'c', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
if s == 'd' and redis.call('HGET', KEYS[1], 'o') == ARGV[1] and redis.call('HGET', KEYS[1], 'c') == ARGV[2] then
  return 1
end
return 0
";

const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 's') == 'p' and redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
";

// done(poisoned) -> processing(owner). A retried reopen that finds its own claim succeeds.
const REOPEN: &str = r"
local s = redis.call('HGET', KEYS[1], 's')
if s == 'd' and redis.call('HGET', KEYS[1], 'c') == 'p' then
  redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1])
  redis.call('HDEL', KEYS[1], 'c')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if s == 'p' and redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  return 1
end
return 0
";

struct Scripts {
    claim: Script,
    claim_counting: Script,
    extend: Script,
    complete: Script,
    release: Script,
    reopen: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            claim: Script::new(CLAIM),
            claim_counting: Script::new(CLAIM_COUNTING),
            extend: Script::new(EXTEND),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
            reopen: Script::new(REOPEN),
        }
    }
}

/// A [`DedupStore`] on Redis. See the [crate docs](crate) for the key layout, failure
/// handling and the durability caveat. Cheap to clone (clones share one multiplexed
/// connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
    target: Arc<Redactor>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.target.redacted)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Configures and connects a [`RedisStore`]. Defaults: prefix [`DEFAULT_PREFIX`],
/// connect timeout 500 ms, response timeout 1 s, 2 reconnect retries 50-200 ms apart.
/// With these a dead Redis fails an operation in well under a second (a refused
/// connection in about 0.1-0.3 s; an unreachable host after about 3 connect timeouts).
#[derive(Clone)]
pub struct RedisStoreBuilder {
    url: String,
    tls: idem_core::TlsConfig,
    prefix: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    retries: usize,
    min_delay: Duration,
    max_delay: Duration,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("tls", &self.tls)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    /// Key prefix (default `idem`), e.g. one per application sharing a Redis.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long to wait for a TCP connection (default 500 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long to wait for a reply (default 1 s). After a timeout the late reply
    /// can delay the next command on the shared connection too.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Reconnect attempts per failure, and the delay bounds between them (default 2,
    /// 50 ms to 200 ms, exponential).
    pub fn reconnect(mut self, retries: usize, min_delay: Duration, max_delay: Duration) -> Self {
        self.retries = retries;
        self.min_delay = min_delay;
        self.max_delay = max_delay.max(min_delay);
        self
    }

    /// TLS settings for a `rediss://` URL: a private CA (trusted instead of the
    /// system roots), a client certificate and key (mutual TLS). Default: verified
    /// against the system roots. See the [crate docs](crate#tls).
    pub fn tls(mut self, tls: idem_core::TlsConfig) -> Self {
        self.tls = tls;
        self
    }

    fn client(&self, target: &Redactor) -> Result<redis::Client, StoreError> {
        let tls_url = is_rediss(&self.url);
        if tls_url && (self.tls.accepts_invalid_certs() || self.url.contains("#insecure")) {
            return Err(StoreError::new(format!(
                "refusing to connect to Redis at {} without certificate verification: give the server's CA with a CA file instead",
                target.redacted
            )));
        }
        #[cfg(feature = "tls")]
        if tls_url && !self.tls.is_default() {
            let certificates = redis::TlsCertificates {
                client_tls: self.tls.client_identity_pem().map(|(cert, key)| {
                    redis::ClientTlsConfig {
                        client_cert: cert.to_vec(),
                        client_key: key.to_vec(),
                    }
                }),
                root_cert: self.tls.ca_pem().map(<[u8]>::to_vec),
            };
            return redis::Client::build_with_tls(self.url.as_str(), certificates)
                .map_err(|e| target.error("invalid Redis URL or TLS files", &e));
        }
        redis::Client::open(self.url.as_str()).map_err(|e| target.error("invalid Redis URL", &e))
    }

    fn parts(&self) -> Result<(redis::Client, ConnectionManagerConfig, Redactor), StoreError> {
        let target = Redactor::new(&self.url);
        let client = self.client(&target)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(self.retries)
            .set_min_delay(self.min_delay)
            .set_max_delay(self.max_delay)
            .set_exponent_base(2.0);
        Ok((client, config, target))
    }

    fn finish(&self, conn: ConnectionManager, target: Redactor) -> RedisStore {
        RedisStore {
            conn,
            prefix: self.prefix.as_str().into(),
            scripts: Arc::new(Scripts::new()),
            target: Arc::new(target),
        }
    }

    /// Connects now: fails if Redis is unreachable (fast, see the defaults).
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let (client, config, target) = self.parts()?;
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| target.connect_error("cannot connect to Redis", &e))?;
        Ok(self.finish(conn, target))
    }

    /// Connects on first use: never fails for an unreachable Redis (the operations do,
    /// with a [`StoreError`], until it is reachable).
    pub fn connect_lazy(self) -> Result<RedisStore, StoreError> {
        let (client, config, target) = self.parts()?;
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| target.error("cannot set up the Redis connection", &e))?;
        Ok(self.finish(conn, target))
    }
}

impl RedisStore {
    /// Configures a store for `url` (`redis://[user:password@]host:port[/db]`,
    /// `rediss://` for TLS if redis-rs is built with TLS).
    pub fn builder(url: &str) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.to_owned(),
            tls: idem_core::TlsConfig::default(),
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_secs(1),
            retries: 2,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
        }
    }

    /// Connects with the default settings.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }

    /// A store on a connection manager you configured yourself.
    pub fn from_manager(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        let prefix: String = prefix.into();
        RedisStore {
            conn,
            prefix: prefix.into(),
            scripts: Arc::new(Scripts::new()),
            target: Arc::new(Redactor::new("redis://(configured manager)")),
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key holding `key`'s record (for inspection, tests and benchmarks).
    pub fn redis_key(&self, key: &ScopedKey) -> String {
        record_key(&self.prefix, key)
    }

    /// The underlying connection (shared, multiplexed): for inspection and tests.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Runs a script, retrying once at once if the connection had dropped (the
    /// manager reconnects in the background; see the crate docs for why a retry is
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

/// Remembers a URL's password so it can be scrubbed from error texts.
struct Redactor {
    redacted: String,
    secret: Option<String>,
}

impl Redactor {
    fn new(url: &str) -> Self {
        Redactor {
            redacted: redact_url(url),
            secret: userinfo(url)
                .map(|u| u.split_once(':').map_or(u, |(_, p)| p))
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        }
    }

    fn scrub(&self, text: &str) -> String {
        match &self.secret {
            Some(s) => text.replace(s.as_str(), "***"),
            None => text.to_owned(),
        }
    }

    fn error(&self, what: &str, err: &RedisError) -> StoreError {
        self.error_with(what, err, idem_core::TlsFailure::classify)
    }

    /// [`error`](Self::error) for a connection attempt: a reset during the TLS
    /// handshake counts as a TLS failure too.
    fn connect_error(&self, what: &str, err: &RedisError) -> StoreError {
        self.error_with(what, err, idem_core::TlsFailure::classify_tls_connect)
    }

    fn error_with(
        &self,
        what: &str,
        err: &RedisError,
        classify: fn(&str) -> Option<idem_core::TlsFailure>,
    ) -> StoreError {
        let detail = self.scrub(&err.to_string());
        if is_rediss(&self.redacted) {
            if let Some(failure) = classify(&detail) {
                return StoreError::with_source(
                    format!(
                        "TLS handshake with Redis failed ({}): {failure}; {}",
                        self.redacted,
                        failure.hint()
                    ),
                    detail,
                );
            }
        }
        StoreError::with_source(format!("{what} ({})", self.redacted), detail)
    }
}

fn is_rediss(url: &str) -> bool {
    url.trim_start()
        .get(..9)
        .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
}

fn userinfo(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    Some(&authority[..authority.rfind('@')?])
}

/// `url` with its password replaced by `***` (`redis://user:***@host:6379`); a lone
/// userinfo part (`redis://secret@host`) is replaced entirely.
///
/// ```
/// assert_eq!(
///     idem_redis::redact_url("redis://app:s3cret@cache:6379/0"),
///     "redis://app:***@cache:6379/0"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(info) = userinfo(url) else {
        return url.to_owned();
    };
    let start = url.find("://").map_or(0, |i| i + 3);
    let replaced = match info.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!(
        "{}{}{}",
        &url[..start],
        replaced,
        &url[start + info.len()..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("redis://:pw@h:1/2"), "redis://:***@h:1/2");
        assert_eq!(redact_url("redis://u:p@ss@h"), "redis://u:***@h");
        assert_eq!(redact_url("rediss://tok@h/0?x=@"), "rediss://***@h/0?x=@");
        let r = Redactor::new("redis://u:hunter2@h");
        assert_eq!(r.scrub("auth hunter2 failed"), "auth *** failed");
    }

    #[test]
    fn keys_are_unambiguous_and_one_slot() {
        let k = |c: &str, k: &str| record_key("idem", &ScopedKey::new(c, k));
        assert_ne!(k("a:b", "c"), k("a", "b:c"));
        assert_eq!(k("billing", "k1"), "idem:{7:billing:k1}");
        assert!(matches!(millis(Duration::ZERO), Arg::Int(1)));
    }
}
