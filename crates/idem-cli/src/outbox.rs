//! `idem outbox status`: pending rows and the outbox lag.

use std::time::Duration;

use idem_outbox::Outbox;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::Connection;

use crate::error::CliError;

/// The database used when neither `--database-url` nor `DATABASE_URL` gives one.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The outbox state, as printed by `idem outbox status --json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutboxReport {
    /// The outbox table.
    pub table: String,
    /// Rows not yet published.
    pub pending: i64,
    /// Age of the oldest pending row, in seconds (the outbox lag).
    pub oldest_pending_age_secs: Option<f64>,
    /// Published rows not yet cleaned up.
    pub published: i64,
}

/// Reads the status of outbox `table` in the PostgreSQL database at `url`.
pub async fn status(url: &str, table: &str) -> Result<OutboxReport, CliError> {
    let outbox = Outbox::new(table).map_err(|e| CliError::Usage(e.to_string()))?;
    let safe_url = idem_core::redact_url(url);
    let unreachable = |detail: String| {
        CliError::Unreachable(format!(
            "cannot connect to PostgreSQL at {safe_url}: {} (is it running? set DATABASE_URL or --database-url)",
            scrub(&detail, url)
        ))
    };
    let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
        CliError::Usage(format!(
            "invalid database URL {safe_url}: {}",
            scrub(&e.to_string(), url)
        ))
    })?;
    // One direct attempt first: a pool would retry a refused connection until its
    // acquire timeout.
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
        }
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => {
            return Err(unreachable(format!(
                "no answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            )))
        }
    }
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let result = outbox.status(&pool).await;
    pool.close().await;
    let s = result.map_err(|e| {
        let text = scrub(&e.to_string(), url);
        match &e {
            idem_outbox::OutboxError::Database(sqlx::Error::Database(db))
                if db.code().as_deref() == Some("42P01") =>
            {
                CliError::NotFound(format!(
                    "outbox table {table:?} does not exist in {safe_url} (check --table)"
                ))
            }
            idem_outbox::OutboxError::Database(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed,
            ) => CliError::Unreachable(text),
            _ => CliError::Failed(text),
        }
    })?;
    Ok(OutboxReport {
        table: table.to_owned(),
        pending: s.pending,
        oldest_pending_age_secs: s.oldest_pending_age.map(|d| d.as_secs_f64()),
        published: s.published,
    })
}

/// Removes `url` and its password from an error text.
fn scrub(text: &str, url: &str) -> String {
    idem_core::redact_in(text, url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubs_passwords() {
        let url = "postgres://app:hunter2@db/x";
        let t = scrub(&format!("error at {url}: auth hunter2"), url);
        assert!(!t.contains("hunter2"), "{t}");
    }
}
