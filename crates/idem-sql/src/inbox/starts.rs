//! The start counters of concurrent deliveries, recorded together (PostgreSQL).
//!
//! Every message records that it starts (crash counting, see [`idem_core::crash`])
//! in a statement committed on its own, before its handler runs. On PostgreSQL the
//! inbox sends these upserts through a [`Batcher`]: the starts of deliveries that
//! arrive while one upsert is in flight go out together as one multi-row upsert (one
//! statement, one commit), so a busy consumer pays that commit once per batch instead
//! of once per message. A lone message still goes out at once. The other databases
//! record each start on its own (see `session.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use idem_core::dedup::{BatchExecutor, Batcher, StoreError, DEFAULT_MAX_BATCH};
use sqlx::{PgPool, Row};

use crate::backend::Dialect;
use crate::schema::TableName;

/// One start to record: the message's consumer and key, and how long the counter is
/// kept (milliseconds).
pub(crate) struct Start {
    consumer: Arc<str>,
    key: String,
    keep_ms: i64,
}

/// Runs the multi-row upserts.
pub(crate) struct Exec {
    pool: PgPool,
    table: TableName,
    sql: String,
}

impl Exec {
    fn new(pool: PgPool, table: &TableName) -> Self {
        let now = Dialect::Postgres.now_ms();
        // Rows are locked in key order, so two batches (two workers) that share keys
        // wait for each other instead of deadlocking. A key appears once per
        // statement (see `execute`): `ON CONFLICT DO UPDATE` refuses a row twice.
        let sql = format!(
            "INSERT INTO {table} AS s (consumer, idem_key, starts, expires_at) \
             SELECT v.consumer, v.idem_key, 1, {now} + v.ms \
             FROM unnest($1::text[], $2::text[], $3::bigint[]) AS v(consumer, idem_key, ms) \
             ORDER BY v.consumer, v.idem_key \
             ON CONFLICT (consumer, idem_key) DO UPDATE SET \
             starts = CASE WHEN s.expires_at > {now} THEN s.starts + 1 ELSE 1 END, \
             expires_at = excluded.expires_at \
             RETURNING s.consumer, s.idem_key, s.starts"
        );
        Exec {
            pool,
            table: table.clone(),
            sql,
        }
    }

    /// One statement for `starts` (each key at most once): the new count per key.
    async fn round(
        &self,
        conn: &mut sqlx::PgConnection,
        starts: &[&Start],
    ) -> Result<HashMap<(String, String), i64>, sqlx::Error> {
        let consumers: Vec<&str> = starts.iter().map(|s| &*s.consumer).collect();
        let keys: Vec<&str> = starts.iter().map(|s| s.key.as_str()).collect();
        let ms: Vec<i64> = starts.iter().map(|s| s.keep_ms).collect();
        let rows = sqlx::query(&self.sql)
            .bind(consumers)
            .bind(keys)
            .bind(ms)
            .fetch_all(&mut *conn)
            .await?;
        let mut counts = HashMap::with_capacity(rows.len());
        for row in rows {
            counts.insert((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?);
        }
        Ok(counts)
    }
}

#[async_trait]
impl BatchExecutor for Exec {
    type Op = Start;
    type Output = i64;

    async fn execute(&self, ops: Vec<Start>) -> Vec<Result<i64, StoreError>> {
        let fail = |e: sqlx::Error, n: usize| {
            crate::schema::store_error(
                format!(
                    "SQL inbox start count of {n} messages on table {} failed",
                    self.table
                ),
                e,
            )
        };
        // Rounds: the n-th start of a key in this batch goes in round n.
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        let mut rounds: Vec<Vec<usize>> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let r = seen.entry((&op.consumer, &op.key)).or_insert(0);
            if rounds.len() <= *r {
                rounds.push(Vec::new());
            }
            rounds[*r].push(i);
            *r += 1;
        }
        let mut conn = match self.pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                let e = fail(e, ops.len());
                return ops.iter().map(|_| Err(e.clone())).collect();
            }
        };
        let mut out: Vec<Result<i64, StoreError>> = ops
            .iter()
            .map(|_| Err(StoreError::new("the start count returned no row")))
            .collect();
        for members in rounds {
            let round: Vec<&Start> = members.iter().map(|&i| &ops[i]).collect();
            match self.round(&mut conn, &round).await {
                Ok(mut counts) => {
                    for &i in &members {
                        let k = (ops[i].consumer.to_string(), ops[i].key.clone());
                        if let Some(n) = counts.remove(&k) {
                            out[i] = Ok(n);
                        }
                    }
                }
                Err(e) => {
                    let e = fail(e, members.len());
                    for &i in &members {
                        out[i] = Err(e.clone());
                    }
                }
            }
        }
        out
    }
}

/// The inbox's batched start counter (PostgreSQL only).
#[derive(Clone)]
pub(crate) struct StartCounter(Batcher<Exec>);

impl StartCounter {
    /// A counter for `pool` when it is a PostgreSQL pool, writing to `table`.
    pub(crate) fn for_pool<P: 'static>(pool: &P, table: &TableName) -> Option<Self> {
        let pg = (pool as &dyn std::any::Any).downcast_ref::<PgPool>()?;
        let exec = Exec::new(pg.clone(), table);
        Some(StartCounter(Batcher::new(exec, DEFAULT_MAX_BATCH)))
    }

    /// Records one more start of `key`; returns the new count (1 for a first start).
    pub(crate) async fn count(
        &self,
        consumer: &Arc<str>,
        key: &str,
        keep_ms: i64,
    ) -> Result<i64, StoreError> {
        let start = Start {
            consumer: consumer.clone(),
            key: key.to_owned(),
            keep_ms,
        };
        self.0.submit(start).await
    }
}
