//! SQL dedup for [idem](https://docs.rs/idem) on PostgreSQL, SQLite and MariaDB/MySQL
//! (through sqlx 0.8): a lease store ([`SqlStore`]) with the same semantics as the
//! Redis store, and the **transactional inbox** ([`SqlInbox`]) whose dedup row commits
//! in the same transaction as the handler's own writes (exactly-once effect).
//!
//! ```no_run
//! use idem_core::{Consumer, HandlerError, IdempotencyKey};
//! use idem_sql::{SqliteInbox, Tx};
//! use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
//! use sqlx::Sqlite;
//!
//! async fn record(key: IdempotencyKey, tx: Tx<Sqlite>) -> Result<(), HandlerError> {
//!     let mut conn = tx.conn().await?;
//!     sqlx::query("INSERT INTO payments (id) VALUES (?)")
//!         .bind(key.as_str())
//!         .execute(&mut *conn)
//!         .await?;
//!     Ok(()) // commits the payment and the dedup row together
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let opts = SqliteConnectOptions::new().filename("app.db").create_if_missing(true);
//! let pool = SqlitePoolOptions::new().connect_with(opts).await?;
//! let inbox = SqliteInbox::new(pool);
//! inbox.ensure_schema().await?;                  // CREATE TABLE IF NOT EXISTS idem_inbox ...
//! let _cleanup = inbox.spawn_cleanup(std::time::Duration::from_secs(60));
//! let consumer = Consumer::builder("payments").dedup(inbox).handler(record)?;
//! # let _ = consumer; Ok(()) }
//! ```
//!
//! # Which one
//! - [`SqlStore`] (`PgStore`, `SqliteStore`, `MySqlStore`): a [`DedupStore`](idem_core::DedupStore)
//!   for `Consumer::builder(name).store(store)`. Claims are leases (owner token,
//!   expiry) as in Redis; the handler's effects are separate from the dedup record,
//!   so a crash between the effect and `complete` can repeat the effect after the
//!   lease expires.
//! - [`SqlInbox`] (`PgInbox`, `SqliteInbox`, `MySqlInbox`): for handlers that write to
//!   the same database. The handler takes a [`Tx`]; commit = effect + dedup record.
//!
//! # Schema
//! The library never uses sqlx's `_sqlx_migrations` table, so it cannot collide with
//! your migrations. Call `ensure_schema()` at start-up (`CREATE TABLE IF NOT EXISTS`,
//! idempotent, safe when many workers start at once) or create the table yourself
//! with the same layout: primary key `(consumer, idem_key)`, columns `state`, `owner`,
//! `fingerprint`, `expires_at` (BIGINT milliseconds since the Unix epoch, by the
//! database clock) and an index on `expires_at`. Table names are configurable
//! (defaults `idem_dedup` and `idem_inbox`) and validated as identifiers
//! ([`TableName`]). Expired rows are deleted by `spawn_cleanup(interval)` in batches
//! of [`CLEANUP_BATCH`] rows per statement (PostgreSQL: `FOR UPDATE SKIP LOCKED`).
//!
//! # Failures
//! Any database error (connection refused or killed, pool timeout) is a
//! [`StoreError`](idem_core::dedup::StoreError): a transient failure, retried, never
//! a duplicate, and counted by the consumer's circuit breaker (`idem_core::breaker`),
//! which pauses the consumer after a few in a row instead of spending attempts. The
//! pool replaces dead connections by itself. No store step waits longer than the store
//! timeout (default 5 s, pool wait included, whatever the pool's own
//! `acquire_timeout`): `DedupLayer::store_timeout` for [`SqlStore`],
//! [`SqlInbox::store_timeout`] for the inbox.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings), allow(dead_code, unused_variables))))]

mod backend;
mod inbox;
mod schema;
mod store;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub mod tls;

pub use backend::Backend;
pub use inbox::{NoInbox, SqlInbox, Tx, TxClosed, TxConn, DEFAULT_INBOX_TABLE};
pub use schema::{CleanupHandle, InvalidTableName, TableName, CLEANUP_BATCH};
pub use store::{SqlStore, DEFAULT_STORE_TABLE};

/// Lease store on PostgreSQL.
#[cfg(feature = "postgres")]
pub type PgStore = SqlStore<sqlx::Postgres>;
/// Lease store on SQLite.
#[cfg(feature = "sqlite")]
pub type SqliteStore = SqlStore<sqlx::Sqlite>;
/// Lease store on MariaDB / MySQL.
#[cfg(feature = "mysql")]
pub type MySqlStore = SqlStore<sqlx::MySql>;

/// Transactional inbox on PostgreSQL.
#[cfg(feature = "postgres")]
pub type PgInbox = SqlInbox<sqlx::Postgres>;
/// Transactional inbox on SQLite.
#[cfg(feature = "sqlite")]
pub type SqliteInbox = SqlInbox<sqlx::Sqlite>;
/// Transactional inbox on MariaDB / MySQL.
#[cfg(feature = "mysql")]
pub type MySqlInbox = SqlInbox<sqlx::MySql>;

pub use sqlx;
