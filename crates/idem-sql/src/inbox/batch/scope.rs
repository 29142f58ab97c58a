//! A savepoint per message of a batch ([`Batch::each`](idem_core::batch::Batch::each)),
//! and the batch's transaction as a batch handler's `Tx` argument.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use idem_core::__private::ItemScope;
use idem_core::batch::{BatchInput, FromBatch};
use idem_core::dedup::{StoreError, StoreErrorKind};
use idem_core::HandlerError;
use sqlx::Postgres;

use crate::backend::Backend;
use crate::inbox::tx::{InboxTx, NoInbox, Slot, Tx, TxClosed};

const ENTER: &str = "SAVEPOINT idem_item";
/// The previous message's savepoint is released with the next one's creation: one
/// round trip per message that keeps its writes.
const NEXT: &str = "RELEASE SAVEPOINT idem_item; SAVEPOINT idem_item";
const UNDO: &str = "ROLLBACK TO SAVEPOINT idem_item; RELEASE SAVEPOINT idem_item";

/// The savepoints of one batch's transaction.
pub(crate) struct Savepoints {
    pub(crate) slot: Slot<Postgres>,
    pub(crate) limit: Duration,
    /// The last message kept its writes and its savepoint is not released yet
    /// (released by the next `enter`, or by the commit).
    pub(crate) open: AtomicBool,
}

impl Savepoints {
    fn run(&self, sql: &'static str) -> BoxFuture<'static, Result<(), HandlerError>> {
        let slot = self.slot.clone();
        let limit = self.limit;
        Box::pin(async move {
            let step = async {
                let mut guard = slot.lock().await;
                let tx = guard
                    .as_mut()
                    .ok_or_else(|| HandlerError::transient(TxClosed))?;
                // No arguments: sent as a simple query, both statements in one round trip.
                <Postgres as Backend>::execute(&mut **tx, sql, Vec::new())
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        HandlerError::store_unavailable(crate::schema::store_error(
                            format!("SQL inbox batch savepoint ({sql}) failed"),
                            e,
                        ))
                    })
            };
            match tokio::time::timeout(limit, step).await {
                Ok(r) => r,
                Err(_) => Err(HandlerError::store_unavailable(
                    StoreError::new(format!(
                        "SQL inbox batch savepoint timed out after {limit:?} (store_timeout)"
                    ))
                    .with_kind(StoreErrorKind::Timeout),
                )),
            }
        })
    }
}

impl ItemScope for Savepoints {
    fn enter(&self) -> BoxFuture<'static, Result<(), HandlerError>> {
        if self.open.swap(false, Ordering::SeqCst) {
            self.run(NEXT)
        } else {
            self.run(ENTER)
        }
    }

    fn leave(&self, keep: bool) -> BoxFuture<'static, Result<(), HandlerError>> {
        if keep {
            self.open.store(true, Ordering::SeqCst);
            Box::pin(std::future::ready(Ok(())))
        } else {
            self.run(UNDO)
        }
    }
}

/// A batch handler's `Tx`: the batch's one transaction (its key is the batch's first
/// message's). For per-message work use [`Batch::each`](idem_core::batch::Batch::each)
/// and take each message's own `Tx` with `item.extract::<Tx<_>>()`.
impl<DB: Backend, S> FromBatch<S> for Tx<DB> {
    fn from_batch(input: &BatchInput, _state: &S) -> Result<Self, HandlerError> {
        input
            .extensions()
            .get::<InboxTx<DB>>()
            .map(|t| Tx::from_parts(t.0.clone(), t.1.clone()))
            .ok_or_else(|| HandlerError::permanent(NoInbox))
    }
}
