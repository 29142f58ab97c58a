//! The consumer's dedup records, read only: an `idem_sql` inbox or lease-store table
//! in PostgreSQL or MariaDB/MySQL (one layout: `consumer`, `idem_key`, `state`,
//! `expires_at` in milliseconds since the epoch on the database's clock; the SQL is
//! in [`sql`](super::sql)), or an `idem_redis` store
//! (a hash per key: `s` is `p` processing or `d` done, `c` is `p` for poisoned; the
//! key's TTL is the lease or the retention).

use std::collections::HashMap;

use idem_core::dedup::ScopedKey;
use idem_redis::RedisStore;
use idem_sql::TableName;
use serde::Serialize;

use super::{sql, Class, Finding};
use crate::error::CliError;

/// Keys looked up per query.
const CHUNK: usize = 1000;

/// Records the stuck query reports at most.
const STUCK_RECORDS: i64 = 1000;

/// The state of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RecordState {
    /// Claimed by a worker (lease store).
    Processing,
    /// Done: the handler succeeded.
    Succeeded,
    /// Done: the handler failed permanently (dead-lettered).
    Poisoned,
}

/// One key's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// Its state.
    pub state: RecordState,
    /// Milliseconds until it expires (negative: expired, the row not yet cleaned
    /// up); `None` without an expiry.
    pub expires_in_ms: Option<i64>,
}

/// Where the records are read.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Records {
    /// A PostgreSQL table of an `idem_sql` inbox or lease store.
    Postgres {
        /// The pool.
        pool: sqlx::PgPool,
        /// The table.
        table: TableName,
    },
    /// A MariaDB/MySQL table of an `idem_sql` inbox or lease store.
    MySql {
        /// The pool.
        pool: sqlx::MySqlPool,
        /// The table.
        table: TableName,
    },
    /// An `idem_redis` store.
    Redis(RedisStore),
}

impl Records {
    /// Records in PostgreSQL `table` (checked to exist now).
    pub async fn postgres(pool: sqlx::PgPool, table: &str) -> Result<Self, CliError> {
        let table = TableName::parse(table).map_err(|e| CliError::Usage(e.to_string()))?;
        sqlx::query(&format!("SELECT 1 FROM {table} LIMIT 1"))
            .fetch_optional(&pool)
            .await
            .map_err(|e| sql::error(e, &table))?;
        Ok(Records::Postgres { pool, table })
    }

    /// Records in MariaDB/MySQL `table` at `url` (`ssl-mode` and `tls` as for the
    /// stores), checked to exist now.
    pub async fn mysql(
        url: &str,
        tls: &idem_core::TlsConfig,
        table: &str,
    ) -> Result<Self, CliError> {
        let table = TableName::parse(table).map_err(|e| CliError::Usage(e.to_string()))?;
        let pool = sql::connect_mysql(url, tls).await?;
        sqlx::query(&format!("SELECT 1 FROM {table} LIMIT 1"))
            .fetch_optional(&pool)
            .await
            .map_err(|e| sql::error(e, &table))?;
        Ok(Records::MySql { pool, table })
    }

    /// Records in the Redis store at `url` with key prefix `prefix`.
    pub async fn redis(url: &str, prefix: &str) -> Result<Self, CliError> {
        let store = RedisStore::builder(url)
            .prefix(prefix)
            .connect()
            .await
            .map_err(|e| CliError::Unreachable(format!("cannot reach the dedup store: {e}")))?;
        Ok(Records::Redis(store))
    }

    /// `postgres <table>` or `redis`.
    pub fn describe(&self) -> String {
        match self {
            Records::Postgres { table, .. } => format!("postgres {table}"),
            Records::MySql { table, .. } => format!("mysql {table}"),
            Records::Redis(_) => "redis".to_owned(),
        }
    }

    /// The records of `keys` of `consumer` that exist (expired rows still present
    /// included).
    pub async fn lookup(
        &self,
        consumer: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Record>, CliError> {
        let mut found = HashMap::new();
        for chunk in keys.chunks(CHUNK) {
            let rows = match self {
                Records::Postgres { pool, table } => {
                    sql::lookup_postgres(pool, table, consumer, chunk).await?
                }
                Records::MySql { pool, table } => {
                    sql::lookup_mysql(pool, table, consumer, chunk).await?
                }
                Records::Redis(store) => {
                    redis_lookup(store, consumer, chunk, &mut found).await?;
                    continue;
                }
            };
            for (key, s, expires_in) in rows {
                if let Some(state) = sql::state(&s) {
                    let expires_in_ms = Some(expires_in);
                    found.insert(
                        key,
                        Record {
                            state,
                            expires_in_ms,
                        },
                    );
                }
            }
        }
        Ok(found)
    }

    /// `processing` records of `consumer` past their lease (SQL tables; Redis drops a
    /// record when its lease ends, so there are none to see).
    pub async fn stuck(&self, consumer: &str) -> Result<Vec<Finding>, CliError> {
        let rows: Vec<sql::Stuck> = match self {
            Records::Postgres { pool, table } => {
                let query = sql::stuck_postgres(table);
                sql::fetch(pool, &query, table, consumer, STUCK_RECORDS).await?
            }
            Records::MySql { pool, table } => {
                let query = sql::stuck_mysql(table);
                sql::fetch(pool, &query, table, consumer, STUCK_RECORDS).await?
            }
            Records::Redis(_) => return Ok(Vec::new()),
        };
        Ok(rows
            .into_iter()
            .map(|(key, past)| {
                Finding::new(
                    Class::Stuck,
                    "processing_past_lease",
                    &key,
                    format!(
                        "record processing, its lease ended {} ago (the worker holding it is gone or hung; a redelivery reclaims it)",
                        super::render::age(past as f64 / 1000.0)
                    ),
                )
            })
            .collect())
    }
}

async fn redis_lookup(
    store: &RedisStore,
    consumer: &str,
    keys: &[String],
    found: &mut HashMap<String, Record>,
) -> Result<(), CliError> {
    let mut fields = redis::pipe();
    let mut ttls = redis::pipe();
    for key in keys {
        let rkey = store.redis_key(&ScopedKey::new(consumer, key.as_str()));
        fields.cmd("HMGET").arg(&rkey).arg("s").arg("c");
        ttls.cmd("PTTL").arg(&rkey);
    }
    let failed =
        |e: redis::RedisError| CliError::Unreachable(format!("dedup store lookup failed: {e}"));
    let mut conn = store.connection();
    let states: Vec<(Option<String>, Option<String>)> =
        fields.query_async(&mut conn).await.map_err(failed)?;
    let ttls: Vec<i64> = ttls.query_async(&mut conn).await.map_err(failed)?;
    for ((key, (s, c)), ttl) in keys.iter().zip(states).zip(ttls) {
        let state = match (s.as_deref(), c.as_deref()) {
            (Some("p"), _) => RecordState::Processing,
            (Some("d"), Some("p")) => RecordState::Poisoned,
            (Some("d"), _) => RecordState::Succeeded,
            _ => continue,
        };
        let expires_in_ms = (ttl >= 0).then_some(ttl);
        found.insert(
            key.clone(),
            Record {
                state,
                expires_in_ms,
            },
        );
    }
    Ok(())
}
