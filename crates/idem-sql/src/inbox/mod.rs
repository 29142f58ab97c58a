//! The transactional inbox: [`SqlInbox`] writes the dedup row in the same transaction
//! as the handler's own writes, handed to the handler as a [`Tx`].
//!
//! Split along its seams: [`tx`] (what the handler receives), [`queries`] (the SQL),
//! [`session`] (one message's admission steps); this module holds the inbox, its
//! settings and its tower service.

#[cfg(feature = "postgres")]
mod batch;
mod queries;
mod session;
#[cfg(feature = "postgres")]
mod starts;
mod tx;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use idem_core::__private::admit;
use idem_core::breaker::HealthCheck;
use idem_core::consumer::Deduplicate;
use idem_core::consumer::{ClassifiedService, DedupedService};
use idem_core::dedup::{DedupSettings, KeyExtractor, MissingKey, StoreError, StoreErrorKind};
use idem_core::{HandlerError, Message, Processed};
use sqlx::Pool;
use tower::util::BoxCloneSyncService;
use tower::Service;

use crate::backend::Backend;
use crate::schema::{self, CleanupHandle, InvalidTableName, TableName, CLEANUP_BATCH};
use queries::Queries;
use session::InboxSession;
#[cfg(feature = "postgres")]
use starts::StartCounter;
pub use tx::{NoInbox, Tx, TxClosed, TxConn};

/// Without PostgreSQL support, no batched start counter exists.
#[cfg(not(feature = "postgres"))]
#[derive(Clone)]
enum StartCounter {}

#[cfg(not(feature = "postgres"))]
impl StartCounter {
    fn for_pool<P>(_: &P, _: &TableName) -> Option<Self> {
        None
    }

    async fn count(&self, _: &Arc<str>, _: &str, _: i64) -> Result<i64, StoreError> {
        match *self {}
    }
}

/// Default table of the inbox.
pub const DEFAULT_INBOX_TABLE: &str = "idem_inbox";

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
/// Keys are scoped by the name of the consumer the inbox is given to
/// (`Consumer::builder(name).dedup(inbox)`), the name the consumer writes in
/// `x-idem-consumer`. Use the aliases [`PgInbox`](crate::PgInbox),
/// [`SqliteInbox`](crate::SqliteInbox), [`MySqlInbox`](crate::MySqlInbox).
///
/// Built like every idem store: `new(pool)`, then chained setters named after the
/// setting, each returning the inbox (`.key(..)`, `.retention(..)`, `.table(..)`);
/// the one fallible setting has a `try_` setter ([`try_table`](Self::try_table), the
/// name is validated there). Values are read back through getters named for what
/// they return ([`table_name`](Self::table_name), [`dedup_settings`](Self::dedup_settings)).
/// The settings shared with the lease-store `DedupLayer` are one
/// [`DedupSettings`], and both admit messages through the same steps
/// (see [`idem_core::dedup`]).
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
/// let inbox = PgInbox::new(pool).try_table("billing_inbox")?;
/// inbox.ensure_schema().await?;
/// let consumer = Consumer::builder("billing").dedup(inbox).handler(charge)?;
/// # let _ = consumer; Ok(()) }
/// ```
pub struct SqlInbox<DB: Backend> {
    pool: Pool<DB>,
    table: TableName,
    q: Queries,
    settings: DedupSettings,
    /// PostgreSQL: the start counts of concurrent deliveries, batched.
    starts: Option<StartCounter>,
}

impl<DB: Backend> Clone for SqlInbox<DB> {
    fn clone(&self) -> Self {
        SqlInbox {
            pool: self.pool.clone(),
            table: self.table.clone(),
            q: self.q.clone(),
            settings: self.settings.clone(),
            starts: self.starts.clone(),
        }
    }
}

impl<DB: Backend> fmt::Debug for SqlInbox<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlInbox")
            .field("dialect", &DB::DIALECT)
            .field("table", &self.table.to_string())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> SqlInbox<DB> {
    /// An inbox on `pool`, table [`DEFAULT_INBOX_TABLE`], with the [`DedupSettings`]
    /// defaults: key from [`DefaultKey`](idem_core::dedup::DefaultKey), missing key
    /// is poison, retention 7 days, payload fingerprints checked, store timeout 5 s.
    pub fn new(pool: Pool<DB>) -> Self {
        let table = TableName::trusted(DEFAULT_INBOX_TABLE);
        let q = Queries::new(DB::DIALECT, &table);
        SqlInbox {
            starts: StartCounter::for_pool(&pool, &q.starts_table),
            q,
            pool,
            table,
            settings: DedupSettings::default(),
        }
    }

    /// Uses table `table` (an already validated name).
    pub fn table(mut self, table: TableName) -> Self {
        self.q = Queries::new(DB::DIALECT, &table);
        self.starts = StartCounter::for_pool(&self.pool, &self.q.starts_table);
        self.table = table;
        self
    }

    /// Uses table `table` (`name` or `schema.name`), validated here.
    pub fn try_table(self, table: &str) -> Result<Self, InvalidTableName> {
        Ok(self.table(TableName::parse(table)?))
    }

    /// Where the key comes from ([`DedupSettings::key`]).
    pub fn key(mut self, extractor: impl KeyExtractor) -> Self {
        self.settings.key = Arc::new(extractor);
        self
    }

    /// Policy for messages without a key ([`DedupSettings::missing_key`]).
    pub fn missing_key(mut self, policy: MissingKey) -> Self {
        self.settings.missing_key = policy;
        self
    }

    /// How long rows are kept ([`DedupSettings::retention`]; must cover the longest
    /// retry horizon, the consumer builder checks).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.settings.retention = retention;
        self
    }

    /// Whether to record a SHA-256 of the payload and poison a message whose key is
    /// done with a different payload ([`DedupSettings::fingerprint`], default on).
    pub fn fingerprint(mut self, on: bool) -> Self {
        self.settings.fingerprint = on;
        self
    }

    /// Shortest delay before retrying a message whose key another transaction holds
    /// ([`DedupSettings::min_busy_delay`], default 1 s).
    pub fn min_busy_delay(mut self, delay: Duration) -> Self {
        self.settings.min_busy_delay = delay;
        self
    }

    /// Longest time each of the inbox's own steps may take
    /// ([`DedupSettings::store_timeout`], default 5 s, well under sqlx's 30 s pool
    /// acquire timeout): beginning the transaction (the pool's connection wait
    /// included) and inserting the row, the pre-commit check and commit, recording a
    /// poisoned message. A step that runs out of time is a store failure: transient,
    /// counted by the consumer's circuit breaker. The handler's own statements are
    /// bounded by the handler timeout instead. A commit that timed out may still have
    /// committed; the redelivery then finds the row and is acked as a duplicate.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.settings.store_timeout = timeout;
        self
    }

    /// Replaces every shared setting at once (e.g. the settings of a `DedupLayer`).
    pub fn settings(mut self, settings: DedupSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The shared settings in force.
    pub fn dedup_settings(&self) -> &DedupSettings {
        &self.settings
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
    fn wrap(&self, consumer: Arc<str>, inner: ClassifiedService) -> DedupedService {
        BoxCloneSyncService::new(InboxService {
            inner,
            inbox: Arc::new(self.clone()),
            consumer,
        })
    }

    fn dedup_settings(&self) -> &DedupSettings {
        &self.settings
    }

    fn lease_duration(&self) -> Option<Duration> {
        None
    }

    /// On PostgreSQL, a batch handler runs each batch in one transaction (see
    /// [`idem_core::batch`]); on SQLite and MariaDB/MySQL each message of a batch is
    /// admitted in a transaction of its own.
    fn wrap_batch(
        &self,
        consumer: Arc<str>,
        runner: idem_core::batch::BatchRunner,
    ) -> Option<DedupedService> {
        #[cfg(feature = "postgres")]
        if let Some(pg) = (self as &dyn std::any::Any).downcast_ref::<SqlInbox<sqlx::Postgres>>() {
            let sql = Arc::new(batch::BatchSql::new(&pg.table, &pg.q));
            let inbox = Arc::new(pg.clone());
            let config = runner.config();
            return Some(idem_core::__private::collected(config, move |messages| {
                let run = batch::Run {
                    inbox: inbox.clone(),
                    sql: sql.clone(),
                    consumer: consumer.clone(),
                    runner: runner.clone(),
                };
                Box::pin(run.run(messages))
            }));
        }
        let _ = (consumer, runner);
        None
    }

    fn health_check(&self) -> Option<HealthCheck> {
        let pool = self.pool.clone();
        let limit = self.settings.effective_store_timeout();
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
                    Ok(Err(e)) => Err(crate::schema::store_error(
                        format!("SQL inbox on table {table}: health probe failed"),
                        e,
                    )),
                    Err(_) => Err(StoreError::new(format!(
                        "SQL inbox on table {table}: health probe timed out after {limit:?} (store_timeout)"
                    ))
                    .with_kind(StoreErrorKind::Timeout)),
                }
            })
        }))
    }
}

/// The inbox as a service of consumer `consumer`.
struct InboxService<DB: Backend> {
    inner: ClassifiedService,
    inbox: Arc<SqlInbox<DB>>,
    consumer: Arc<str>,
}

impl<DB: Backend> Clone for InboxService<DB> {
    fn clone(&self) -> Self {
        InboxService {
            inner: self.inner.clone(),
            inbox: self.inbox.clone(),
            consumer: self.consumer.clone(),
        }
    }
}

impl<DB: Backend> Service<Message> for InboxService<DB> {
    type Response = Processed;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Processed, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (inbox, consumer) = (self.inbox.clone(), self.consumer.clone());
        Box::pin(async move {
            let open = |key: &str, fingerprint: Option<&str>| {
                InboxSession::open(inbox.clone(), consumer.clone(), key, fingerprint)
            };
            admit(&inbox.settings, open, inner, msg).await
        })
    }
}
