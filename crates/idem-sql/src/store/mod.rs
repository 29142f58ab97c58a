//! The lease store: [`SqlStore`], the same state machine as the Redis store, in a table.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
#[cfg(feature = "postgres")]
use idem_core::dedup::Batcher;
use idem_core::dedup::{
    Answers, Claim, ClaimRequest, CompleteRequest, Completion, CountedClaim, DedupStore, HeldClaim,
    StoreError, StoreResult, Terms, DEFAULT_MAX_BATCH,
};
use sqlx::Pool;

#[cfg(feature = "postgres")]
use crate::backend::Dialect;
use crate::backend::{Arg, Backend};
use crate::schema::{self, CleanupHandle, InvalidTableName, TableName, CLEANUP_BATCH};

mod many;
mod queries;
use queries::Queries;

/// Default table of the lease store.
pub const DEFAULT_STORE_TABLE: &str = "idem_dedup";

pub(crate) const PROCESSING: &str = "processing";
pub(crate) const SUCCEEDED: &str = "succeeded";
pub(crate) const POISONED: &str = "poisoned";

pub(crate) fn ms(d: Duration) -> i64 {
    // At least 1 ms; at most ~292 million years.
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4).max(1)
}

fn state_of(completion: Completion) -> &'static str {
    match completion {
        Completion::Succeeded => SUCCEEDED,
        Completion::Poisoned => POISONED,
    }
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
/// row, then a read; on PostgreSQL concurrent operations are batched, see below). Time is always the **database's clock** (`clock_timestamp()`,
/// `UTC_TIMESTAMP(6)`, SQLite's `julianday('now')`), so workers need no synchronised
/// clocks. Expired rows are ignored at once and deleted by
/// [`cleanup_expired`](Self::cleanup_expired) / [`spawn_cleanup`](Self::spawn_cleanup).
///
/// # Batching
/// On PostgreSQL, operations of deliveries handled at the same time share statements.
/// An operation submitted while no batch statement of this store is running is sent at
/// once, alone (no timer, so a lone message waits for nothing); operations submitted
/// while one runs queue up and go together in the next one, at most
/// [`max_batch`](Self::max_batch) operations (default
/// [`DEFAULT_MAX_BATCH`](idem_core::dedup::DEFAULT_MAX_BATCH)) on one pool connection.
/// The batch statement takes claims, completions, extensions and releases of many keys
/// at once: arrays bound with `unnest`, an `INSERT ... ON CONFLICT DO NOTHING
/// RETURNING` for the claims, a conditional `UPDATE ... FROM` and `DELETE ... USING`
/// (same owner, state and lease conditions as the single-row statements) in
/// data-modifying CTEs of one statement. Each key appears at most once per statement
/// (a second operation on a key goes in the next statement of the same batch), so no
/// two parts of a statement touch one row; each operation is still one atomic, fenced
/// step with the answer it would get alone. What a batch cannot settle in one step
/// runs the single-row statements below, from its caller: a claim of a key that
/// already has a row (a duplicate, a busy or expired lease), a reopen. A failed batch statement fails each of its
/// operations with its own copy of the [`StoreError`]; a caller that gives up (the
/// dedup layer's `store_timeout`) loses only its own answer.
///
/// A [batch handler](idem_core::batch)'s calls on many keys are one statement each on
/// PostgreSQL while batching is on, sent at once (not queued): `claim_many` inserts
/// the absent keys, takes over the expired ones and reads the others (a key it cannot
/// decide, a row committed by another transaction meanwhile, runs the single-row
/// claim after it); `complete_many` and `release_many` are the batch statement above.
///
/// SQLite and MariaDB keep the single-row statements. SQLite runs in-process (no
/// network round trip to save) and serialises writers anyway. MariaDB has no
/// `RETURNING` on `UPDATE` (MySQL has none at all), so a multi-row update could not
/// tell which of its rows matched their owners; there each operation's own
/// affected-row count is what fences it.
///
/// Use the aliases [`PgStore`](crate::PgStore), [`SqliteStore`](crate::SqliteStore),
/// [`MySqlStore`](crate::MySqlStore). Cheap to clone. Built like every idem store:
/// `new(pool)`, then chained setters ([`table`](Self::table), or
/// [`try_table`](Self::try_table) which validates a name); getters are named for what
/// they return ([`table_name`](Self::table_name)). The dedup settings (retention, key,
/// store timeout...) belong to the `DedupLayer` the store is used through.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use idem_core::Consumer;
/// use idem_sql::PgStore;
///
/// let store = PgStore::new(pool).try_table("billing_dedup")?;
/// store.ensure_schema().await?;
/// let consumer = Consumer::builder("billing").store(store).handler(|| async {})?;
/// # let _ = consumer; Ok(()) }
/// ```
pub struct SqlStore<DB: Backend> {
    inner: Arc<Inner<DB>>,
}

struct Inner<DB: Backend> {
    pool: Pool<DB>,
    table: TableName,
    q: Queries,
    max_batch: usize,
    /// PostgreSQL: the batched path (see "Batching" in [`SqlStore`]'s docs).
    #[cfg(feature = "postgres")]
    batch: Option<Batcher<pg_batch::Exec>>,
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
        Self::build(
            pool,
            TableName::trusted(DEFAULT_STORE_TABLE),
            DEFAULT_MAX_BATCH,
        )
    }

    fn build(pool: Pool<DB>, table: TableName, max_batch: usize) -> Self {
        let max_batch = max_batch.max(1);
        #[cfg(feature = "postgres")]
        let batch = if DB::DIALECT == Dialect::Postgres && max_batch > 1 {
            let pool: Box<dyn std::any::Any> = Box::new(pool.clone());
            pool.downcast::<sqlx::PgPool>()
                .ok()
                .map(|pool| Batcher::new(pg_batch::Exec::new(*pool, table.clone()), max_batch))
        } else {
            None
        };
        SqlStore {
            inner: Arc::new(Inner {
                q: Queries::new(DB::DIALECT, &table),
                pool,
                table,
                max_batch,
                #[cfg(feature = "postgres")]
                batch,
            }),
        }
    }

    /// Uses table `table` (an already validated name).
    pub fn table(self, table: TableName) -> Self {
        Self::build(self.inner.pool.clone(), table, self.inner.max_batch)
    }

    /// The most operations one batched statement carries on PostgreSQL (default
    /// [`DEFAULT_MAX_BATCH`]); 1 turns batching off (every operation runs its own
    /// single-row statements, concurrently on the pool). SQLite and MariaDB do not
    /// batch (see "Batching" above).
    pub fn max_batch(self, max_batch: usize) -> Self {
        Self::build(self.inner.pool.clone(), self.inner.table.clone(), max_batch)
    }

    /// The bound set by [`max_batch`](Self::max_batch).
    pub fn max_batch_size(&self) -> usize {
        self.inner.max_batch
    }

    /// Whether this store batches concurrent operations (PostgreSQL with a bound
    /// above 1).
    pub fn is_batching(&self) -> bool {
        #[cfg(feature = "postgres")]
        return self.inner.batch.is_some();
        #[cfg(not(feature = "postgres"))]
        false
    }

    /// Runs `op` through the batched path; `None` when this store does not batch or
    /// the batch left it to the single-row statements.
    #[cfg(feature = "postgres")]
    async fn batched(
        &self,
        op: impl FnOnce() -> pg_batch::Op,
    ) -> Result<Option<pg_batch::Answer>, StoreError> {
        if let Some(batch) = &self.inner.batch {
            return match batch.submit(op()).await? {
                pg_batch::Answer::Fallback => Ok(None),
                answer => Ok(Some(answer)),
            };
        }
        Ok(None)
    }

    /// An update or release through the batched path, if it settled there.
    #[cfg(feature = "postgres")]
    async fn batched_settle(
        &self,
        op: impl FnOnce() -> pg_batch::Op,
    ) -> Result<Option<bool>, StoreError> {
        match self.batched(op).await? {
            Some(pg_batch::Answer::Settled(done)) => Ok(Some(done)),
            Some(_) => Err(StoreError::new(
                "SQL dedup batch answered a settle with a claim",
            )),
            None => Ok(None),
        }
    }

    /// A claim through the batched path, if it was acquired there.
    #[cfg(feature = "postgres")]
    async fn batched_claim(
        &self,
        req: &ClaimRequest,
        lease: Duration,
        counting: bool,
    ) -> Result<Option<Option<u32>>, StoreError> {
        let op = || pg_batch::Op::Claim {
            key: req.held.key.clone(),
            owner: req.held.owner.clone(),
            fingerprint: req.fingerprint.clone(),
            lease,
            counting,
        };
        match self.batched(op).await? {
            Some(pg_batch::Answer::Acquired(starts)) => Ok(Some(starts)),
            Some(_) => Err(StoreError::new(
                "SQL dedup batch answered a claim with a settle",
            )),
            None => Ok(None),
        }
    }

    /// Uses table `table` (`name` or `schema.name`), validated here.
    pub fn try_table(self, table: &str) -> Result<Self, InvalidTableName> {
        Ok(self.table(TableName::parse(table)?))
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.inner.pool
    }

    /// The table name.
    pub fn table_name(&self) -> &TableName {
        &self.inner.table
    }

    /// Creates the table and its index if they do not exist. Idempotent and safe
    /// under concurrent callers. Does not touch sqlx's `_sqlx_migrations`.
    ///
    /// Also adds the `starts` column (crash counting, see [`idem_core::crash`]) to a
    /// table created by an older version: `ALTER TABLE ... ADD COLUMN starts BIGINT
    /// NOT NULL DEFAULT 0` when the column is missing, so upgrading needs only this
    /// call (or that statement in your migrations). This is the only upgrade path:
    /// the store does not adapt to an older table at run time, and a claim on a
    /// table without the column fails with a store error naming the column.
    pub async fn ensure_schema(&self) -> Result<(), StoreError> {
        let i = &self.inner;
        schema::ensure_schema(&i.pool, &i.table).await?;
        let err = self.err("schema upgrade");
        let mut conn = i.pool.acquire().await.map_err(&err)?;
        if DB::execute(&mut *conn, &i.q.probe_starts, vec![])
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Err(e) = DB::execute(&mut *conn, &i.q.add_starts, vec![]).await {
            // A concurrent caller may have added it first.
            if DB::execute(&mut *conn, &i.q.probe_starts, vec![])
                .await
                .is_err()
            {
                return Err(err(e));
            }
        }
        Ok(())
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
        move |e| schema::store_error(format!("SQL dedup {op} on table {table} failed"), e)
    }

    async fn exec(&self, op: &str, sql: &str, args: Vec<Arg>) -> Result<u64, StoreError> {
        let mut conn = self.inner.pool.acquire().await.map_err(self.err(op))?;
        DB::execute(&mut *conn, sql, args)
            .await
            .map_err(self.err(op))
    }
}

impl<DB: Backend> SqlStore<DB> {
    /// An acquired claim, with its earlier unsettled starts when counting.
    async fn acquired(
        &self,
        conn: &mut DB::Connection,
        held: &HeldClaim,
        counting: bool,
    ) -> Result<(Claim, Option<u32>), StoreError> {
        if !counting {
            return Ok((Claim::Acquired, None));
        }
        let args = key_owner(held);
        let n = DB::fetch_int(conn, &self.inner.q.read_starts, args)
            .await
            .map_err(self.err("claim"))?
            .unwrap_or(1);
        Ok((
            Claim::Acquired,
            Some(u32::try_from(n.saturating_sub(1)).unwrap_or(0)),
        ))
    }

    /// The claim: insert-if-absent, then take over an expired row, then read. With
    /// `counting`, the statements also count starts in the `starts` column, and the
    /// answer carries the earlier unsettled starts.
    async fn claim_with(
        &self,
        req: &ClaimRequest,
        lease: Duration,
        counting: bool,
    ) -> Result<(Claim, Option<u32>), StoreError> {
        many::check_claim::<DB>(req)?;
        let HeldClaim { key, owner, .. } = &req.held;
        let q = &self.inner.q;
        let err = self.err("claim");
        let (insert, take_over) = if counting {
            (&q.insert_counting, &q.take_over_counting)
        } else {
            (&q.insert, &q.take_over)
        };
        let mut conn = self.inner.pool.acquire().await.map_err(&err)?;
        let fp = Arg::OptText(req.fingerprint.clone());
        // A row can expire or be deleted between the statements: settle in a few rounds.
        for _ in 0..4 {
            let args = vec![
                text(key.consumer()),
                text(key.key()),
                text(owner.as_str()),
                fp.clone(),
                Arg::Int(ms(lease)),
            ];
            if DB::execute(&mut *conn, insert, args).await.map_err(&err)? == 1 {
                return self.acquired(&mut *conn, &req.held, counting).await;
            }
            let args = vec![
                text(owner.as_str()),
                fp.clone(),
                Arg::Int(ms(lease)),
                text(key.consumer()),
                text(key.key()),
            ];
            if DB::execute(&mut *conn, take_over, args)
                .await
                .map_err(&err)?
                == 1
            {
                return self.acquired(&mut *conn, &req.held, counting).await;
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
            if state == PROCESSING && row_owner.as_deref() == Some(owner.as_str()) {
                // Our own claim, retried after a lost reply: not a new start.
                return self.acquired(&mut *conn, &req.held, counting).await;
            }
            return Ok((
                match state.as_str() {
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
                },
                counting.then_some(0),
            ));
        }
        Err(StoreError::new(format!(
            "SQL dedup claim of {key} did not settle (the row kept changing)"
        )))
    }
}

#[async_trait]
impl<DB: Backend> DedupStore for SqlStore<DB> {
    async fn claim(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<Claim> {
        #[cfg(feature = "postgres")]
        if self.batched_claim(req, terms.lease, false).await?.is_some() {
            return Ok(Claim::Acquired);
        }
        self.claim_with(req, terms.lease, false)
            .await
            .map(|(claim, _)| claim)
    }

    /// Counted starts are kept in the row's `starts` column, so they last as long as
    /// the row itself.
    async fn claim_counting(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<CountedClaim> {
        #[cfg(feature = "postgres")]
        if let Some(starts) = self.batched_claim(req, terms.lease, true).await? {
            return Ok((Claim::Acquired, starts));
        }
        self.claim_with(req, terms.lease, true).await
    }

    async fn extend(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        #[cfg(feature = "postgres")]
        if let Some(done) = self
            .batched_settle(|| pg_batch::Op::update(held, None, terms.lease))
            .await?
        {
            return Ok(done);
        }
        let mut args = vec![Arg::Int(ms(terms.lease))];
        args.extend(key_owner(held));
        Ok(self.exec("extend", &self.inner.q.extend, args).await? == 1)
    }

    async fn complete(&self, held: &HeldClaim, how: Completion, terms: Terms) -> StoreResult<bool> {
        let state = state_of(how);
        #[cfg(feature = "postgres")]
        if let Some(done) = self
            .batched_settle(|| pg_batch::Op::update(held, Some(state), terms.retention))
            .await?
        {
            return Ok(done);
        }
        let mut args = vec![text(state), Arg::Int(ms(terms.retention))];
        args.extend(key_owner(held));
        Ok(self.exec("complete", &self.inner.q.complete, args).await? == 1)
    }

    async fn release(&self, held: &HeldClaim) -> StoreResult<bool> {
        #[cfg(feature = "postgres")]
        if let Some(done) = self.batched_settle(|| pg_batch::Op::release(held)).await? {
            return Ok(done);
        }
        let args = key_owner(held);
        Ok(self.exec("release", &self.inner.q.release, args).await? == 1)
    }

    async fn claim_many(&self, requests: &[ClaimRequest], terms: Terms) -> Answers<CountedClaim> {
        self.claims(requests, terms).await
    }

    async fn complete_many(&self, requests: &[CompleteRequest], terms: Terms) -> Answers<bool> {
        self.completions(requests, terms).await
    }

    async fn release_many(&self, claims: &[HeldClaim]) -> Answers<bool> {
        self.releases(claims).await
    }

    async fn reopen_poisoned(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        let HeldClaim { key, owner, .. } = held;
        let args = vec![
            text(owner.as_str()),
            Arg::Int(ms(terms.lease)),
            text(key.consumer()),
            text(key.key()),
        ];
        Ok(self.exec("reopen", &self.inner.q.reopen, args).await? == 1)
    }
}

/// The arguments `consumer, key, owner` of a held claim, in the order the statements
/// that select a claim by its owner bind them.
fn key_owner(held: &HeldClaim) -> Vec<Arg> {
    let HeldClaim { key, owner, .. } = held;
    vec![text(key.consumer()), text(key.key()), text(owner.as_str())]
}

/// The batched path of the lease store on PostgreSQL: see [`SqlStore`]'s docs,
/// "Batching".
#[cfg(feature = "postgres")]
mod pg_batch;
/// The one-statement claims of many keys on PostgreSQL.
#[cfg(feature = "postgres")]
mod pg_claims;
