//! Batch handlers on the PostgreSQL inbox: a whole batch in one transaction.
//!
//! Per batch: one statement counts the starts of every message (committed at once,
//! for the crash-loop guard), then one transaction holds one admission statement
//! (every dedup row inserted, or the row already there read), the handler's work
//! (a savepoint per message through [`Batch::each`](idem_core::batch::Batch::each)),
//! one settling statement (start counters cleared, failed messages' rows dropped,
//! poisoned ones marked, kept rows checked) and the `COMMIT`.

mod scope;
mod sql;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use idem_core::__private::Reading;
use idem_core::__private::{extensions_mut, whole_batch_failure, with_scope};
use idem_core::batch::{BatchInput, BatchRunner};
use idem_core::crash::CrashGuard;
use idem_core::dedup::{Completion, StoreError};
use idem_core::{HandlerError, IdempotencyKey, Message, Processed};
use sqlx::{Postgres, Transaction};
use tokio::sync::Mutex;

use super::tx::{InboxTx, Scope, Slot, TxClosed};
use super::SqlInbox;
use crate::backend::Backend;
use crate::store::{ms, POISONED, SUCCEEDED};
use scope::Savepoints;
pub(crate) use sql::BatchSql;
use sql::{Found, Settled};

type Answer = Result<Processed, HandlerError>;

/// One message of the batch on its way through.
struct Entry {
    msg: Option<Message>,
    reading: Option<Reading>,
    /// Set once the message's outcome is known.
    answer: Option<Answer>,
    /// The start count before this one (admitted messages).
    earlier: u32,
}

/// One batch of consumer `consumer` on `inbox`.
pub(crate) struct Run {
    pub(crate) inbox: Arc<SqlInbox<Postgres>>,
    pub(crate) sql: Arc<BatchSql>,
    pub(crate) consumer: Arc<str>,
    pub(crate) runner: BatchRunner,
}

impl Run {
    fn keep_ms(&self) -> i64 {
        ms(self.inbox.settings.retention)
    }

    /// Runs the batch; one answer per message, in order.
    pub(crate) async fn run(self, messages: Vec<Message>) -> Vec<Answer> {
        let Some(first) = messages.first() else {
            return Vec::new();
        };
        // The collector makes a suspect a batch of its own: it runs alone.
        let guard = first.context.crash_guard();
        let _turn = guard.turn(first).await;
        let mut entries = self.read(messages);
        let started: Vec<String> = entries
            .iter()
            .filter(|e| e.answer.is_none())
            .filter_map(|e| e.reading.as_ref().map(|r| r.key.clone()))
            .collect();
        if !started.is_empty() {
            if let Err(e) = self.admit_and_run(&mut entries, &started, &guard).await {
                let copies = whole_batch_failure(&e, entries.len());
                for (entry, copy) in entries.iter_mut().zip(copies) {
                    if entry.answer.is_none() {
                        entry.answer = Some(Err(copy));
                    }
                }
            }
        }
        entries
            .into_iter()
            .map(|e| {
                e.answer
                    .unwrap_or_else(|| Err(HandlerError::transient(TxClosed)))
            })
            .collect()
    }

    /// Reads every key ([`Reading::batch`]); no message has earlier starts yet.
    fn read(&self, messages: Vec<Message>) -> Vec<Entry> {
        Reading::batch(&self.inbox.settings, messages)
            .into_iter()
            .map(|e| Entry {
                msg: e.msg,
                reading: e.reading,
                answer: e.answer,
                earlier: 0,
            })
            .collect()
    }

    /// Counts the starts, begins the transaction, admits, runs the handler and
    /// settles. An error here failed the batch as a whole (the entries without an
    /// answer get a copy of it); the start counters are then cleared.
    async fn admit_and_run(
        &self,
        entries: &mut [Entry],
        started: &[String],
        guard: &CrashGuard,
    ) -> Result<(), HandlerError> {
        let (conn, counts) = self
            .inbox
            .bounded("batch start count", async {
                let mut conn = self.inbox.pool.acquire().await?;
                let counts = self
                    .sql
                    .count_starts(&mut conn, &self.consumer, self.keep_ms(), started)
                    .await?;
                Ok((conn, counts))
            })
            .await?;
        for (key, n) in counts {
            if let Some(e) = find(entries, &key) {
                e.earlier = u32::try_from(n.saturating_sub(1)).unwrap_or(0);
            }
        }
        let began = self
            .inbox
            .bounded("batch begin", <Postgres as Backend>::begin_on(conn))
            .await;
        let result = match began {
            Ok(tx) => self.in_transaction(entries, started, guard, tx).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.clear_starts(started).await;
        }
        result
    }

    /// Admits every key in `tx`; answers the entries that are not admitted and
    /// returns the indices of those that are.
    async fn admit(
        &self,
        entries: &mut [Entry],
        started: &[String],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<Vec<usize>, HandlerError> {
        let fps: Vec<Option<String>> = started
            .iter()
            .map(|k| find(entries, k).and_then(|e| e.reading.as_ref()?.fingerprint.clone()))
            .collect();
        let keep = self.keep_ms();
        let found = self
            .inbox
            .bounded(
                "batch admission",
                self.sql.admit(tx, &self.consumer, keep, started, &fps),
            )
            .await?;
        let mut admitted = Vec::with_capacity(found.len());
        for f in found {
            let Some(i) = entries.iter().position(|e| {
                e.answer.is_none() && e.reading.as_ref().is_some_and(|r| r.key == f.key)
            }) else {
                continue;
            };
            if self.claimed(&mut entries[i], f, tx).await? {
                admitted.push(i);
            }
        }
        admitted.sort_unstable();
        Ok(admitted)
    }

    /// Decides one key from what the admission found: `true` when the message runs;
    /// otherwise its answer is set (duplicate, poisoned, mismatch, busy).
    async fn claimed(
        &self,
        entry: &mut Entry,
        found: Found,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<bool, HandlerError> {
        let busy = || {
            Err(idem_core::__private::busy(
                self.inbox.settings.min_busy_delay,
            ))
        };
        let Some(reading) = entry.reading.as_ref() else {
            return Ok(false);
        };
        if found.acquired {
            return Ok(true);
        }
        let fp = reading.fingerprint.as_deref();
        let (consumer, key, keep) = (&*self.consumer, reading.key.as_str(), self.keep_ms());
        let taken = match found.row {
            Some((_, _, left)) if left <= 0 => {
                let take = self.sql.take(tx, false, consumer, key, fp, keep);
                self.inbox.bounded("batch claim", take).await?
            }
            Some((state, row_fp, _)) if state == SUCCEEDED || state == POISONED => {
                let completion = if state == SUCCEEDED {
                    Completion::Succeeded
                } else {
                    Completion::Poisoned
                };
                match reading.done(completion, row_fp.as_deref()) {
                    Ok(Processed::Handled) => {
                        let take = self.sql.take(tx, true, consumer, key, fp, keep);
                        self.inbox.bounded("batch claim", take).await?
                    }
                    verdict => {
                        entry.answer = Some(verdict);
                        return Ok(false);
                    }
                }
            }
            // Held by a transaction that committed after this statement began, or in
            // a state of another writer: look again later.
            _ => false,
        };
        if !taken {
            entry.answer = Some(busy());
        }
        Ok(taken)
    }

    async fn in_transaction(
        &self,
        entries: &mut [Entry],
        started: &[String],
        guard: &CrashGuard,
        mut tx: Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        let admitted = match self.admit(entries, started, &mut tx).await {
            Ok(a) => a,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e);
            }
        };
        let mut settled = Settled {
            started: started.to_vec(),
            ..Settled::default()
        };
        let mut to_run = Vec::with_capacity(admitted.len());
        for i in admitted {
            let entry = &mut entries[i];
            let key = entry
                .reading
                .as_ref()
                .map(|r| r.key.clone())
                .unwrap_or_default();
            match guard.check(entry.earlier) {
                Ok(()) => to_run.push(i),
                Err(crashed) => {
                    tracing::warn!(key = %key, times = crashed.times, "message crashed or hung the worker too often; dead-lettering it without running it");
                    entry.answer = Some(Err(HandlerError::permanent(crashed)));
                    settled.poisoned.push(key);
                }
            }
        }
        let (tx, results) = self.handle(entries, &to_run, tx).await;
        let Some(tx) = tx else {
            return Err(HandlerError::transient(TxClosed));
        };
        let mut answers = Vec::with_capacity(to_run.len());
        for (&i, result) in to_run.iter().zip(results) {
            let key = entries[i]
                .reading
                .as_ref()
                .map(|r| r.key.clone())
                .unwrap_or_default();
            match &result {
                Ok(()) => settled.kept.push(key),
                Err(e) if e.is_discard() => settled.kept.push(key),
                Err(e) if e.kind() == Some(idem_core::ErrorKind::Permanent) => {
                    settled.poisoned.push(key)
                }
                Err(_) => settled.dropped.push(key),
            }
            answers.push((i, result.map(|()| Processed::Handled)));
        }
        if settled.kept.is_empty() && settled.poisoned.is_empty() {
            let _ = tx.rollback().await;
            self.clear_starts(started).await;
        } else {
            self.commit(tx, &settled).await?;
        }
        for (i, answer) in answers {
            entries[i].answer = Some(answer);
        }
        Ok(())
    }

    /// Runs the handler on the entries `to_run` inside `tx`; gives the transaction
    /// back (`None` if the handler's `Tx` was misused and it is gone) with one result
    /// per entry.
    async fn handle(
        &self,
        entries: &mut [Entry],
        to_run: &[usize],
        tx: Transaction<'static, Postgres>,
    ) -> (
        Option<Transaction<'static, Postgres>>,
        Vec<Result<(), HandlerError>>,
    ) {
        if to_run.is_empty() {
            return (Some(tx), Vec::new());
        }
        let slot: Slot<Postgres> = Arc::new(Mutex::new(Some(tx)));
        let scope = |key: &str| {
            Arc::new(Scope {
                consumer: self.consumer.clone(),
                key: key.to_owned(),
                follow_ups: Default::default(),
            })
        };
        let mut messages = Vec::with_capacity(to_run.len());
        let mut first_key = None;
        for &i in to_run {
            let entry = &mut entries[i];
            let (Some(mut msg), Some(r)) = (entry.msg.take(), entry.reading.as_ref()) else {
                continue;
            };
            first_key.get_or_insert_with(|| r.key.clone());
            msg.extensions.insert(IdempotencyKey(r.key.clone()));
            msg.extensions.insert(InboxTx(slot.clone(), scope(&r.key)));
            messages.push(msg);
        }
        let mut input = BatchInput::new(messages);
        let batch_scope = scope(first_key.as_deref().unwrap_or(""));
        extensions_mut(&mut input).insert(InboxTx(slot.clone(), batch_scope));
        let input = with_scope(
            input,
            Arc::new(Savepoints {
                slot: slot.clone(),
                limit: self.inbox.settings.effective_store_timeout(),
                open: AtomicBool::new(false),
            }),
        );
        let results = self.runner.run(input).await;
        let tx = slot.lock().await.take();
        (tx, results)
    }

    /// Settles and commits. An error: nothing committed.
    async fn commit(
        &self,
        mut tx: Transaction<'static, Postgres>,
        settled: &Settled,
    ) -> Result<(), HandlerError> {
        let checked = self
            .inbox
            .bounded(
                "batch settle",
                self.sql.finish(&mut tx, &self.consumer, settled),
            )
            .await;
        match checked {
            Ok(n) if usize::try_from(n).ok() == Some(settled.kept.len()) => {}
            Ok(_) => {
                let _ = tx.rollback().await;
                return Err(HandlerError::transient(StoreError::new(
                    "inbox rows vanished from the batch's transaction; rolled back",
                )));
            }
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e);
            }
        }
        self.inbox.bounded("batch commit", tx.commit()).await
    }

    /// Clears the start counters after a batch that did not commit. A failure only
    /// leaves counters that a later success clears.
    async fn clear_starts(&self, keys: &[String]) {
        let cleared = self
            .inbox
            .bounded("batch start clear", async {
                let mut conn = self.inbox.pool.acquire().await?;
                self.sql.clear_starts(&mut conn, &self.consumer, keys).await
            })
            .await;
        if let Err(e) = cleared {
            tracing::debug!(error = %e, "could not clear the batch's start counters");
        }
    }
}

fn find<'a>(entries: &'a mut [Entry], key: &str) -> Option<&'a mut Entry> {
    entries
        .iter_mut()
        .find(|e| e.answer.is_none() && e.reading.as_ref().is_some_and(|r| r.key == key))
}
