//! Transactional outbox: "the database changed but the message was never published"
//! cannot happen.
//!
//! A service that changes its database and publishes a message writes the message
//! into an outbox table *in the same transaction* as its own changes
//! ([`Outbox::enqueue`]). Nothing is published unless that transaction commits. A
//! [`Relay`] then publishes committed rows to RabbitMQ with publisher confirms and only
//! afterwards marks them published. A relay that dies after publishing but before
//! marking publishes the row again: each row carries a stable UUIDv7 idempotency key
//! that becomes its AMQP `message_id`, so the consumer's dedup absorbs the copy.
//!
//! PostgreSQL is supported (SQLite and MariaDB relays are not implemented yet: see the
//! README). Several relays may run at once: rows are leased with `FOR UPDATE SKIP
//! LOCKED`, and rows that share an ordering key are published in the order they were
//! enqueued while different keys go in parallel. Relays wake up on `LISTEN/NOTIFY` and
//! poll as a fallback.
//!
//! ```no_run
//! use idem_outbox::{Outbox, OutboxMessage, Relay};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
//! let outbox = Outbox::new("idem_outbox")?;
//! outbox.ensure_schema(&pool).await?;
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE accounts SET cents = cents - 500 WHERE id = 1")
//!     .execute(&mut *tx)
//!     .await?;
//! let id = outbox
//!     .enqueue(&mut tx, OutboxMessage::new("", "deposits", br#"{"to":2,"cents":500}"#.to_vec())
//!         .ordering_key("account-2"))
//!     .await?;
//! tx.commit().await?; // the withdrawal and the message, or neither
//! println!("enqueued {id}");
//!
//! let relay = Relay::builder(pool, outbox, "amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .connection_name("billing-outbox")
//!     .build();
//! relay.run(tokio::signal::ctrl_c().map(|_| ())).await?;
//! # Ok(()) }
//! # use futures_util::FutureExt;
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings), allow(dead_code, unused_variables))))]

mod error;
#[cfg(feature = "inbox")]
#[cfg_attr(docsrs, doc(cfg(feature = "inbox")))]
pub mod follow_up;
pub mod hosted;
mod message;
#[cfg(feature = "otel")]
mod otel;
mod relay;
mod schema;

pub use error::OutboxError;
#[cfg(feature = "inbox")]
pub use follow_up::{follow_up_id, follow_up_id_at};
pub use message::OutboxMessage;
pub use relay::{Relay, RelayBuilder, RelayStats};
pub use schema::{Outbox, OutboxStatus};
