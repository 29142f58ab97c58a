//! The core of [idem](https://docs.rs/idem): message consumers whose effects happen once.
//!
//! A consumer is a plain `async fn`. idem wraps it in a tower stack that classifies
//! failures (transient -> retry with backoff, permanent -> dead-letter at once),
//! deduplicates by idempotence key through a [`DedupStore`], and tells the transport
//! what to do with each delivery ([`Disposition`]). This crate holds everything that
//! does not depend on a broker or a database, plus an in-memory broker and store so the
//! whole stack runs with no services.
//!
//! ```
//! use idem_core::memory::MemoryBroker;
//! use idem_core::{Consumer, HandlerError, IdempotencyKey, Json, Message, MemoryStore};
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
//! for _ in 0..2 {
//!     broker.publish("charges", Message::new(r#"{"cents":500}"#).with_message_id("charge-1"));
//! }
//! let consumer = Consumer::builder("billing").store(MemoryStore::new()).handler(charge)?;
//! let stats = broker.worker("charges", consumer).run_until_idle().await;
//! assert_eq!(stats.to_string(), "processed=1 duplicates=1 retries=0 dead_lettered=0");
//! # Ok(()) }
//! ```

pub mod backoff;
pub mod breaker;
pub mod classify;
pub mod consumer;
pub mod crash;
pub mod dedup;
pub mod error;
pub mod handler;
pub mod memory;
pub mod message;
pub mod outcome;
pub mod read;
mod redact;
pub mod run;
pub mod tls;

pub use backoff::{Backoff, Jitter};
pub use breaker::{BreakerConfig, CircuitBreaker};
pub use consumer::{ConfigError, Consumer, ConsumerBuilder, DeliveryMode, Stats};
pub use crash::{CrashGuard, CrashLoopError, DEFAULT_CRASH_LIMIT};
pub use dedup::{DedupLayer, DedupStore, MemoryStore, Processed};
pub use error::{
    BoxError, ErrorKind, HandlerError, HandlerTimeoutError, IntoHandlerResult, ResultExt,
};
pub use handler::{
    Attempt, Body, FromMessage, Handler, HandlerService, IdempotencyKey, Json, Metadata, State,
};
pub use message::{
    DeliveryInfo, Extensions, HeaderValue, Headers, Message, Properties, UnmappedHeaders,
};
pub use outcome::{DelayKind, Disposition, Failure, SettleHook, Settled};
pub use redact::{redact_in, redact_url};
pub use run::WorkerHandle;
pub use tls::{TlsConfig, TlsConfigError, TlsFailure};
