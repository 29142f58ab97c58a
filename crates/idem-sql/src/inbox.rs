//! The transactional inbox: [`SqlInbox`] writes the dedup row in the same transaction
//! as the handler's own writes, handed to the handler as a [`Tx`].

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use idem_core::__private::{busy, resolve_key, sha256_hex, BoxFuture};
use idem_core::__private::{ClassifiedService, DedupedService};
use idem_core::breaker::HealthCheck;
use idem_core::consumer::Deduplicate;
use idem_core::crash::CrashGuard;
use idem_core::dedup::{
    DefaultKey, KeyExtractor, MissingKey, PayloadMismatchError, PreviouslyPoisonedError,
    StoreError, DEFAULT_STORE_TIMEOUT, REPLAY_HEADER,
};
use idem_core::{ErrorKind, FromMessage, HandlerError, IdempotencyKey, Message, Processed};
use sqlx::{Pool, Transaction};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use crate::backend::{Arg, Backend, Dialect};
use crate::schema::{self, CleanupHandle, InvalidTableName, TableName, CLEANUP_BATCH};
use crate::store::{ms, POISONED, PROCESSING, SUCCEEDED};

/// Default table of the inbox.
pub const DEFAULT_INBOX_TABLE: &str = "idem_inbox";

type Slot<DB> = Arc<Mutex<Option<Transaction<'static, DB>>>>;

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
/// [`SqlInbox`] of the same database. Permanent (a configuration error).
#[derive(Debug, thiserror::Error)]
#[error(
    "handler takes a Tx but the consumer has no SQL inbox for this database (use .dedup(inbox))"
)]
pub struct NoInbox;

impl<DB: Backend> Tx<DB> {
    /// Locks the transaction for a few statements. Keep the guard only while you use
    /// it if you run work concurrently inside the handler.
    pub async fn conn(&self) -> Result<TxConn<'_, DB>, TxClosed> {
        MutexGuard::try_map(self.slot.lock().await, Option::as_mut)
            .map(|guard| TxConn { guard })
            .map_err(|_| TxClosed)
    }
}

/// A locked [`Tx`]: dereferences to the database connection (`&mut *conn` is an
/// executor).
pub struct TxConn<'a, DB: Backend> {
    guard: MappedMutexGuard<'a, Transaction<'static, DB>>,
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

struct InboxTx<DB: Backend>(Slot<DB>);

impl<DB: Backend, S> FromMessage<S> for Tx<DB> {
    fn from_message(msg: &Message, _state: &S) -> Result<Self, HandlerError> {
        msg.extensions
            .get::<InboxTx<DB>>()
            .map(|t| Tx { slot: t.0.clone() })
            .ok_or_else(|| HandlerError::permanent(NoInbox))
    }
}

#[derive(Clone)]
struct Queries {
    insert_done: String,
    record_locked: String,
    record: String,
    take_expired: String,
    reopen: String,
    insert_poisoned: String,
    mark_poisoned: String,
    cleanup: String,
    starts_table: TableName,
    count_start: String,
    read_start: String,
    clear_start: String,
    cleanup_starts: String,
}

impl Queries {
    fn new(d: Dialect, t: &TableName) -> Self {
        let now = d.now_ms();
        let key = "consumer = ? AND idem_key = ?";
        let cols = "consumer, idem_key, state, owner, fingerprint, expires_at";
        let q = |s: String| d.placeholders(&s);
        let starts = t.suffixed("_starts");
        let record = format!(
            "SELECT {}, {} FROM {t} WHERE {key}",
            d.record_columns(),
            d.int_cast(&format!("expires_at - {now}"))
        );
        Queries {
            insert_done: q(d.insert_ignore(
                &t.to_string(),
                cols,
                &format!("?, ?, '{SUCCEEDED}', NULL, ?, {now} + ?"),
            )),
            record_locked: q(format!("{record}{}", d.for_update())),
            record: q(record),
            take_expired: q(format!(
                "UPDATE {t} SET state = '{SUCCEEDED}', owner = NULL, fingerprint = ?, expires_at = {now} + ? \
                 WHERE {key} AND expires_at <= {now}"
            )),
            reopen: q(format!(
                "UPDATE {t} SET state = '{SUCCEEDED}', fingerprint = ?, expires_at = {now} + ? \
                 WHERE {key} AND state = '{POISONED}'"
            )),
            insert_poisoned: q(d.insert_ignore(
                &t.to_string(),
                cols,
                &format!("?, ?, '{POISONED}', NULL, ?, {now} + ?"),
            )),
            mark_poisoned: q(format!(
                "UPDATE {t} SET state = '{POISONED}', fingerprint = ?, expires_at = {now} + ? \
                 WHERE {key} AND (state = '{POISONED}' OR expires_at <= {now})"
            )),
            cleanup: schema::cleanup_sql(d, t),
            count_start: q(count_start_sql(d, &starts)),
            read_start: q(format!("SELECT starts FROM {starts} WHERE {key}")),
            clear_start: q(format!("DELETE FROM {starts} WHERE {key}")),
            cleanup_starts: schema::cleanup_sql(d, &starts),
            starts_table: starts,
        }
    }
}

/// The statement failed because its table does not exist.
fn is_missing_table(e: &sqlx::Error) -> bool {
    let Some(db) = e.as_database_error() else {
        return false;
    };
    // PostgreSQL undefined_table; MariaDB/MySQL ER_NO_SUCH_TABLE; SQLite's message.
    matches!(db.code().as_deref(), Some("42P01" | "42S02"))
        || db.message().contains("no such table")
}

/// One more start of a message: a fresh counter, or the live one plus one.
fn count_start_sql(d: Dialect, t: &TableName) -> String {
    let now = d.now_ms();
    match d {
        // Assignments run left to right: `starts` still sees the old `expires_at`.
        Dialect::MySql => format!(
            "INSERT INTO {t} (consumer, idem_key, starts, expires_at) VALUES (?, ?, 1, {now} + ?) \
             ON DUPLICATE KEY UPDATE starts = IF(expires_at > {now}, starts + 1, 1), \
             expires_at = VALUES(expires_at)"
        ),
        _ => format!(
            "INSERT INTO {t} (consumer, idem_key, starts, expires_at) VALUES (?, ?, 1, {now} + ?) \
             ON CONFLICT (consumer, idem_key) DO UPDATE SET \
             starts = CASE WHEN {name}.expires_at > {now} THEN {name}.starts + 1 ELSE 1 END, \
             expires_at = excluded.expires_at RETURNING starts",
            name = t.name()
        ),
    }
}

/// The SQL transactional inbox: exactly-once *effect* for handlers whose effects are
/// writes to the same database.
///
/// For each message it begins a transaction, inserts the dedup row
/// `(consumer, key) -> succeeded` in it, and hands the transaction to the handler as a
/// [`Tx`]. `Ok` commits the handler's writes and the dedup row together; an error
/// rolls both back. A concurrent delivery of the same key blocks on the unique key
/// until the first commits or rolls back, then sees the row and is acked as a
/// duplicate (or claims the key if the first rolled back). A crash before commit
/// leaves nothing; a crash after commit but before the broker ack makes the
/// redelivery a duplicate. A permanent (poison) error rolls back the handler's
/// writes and then records `poisoned` in a short transaction of its own; a replay with
/// header `x-idem-replay` may run it again. Transient errors record nothing. The
/// database being unreachable is a transient failure, never a duplicate.
///
/// No leases: the open transaction (and its row lock) is the claim, so a crashed
/// worker's claim ends when its connection drops. Each in-flight message holds one
/// pool connection, and so does each duplicate waiting for it: size the pool for the
/// consumer's concurrency. On SQLite every message runs under the database write
/// lock (`BEGIN IMMEDIATE`), so messages are processed one at a time, and a waiter
/// gives up after the pool's busy timeout (a transient failure, retried).
///
/// `consumer` must be the consumer's name (it scopes the keys); build it with
/// `Consumer::builder(name).dedup(inbox)`. Use the aliases [`PgInbox`](crate::PgInbox),
/// [`SqliteInbox`](crate::SqliteInbox), [`MySqlInbox`](crate::MySqlInbox).
///
/// ```no_run
/// use idem_core::{Consumer, HandlerError, IdempotencyKey};
/// use idem_sql::{PgInbox, Tx};
/// use sqlx::Postgres;
///
/// async fn charge(key: IdempotencyKey, tx: Tx<Postgres>) -> Result<(), HandlerError> {
///     let mut conn = tx.conn().await?;
///     sqlx::query("INSERT INTO charges (id) VALUES ($1)")
///         .bind(key.as_str())
///         .execute(&mut *conn)
///         .await?;
///     Ok(())
/// }
///
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let inbox = PgInbox::new(pool, "billing");
/// inbox.ensure_schema().await?;
/// let consumer = Consumer::builder("billing").dedup(inbox).handler(charge)?;
/// # let _ = consumer; Ok(()) }
/// ```
pub struct SqlInbox<DB: Backend> {
    pool: Pool<DB>,
    consumer: Arc<str>,
    table: TableName,
    q: Queries,
    extractor: Arc<dyn KeyExtractor>,
    missing: MissingKey,
    retention: Duration,
    fingerprint: bool,
    busy_delay: Duration,
    /// Off once the start counters' table turned out to be missing (a deployment
    /// that upgraded without `ensure_schema`): messages then run without crash counting.
    counting: Arc<AtomicBool>,
    store_timeout: Duration,
}

impl<DB: Backend> Clone for SqlInbox<DB> {
    fn clone(&self) -> Self {
        SqlInbox {
            pool: self.pool.clone(),
            consumer: self.consumer.clone(),
            table: self.table.clone(),
            q: self.q.clone(),
            extractor: self.extractor.clone(),
            missing: self.missing,
            retention: self.retention,
            fingerprint: self.fingerprint,
            busy_delay: self.busy_delay,
            counting: self.counting.clone(),
            store_timeout: self.store_timeout,
        }
    }
}

impl<DB: Backend> fmt::Debug for SqlInbox<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlInbox")
            .field("dialect", &DB::DIALECT)
            .field("consumer", &self.consumer)
            .field("table", &self.table.to_string())
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> SqlInbox<DB> {
    /// An inbox for consumer `consumer` on `pool`, table [`DEFAULT_INBOX_TABLE`].
    /// Defaults: key from [`DefaultKey`], missing key is poison, retention 7 days,
    /// payload fingerprints checked.
    pub fn new(pool: Pool<DB>, consumer: impl Into<Arc<str>>) -> Self {
        let table = TableName::trusted(DEFAULT_INBOX_TABLE);
        SqlInbox {
            q: Queries::new(DB::DIALECT, &table),
            pool,
            consumer: consumer.into(),
            table,
            extractor: Arc::new(DefaultKey),
            missing: MissingKey::Poison,
            retention: Duration::from_secs(7 * 24 * 3600),
            fingerprint: true,
            busy_delay: Duration::from_secs(1),
            counting: Arc::new(AtomicBool::new(true)),
            store_timeout: DEFAULT_STORE_TIMEOUT,
        }
    }

    /// Uses table `table` (`name` or `schema.name`, validated).
    pub fn table(self, table: &str) -> Result<Self, InvalidTableName> {
        Ok(self.with_table(TableName::parse(table)?))
    }

    /// Uses an already validated table name.
    pub fn with_table(mut self, table: TableName) -> Self {
        self.q = Queries::new(DB::DIALECT, &table);
        self.table = table;
        self
    }

    /// Where the key comes from.
    pub fn key(mut self, extractor: impl KeyExtractor) -> Self {
        self.extractor = Arc::new(extractor);
        self
    }

    /// Policy for messages without a key.
    pub fn missing_key(mut self, policy: MissingKey) -> Self {
        self.missing = policy;
        self
    }

    /// How long rows are kept (must cover the longest retry horizon; the consumer
    /// builder checks).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Whether to record a SHA-256 of the payload and poison a message whose key is
    /// done with a different payload (default on).
    pub fn fingerprint(mut self, on: bool) -> Self {
        self.fingerprint = on;
        self
    }

    /// Longest time each of the inbox's own steps may take: beginning the transaction
    /// (the pool's connection wait included) and inserting the row, the pre-commit
    /// check and commit, recording a poisoned message (default
    /// [`DEFAULT_STORE_TIMEOUT`], 5 s, well under sqlx's 30 s pool acquire timeout). A
    /// step that runs out of time is a store failure: transient, counted by the
    /// consumer's circuit breaker. The handler's own statements are bounded by the
    /// handler timeout instead. A commit that timed out may still have committed; the
    /// redelivery then finds the row and is acked as a duplicate.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The table name.
    pub fn table_name(&self) -> &TableName {
        &self.table
    }

    /// Creates the table if missing (idempotent, safe under concurrent callers).
    ///
    /// Also creates the start counters' table (the inbox table's name plus `_starts`,
    /// cut to 63 characters), which records that a message started before its
    /// handler runs, so that crash loops are detected (see [`idem_core::crash`]).
    /// Existing inbox tables are not altered: upgrading only needs this call (or the
    /// same `CREATE TABLE` in your migrations).
    pub async fn ensure_schema(&self) -> Result<(), StoreError> {
        schema::ensure_schema(&self.pool, &self.table).await?;
        let starts = &self.q.starts_table;
        schema::ensure_ddl(&self.pool, starts, schema::starts_ddl(DB::DIALECT, starts)).await
    }

    /// The table of start counters (crash counting).
    pub fn starts_table_name(&self) -> &TableName {
        &self.q.starts_table
    }

    /// Deletes rows past their retention in batches of [`CLEANUP_BATCH`], and start
    /// counters of messages that never came back.
    pub async fn cleanup_expired(&self) -> Result<u64, StoreError> {
        let rows = schema::cleanup_expired(&self.pool, &self.table, &self.q.cleanup, CLEANUP_BATCH)
            .await?;
        let starts = schema::cleanup_expired(
            &self.pool,
            &self.q.starts_table,
            &self.q.cleanup_starts,
            CLEANUP_BATCH,
        )
        .await?;
        Ok(rows + starts)
    }

    /// Runs [`cleanup_expired`](Self::cleanup_expired) every `interval` until the
    /// handle is dropped.
    pub fn spawn_cleanup(&self, interval: Duration) -> CleanupHandle {
        CleanupHandle::spawn(
            self.pool.clone(),
            self.table.clone(),
            interval,
            CLEANUP_BATCH,
        )
    }
}

impl<DB: Backend> Deduplicate for SqlInbox<DB> {
    fn wrap(&self, inner: ClassifiedService) -> DedupedService {
        BoxCloneSyncService::new(InboxService {
            inner,
            inbox: Arc::new(self.clone()),
        })
    }

    fn retention(&self) -> Duration {
        self.retention
    }

    fn lease(&self) -> Option<Duration> {
        None
    }

    fn health_check(&self) -> Option<HealthCheck> {
        let pool = self.pool.clone();
        let limit = self.store_timeout;
        let table = self.table.to_string();
        Some(Arc::new(move || {
            let pool = pool.clone();
            let table = table.clone();
            Box::pin(async move {
                let probe = async {
                    let mut conn = pool.acquire().await?;
                    DB::execute(&mut *conn, "SELECT 1", Vec::new()).await
                };
                match tokio::time::timeout(limit, probe).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(StoreError::with_source(
                        format!("SQL inbox on table {table}: health probe failed"),
                        e,
                    )),
                    Err(_) => Err(StoreError::new(format!(
                        "SQL inbox on table {table}: health probe timed out after {limit:?} (store_timeout)"
                    ))),
                }
            })
        }))
    }
}

struct InboxService<DB: Backend> {
    inner: ClassifiedService,
    inbox: Arc<SqlInbox<DB>>,
}

impl<DB: Backend> Clone for InboxService<DB> {
    fn clone(&self) -> Self {
        InboxService {
            inner: self.inner.clone(),
            inbox: self.inbox.clone(),
        }
    }
}

impl<DB: Backend> Service<Message> for InboxService<DB> {
    type Response = Processed;
    type Error = HandlerError;
    type Future = BoxFuture<Result<Processed, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(run(self.inbox.clone(), inner, msg))
    }
}

fn text(s: &str) -> Arg {
    Arg::Text(s.to_owned())
}

enum Entry {
    Owned,
    Duplicate,
    /// Done as poison and not a replay: dead-letter this copy too.
    Poisoned,
    Mismatch,
    Busy,
}

impl<DB: Backend> SqlInbox<DB> {
    fn store_error(&self, op: &str, e: sqlx::Error) -> HandlerError {
        HandlerError::store_unavailable(StoreError::with_source(
            format!("SQL inbox {op} on table {} failed", self.table),
            e,
        ))
    }

    /// Runs one of the inbox's own steps within the store timeout.
    async fn bounded<T>(
        &self,
        op: &str,
        step: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, HandlerError> {
        match tokio::time::timeout(self.store_timeout, step).await {
            Ok(r) => r.map_err(|e| self.store_error(op, e)),
            Err(_) => Err(HandlerError::store_unavailable(StoreError::new(format!(
                "SQL inbox {op} on table {} timed out after {:?} (store_timeout)",
                self.table, self.store_timeout
            )))),
        }
    }

    /// Inserts (or takes over) the dedup row inside `conn`'s transaction.
    async fn enter(
        &self,
        conn: &mut DB::Connection,
        key: &str,
        fp: Option<&str>,
        replay: bool,
    ) -> Result<Entry, sqlx::Error> {
        let c = &*self.consumer;
        let fp_arg = || Arg::OptText(fp.map(str::to_owned));
        let keep = Arg::Int(ms(self.retention));
        for _ in 0..4 {
            let args = vec![text(c), text(key), fp_arg(), keep.clone()];
            // Blocks while another transaction holds an uncommitted row for this key.
            if DB::execute(&mut *conn, &self.q.insert_done, args).await? == 1 {
                return Ok(Entry::Owned);
            }
            let args = vec![text(c), text(key)];
            let Some((state, _, row_fp, left)) =
                DB::fetch_record(&mut *conn, &self.q.record_locked, args).await?
            else {
                continue; // deleted by cleanup in between
            };
            if left <= 0 {
                let args = vec![fp_arg(), keep.clone(), text(c), text(key)];
                if DB::execute(&mut *conn, &self.q.take_expired, args).await? == 1 {
                    return Ok(Entry::Owned);
                }
                continue;
            }
            if let (Some(now), Some(then)) = (fp, row_fp.as_deref()) {
                if now != then && state != PROCESSING {
                    return Ok(Entry::Mismatch);
                }
            }
            return Ok(match state.as_str() {
                POISONED if replay => {
                    let args = vec![fp_arg(), keep.clone(), text(c), text(key)];
                    if DB::execute(&mut *conn, &self.q.reopen, args).await? == 1 {
                        Entry::Owned
                    } else {
                        Entry::Busy
                    }
                }
                POISONED => Entry::Poisoned,
                SUCCEEDED => Entry::Duplicate,
                _ => Entry::Busy,
            });
        }
        Ok(Entry::Busy)
    }

    /// Records, in a short statement committed at once, that `key` starts now;
    /// returns how many earlier starts never settled.
    async fn count_start(&self, key: &str) -> Result<u32, sqlx::Error> {
        if !self.counting.load(Ordering::Relaxed) {
            return Ok(0);
        }
        let mut conn = self.pool.acquire().await?;
        let c = &*self.consumer;
        let args = vec![text(c), text(key), Arg::Int(ms(self.retention))];
        // PostgreSQL and SQLite return the new count from the upsert itself.
        let counted = match DB::DIALECT {
            Dialect::MySql => DB::execute(&mut *conn, &self.q.count_start, args)
                .await
                .map(|_| None),
            _ => DB::fetch_int(&mut *conn, &self.q.count_start, args).await,
        };
        let n = match counted {
            Ok(Some(n)) => n,
            Ok(None) => {
                let args = vec![text(c), text(key)];
                DB::fetch_int(&mut *conn, &self.q.read_start, args)
                    .await?
                    .unwrap_or(1)
            }
            Err(e) if is_missing_table(&e) => {
                if self.counting.swap(false, Ordering::Relaxed) {
                    tracing::warn!(table = %self.q.starts_table, "the inbox's start counters table is missing: crash loops are not detected; run ensure_schema() to create it");
                }
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
        Ok(u32::try_from(n.saturating_sub(1)).unwrap_or(0))
    }

    /// The message settled without committing (duplicate, failure, poison): forget
    /// its start. A failure here only leaves a counter that a later success clears.
    async fn clear_start(&self, key: &str) {
        if !self.counting.load(Ordering::Relaxed) {
            return;
        }
        let cleared = async {
            let mut conn = self.pool.acquire().await?;
            let args = vec![text(&self.consumer), text(key)];
            DB::execute(&mut *conn, &self.q.clear_start, args).await
        };
        match tokio::time::timeout(self.store_timeout, cleared).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(key = %key, error = %e, "could not clear the start counter")
            }
            Err(_) => tracing::debug!(key = %key, "clearing the start counter timed out"),
        }
    }

    async fn record_poison(&self, key: &str, fp: Option<&str>) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let c = &*self.consumer;
        let fp_arg = || Arg::OptText(fp.map(str::to_owned));
        let keep = Arg::Int(ms(self.retention));
        let args = vec![text(c), text(key), fp_arg(), keep.clone()];
        if DB::execute(&mut *conn, &self.q.insert_poisoned, args).await? == 0 {
            let args = vec![fp_arg(), keep, text(c), text(key)];
            DB::execute(&mut *conn, &self.q.mark_poisoned, args).await?;
        }
        Ok(())
    }
}

async fn run<DB: Backend>(
    inbox: Arc<SqlInbox<DB>>,
    inner: ClassifiedService,
    msg: Message,
) -> Result<Processed, HandlerError> {
    let key = resolve_key(inbox.extractor.as_ref(), inbox.missing, &msg)?;
    tracing::Span::current().record("key", key.as_str());
    let scoped_key = key.clone();
    run_keyed(inbox, inner, msg, key)
        .await
        .map_err(|e| e.with_key(&scoped_key))
}

async fn run_keyed<DB: Backend>(
    inbox: Arc<SqlInbox<DB>>,
    inner: ClassifiedService,
    mut msg: Message,
    key: String,
) -> Result<Processed, HandlerError> {
    let fp = inbox.fingerprint.then(|| sha256_hex(&msg.body));
    let replay =
        idem_core::read::read_in::<String>(&msg, REPLAY_HEADER).is_some_and(|v| !v.is_empty());
    if let Err(m) = DB::DIALECT.check_lengths(&inbox.consumer, &key, None, fp.as_deref()) {
        return Err(HandlerError::permanent(StoreError::new(format!(
            "SQL inbox cannot record key {key:?}: {m}"
        ))));
    }

    // A suspect (redelivered) message waits until it can run alone, and its start is
    // committed before the handler's transaction begins; see `idem_core::crash`.
    let guard = CrashGuard::of(&msg);
    let _turn = guard.turn(&msg).await;
    let earlier = inbox
        .bounded("start count", inbox.count_start(&key))
        .await?;

    let mut tx = match inbox.bounded("begin", DB::begin(&inbox.pool)).await {
        Ok(tx) => tx,
        Err(e) => {
            inbox.clear_start(&key).await;
            return Err(e);
        }
    };
    let entry = inbox
        .bounded("claim", inbox.enter(&mut *tx, &key, fp.as_deref(), replay))
        .await;
    match entry {
        Ok(Entry::Owned) => {
            if let Err(crashed) = guard.check(earlier) {
                let _ = tx.rollback().await;
                tracing::warn!(key = %key, times = crashed.times, "message crashed or hung the worker too often; dead-lettering it without running it");
                let recorded =
                    inbox.bounded("poison record", inbox.record_poison(&key, fp.as_deref()));
                if let Err(err) = recorded.await {
                    tracing::warn!(key = %key, error = %err, "could not record the poisoned message; a redelivery would be dead-lettered again");
                }
                inbox.clear_start(&key).await;
                return Err(HandlerError::permanent(crashed));
            }
        }
        other => {
            // Nothing was written: a rollback failure only closes the connection.
            let _ = tx.rollback().await;
            inbox.clear_start(&key).await;
            return match other {
                Ok(Entry::Duplicate) => Ok(Processed::Duplicate),
                Ok(Entry::Poisoned) => Err(HandlerError::permanent(PreviouslyPoisonedError(key))),
                Ok(Entry::Mismatch) => Err(HandlerError::permanent(PayloadMismatchError(key))),
                Ok(_) => Err(busy(inbox.busy_delay)),
                Err(e) => Err(e),
            };
        }
    }
    if replay {
        tracing::debug!(key = %key, "operator replay: running the message again");
    }

    let slot: Slot<DB> = Arc::new(Mutex::new(Some(tx)));
    msg.extensions.insert(InboxTx(slot.clone()));
    msg.extensions.insert(IdempotencyKey(key.clone()));
    let result = inner.oneshot(msg).await;
    let tx = slot.lock().await.take();

    match result {
        Ok(()) => {
            let Some(mut tx) = tx else {
                inbox.clear_start(&key).await;
                return Err(HandlerError::transient(TxClosed));
            };
            // A PostgreSQL transaction in which a statement failed "commits" as a
            // rollback without an error: make sure our row is still there first.
            let args = vec![text(&inbox.consumer), text(&key)];
            let check = DB::fetch_record(&mut *tx, &inbox.q.record, args);
            match inbox.bounded("pre-commit check", check).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    let _ = tx.rollback().await;
                    inbox.clear_start(&key).await;
                    return Err(HandlerError::transient(StoreError::new(
                        "the inbox row vanished from the transaction; rolled back",
                    )));
                }
                Err(e) => {
                    let _ = tx.rollback().await;
                    inbox.clear_start(&key).await;
                    return Err(e);
                }
            }
            // The start settles with the effect, in the same transaction.
            let args = vec![text(&inbox.consumer), text(&key)];
            let counting = inbox.counting.load(Ordering::Relaxed);
            if counting {
                let cleared = DB::execute(&mut *tx, &inbox.q.clear_start, args);
                if let Err(e) = inbox.bounded("start count", cleared).await {
                    let _ = tx.rollback().await;
                    inbox.clear_start(&key).await;
                    return Err(e);
                }
            }
            if let Err(e) = inbox.bounded("commit", tx.commit()).await {
                inbox.clear_start(&key).await;
                return Err(e);
            }
            Ok(Processed::Handled)
        }
        Err(e) => {
            if let Some(tx) = tx {
                if let Err(err) = tx.rollback().await {
                    tracing::debug!(error = %err, "inbox rollback failed; the connection is discarded");
                }
            }
            if e.kind() == Some(ErrorKind::Permanent) {
                let recorded =
                    inbox.bounded("poison record", inbox.record_poison(&key, fp.as_deref()));
                if let Err(err) = recorded.await {
                    tracing::warn!(key = %key, error = %err, "could not record the poisoned message; a redelivery would run it again");
                }
            }
            inbox.clear_start(&key).await;
            Err(e)
        }
    }
}

/// The pre-commit check of the inbox on PostgreSQL, against a real server
/// (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).
#[cfg(all(test, feature = "postgres"))]
#[allow(clippy::unwrap_used)]
mod pg_commit_check {
    use super::*;
    use crate::PgInbox;
    use idem_core::{Consumer, Disposition, State};
    use sqlx::postgres::PgPoolOptions;
    use sqlx::{Executor as _, PgPool, Postgres};

    async fn pool() -> PgPool {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        // One connection: every message reuses the connection the last one committed on.
        match PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&url)
            .await
        {
            Ok(p) => p,
            Err(e) => panic!(
                "PostgreSQL not reachable (set DATABASE_URL): start it with `service postgresql start`: {e}"
            ),
        }
    }

    /// What the handler does in its transaction before returning `Ok`.
    #[derive(Clone, Copy)]
    enum Misuse {
        None,
        /// A failing statement whose error it ignores (the transaction is aborted).
        SwallowedError,
        /// A failing statement inside a savepoint it rolls back, then the insert.
        SavepointRecovered,
        /// Deletes the inbox row.
        DeletesInboxRow,
        /// Ends the transaction itself.
        RawRollback,
    }

    #[derive(Clone)]
    struct Ctx {
        fx: Arc<str>,
        inbox: Arc<str>,
        misuse: Misuse,
    }

    async fn handler(
        State(ctx): State<Ctx>,
        key: IdempotencyKey,
        tx: Tx<Postgres>,
    ) -> Result<(), HandlerError> {
        let mut conn = tx.conn().await?;
        let insert = format!("INSERT INTO {} (k) VALUES ($1)", ctx.fx);
        match ctx.misuse {
            Misuse::None => {}
            Misuse::SwallowedError => {
                let _ = conn.execute("SELECT 1 / 0").await;
            }
            Misuse::SavepointRecovered => {
                let mut sp = sqlx::Connection::begin(&mut *conn).await?;
                assert!(sp.execute("SELECT 1 / 0").await.is_err());
                sp.rollback().await?;
            }
            Misuse::DeletesInboxRow => {
                conn.execute(&*format!("DELETE FROM {}", ctx.inbox)).await?;
            }
            Misuse::RawRollback => {
                conn.execute("ROLLBACK").await?;
            }
        }
        let _ = sqlx::query(&insert)
            .bind(key.as_str())
            .execute(&mut *conn)
            .await;
        Ok(())
    }

    async fn run(misuse: Misuse) -> (Vec<Disposition>, i64, i64) {
        let pool = pool().await;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (fx, table) = (format!("idem_cc_fx_{id}"), format!("idem_cc_inbox_{id}"));
        pool.execute(&*format!("CREATE TABLE {fx} (k TEXT PRIMARY KEY)"))
            .await
            .unwrap();
        let inbox = PgInbox::new(pool.clone(), "cc").table(&table).unwrap();
        inbox.ensure_schema().await.unwrap();
        let ctx = Ctx {
            fx: fx.as_str().into(),
            inbox: table.as_str().into(),
            misuse,
        };
        let consumer = Consumer::builder("cc")
            .dedup(inbox)
            .handler_with_state(handler, ctx)
            .unwrap();
        let mut out = Vec::new();
        for _ in 0..2 {
            out.push(
                consumer
                    .process(Message::new("{}").with_message_id("m-1"))
                    .await,
            );
        }
        // The pool's only connection must be back outside any transaction.
        let mut conn = pool.acquire().await.unwrap();
        let err = conn.execute("SAVEPOINT probe").await.unwrap_err();
        assert_eq!(
            err.as_database_error().and_then(|d| d.code()).as_deref(),
            Some("25P01"),
            "connection left inside a transaction"
        );
        drop(conn);
        let count = |t: String| {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {t}"))
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        let (effects, rows) = (count(fx.clone()).await, count(table.clone()).await);
        for t in [fx, table.clone(), format!("{table}_starts")] {
            pool.execute(&*format!("DROP TABLE {t}")).await.unwrap();
        }
        (out, effects, rows)
    }

    fn is_transient_retry(d: &Disposition) -> bool {
        matches!(d, Disposition::Retry { failure, .. } if failure.kind == ErrorKind::Transient)
    }

    #[tokio::test]
    async fn commits_effect_and_row_then_duplicate() {
        let (out, effects, rows) = run(Misuse::None).await;
        assert_eq!(out[0], Disposition::Ack { duplicate: false });
        assert_eq!(out[1], Disposition::Ack { duplicate: true });
        assert_eq!((effects, rows), (1, 1));
    }

    #[tokio::test]
    async fn swallowed_statement_error_is_not_acked_and_writes_nothing() {
        let (out, effects, rows) = run(Misuse::SwallowedError).await;
        assert!(out.iter().all(is_transient_retry), "{out:?}");
        assert_eq!((effects, rows), (0, 0));
    }

    #[tokio::test]
    async fn handler_savepoints_still_work() {
        let (out, effects, rows) = run(Misuse::SavepointRecovered).await;
        assert_eq!(out[0], Disposition::Ack { duplicate: false });
        assert_eq!(out[1], Disposition::Ack { duplicate: true });
        assert_eq!((effects, rows), (1, 1));
    }

    #[tokio::test]
    async fn deleted_inbox_row_is_not_acked() {
        let (out, effects, rows) = run(Misuse::DeletesInboxRow).await;
        assert!(out.iter().all(is_transient_retry), "{out:?}");
        assert_eq!((effects, rows), (0, 0));
    }

    #[tokio::test]
    async fn handler_ending_the_transaction_is_not_acked() {
        let (out, _, rows) = run(Misuse::RawRollback).await;
        assert!(out.iter().all(is_transient_retry), "{out:?}");
        assert_eq!(rows, 0);
    }
}
