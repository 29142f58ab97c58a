//! The set-up of the PostgreSQL inbox tests: a pool on the test server, an inbox on a
//! fresh table, the table a handler writes its effect to, and their clean-up.

use std::future::Future;

use idem_sql::{PgInbox, PgStore};
use idem_testkit::drop_pg_table;
use idem_testkit::logs::LogCapture;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};

use super::unique;

/// A pool of at most `max` connections on the test PostgreSQL, named after `tag`.
pub(crate) async fn pool(tag: &str, max: u32) -> PgPool {
    idem_testkit::postgres(PgPoolOptions::new().max_connections(max), &unique(tag)).await
}

/// sqlx's statement log, captured from now on (filter it by the store's table), and a
/// lease store on a fresh table named after `tag` over a pool of at most `max`
/// connections, its schema created.
pub(crate) async fn logged_store(tag: &str, max: u32) -> (LogCapture, PgPool, PgStore) {
    let log = LogCapture::default();
    log.install_global("sqlx::query=debug");
    let pool = pool(tag, max).await;
    let store = PgStore::new(pool.clone()).try_table(&unique(tag)).unwrap();
    store.ensure_schema().await.unwrap();
    (log, pool, store)
}

/// An inbox on a fresh table named after `tag`, its schema created.
pub(crate) async fn inbox(pool: &PgPool, tag: &str) -> PgInbox {
    let inbox = PgInbox::new(pool.clone()).try_table(&unique(tag)).unwrap();
    inbox.ensure_schema().await.unwrap();
    inbox
}

/// Creates a fresh effect table of `columns` (SQL column definitions); its name.
pub(crate) async fn effect_table(pool: &PgPool, columns: &str) -> String {
    let effects = unique("effects");
    sqlx::query(&format!("CREATE TABLE {effects} ({columns})"))
        .execute(pool)
        .await
        .unwrap();
    effects
}

/// A handler's effect row: runs `insert` on `conn` (the inbox transaction's
/// connection) with the message's `key` bound as `$1` and `run`, if any, as `$2`.
pub(crate) async fn insert_effect(
    conn: &mut PgConnection,
    insert: &str,
    key: &str,
    run: Option<i64>,
) -> sqlx::Result<()> {
    let query = sqlx::query(insert).bind(key);
    let query = match run {
        Some(run) => query.bind(run),
        None => query,
    };
    query.execute(conn).await.map(drop)
}

/// The number of rows in `table`.
pub(crate) async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// How many rows of `table` have `column` equal to `key`: a harness's effect probe.
pub(crate) fn rows_for(
    pool: &PgPool,
    table: &str,
    column: &str,
    key: String,
) -> impl Future<Output = Result<u64, sqlx::Error>> + 'static {
    let pool = pool.clone();
    let sql = format!("SELECT count(*) FROM {table} WHERE {column} = $1");
    async move {
        let n: i64 = sqlx::query_scalar(&sql).bind(key).fetch_one(&pool).await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// Drops the inbox's tables (records and start counters) and the tables `others`.
pub(crate) async fn drop_inbox(
    pool: &PgPool,
    inbox: &PgInbox,
    others: impl IntoIterator<Item = String>,
) {
    let own = [
        inbox.table_name().to_string(),
        inbox.starts_table_name().to_string(),
    ];
    for table in own.into_iter().chain(others) {
        drop_pg_table(pool, &table).await;
    }
}

/// The tables of one test: an inbox and the effect table of its handler.
pub(crate) struct Tables {
    pub(crate) pool: PgPool,
    pub(crate) effects: String,
    pub(crate) inbox: PgInbox,
}

impl Tables {
    /// A fresh inbox named after `tag` and a fresh effect table of `columns`.
    pub(crate) async fn new(pool: PgPool, tag: &str, columns: &str) -> Self {
        let effects = effect_table(&pool, columns).await;
        let inbox = inbox(&pool, tag).await;
        Tables {
            pool,
            effects,
            inbox,
        }
    }

    /// The number of rows in `table`.
    pub(crate) async fn count(&self, table: &str) -> i64 {
        count(&self.pool, table).await
    }

    /// Drops the effect table and the inbox's tables.
    pub(crate) async fn drop_all(self) {
        drop_inbox(&self.pool, &self.inbox, [self.effects]).await;
    }
}
