//! Table names, the DDL, and retention cleanup.

use std::fmt;
use std::time::Duration;

use idem_core::dedup::{StoreError, StoreErrorKind};
use sqlx::Pool;

use crate::backend::{Arg, Backend, Dialect};

/// A validated table name: `name` or `schema.name`, each part matching
/// `[A-Za-z_][A-Za-z0-9_]{0,62}`. Nothing from configuration reaches SQL unchecked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

/// A table name that is not a plain identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid table name {0:?}: expected `name` or `schema.name`, each matching [A-Za-z_][A-Za-z0-9_]{{0,62}}")]
pub struct InvalidTableName(pub String);

impl TableName {
    /// Validates `name`.
    pub fn parse(name: &str) -> Result<Self, InvalidTableName> {
        let (schema, table) = idem_core::__private::split_table_name(name)
            .ok_or_else(|| InvalidTableName(name.to_owned()))?;
        Ok(TableName {
            schema: schema.map(str::to_owned),
            name: table.to_owned(),
        })
    }

    /// A built-in default name (a valid identifier by construction).
    pub(crate) fn trusted(name: &'static str) -> Self {
        TableName {
            schema: None,
            name: name.to_owned(),
        }
    }

    /// This name with `suffix` appended to the table part (cut to stay a valid
    /// identifier of at most 63 characters), in the same schema.
    pub(crate) fn suffixed(&self, suffix: &str) -> TableName {
        let keep = 63usize.saturating_sub(suffix.len());
        let base: String = self.name.chars().take(keep).collect();
        TableName {
            schema: self.schema.clone(),
            name: format!("{base}{suffix}"),
        }
    }

    /// The table without its schema.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The schema, if qualified.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl std::str::FromStr for TableName {
    type Err = InvalidTableName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TableName::parse(s)
    }
}

/// The statements creating a dedup table (same layout for the lease store and the
/// inbox). Each is idempotent.
pub(crate) fn ddl(dialect: Dialect, table: &TableName) -> Vec<String> {
    let t = table.to_string();
    let base = table.name();
    match dialect {
        Dialect::Postgres | Dialect::Sqlite => {
            // SQLite puts the index in the table's schema and names the table bare.
            let (int, index) = match (dialect, table.schema()) {
                (Dialect::Postgres, _) => ("BIGINT", format!("{base}_expires_idx ON {t}")),
                (_, Some(s)) => ("INTEGER", format!("{s}.{base}_expires_idx ON {base}")),
                (_, None) => ("INTEGER", format!("{base}_expires_idx ON {base}")),
            };
            vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} (\
                     consumer TEXT NOT NULL, idem_key TEXT NOT NULL, state TEXT NOT NULL, \
                     owner TEXT, fingerprint TEXT, expires_at {int} NOT NULL, \
                     PRIMARY KEY (consumer, idem_key))"
                ),
                format!("CREATE INDEX IF NOT EXISTS {index} (expires_at)"),
            ]
        }
        // Binary collation: keys compare byte for byte, as in Redis and PostgreSQL.
        // (200 + 512) * 4 bytes of primary key fits InnoDB's 3072-byte limit.
        Dialect::MySql => vec![format!(
            "CREATE TABLE IF NOT EXISTS {t} (\
             consumer VARCHAR(200) NOT NULL, idem_key VARCHAR(512) NOT NULL, \
             state VARCHAR(16) NOT NULL, owner VARCHAR(255) NULL, fingerprint VARCHAR(255) NULL, \
             expires_at BIGINT NOT NULL, PRIMARY KEY (consumer, idem_key), \
             INDEX idem_expires_idx (expires_at)) \
             ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
        )],
    }
}

fn sql_err(op: &str, table: &TableName, e: sqlx::Error) -> StoreError {
    store_error(format!("SQL dedup {op} on table {table} failed"), e)
}

/// A [`StoreError`] for a failed statement, its kind read from sqlx's error: no
/// connection (I/O, TLS, pool exhausted or closed) is `Unavailable`, an error the
/// database returned is `Refused`, the rest `Other`.
pub(crate) fn store_error(message: String, e: sqlx::Error) -> StoreError {
    let kind = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreErrorKind::Unavailable,
        sqlx::Error::Database(_) => StoreErrorKind::Refused,
        _ => StoreErrorKind::Other,
    };
    StoreError::with_source(message, e).with_kind(kind)
}

/// Creates the table and its index if missing. Safe to call from many processes at
/// once: PostgreSQL serialises it with a transaction-scoped advisory lock, SQLite
/// with its write lock, MariaDB with its metadata locks.
pub(crate) async fn ensure_schema<DB: Backend>(
    pool: &Pool<DB>,
    table: &TableName,
) -> Result<(), StoreError> {
    ensure_ddl(pool, table, ddl(DB::DIALECT, table)).await
}

/// The statements creating the inbox's start counters (crash counting): one row per
/// message that started and has not settled. A table of its own, so the inbox table
/// keeps its layout and older workers are not affected.
pub(crate) fn starts_ddl(dialect: Dialect, table: &TableName) -> Vec<String> {
    let t = table.to_string();
    match dialect {
        Dialect::Postgres => vec![format!(
            "CREATE TABLE IF NOT EXISTS {t} (\
             consumer TEXT NOT NULL, idem_key TEXT NOT NULL, starts BIGINT NOT NULL, \
             expires_at BIGINT NOT NULL, PRIMARY KEY (consumer, idem_key))"
        )],
        Dialect::Sqlite => vec![format!(
            "CREATE TABLE IF NOT EXISTS {t} (\
             consumer TEXT NOT NULL, idem_key TEXT NOT NULL, starts INTEGER NOT NULL, \
             expires_at INTEGER NOT NULL, PRIMARY KEY (consumer, idem_key))"
        )],
        Dialect::MySql => vec![format!(
            "CREATE TABLE IF NOT EXISTS {t} (\
             consumer VARCHAR(200) NOT NULL, idem_key VARCHAR(512) NOT NULL, \
             starts BIGINT NOT NULL, expires_at BIGINT NOT NULL, \
             PRIMARY KEY (consumer, idem_key)) \
             ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
        )],
    }
}

/// Runs `statements` (idempotent DDL) in one transaction; see [`ensure_schema`].
pub(crate) async fn ensure_ddl<DB: Backend>(
    pool: &Pool<DB>,
    table: &TableName,
    statements: Vec<String>,
) -> Result<(), StoreError> {
    let err = |e| sql_err("schema creation", table, e);
    let mut tx = DB::begin(pool).await.map_err(err)?;
    if DB::DIALECT == Dialect::Postgres {
        // Concurrent CREATE TABLE IF NOT EXISTS can still collide in pg_type.
        DB::execute(
            &mut *tx,
            "SELECT pg_advisory_xact_lock(7140926551938)",
            vec![],
        )
        .await
        .map_err(err)?;
    }
    for stmt in statements {
        DB::execute(&mut *tx, &stmt, vec![]).await.map_err(err)?;
    }
    tx.commit().await.map_err(err)
}

/// Default number of rows one cleanup statement deletes.
pub const CLEANUP_BATCH: u32 = 1000;

pub(crate) fn cleanup_sql(dialect: Dialect, table: &TableName) -> String {
    let now = dialect.now_ms();
    let sql = match dialect {
        // SKIP LOCKED: never wait on (or block) a worker's row.
        Dialect::Postgres => format!(
            "DELETE FROM {table} WHERE (consumer, idem_key) IN (SELECT consumer, idem_key FROM {table} \
             WHERE expires_at <= {now} LIMIT ? FOR UPDATE SKIP LOCKED) AND expires_at <= {now}"
        ),
        Dialect::Sqlite => format!(
            "DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE expires_at <= {now} LIMIT ?)"
        ),
        Dialect::MySql => format!("DELETE FROM {table} WHERE expires_at <= {now} LIMIT ?"),
    };
    dialect.placeholders(&sql)
}

/// Deletes expired rows in batches of `batch` (one short statement each) until none
/// are left; returns how many it deleted.
pub(crate) async fn cleanup_expired<DB: Backend>(
    pool: &Pool<DB>,
    table: &TableName,
    sql: &str,
    batch: u32,
) -> Result<u64, StoreError> {
    let batch = batch.max(1);
    let mut total = 0;
    loop {
        let mut conn = pool
            .acquire()
            .await
            .map_err(|e| sql_err("cleanup", table, e))?;
        let n = DB::execute(&mut *conn, sql, vec![Arg::Int(i64::from(batch))])
            .await
            .map_err(|e| sql_err("cleanup", table, e))?;
        drop(conn);
        total += n;
        if n < u64::from(batch) {
            return Ok(total);
        }
        // Let workers at the table between batches.
        tokio::task::yield_now().await;
    }
}

/// The background retention cleanup started by `spawn_cleanup`. Dropping it (or
/// [`stop`](Self::stop)) stops the task.
#[must_use = "the cleanup task stops when its handle is dropped"]
#[derive(Debug)]
pub struct CleanupHandle {
    task: tokio::task::JoinHandle<()>,
}

impl CleanupHandle {
    pub(crate) fn spawn<DB: Backend>(
        pool: Pool<DB>,
        table: TableName,
        interval: Duration,
        batch: u32,
    ) -> Self {
        let sql = cleanup_sql(DB::DIALECT, &table);
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                match cleanup_expired(&pool, &table, &sql, batch).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::debug!(table = %table, deleted = n, "expired dedup rows deleted")
                    }
                    Err(e) => {
                        tracing::warn!(table = %table, error = %e, "dedup cleanup failed; will try again")
                    }
                }
            }
        });
        CleanupHandle { task }
    }

    /// Stops the task.
    pub fn stop(self) {}

    /// Whether the task ended (it only ends when stopped or on a panic).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for CleanupHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_table_names() {
        for ok in ["idem_dedup", "_x", "public.idem_inbox", "A1"] {
            assert!(TableName::parse(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "t; DROP TABLE users",
            "a.b.c",
            ".t",
            "s.",
            "\"quoted\"",
            long.as_str(),
        ] {
            let err = TableName::parse(bad).unwrap_err();
            assert!(err.to_string().contains("invalid table name"), "{bad}");
        }
        assert_eq!(TableName::parse(&"a".repeat(63)).unwrap().name().len(), 63);
        assert_eq!(
            TableName::parse("s.t").unwrap().to_string(),
            "s.t",
            "qualified name round-trips"
        );
    }
}
