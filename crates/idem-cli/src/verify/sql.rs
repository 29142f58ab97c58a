//! The SQL behind [`Records`](super::Records) for each database: look records up,
//! find `processing` rows past their lease. Both databases hold the `idem_sql`
//! layout; each query reads the database's own clock, as the stores do.

use std::time::Duration;

use idem_sql::TableName;

use super::records::RecordState;
use crate::error::CliError;

/// A record row: key, state, milliseconds until it expires.
type Row = (String, String, i64);

const PG_NOW_MS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

// UTC_TIMESTAMP does not depend on the session's time zone.
const MY_NOW_MS: &str =
    "CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000 AS SIGNED)";

/// The error for a failed query on `table`: a missing table is a usage error that
/// names the option.
pub(super) fn error(e: sqlx::Error, table: &TableName) -> CliError {
    let what = format!("reading records from {table} failed");
    CliError::sql(
        &e,
        format!(
            "no table {table} in that database: name the consumer's dedup table with --dedup-table (idem_inbox for the inbox, idem_dedup for the lease store, unless configured otherwise)"
        ),
        &what,
        &what,
    )
}

/// A `state` column's value.
pub(super) fn state(s: &str) -> Option<RecordState> {
    match s {
        "processing" => Some(RecordState::Processing),
        "succeeded" => Some(RecordState::Succeeded),
        "poisoned" => Some(RecordState::Poisoned),
        _ => None,
    }
}

/// Runs `sql` on `pool` with the consumer and `value` bound, in that order; errors
/// as [`error`].
pub(super) async fn fetch<'q, DB, R, V>(
    pool: &sqlx::Pool<DB>,
    sql: &'q str,
    table: &TableName,
    consumer: &'q str,
    value: V,
) -> Result<Vec<R>, CliError>
where
    DB: sqlx::Database,
    DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    V: 'q + sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    R: for<'r> sqlx::FromRow<'r, DB::Row> + Send + Unpin,
{
    sqlx::query_as(sql)
        .bind(consumer)
        .bind(value)
        .fetch_all(pool)
        .await
        .map_err(|e| error(e, table))
}

pub(super) async fn lookup_postgres(
    pool: &sqlx::PgPool,
    table: &TableName,
    consumer: &str,
    keys: &[String],
) -> Result<Vec<Row>, CliError> {
    let sql = format!(
        "SELECT idem_key, state, expires_at - {PG_NOW_MS} FROM {table} \
         WHERE consumer = $1 AND idem_key = ANY($2)"
    );
    fetch(pool, &sql, table, consumer, keys).await
}

pub(super) async fn lookup_mysql(
    pool: &sqlx::MySqlPool,
    table: &TableName,
    consumer: &str,
    keys: &[String],
) -> Result<Vec<Row>, CliError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // Binary-collated columns come back as VARBINARY from MariaDB: converted to text.
    let marks = vec!["?"; keys.len()].join(", ");
    let sql = format!(
        "SELECT CONVERT(idem_key USING utf8mb4), CONVERT(state USING utf8mb4), \
         CAST(expires_at AS SIGNED) - {MY_NOW_MS} FROM {table} \
         WHERE consumer = ? AND idem_key IN ({marks})"
    );
    let mut query = sqlx::query_as(&sql).bind(consumer);
    for key in keys {
        query = query.bind(key);
    }
    query.fetch_all(pool).await.map_err(|e| error(e, table))
}

/// Key and milliseconds since its lease ended.
pub(super) type Stuck = (String, i64);

/// The PostgreSQL query of [`Stuck`] rows: binds the consumer, then the limit.
pub(super) fn stuck_postgres(table: &TableName) -> String {
    format!(
        "SELECT idem_key, {PG_NOW_MS} - expires_at FROM {table} \
         WHERE consumer = $1 AND state = 'processing' AND expires_at < {PG_NOW_MS} \
         ORDER BY expires_at LIMIT $2"
    )
}

/// [`stuck_postgres`] for MariaDB/MySQL.
pub(super) fn stuck_mysql(table: &TableName) -> String {
    format!(
        "SELECT CONVERT(idem_key USING utf8mb4), {MY_NOW_MS} - CAST(expires_at AS SIGNED) \
         FROM {table} WHERE consumer = ? AND state = 'processing' AND expires_at < {MY_NOW_MS} \
         ORDER BY expires_at LIMIT ?"
    )
}

/// A pool of 2 on the MariaDB/MySQL database at `url`, failing fast (exit 2) when it
/// cannot be reached; no error carries the password.
pub(super) async fn connect_mysql(
    url: &str,
    tls: &idem_core::TlsConfig,
) -> Result<sqlx::MySqlPool, CliError> {
    let safe = idem_core::redact::redact_url(url);
    let options = idem_sql::tls::mysql_connect_options(url, tls).map_err(|e| {
        CliError::Usage(format!(
            "invalid --dedup-mysql URL {safe}: {}",
            idem_core::redact::redact_in(&e.to_string(), url)
        ))
    })?;
    sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| {
            CliError::Unreachable(format!(
                "cannot connect to MariaDB/MySQL at {safe}: {} (is it running? check --dedup-mysql)",
                idem_core::redact::redact_in(&e.to_string(), url)
            ))
        })
}
