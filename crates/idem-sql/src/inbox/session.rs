//! One message's admission through the inbox: the storage steps that
//! [`admit`](idem_core::__private::admit) calls.
//!
//! The claim is the open transaction: `claim` records the start (crash counting),
//! begins the transaction and inserts the dedup row in it; the handler receives the
//! transaction; `succeeded` commits it, every other outcome rolls it back.

use std::sync::Arc;

use idem_core::__private::{Admission, Claimed};
use idem_core::dedup::{Completion, StoreError, StoreErrorKind};
use idem_core::{HandlerError, Message};
use sqlx::Transaction;
use tokio::sync::Mutex;

use super::tx::{InboxTx, Scope, Slot, TxClosed};
use super::SqlInbox;
use crate::backend::{Arg, Backend, Dialect};
use crate::store::{ms, POISONED, SUCCEEDED};

fn text(s: &str) -> Arg {
    Arg::Text(s.to_owned())
}

/// One message of consumer `consumer`, key `key`: what does not change during its
/// admission (shared by reference across awaits, so it holds no transaction).
pub(crate) struct Keyed<DB: Backend> {
    inbox: Arc<SqlInbox<DB>>,
    consumer: Arc<str>,
    key: String,
    fingerprint: Option<String>,
}

/// One message's admission: its [`Keyed`] part and its transaction.
pub(crate) struct InboxSession<DB: Backend> {
    k: Keyed<DB>,
    /// The claim's transaction, until the handler receives it.
    tx: Option<Transaction<'static, DB>>,
    /// The transaction while (and after) the handler has it.
    slot: Option<Slot<DB>>,
}

impl<DB: Backend> InboxSession<DB> {
    /// A session for `key`; refuses (permanent) a key or consumer name the inbox's
    /// columns cannot hold.
    pub(crate) fn open(
        inbox: Arc<SqlInbox<DB>>,
        consumer: Arc<str>,
        key: &str,
        fingerprint: Option<&str>,
    ) -> Result<Self, HandlerError> {
        if let Err(m) = DB::DIALECT.check_lengths(&consumer, key, None, fingerprint) {
            return Err(HandlerError::permanent(StoreError::new(format!(
                "SQL inbox cannot record key {key:?}: {m}"
            ))));
        }
        Ok(InboxSession {
            k: Keyed {
                inbox,
                consumer,
                key: key.to_owned(),
                fingerprint: fingerprint.map(str::to_owned),
            },
            tx: None,
            slot: None,
        })
    }

    /// The transaction, wherever it is now (the handler's copy is emptied, so a
    /// [`Tx`](super::Tx) kept past the handler finds it closed).
    async fn take_tx(&mut self) -> Option<Transaction<'static, DB>> {
        match (self.tx.take(), &self.slot) {
            (Some(tx), _) => Some(tx),
            (None, Some(slot)) => slot.lock().await.take(),
            (None, None) => None,
        }
    }

    /// Rolls back whatever the transaction holds. A rollback failure only closes the
    /// connection.
    async fn rollback(&mut self) {
        if let Some(tx) = self.take_tx().await {
            if let Err(err) = tx.rollback().await {
                tracing::debug!(error = %err, "inbox rollback failed; the connection is discarded");
            }
        }
    }
}

impl<DB: Backend> Keyed<DB> {
    fn keep(&self) -> Arg {
        Arg::Int(ms(self.inbox.settings.retention))
    }

    fn fp_arg(&self) -> Arg {
        Arg::OptText(self.fingerprint.clone())
    }

    /// Inserts (or takes over) the dedup row inside `conn`'s transaction, or reads
    /// the row that is there.
    async fn enter(&self, conn: &mut DB::Connection) -> Result<Claimed, sqlx::Error> {
        let (c, key, q) = (&*self.consumer, self.key.as_str(), &self.inbox.q);
        for _ in 0..4 {
            let args = vec![text(c), text(key), self.fp_arg(), self.keep()];
            // Blocks while another transaction holds an uncommitted row for this key.
            if DB::execute(&mut *conn, &q.insert_done, args).await? == 1 {
                return Ok(Claimed::Acquired);
            }
            let args = vec![text(c), text(key)];
            let Some((state, _, row_fp, left)) =
                DB::fetch_record(&mut *conn, &q.record_locked, args).await?
            else {
                continue; // deleted by cleanup in between
            };
            if left <= 0 {
                let args = vec![self.fp_arg(), self.keep(), text(c), text(key)];
                if DB::execute(&mut *conn, &q.take_expired, args).await? == 1 {
                    return Ok(Claimed::Acquired);
                }
                continue;
            }
            let completion = match state.as_str() {
                POISONED => Completion::Poisoned,
                SUCCEEDED => Completion::Succeeded,
                _ => return Ok(Claimed::Busy { retry_in: None }),
            };
            return Ok(Claimed::Done {
                completion,
                fingerprint: row_fp,
            });
        }
        Ok(Claimed::Busy { retry_in: None })
    }

    /// Records, in a short statement committed at once on `conn` (autocommit, before
    /// the message's transaction begins on the same connection), that the message
    /// starts now; returns how many earlier starts never settled.
    async fn count_start(&self, conn: &mut DB::Connection) -> Result<u32, sqlx::Error> {
        let inbox = &self.inbox;
        let (c, key) = (&*self.consumer, self.key.as_str());
        let args = vec![text(c), text(key), self.keep()];
        // PostgreSQL and SQLite return the new count from the upsert itself.
        let counted = match DB::DIALECT {
            Dialect::MySql => DB::execute(&mut *conn, &inbox.q.count_start, args)
                .await
                .map(|_| None),
            _ => DB::fetch_int(&mut *conn, &inbox.q.count_start, args).await,
        };
        let n = match counted {
            Ok(Some(n)) => n,
            Ok(None) => {
                let args = vec![text(c), text(key)];
                DB::fetch_int(&mut *conn, &inbox.q.read_start, args)
                    .await?
                    .unwrap_or(1)
            }
            Err(e) => return Err(e),
        };
        Ok(u32::try_from(n.saturating_sub(1)).unwrap_or(0))
    }

    /// Records the start and begins the message's transaction. On PostgreSQL the
    /// start goes out with those of concurrent deliveries (see `starts.rs`);
    /// elsewhere it is recorded on the connection that then begins the transaction
    /// (one pool acquire per message).
    async fn start(&self) -> Result<(Transaction<'static, DB>, u32), HandlerError> {
        if let Some(counter) = &self.inbox.starts {
            return self.start_batched(counter).await;
        }
        let (conn, earlier) = self
            .inbox
            .bounded("start count", async {
                let mut conn = self.inbox.pool.acquire().await?;
                let earlier = self.count_start(&mut conn).await?;
                Ok((conn, earlier))
            })
            .await?;
        match self.inbox.bounded("begin", DB::begin_on(conn)).await {
            Ok(tx) => Ok((tx, earlier)),
            Err(e) => {
                self.clear_start().await;
                Err(e)
            }
        }
    }

    /// [`start`](Self::start) with the batched counter: the count (committed when
    /// its answer arrives), then `BEGIN`. One after the other, never side by side:
    /// the batch takes a pool connection of its own, and a message must not hold
    /// one while it waits for the batch (a pool of one connection would wait for
    /// itself).
    async fn start_batched(
        &self,
        counter: &super::StartCounter,
    ) -> Result<(Transaction<'static, DB>, u32), HandlerError> {
        let limit = self.inbox.settings.effective_store_timeout();
        let keep = ms(self.inbox.settings.retention);
        let counted = tokio::time::timeout(limit, counter.count(&self.consumer, &self.key, keep));
        let earlier = match counted.await {
            Ok(Ok(n)) => u32::try_from(n.saturating_sub(1)).unwrap_or(0),
            Ok(Err(e)) => return Err(HandlerError::store_unavailable(e)),
            Err(_) => {
                // The count may have committed after all: a later success clears it.
                return Err(HandlerError::store_unavailable(
                    StoreError::new(format!(
                        "SQL inbox start count on table {} timed out after {limit:?} (store_timeout)",
                        self.inbox.table
                    ))
                    .with_kind(StoreErrorKind::Timeout),
                ));
            }
        };
        match self
            .inbox
            .bounded("begin", DB::begin(&self.inbox.pool))
            .await
        {
            Ok(tx) => Ok((tx, earlier)),
            Err(e) => {
                self.clear_start().await;
                Err(e)
            }
        }
    }

    /// The pre-commit guard, run in the message's transaction just before `COMMIT`:
    /// is our inbox row still there, in a transaction that is still alive? A
    /// PostgreSQL transaction in which a statement failed "commits" as a rollback
    /// without an error; in it every statement fails (`25P02`), this one included.
    /// A row the handler deleted (or a transaction it ended itself) reads as absent.
    ///
    /// On PostgreSQL the same statement also clears the start counter (a
    /// data-modifying CTE), so the guard costs no round trip of its own: the start
    /// settles with the effect. The other databases run the check and the clear as
    /// two statements.
    async fn guard(&self, conn: &mut DB::Connection) -> Result<bool, sqlx::Error> {
        let (c, key, q) = (&*self.consumer, self.key.as_str(), &self.inbox.q);
        let args = || vec![text(c), text(key)];
        if DB::DIALECT == Dialect::Postgres {
            let sql = &q.present_clearing_start;
            return Ok(DB::fetch_int(&mut *conn, sql, args()).await?.is_some());
        }
        if DB::fetch_int(&mut *conn, &q.present, args())
            .await?
            .is_none()
        {
            return Ok(false);
        }
        DB::execute(&mut *conn, &q.clear_start, args()).await?;
        Ok(true)
    }

    /// The message settled without committing (duplicate, failure, poison): forget
    /// its start. A failure here only leaves a counter that a later success clears.
    async fn clear_start(&self) {
        let inbox = &self.inbox;
        let key = self.key.as_str();
        let cleared = async {
            let mut conn = inbox.pool.acquire().await?;
            let args = vec![text(&self.consumer), text(key)];
            DB::execute(&mut *conn, &inbox.q.clear_start, args).await
        };
        let limit = inbox.settings.effective_store_timeout();
        match tokio::time::timeout(limit, cleared).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(key = %key, error = %e, "could not clear the start counter")
            }
            Err(_) => tracing::debug!(key = %key, "clearing the start counter timed out"),
        }
    }

    /// Records `poisoned` in a short statement of its own.
    async fn record_poison(&self) -> Result<(), sqlx::Error> {
        let mut conn = self.inbox.pool.acquire().await?;
        let (c, key, q) = (&*self.consumer, self.key.as_str(), &self.inbox.q);
        let args = vec![text(c), text(key), self.fp_arg(), self.keep()];
        if DB::execute(&mut *conn, &q.insert_poisoned, args).await? == 0 {
            let args = vec![self.fp_arg(), self.keep(), text(c), text(key)];
            DB::execute(&mut *conn, &q.mark_poisoned, args).await?;
        }
        Ok(())
    }
}

impl<DB: Backend> Admission for InboxSession<DB> {
    async fn claim(&mut self) -> Result<(Claimed, u32), HandlerError> {
        // The start is committed before the handler's transaction begins; see
        // `idem_core::crash`.
        let (mut tx, earlier) = self.k.start().await?;
        match self.k.inbox.bounded("claim", self.k.enter(&mut *tx)).await {
            Ok(found) => {
                self.tx = Some(tx);
                Ok((found, earlier))
            }
            Err(e) => {
                let _ = tx.rollback().await;
                self.k.clear_start().await;
                Err(e)
            }
        }
    }

    async fn reopen(&mut self) -> Result<bool, HandlerError> {
        let Some(mut tx) = self.tx.take() else {
            return Ok(false);
        };
        let (c, key) = (&*self.k.consumer, self.k.key.as_str());
        let args = vec![self.k.fp_arg(), self.k.keep(), text(c), text(key)];
        // The row is locked by `enter`: no one can change it in between.
        let reopened = DB::execute(&mut *tx, &self.k.inbox.q.reopen, args);
        let reopened = self.k.inbox.bounded("claim", reopened).await;
        self.tx = Some(tx);
        reopened.map(|n| n == 1)
    }

    async fn declined(&mut self) {
        // Nothing was written: a rollback failure only closes the connection.
        if let Some(tx) = self.take_tx().await {
            let _ = tx.rollback().await;
        }
        self.k.clear_start().await;
    }

    fn prepare(&mut self, msg: &mut Message) {
        let slot: Slot<DB> = Arc::new(Mutex::new(self.tx.take()));
        let scope = Arc::new(Scope {
            consumer: self.k.consumer.clone(),
            key: self.k.key.clone(),
            follow_ups: Default::default(),
        });
        msg.extensions.insert(InboxTx(slot.clone(), scope));
        self.slot = Some(slot);
    }

    async fn succeeded(&mut self) -> Result<(), HandlerError> {
        let Some(mut tx) = self.take_tx().await else {
            self.k.clear_start().await;
            return Err(HandlerError::transient(TxClosed));
        };
        // The start settles with the effect, in the same transaction.
        match self
            .k
            .inbox
            .bounded("pre-commit check", self.k.guard(&mut tx))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                let _ = tx.rollback().await;
                self.k.clear_start().await;
                return Err(HandlerError::transient(StoreError::new(
                    "the inbox row vanished from the transaction; rolled back",
                )));
            }
            Err(e) => {
                let _ = tx.rollback().await;
                self.k.clear_start().await;
                return Err(e);
            }
        }
        if let Err(e) = self.k.inbox.bounded("commit", tx.commit()).await {
            self.k.clear_start().await;
            return Err(e);
        }
        Ok(())
    }

    async fn poisoned(&mut self) {
        self.rollback().await;
        if let Err(err) = self
            .k
            .inbox
            .bounded("poison record", self.k.record_poison())
            .await
        {
            tracing::warn!(key = %self.k.key, error = %err, "could not record the poisoned message; a redelivery may run it again");
        }
        self.k.clear_start().await;
    }

    async fn released(&mut self) {
        self.rollback().await;
        self.k.clear_start().await;
    }
}

impl<DB: Backend> SqlInbox<DB> {
    /// Runs one of the inbox's own steps (`op`, named in the error) within the store
    /// timeout; a failure or a timeout is a store failure.
    pub(super) async fn bounded<T>(
        &self,
        op: &str,
        step: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, HandlerError> {
        let (limit, table) = (self.settings.effective_store_timeout(), &self.table);
        match tokio::time::timeout(limit, step).await {
            Ok(r) => r.map_err(|e| {
                HandlerError::store_unavailable(crate::schema::store_error(
                    format!("SQL inbox {op} on table {table} failed"),
                    e,
                ))
            }),
            Err(_) => Err(HandlerError::store_unavailable(
                StoreError::new(format!(
                    "SQL inbox {op} on table {table} timed out after {limit:?} (store_timeout)"
                ))
                .with_kind(StoreErrorKind::Timeout),
            )),
        }
    }
}
