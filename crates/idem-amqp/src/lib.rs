//! RabbitMQ transport for [idem](https://docs.rs/idem): runs an [`idem_core::Consumer`]
//! on a RabbitMQ queue, with retries as delayed messages in the broker, a dead-letter
//! queue, publisher confirms, reconnection and graceful shutdown.
//!
//! A [`Worker`] consumes a work queue `Q` with a bounded prefetch and concurrency,
//! turns each delivery into an idem [`Message`](idem_core::Message), runs the
//! consumer's stack (dedup, classification, backoff) and carries the outcome out:
//! ack; a retry copy to the delay queue `Q.retry.<tier>` (which dead-letters back to
//! `Q` when its TTL expires); or a copy with the failure headers to `Q.dlq`. Copies
//! are confirmed by the broker before the original is acked, so a crash gives a
//! duplicate (absorbed by dedup), never a loss. [`Topology`] declares those queues.
//! [`Publisher`] publishes with confirms and mandatory routing; it is the one publish
//! path of idem (the outbox relay and the `idem` CLI use it), with the one header rule
//! of [`headers`] and the replay rules of [`replay`]. Every connection takes one broker
//! URL or several ([`Endpoints`]: the first that answers, the next one after a loss).
//! [`Service`] runs several consumers in one process, with one metrics listener and
//! one graceful stop for all of them.
//!
//! ```no_run
//! use idem_amqp::{Publisher, Topology, Worker};
//! use idem_core::{Consumer, Json, Message, MemoryStore};
//!
//! #[derive(serde::Deserialize)]
//! struct Charge { cents: u64 }
//!
//! async fn charge(Json(c): Json<Charge>) -> Result<(), std::io::Error> {
//!     println!("charging {} cents", c.cents);
//!     Ok(())
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let url = idem_amqp::amqp_url_from_env();
//! let consumer = Consumer::builder("billing").store(MemoryStore::new()).handler(charge)?;
//! let worker = Worker::builder(&url, Topology::new("charges"), consumer)
//!     .prefetch(100)
//!     .build()?;
//!
//! let publisher = Publisher::connect(&url).await?;
//! let mut msg = Message::new(r#"{"cents":500}"#).with_message_id("charge-1");
//! publisher.publish("", "charges", &mut msg).await?; // confirmed by the broker
//!
//! let stats = worker.run_until_signal().await?; // Ctrl-C / SIGTERM: graceful stop
//! println!("{stats}");
//! # Ok(()) }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings), allow(dead_code, unused_variables))))]
#![deny(missing_docs)]

mod acks;
pub mod convert;
mod crash;
pub mod delayed;
pub mod endpoints;
pub mod error;
#[cfg(feature = "_failpoints")]
#[doc(hidden)]
pub mod failpoints;
pub mod headers;
pub mod health;
pub mod ordered;
#[cfg(feature = "prometheus")]
pub mod prometheus;
pub mod publisher;
pub mod readiness;
pub mod replay;
pub mod service;
pub mod shutdown;
pub mod tiers;
pub mod tls;
pub mod topology;
pub mod url;
pub mod worker;

pub use endpoints::Endpoints;
pub use error::Error;
pub use idem_core::{TlsConfig, TlsFailure};
pub use publisher::{connect, Outgoing, Publisher, PublisherBuilder, RawOutgoing};
pub use service::{Service, ServiceBuilder, ServiceStats};
pub use tiers::DelayTiers;
pub use tls::connect_tls;
pub use topology::{Binding, Exchange, ExchangeKind, QueueType, Topology};
pub use url::{amqp_url_from_env, redact_url, DEFAULT_AMQP_URL};
pub use worker::{Worker, WorkerBuilder};
