//! [`Tx`]: the inbox's open transaction, as the handler receives it.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use idem_core::{FromMessage, HandlerError, Message};
use sqlx::Transaction;
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use crate::backend::Backend;

pub(crate) type Slot<DB> = Arc<Mutex<Option<Transaction<'static, DB>>>>;

/// The inbox's open transaction, as the handler receives it.
///
/// Lock it with [`conn`](Self::conn) and run your statements on the connection; do
/// not commit or roll back yourself: the inbox commits when the handler returns `Ok`
/// (your writes and the dedup row together) and rolls back on an error.
///
/// ```no_run
/// use idem_core::HandlerError;
/// use idem_sql::Tx;
/// use sqlx::Postgres;
///
/// async fn charge(tx: Tx<Postgres>) -> Result<(), HandlerError> {
///     let mut conn = tx.conn().await?;
///     sqlx::query("INSERT INTO charges (cents) VALUES ($1)")
///         .bind(500_i64)
///         .execute(&mut *conn)
///         .await?;
///     Ok(())
/// }
/// ```
pub struct Tx<DB: Backend> {
    slot: Slot<DB>,
    scope: Arc<Scope>,
}

/// Who the transaction is for: the consumer and the dedup key of the message being
/// handled, and how many follow-ups it has numbered so far.
#[derive(Debug)]
pub(crate) struct Scope {
    pub(crate) consumer: Arc<str>,
    pub(crate) key: String,
    pub(crate) follow_ups: AtomicU32,
}

/// The accessors [`Tx`] and [`TxConn`] share: what they read is the message's
/// [`Scope`] (a `TxConn` counts follow-ups on its `Tx`'s counter).
macro_rules! scope_accessors {
    () => {
        /// The name of the consumer handling the message (the scope of its dedup key).
        pub fn consumer(&self) -> &str {
            &self.scope.consumer
        }

        /// The message's idempotency key, as the inbox recorded it.
        pub fn key(&self) -> &str {
            &self.scope.key
        }

        /// The position of the next follow-up message of this handler run: 0, then 1, ...
        /// Each call takes one position; every run of the handler (a retry, a redelivery
        /// after a crash) starts again at 0, so a handler that publishes its follow-ups in
        /// a fixed order numbers them the same way on every run. The consumer outbox
        /// (`idem_outbox::Outbox::enqueue_follow_up`) derives follow-up ids from it.
        pub fn next_follow_up(&self) -> u32 {
            self.scope.follow_ups.fetch_add(1, Ordering::Relaxed)
        }
    };
}

impl<DB: Backend> fmt::Debug for Tx<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

/// The inbox has already committed or rolled back this message's transaction (the
/// handler used its [`Tx`] after returning, e.g. from a spawned task).
#[derive(Debug, thiserror::Error)]
#[error("the inbox transaction of this message is already finished")]
pub struct TxClosed;

/// The handler takes a [`Tx`] but the consumer does not dedup through a
/// [`SqlInbox`](crate::SqlInbox) of the same database. Permanent (a configuration error).
#[derive(Debug, thiserror::Error)]
#[error(
    "handler takes a Tx but the consumer has no SQL inbox for this database (use .dedup(inbox))"
)]
pub struct NoInbox;

impl<DB: Backend> Tx<DB> {
    /// Used by the PostgreSQL batch path only.
    #[cfg(feature = "postgres")]
    pub(crate) fn from_parts(slot: Slot<DB>, scope: Arc<Scope>) -> Self {
        Tx { slot, scope }
    }

    /// Locks the transaction for a few statements. Keep the guard only while you use
    /// it if you run work concurrently inside the handler, and do not lock again while
    /// you hold it: a second `conn()` in the same handler waits for the first guard to
    /// be dropped. What needs the transaction while you hold a guard takes the guard
    /// itself (the consumer outbox's `enqueue_follow_up(&mut conn, ..)` does).
    pub async fn conn(&self) -> Result<TxConn<'_, DB>, TxClosed> {
        MutexGuard::try_map(self.slot.lock().await, Option::as_mut)
            .map(|guard| TxConn {
                guard,
                scope: &self.scope,
            })
            .map_err(|_| TxClosed)
    }

    scope_accessors!();
}

/// A locked [`Tx`]: dereferences to the database connection (`&mut *conn` is an
/// executor), and knows the message it was opened for, like the `Tx`.
pub struct TxConn<'a, DB: Backend> {
    guard: MappedMutexGuard<'a, Transaction<'static, DB>>,
    scope: &'a Scope,
}

impl<DB: Backend> TxConn<'_, DB> {
    scope_accessors!();
}

impl<DB: Backend> fmt::Debug for TxConn<'_, DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxConn").finish_non_exhaustive()
    }
}

impl<DB: Backend> Deref for TxConn<'_, DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.guard
    }
}

impl<DB: Backend> DerefMut for TxConn<'_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.guard
    }
}

/// The extension through which the inbox hands its transaction to [`Tx`].
pub(crate) struct InboxTx<DB: Backend>(pub(crate) Slot<DB>, pub(crate) Arc<Scope>);

impl<DB: Backend, S> FromMessage<S> for Tx<DB> {
    fn from_message(msg: &Message, _state: &S) -> Result<Self, HandlerError> {
        msg.extensions
            .get::<InboxTx<DB>>()
            .map(|t| Tx {
                slot: t.0.clone(),
                scope: t.1.clone(),
            })
            .ok_or_else(|| HandlerError::permanent(NoInbox))
    }
}
