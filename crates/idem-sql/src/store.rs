//! The lease store: [`SqlStore`], the same state machine as the Redis store, in a table.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem_core::dedup::{Claim, Completion, DedupStore, OwnerToken, ScopedKey, StoreError};
use sqlx::Pool;

use crate::backend::{Arg, Backend, Dialect};
use crate::schema::{self, CleanupHandle, InvalidTableName, TableName, CLEANUP_BATCH};

/// Default table of the lease store.
pub const DEFAULT_STORE_TABLE: &str = "idem_dedup";

pub(crate) const PROCESSING: &str = "processing";
pub(crate) const SUCCEEDED: &str = "succeeded";
pub(crate) const POISONED: &str = "poisoned";

struct Queries {
    insert: String,
    take_over: String,
    record: String,
    extend: String,
    complete: String,
    release: String,
    reopen: String,
    cleanup: String,
}

impl Queries {
    fn new(d: Dialect, t: &TableName) -> Self {
        let now = d.now_ms();
        let key = "consumer = ? AND idem_key = ?";
        let held = format!("{key} AND state = '{PROCESSING}' AND owner = ? AND expires_at > {now}");
        let q = |s: String| d.placeholders(&s);
        Queries {
            insert: q(d.insert_ignore(
                &t.to_string(),
                "consumer, idem_key, state, owner, fingerprint, expires_at",
                &format!("?, ?, '{PROCESSING}', ?, ?, {now} + ?"),
            )),
            take_over: q(format!(
                "UPDATE {t} SET state = '{PROCESSING}', owner = ?, fingerprint = ?, expires_at = {now} + ? \
                 WHERE {key} AND expires_at <= {now}"
            )),
            record: q(format!(
                "SELECT {}, {} FROM {t} WHERE {key}",
                d.record_columns(),
                d.int_cast(&format!("expires_at - {now}"))
            )),
            extend: q(format!(
                "UPDATE {t} SET expires_at = {now} + ? WHERE {held}"
            )),
            complete: q(format!(
                "UPDATE {t} SET state = ?, expires_at = {now} + ? WHERE {held}"
            )),
            release: q(format!("DELETE FROM {t} WHERE {held}")),
            reopen: q(format!(
                "UPDATE {t} SET state = '{PROCESSING}', owner = ?, expires_at = {now} + ? \
                 WHERE {key} AND state = '{POISONED}' AND expires_at > {now}"
            )),
            cleanup: schema::cleanup_sql(d, t),
        }
    }
}

pub(crate) fn ms(d: Duration) -> i64 {
    // At least 1 ms; at most ~292 million years.
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4).max(1)
}

fn text(s: &str) -> Arg {
    Arg::Text(s.to_owned())
}

/// A [`DedupStore`] in a SQL table, for applications with a database but no Redis.
///
/// One row per (consumer, key): `state` (`processing` / `succeeded` / `poisoned`),
/// `owner`, `fingerprint` and `expires_at` (lease end, then retention end, in
/// milliseconds since the Unix epoch). Every operation is one atomic statement fenced
/// by the owner token (a claim is an insert-if-absent, then a take-over of an expired
/// row, then a read). Time is always the **database's clock** (`clock_timestamp()`,
/// `UTC_TIMESTAMP(6)`, SQLite's `julianday('now')`), so workers need no synchronised
/// clocks. Expired rows are ignored at once and deleted by
/// [`cleanup_expired`](Self::cleanup_expired) / [`spawn_cleanup`](Self::spawn_cleanup).
///
/// Use the aliases [`PgStore`](crate::PgStore), [`SqliteStore`](crate::SqliteStore),
/// [`MySqlStore`](crate::MySqlStore). Cheap to clone.
pub struct SqlStore<DB: Backend> {
    inner: Arc<Inner<DB>>,
}

struct Inner<DB: Backend> {
    pool: Pool<DB>,
    table: TableName,
    q: Queries,
}

impl<DB: Backend> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        SqlStore {
            inner: self.inner.clone(),
        }
    }
}

impl<DB: Backend> fmt::Debug for SqlStore<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlStore")
            .field("dialect", &DB::DIALECT)
            .field("table", &self.inner.table.to_string())
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> SqlStore<DB> {
    /// A store on `pool` using table [`DEFAULT_STORE_TABLE`]. Call
    /// [`ensure_schema`](Self::ensure_schema) once before use (or create the table
    /// with your own migrations, see the crate docs).
    pub fn new(pool: Pool<DB>) -> Self {
        Self::with_table(pool, TableName::trusted(DEFAULT_STORE_TABLE))
    }

    /// A store on `pool` using `table` (`name` or `schema.name`, validated).
    pub fn with_table_name(pool: Pool<DB>, table: &str) -> Result<Self, InvalidTableName> {
        Ok(Self::with_table(pool, TableName::parse(table)?))
    }

    /// A store on `pool` using an already validated table name.
    pub fn with_table(pool: Pool<DB>, table: TableName) -> Self {
        SqlStore {
            inner: Arc::new(Inner {
                q: Queries::new(DB::DIALECT, &table),
                pool,
                table,
            }),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.inner.pool
    }

    /// The table.
    pub fn table(&self) -> &TableName {
        &self.inner.table
    }

    /// Creates the table and its index if they do not exist. Idempotent and safe
    /// under concurrent callers. Does not touch sqlx's `_sqlx_migrations`.
    pub async fn ensure_schema(&self) -> Result<(), StoreError> {
        schema::ensure_schema(&self.inner.pool, &self.inner.table).await
    }

    /// Deletes expired rows in batches of [`CLEANUP_BATCH`]; returns how many.
    pub async fn cleanup_expired(&self) -> Result<u64, StoreError> {
        let i = &self.inner;
        schema::cleanup_expired(&i.pool, &i.table, &i.q.cleanup, CLEANUP_BATCH).await
    }

    /// Runs [`cleanup_expired`](Self::cleanup_expired) every `interval` in a
    /// background task until the handle is dropped.
    pub fn spawn_cleanup(&self, interval: Duration) -> CleanupHandle {
        CleanupHandle::spawn(
            self.inner.pool.clone(),
            self.inner.table.clone(),
            interval,
            CLEANUP_BATCH,
        )
    }

    fn err(&self, op: &str) -> impl Fn(sqlx::Error) -> StoreError + '_ {
        let table = &self.inner.table;
        let op = op.to_owned();
        move |e| StoreError::with_source(format!("SQL dedup {op} on table {table} failed"), e)
    }

    async fn exec(&self, op: &str, sql: &str, args: Vec<Arg>) -> Result<u64, StoreError> {
        let mut conn = self.inner.pool.acquire().await.map_err(self.err(op))?;
        DB::execute(&mut *conn, sql, args)
            .await
            .map_err(self.err(op))
    }
}

#[async_trait]
impl<DB: Backend> DedupStore for SqlStore<DB> {
    async fn claim(
        &self,
        key: &ScopedKey,
        owner: &OwnerToken,
        fingerprint: Option<&str>,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        DB::DIALECT
            .check_lengths(key.consumer(), key.key(), Some(owner.as_str()), fingerprint)
            .map_err(|m| StoreError::new(format!("SQL dedup claim of {key} refused: {m}")))?;
        let q = &self.inner.q;
        let err = self.err("claim");
        let mut conn = self.inner.pool.acquire().await.map_err(&err)?;
        let fp = Arg::OptText(fingerprint.map(str::to_owned));
        // A row can expire or be deleted between the statements: settle in a few rounds.
        for _ in 0..4 {
            let args = vec![
                text(key.consumer()),
                text(key.key()),
                text(owner.as_str()),
                fp.clone(),
                Arg::Int(ms(lease)),
            ];
            if DB::execute(&mut *conn, &q.insert, args)
                .await
                .map_err(&err)?
                == 1
            {
                return Ok(Claim::Acquired);
            }
            let args = vec![
                text(owner.as_str()),
                fp.clone(),
                Arg::Int(ms(lease)),
                text(key.consumer()),
                text(key.key()),
            ];
            if DB::execute(&mut *conn, &q.take_over, args)
                .await
                .map_err(&err)?
                == 1
            {
                return Ok(Claim::Acquired);
            }
            let args = vec![text(key.consumer()), text(key.key())];
            let Some((state, row_owner, row_fp, left)) =
                DB::fetch_record(&mut *conn, &q.record, args)
                    .await
                    .map_err(&err)?
            else {
                continue;
            };
            if left <= 0 {
                continue;
            }
            return Ok(match state.as_str() {
                PROCESSING if row_owner.as_deref() == Some(owner.as_str()) => Claim::Acquired,
                PROCESSING => Claim::Busy {
                    retry_in: Duration::from_millis(left.unsigned_abs()),
                },
                POISONED => Claim::Done {
                    completion: Completion::Poisoned,
                    fingerprint: row_fp,
                },
                _ => Claim::Done {
                    completion: Completion::Succeeded,
                    fingerprint: row_fp,
                },
            });
        }
        Err(StoreError::new(format!(
            "SQL dedup claim of {key} did not settle (the row kept changing)"
        )))
    }

    async fn extend(
        &self,
        key: &ScopedKey,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let args = vec![
            Arg::Int(ms(lease)),
            text(key.consumer()),
            text(key.key()),
            text(owner.as_str()),
        ];
        Ok(self.exec("extend", &self.inner.q.extend, args).await? == 1)
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        owner: &OwnerToken,
        completion: Completion,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let state = match completion {
            Completion::Succeeded => SUCCEEDED,
            Completion::Poisoned => POISONED,
        };
        let args = vec![
            text(state),
            Arg::Int(ms(retention)),
            text(key.consumer()),
            text(key.key()),
            text(owner.as_str()),
        ];
        Ok(self.exec("complete", &self.inner.q.complete, args).await? == 1)
    }

    async fn release(&self, key: &ScopedKey, owner: &OwnerToken) -> Result<bool, StoreError> {
        let args = vec![text(key.consumer()), text(key.key()), text(owner.as_str())];
        Ok(self.exec("release", &self.inner.q.release, args).await? == 1)
    }

    async fn reopen_poisoned(
        &self,
        key: &ScopedKey,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let args = vec![
            text(owner.as_str()),
            Arg::Int(ms(lease)),
            text(key.consumer()),
            text(key.key()),
        ];
        Ok(self.exec("reopen", &self.inner.q.reopen, args).await? == 1)
    }
}
