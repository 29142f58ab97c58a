//! The core of [idem](https://docs.rs/idem): message consumers whose effects happen once.
//!
//! A consumer is a plain `async fn`. idem wraps it in a tower stack that classifies
//! failures (transient -> retry with backoff, permanent -> dead-letter at once),
//! deduplicates by idempotency key through a [`DedupStore`], and tells the transport
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

#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings), allow(dead_code, unused_variables))))]

pub mod backoff;
pub mod batch;
pub mod breaker;
pub mod classify;
#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;
pub mod consumer;
pub mod crash;
pub mod dedup;
pub mod error;
pub mod handler;
pub mod headers;
pub(crate) mod ident;
pub mod memory;
pub mod message;
pub mod ordered;
#[cfg(feature = "otel")]
pub mod otel;
pub mod outcome;
pub mod read;
pub mod redact;
pub mod run;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod text;
pub mod tls;

pub use backoff::{Backoff, Jitter};
pub use breaker::{BreakerConfig, CircuitBreaker};
pub use consumer::{ConfigError, Consumer, ConsumerBuilder, DeliveryContext, DeliveryMode, Stats};
pub use crash::{CrashLoopError, DEFAULT_CRASH_LIMIT};
pub use dedup::{DedupLayer, DedupStore, MemoryStore, Processed};
pub use error::{
    BoxError, ErrorKind, HandlerError, HandlerTimeoutError, IntoHandlerResult, ResultExt,
};
pub use handler::{
    Attempt, Body, FromMessage, Handler, HandlerService, IdempotencyKey, Json, Metadata,
    OptionalFromMessage, State,
};
pub use message::{
    DeliveryInfo, Extensions, HeaderValue, Headers, Message, Properties, UnmappedHeaders,
};
pub use outcome::{
    DeadLetterHook, DeadLettered, DelayKind, Disposition, Failure, SettleHook, Settled,
};
pub use run::WorkerHandle;
pub use tls::{TlsConfig, TlsConfigError, TlsFailure};

/// Plumbing shared between the idem crates. **Not public API**: anything here may
/// change or disappear in any release, without notice. Use the documented items of
/// this crate instead.
#[doc(hidden)]
pub mod __private {
    use std::future::Future;
    use std::pin::Pin;
    use std::time::Duration;

    use crate::error::HandlerError;

    pub use crate::batch::plumbing::{
        collected, extensions_mut, whole_batch_failure, with_scope, ItemScope,
    };
    pub use crate::dedup::admission::{admit, Admission, BatchEntry, Claimed, Reading};
    pub use crate::ident::split_table_name;
    pub use crate::redact::{redact_in, redact_url};
    pub use crate::text::{parse_rfc3339, rfc3339, truncate};

    /// A boxed `Send` future.
    pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

    /// The message is being processed elsewhere under a live lease: retry after `delay`
    /// without spending an attempt. For dedup stages only: a handler returning this
    /// would be retried forever.
    pub fn busy(delay: Duration) -> HandlerError {
        HandlerError::busy(delay)
    }
}
