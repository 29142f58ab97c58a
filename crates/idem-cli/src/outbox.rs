//! `idem outbox status`: pending rows and the outbox lag. `idem outbox relay`: a
//! runnable relay.

use std::time::Duration;

use idem_outbox::Outbox;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::Connection;

use idem_core::TlsConfig;

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

/// Connects a pool of `max` connections, failing fast (exit 2) if the database is
/// unreachable.
async fn connect(url: &str, tls: &TlsConfig, max: u32) -> Result<sqlx::PgPool, CliError> {
    connect_pool(url, tls, max, "set DATABASE_URL or --database-url").await
}

/// [`connect`], the unreachable error ending with `hint` (where the URL comes from).
pub(crate) async fn connect_pool(
    url: &str,
    tls: &TlsConfig,
    max: u32,
    hint: &str,
) -> Result<sqlx::PgPool, CliError> {
    let safe_url = idem_core::redact::redact_url(url);
    let unreachable = |detail: String| {
        let detail = scrub(&detail, url);
        crate::tls::tls_error("PostgreSQL", &safe_url, &detail).unwrap_or_else(|| {
            CliError::Unreachable(format!(
                "cannot connect to PostgreSQL at {safe_url}: {detail} (is it running? {hint})",
            ))
        })
    };
    // sslmode=require is verified as verify-full; see idem_sql::tls.
    let options: PgConnectOptions =
        idem_sql::tls::pg_connect_options(url, tls).map_err(|e: sqlx::Error| {
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
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|e| unreachable(e.to_string()))
}

fn outbox_error(e: idem_outbox::OutboxError, url: &str, table: &str) -> CliError {
    let text = scrub(&e.to_string(), url);
    match &e {
        idem_outbox::OutboxError::Database(sqlx::Error::Database(db))
            if db.code().as_deref() == Some("42P01") =>
        {
            CliError::NotFound(format!(
                "outbox table {table:?} does not exist in {} (check --table, or --create-table for the relay)",
                idem_core::redact::redact_url(url)
            ))
        }
        idem_outbox::OutboxError::Database(
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed,
        ) => CliError::Unreachable(text),
        _ => CliError::Failed(text),
    }
}

/// Runs a relay for `table` until SIGINT/SIGTERM (`amqp_url`: one URL or a
/// comma-separated list), then returns what it published.
/// Broker outages are retried by the relay (rows wait); an unreachable database at
/// start or a missing table is an error.
pub async fn relay(
    database_url: &str,
    amqp_url: &str,
    table: &str,
    batch: i64,
    poll: Duration,
    create_table: bool,
) -> Result<idem_outbox::RelayStats, CliError> {
    let tls = TlsConfig::default();
    relay_tls(
        database_url,
        amqp_url,
        None,
        &tls,
        table,
        batch,
        poll,
        create_table,
    )
    .await
}

/// [`relay`] with a broker connection name (default `idem-outbox-relay`) and TLS
/// settings for both the database and `amqps://` broker URLs.
#[allow(clippy::too_many_arguments)] // one per command-line option
pub async fn relay_tls(
    database_url: &str,
    amqp_url: &str,
    connection_name: Option<&str>,
    tls: &TlsConfig,
    table: &str,
    batch: i64,
    poll: Duration,
    create_table: bool,
) -> Result<idem_outbox::RelayStats, CliError> {
    let outbox = Outbox::new(table).map_err(|e| CliError::Usage(e.to_string()))?;
    // A certificate problem does not heal by retrying: check the broker's TLS once
    // before the relay starts (later outages are retried by the relay).
    let endpoints = idem_amqp::Endpoints::from(amqp_url);
    if endpoints
        .urls()
        .iter()
        .any(|u| u.to_ascii_lowercase().starts_with("amqps://"))
    {
        match crate::broker::connect_tls(amqp_url, tls).await {
            Ok(conn) => {
                let _ = conn.close(200, "checked".into()).await;
            }
            Err(e @ CliError::Tls(_)) => return Err(e),
            Err(_) => {}
        }
    }
    // One connection for LISTEN, one for the relay rounds, one for gauges/cleanup.
    let pool = connect(database_url, tls, 3).await?;
    if create_table {
        outbox
            .ensure_schema(&pool)
            .await
            .map_err(|e| outbox_error(e, database_url, table))?;
    }
    outbox
        .status(&pool)
        .await
        .map_err(|e| outbox_error(e, database_url, table))?;
    let mut relay = idem_outbox::Relay::builder(pool.clone(), outbox, endpoints);
    if let Some(name) = connection_name {
        relay = relay.connection_name(name);
    }
    let relay = relay
        .tls(tls.clone())
        .batch_size(batch)
        .poll_interval(poll)
        .build();
    let stats = relay
        .run(idem_amqp::shutdown::signal())
        .await
        .map_err(|e| outbox_error(e, database_url, table))?;
    pool.close().await;
    Ok(stats)
}

/// Reads the status of outbox `table` in the PostgreSQL database at `url`.
pub async fn status(url: &str, table: &str) -> Result<OutboxReport, CliError> {
    status_tls(url, &TlsConfig::default(), table).await
}

/// [`status`] with TLS settings for the database connection.
pub async fn status_tls(url: &str, tls: &TlsConfig, table: &str) -> Result<OutboxReport, CliError> {
    let outbox = Outbox::new(table).map_err(|e| CliError::Usage(e.to_string()))?;
    let pool = connect(url, tls, 1).await?;
    let result = outbox.status(&pool).await;
    pool.close().await;
    let s = result.map_err(|e| outbox_error(e, url, table))?;
    Ok(OutboxReport {
        table: table.to_owned(),
        pending: s.pending,
        oldest_pending_age_secs: s.oldest_pending_age.map(|d| d.as_secs_f64()),
        published: s.published,
    })
}

/// Removes `url` and its password from an error text.
fn scrub(text: &str, url: &str) -> String {
    idem_core::redact::redact_in(text, url)
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
