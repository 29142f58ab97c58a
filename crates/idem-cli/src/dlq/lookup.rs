//! "Will be acked as a duplicate": what a replay predicts from the consumer's dedup
//! store, before it moves anything.
//!
//! A replayed message whose key is already `done (succeeded)` in its consumer's dedup
//! store is acked by the consumer without running its handler. `idem dlq replay
//! --dedup-redis URL` or `--dedup-postgres URL` looks each selected message's key up
//! first (read only) and reports those as `will be acked as a duplicate`, in a dry run
//! and in a real run. The key is the message's `x-idem-key` (else its message id), the
//! consumer its `x-idem-consumer` (else `--dedup-consumer`). A key recorded with a
//! payload fingerprint that is neither the body's nor the one it was edited from is
//! reported as `will be dead-lettered: different payload`.
//!
//! - **Redis** ([`DedupLookup::redis`]): the record layout of `idem_redis` (hash
//!   fields `s`, `c`, `f` under the store's key prefix).
//! - **PostgreSQL** ([`DedupLookup::postgres`]): the table of an `idem_sql` lease
//!   store (`idem_dedup` by default) or of an `idem_sql` inbox (`idem_inbox`), which
//!   share one layout: a row per (`consumer`, `idem_key`) with `state` (`processing`,
//!   `succeeded`, `poisoned`), `fingerprint` and `expires_at` (milliseconds since the
//!   epoch, on the database's clock). A row past its `expires_at` counts as absent,
//!   as it does for the store. One `SELECT` per selected message.
//!
//! A poisoned key lets a replay run (the replay reopens it); a key being processed
//! lets it run too (the lease decides then, not the replay).

use idem_core::dedup::{ScopedKey, ORIGINAL_FINGERPRINT_HEADER};
use idem_redis::RedisStore;
use idem_sql::TableName;
use serde::Serialize;

use crate::error::CliError;

/// What the consumer will do with a replayed message, as far as its store tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// No record, or one that lets it run (poisoned, processing): the handler runs.
    Runs,
    /// Its key is done (succeeded): acked as a duplicate, the handler does not run.
    Duplicate,
    /// Its key is done with another payload: dead-lettered again.
    Mismatch,
}

/// Where the records are.
#[derive(Clone, Debug)]
enum Store {
    Redis(RedisStore),
    Postgres {
        pool: sqlx::PgPool,
        table: TableName,
    },
}

/// A read-only look into a consumer's dedup store (Redis or PostgreSQL).
#[derive(Clone, Debug)]
pub struct DedupLookup {
    store: Store,
    consumer: Option<String>,
}

/// A done record, as a store holds it.
struct Done {
    succeeded: bool,
    fingerprint: Option<String>,
}

impl DedupLookup {
    /// Connects to the Redis store at `url` (key prefix `prefix`, `idem` by default);
    /// `consumer` names the consumer for messages without `x-idem-consumer`.
    pub async fn redis(
        url: &str,
        prefix: &str,
        consumer: Option<String>,
    ) -> Result<Self, CliError> {
        let store = RedisStore::builder(url)
            .prefix(prefix)
            .connect()
            .await
            .map_err(|e| CliError::Unreachable(format!("cannot reach the dedup store: {e}")))?;
        Ok(DedupLookup {
            store: Store::Redis(store),
            consumer,
        })
    }

    /// Looks records up in `table` (an `idem_sql` lease store's or inbox's table,
    /// `schema.name` allowed) of the PostgreSQL database at `url`, with `tls` for
    /// `sslmode` URLs. The table must exist (else [`CliError::NotFound`]); `consumer`
    /// names the consumer for messages without `x-idem-consumer`. The error never
    /// contains the password.
    pub async fn postgres(
        url: &str,
        tls: &idem_core::TlsConfig,
        table: &str,
        consumer: Option<String>,
    ) -> Result<Self, CliError> {
        let table = TableName::parse(table).map_err(|e| CliError::Usage(e.to_string()))?;
        let pool = crate::outbox::connect_pool(url, tls, 2, "check --dedup-postgres").await?;
        let lookup = DedupLookup {
            store: Store::Postgres { pool, table },
            consumer,
        };
        // Checked once now, so that a wrong table is one clear error, not one per message.
        lookup.done_postgres(&ScopedKey::new("", "")).await?;
        Ok(lookup)
    }

    /// What the consumer will do with `msg` (a dead letter as read).
    pub async fn predict(
        &self,
        consumer: Option<&str>,
        key: &str,
        body: &[u8],
        edited_from: Option<&str>,
    ) -> Result<Prediction, CliError> {
        let Some(consumer) = consumer.or(self.consumer.as_deref()) else {
            return Ok(Prediction::Runs);
        };
        let key = ScopedKey::new(consumer, key);
        let done = match &self.store {
            Store::Redis(store) => done_redis(store, &key).await?,
            Store::Postgres { .. } => self.done_postgres(&key).await?,
        };
        Ok(decide(done, body, edited_from))
    }

    /// The done record of `key` in the PostgreSQL table, if any (and not expired).
    async fn done_postgres(&self, key: &ScopedKey) -> Result<Option<Done>, CliError> {
        let Store::Postgres { pool, table } = &self.store else {
            return Ok(None);
        };
        let sql = format!(
            "SELECT state, fingerprint FROM {table} WHERE consumer = $1 AND idem_key = $2 \
             AND expires_at > CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
        );
        let row: Option<(String, Option<String>)> = sqlx::query_as(&sql)
            .bind(key.consumer())
            .bind(key.key())
            .fetch_optional(pool)
            .await
            .map_err(|e| {
                CliError::sql(
                    &e,
                    format!(
                        "no table {table} in that database: name the consumer's dedup table with --dedup-table (idem_dedup for the lease store, idem_inbox for the inbox, unless configured otherwise)"
                    ),
                    &format!("dedup store lookup in {table} failed"),
                    "dedup store lookup failed",
                )
            })?;
        Ok(row.and_then(|(state, fingerprint)| match state.as_str() {
            "succeeded" => Some(Done {
                succeeded: true,
                fingerprint,
            }),
            "poisoned" => Some(Done {
                succeeded: false,
                fingerprint,
            }),
            _ => None,
        }))
    }
}

/// The done record of `key` in the Redis store, if any.
async fn done_redis(store: &RedisStore, key: &ScopedKey) -> Result<Option<Done>, CliError> {
    let rkey = store.redis_key(key);
    let mut conn = store.connection();
    let (state, completion, fingerprint): (Option<String>, Option<String>, Option<String>) =
        redis::cmd("HMGET")
            .arg(&rkey)
            .arg("s")
            .arg("c")
            .arg("f")
            .query_async(&mut conn)
            .await
            .map_err(|e| CliError::Unreachable(format!("dedup store lookup failed: {e}")))?;
    if state.as_deref() != Some("d") {
        return Ok(None);
    }
    Ok(Some(Done {
        succeeded: completion.as_deref() != Some("p"),
        fingerprint,
    }))
}

/// The prediction from a done record (or none): a fingerprint that is neither the
/// body's nor the one it was edited from is a mismatch, a success a duplicate.
fn decide(done: Option<Done>, body: &[u8], edited_from: Option<&str>) -> Prediction {
    let Some(done) = done else {
        return Prediction::Runs;
    };
    if let Some(f) = done.fingerprint {
        if f != super::sha256_hex(body) && edited_from != Some(f.as_str()) {
            return Prediction::Mismatch;
        }
    }
    if done.succeeded {
        Prediction::Duplicate
    } else {
        Prediction::Runs
    }
}

/// The header naming the fingerprint a message was edited from.
pub(super) const EDITED_FROM: &str = ORIGINAL_FINGERPRINT_HEADER;
