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
//! with fields `s` state, `o` owner token, `f` payload fingerprint, `c` completion),
//! and its start counter is the same key plus `:n`. Every script touches only those two
//! keys (declared in `KEYS`), and the braces make a hash tag, so each message lives in
//! exactly one Redis Cluster slot and the scripts run unchanged on a cluster. The
//! consumer name is length-prefixed so that no two (consumer, key) pairs share a key.
//!
//! Give several URLs, comma-separated, to talk to a Redis Cluster (or one seed URL and
//! [`RedisStoreBuilder::cluster`]):
//!
//! ```no_run
//! # async fn f() -> Result<(), idem_core::dedup::StoreError> {
//! let store = idem_redis::RedisStore::builder(
//!     "redis://10.0.0.1:6379,redis://10.0.0.2:6379,redis://10.0.0.3:6379",
//! )
//! .connect()
//! .await?;
//! assert!(store.is_cluster());
//! # Ok(()) }
//! ```
//!
//! In cluster mode the store uses redis-rs's cluster client: it learns the slot map
//! from whichever seed answers, sends each script to the master of the message's slot,
//! follows `MOVED`/`ASK` redirects and refreshes the map when a master fails and its
//! replica is promoted. While a failover is under way (the cluster's
//! `cluster-node-timeout` plus the election, a few seconds) operations on the failed
//! master's slots fail with a [`StoreError`], which the consumer treats as transient
//! like any store outage. Reads never go to replicas (a replica may lag its master).
//!
//! # Batching
//! Deliveries handled at the same time share script calls. An operation (claim,
//! complete, release, extend, reopen) submitted while no call of this store is in
//! flight is sent at once, alone: a lone message pays one round trip per step, as with
//! a script per operation, and nothing ever waits for a timer. Operations submitted
//! while a call is in flight queue up and leave together, in order, as one `EVALSHA` of
//! a batch script as soon as that call returns; at most
//! [`RedisStoreBuilder::max_batch`] operations per call (default
//! [`DEFAULT_MAX_BATCH`](idem_core::dedup::DEFAULT_MAX_BATCH)), the rest in the
//! following calls. The queue holds one entry per waiting caller, so it is bounded by
//! the consumer's prefetch. Under load a worker with prefetch 200 thus pays about one
//! script call per batch instead of two per message. `max_batch(1)` turns batching
//! off (one script call per operation, concurrent callers' calls in flight together).
//!
//! The batch script runs each operation's own script (the `.lua` file it had when it
//! was a call of its own) with that operation's keys and arguments, one after
//! another: Redis runs a script without any other command in between, so every
//! operation is exactly the atomic, owner-fenced step it is alone, with the same
//! answer. The batch as a whole is not a transaction: an operation that raises an
//! error inside Redis (a key of the wrong type) fails with its own [`StoreError`] and
//! the others in the call go on. A call that fails as a whole (connection lost,
//! response timeout) fails every operation in it, each caller with its own copy of the
//! error; the dedup layer treats each as the transient store failure it is. The call
//! runs in a task of its own: a caller that gives up (the dedup layer's
//! `store_timeout`) loses only its own answer, and an operation whose caller gave up
//! before it was sent is not sent at all.
//!
//! A [batch handler](idem_core::batch)'s claims, completions and releases come as
//! calls on many keys ([`DedupStore::claim_many`], `complete_many`, `release_many`):
//! each is sent at once as script calls of its own, not through the queue: one
//! `EVALSHA` for up to [`RedisStoreBuilder::max_batch`] operations (more: one call
//! per `max_batch`, all in flight together), split by slot on a cluster as below.
//!
//! On a Redis Cluster the keys of one script call must share a hash slot, so a batch
//! is split by slot ([CRC16 of the hash tag](https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags),
//! as Redis computes it) into one script call per slot, all sent at once over the
//! cluster connection (each to its slot's master). Messages rarely share a slot, so on
//! a cluster batching saves the queueing of round trips rather than their number.
//!
//! # Failures
//! Redis down, a dropped connection or a timeout is a [`StoreError`], which the dedup
//! layer treats as transient (retry later, never "duplicate") and the consumer's
//! circuit breaker counts (`idem_core::breaker`: after a few in a row the consumer
//! pauses instead of spending attempts). The connection manager reconnects by itself;
//! the first command after a dropped connection fails, and the first command after
//! Redis comes back gets the stale error of the manager's last failed reconnect
//! (`Connection refused`), so each script call is retried once at once when the
//! connection was dropped or refused (the retry waits for a fresh reconnect). That
//! retry is safe because every operation is idempotent for its own owner token (a claim
//! that finds the key held by its own token reports `Acquired`, a completion that finds
//! its own completion reports success). Connecting and reconnecting are bounded (see
//! [`RedisStoreBuilder`]) so that a dead Redis fails in well under a second instead of
//! hanging. Passwords in `REDIS_URL` never appear in errors or logs
//! ([`idem_core::redact::redact_url`]).
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
//! then runs the handler again (a duplicate effect). The same holds for a Redis Cluster
//! failover: replication is asynchronous, so the promoted replica may not have the
//! master's last acknowledged writes (a `done` record, or a claim, which another worker
//! can then take while the first still runs). For effects that must never repeat, use
//! the SQL transactional inbox (`idem-sql`).

#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings), allow(dead_code, unused_variables))))]

mod builder;
mod connection;
mod scripts;
mod store;

#[cfg(doc)]
use idem_core::dedup::{DedupStore, StoreError};

pub use builder::RedisStoreBuilder;
pub use connection::RedisConnection;
pub use store::RedisStore;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idem";
