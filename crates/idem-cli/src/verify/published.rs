//! What was published: the outbox rows of the window, or a list of ids; and the
//! outbox rows stuck pending.

use std::time::{Duration, UNIX_EPOCH};

use idem_outbox::Outbox;
use sqlx::PgPool;

use super::{Class, Finding, VerifyOptions};
use crate::error::CliError;

/// Rows the stuck-outbox query reports at most.
const STUCK_ROWS: i64 = 1000;

/// One published message id.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Published {
    /// The AMQP message id (the outbox's `message_id`), which is also the key.
    pub id: String,
    /// When its row was created (RFC 3339), for an outbox row.
    pub created_at: Option<String>,
    /// Seconds since it was published (or created, while pending), on the database's
    /// clock; `None` for an id given in a list.
    pub age_secs: Option<f64>,
    /// An outbox row not yet published.
    pub pending: bool,
}

/// Reads a list of message ids: one per line, blank lines and lines starting with
/// `#` skipped, surrounding whitespace trimmed.
pub fn read_ids(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The ids of a list, deduplicated in order.
pub(super) fn from_ids(ids: &[String]) -> Vec<Published> {
    let mut seen = std::collections::HashSet::new();
    ids.iter()
        .filter(|id| seen.insert(id.as_str()))
        .map(|id| Published {
            id: id.clone(),
            created_at: None,
            age_secs: None,
            pending: false,
        })
        .collect()
}

fn table_error(e: sqlx::Error, table: &str) -> CliError {
    let what = format!("reading outbox {table} failed");
    CliError::sql(
        &e,
        format!(
            "outbox table {table:?} does not exist in that database (check --outbox-table and --database-url)"
        ),
        &what,
        &what,
    )
}

fn epoch_secs(t: std::time::SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn valid_table(table: &str) -> Result<(), CliError> {
    Outbox::new(table)
        .map(|_| ())
        .map_err(|e| CliError::Usage(e.to_string()))
}

/// The rows of outbox `table` created within the window of `opts`, in id order.
pub(super) async fn outbox_window(
    pool: &PgPool,
    table: &str,
    opts: &VerifyOptions,
) -> Result<Vec<Published>, CliError> {
    valid_table(table)?;
    let sql = format!(
        "SELECT message_id, \
         to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
         CAST(EXTRACT(EPOCH FROM (now() - COALESCE(published_at, created_at))) AS DOUBLE PRECISION), \
         published_at IS NULL \
         FROM {table} WHERE created_at >= to_timestamp($1) AND created_at <= to_timestamp($2) \
         ORDER BY id"
    );
    let rows: Vec<(String, String, f64, bool)> = sqlx::query_as(&sql)
        .bind(epoch_secs(opts.since))
        .bind(epoch_secs(opts.until))
        .fetch_all(pool)
        .await
        .map_err(|e| table_error(e, table))?;
    Ok(rows
        .into_iter()
        .map(|(id, created, age, pending)| Published {
            id,
            created_at: Some(created),
            age_secs: Some(age),
            pending,
        })
        .collect())
}

/// Outbox rows due and still pending longer than `after` (the whole table, not only
/// the window: a stuck row may be older), at most [`STUCK_ROWS`].
pub(super) async fn stuck_rows(
    pool: &PgPool,
    table: &str,
    after: Duration,
) -> Result<Vec<Finding>, CliError> {
    valid_table(table)?;
    let sql = format!(
        "SELECT message_id, \
         CAST(EXTRACT(EPOCH FROM (now() - available_at)) AS DOUBLE PRECISION), \
         attempts, last_error FROM {table} \
         WHERE published_at IS NULL AND available_at < now() - make_interval(secs => $1) \
         ORDER BY id LIMIT $2"
    );
    let rows: Vec<(String, f64, i32, Option<String>)> = sqlx::query_as(&sql)
        .bind(after.as_secs_f64())
        .bind(STUCK_ROWS)
        .fetch_all(pool)
        .await
        .map_err(|e| table_error(e, table))?;
    Ok(rows
        .into_iter()
        .map(|(id, age, attempts, error)| {
            let error = error.map_or_else(String::new, |e| format!(", last error: {e}"));
            Finding::new(
                Class::Stuck,
                "outbox_pending",
                &id,
                format!(
                    "outbox row pending for {}, longer than {} ({attempts} publish attempt(s){error})",
                    super::render::age(age),
                    super::render::age(after.as_secs_f64())
                ),
            )
        })
        .collect())
}
