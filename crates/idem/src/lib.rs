//! idem: message consumers whose effects happen once.
//!
//! Brokers such as RabbitMQ deliver at least once: a message can arrive twice. idem
//! lets you write a consumer as a plain `async fn` and wraps it in a tower stack that
//!
//! - deduplicates by idempotency key (in memory, Redis or SQL, including a
//!   transactional inbox where the dedup record commits with the handler's writes);
//! - classifies failures: transient -> retry with backoff, permanent -> dead-letter
//!   queue at once ("poison ack");
//! - schedules retries as messages in the broker, so they survive crashes and never
//!   block the queue.
//!
//! This facade re-exports [`idem_core`] at its root; the rest comes behind features:
//!
//! | feature | module | what |
//! |---|---|---|
//! | `amqp` | [`idem::amqp`](https://docs.rs/idem-amqp) | RabbitMQ worker, topology, publisher |
//! | `prometheus` | `idem::amqp::prometheus` | the worker's metrics served in the Prometheus text format (implies `amqp`) |
//! | `outbox` | [`idem::outbox`](https://docs.rs/idem-outbox) | transactional outbox and relay (PostgreSQL) |
//! | `redis` | [`idem::redis`](https://docs.rs/idem-redis) | Redis lease store |
//! | `postgres`, `sqlite`, `mysql` | [`idem::sql`](https://docs.rs/idem-sql) | SQL lease store and transactional inbox |
//! | `otel` | `idem::otel` | W3C trace context (`traceparent`) across publish, outbox, consume, retry and dead-letter copies, through OpenTelemetry |
//! | `testing` | `idem::testing` | test harness: redelivers, duplicates and crashes your consumer and checks its effects (for dev-dependencies) |
//! | `conformance` | `idem::conformance` | the behavioural suite every dedup store must pass, for authors of a `DedupStore` (for dev-dependencies) |
//! | `tls` (default) | [`TlsConfig`] | TLS (rustls) for `amqps://`, `rediss://` and SQL `sslmode`, verified against the system roots by default |
//!
//! ```
//! use idem::memory::MemoryBroker;
//! use idem::{Consumer, HandlerError, IdempotencyKey, Json, Message, MemoryStore};
//!
//! #[derive(serde::Deserialize)]
//! struct Charge { cents: u64 }
//!
//! async fn charge(key: IdempotencyKey, Json(c): Json<Charge>) -> Result<(), HandlerError> {
//!     println!("charging {} cents for {key}", c.cents);
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = MemoryBroker::new();
//! broker.publish("charges", Message::new(r#"{"cents":500}"#).with_message_id("c-1"));
//! broker.publish("charges", Message::new(r#"{"cents":500}"#).with_message_id("c-1"));
//! let consumer = Consumer::builder("billing").store(MemoryStore::new()).handler(charge)?;
//! let stats = broker.worker("charges", consumer).run_until_idle().await;
//! assert_eq!((stats.processed, stats.duplicates), (1, 1));
//! # Ok(()) }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings), allow(dead_code, unused_variables))))]
#![deny(missing_docs)]

pub use idem_core::*;

/// The RabbitMQ transport (feature `amqp`).
#[cfg(feature = "amqp")]
pub use idem_amqp as amqp;

/// The Redis dedup store (feature `redis`).
#[cfg(feature = "redis")]
pub use idem_redis as redis;

/// SQL lease store and transactional inbox (features `postgres`, `sqlite`, `mysql`).
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "mysql"))]
pub use idem_sql as sql;

/// The transactional outbox (feature `outbox`).
#[cfg(feature = "outbox")]
pub use idem_outbox as outbox;
