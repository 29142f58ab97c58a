//! The statements of a batch on the PostgreSQL inbox: each takes every key of the
//! batch at once (arrays through `unnest` / `ANY`), so a batch costs the same few
//! round trips whatever its size.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use crate::backend::Dialect;
use crate::inbox::queries::Queries;
use crate::schema::TableName;
use crate::store::{POISONED, SUCCEEDED};

/// The batch statements of one inbox table.
#[derive(Clone, Debug)]
pub(crate) struct BatchSql {
    count_starts: String,
    admit: String,
    finish: String,
    clear_starts: String,
    take_expired: String,
    reopen: String,
}

/// What the admission statement found for one key.
#[derive(Debug)]
pub(crate) struct Found {
    pub(crate) key: String,
    /// The row is ours (inserted now, in the batch's transaction).
    pub(crate) acquired: bool,
    /// The row that was there: state, fingerprint, ms until it expires.
    pub(crate) row: Option<(String, Option<String>, i64)>,
}

impl BatchSql {
    pub(crate) fn new(t: &TableName, q: &Queries) -> Self {
        let now = Dialect::Postgres.now_ms();
        let starts = &q.starts_table;
        let sname = starts.name();
        BatchSql {
            count_starts: format!(
                "INSERT INTO {starts} (consumer, idem_key, starts, expires_at) \
                 SELECT $1, k, 1, {now} + $2 FROM unnest($3::text[]) AS k \
                 ON CONFLICT (consumer, idem_key) DO UPDATE SET \
                 starts = CASE WHEN {sname}.expires_at > {now} THEN {sname}.starts + 1 ELSE 1 END, \
                 expires_at = excluded.expires_at RETURNING idem_key, CAST(starts AS BIGINT)"
            ),
            admit: format!(
                "WITH input AS (SELECT * FROM unnest($3::text[], $4::text[]) AS i(k, fp)), \
                 ins AS (INSERT INTO {t} (consumer, idem_key, state, owner, fingerprint, expires_at) \
                 SELECT $1, k, '{SUCCEEDED}', NULL, fp, {now} + $2 FROM input \
                 ON CONFLICT DO NOTHING RETURNING idem_key) \
                 SELECT i.k, ins.idem_key IS NOT NULL, r.state, r.fingerprint, \
                 CAST(r.expires_at - {now} AS BIGINT) \
                 FROM input i LEFT JOIN ins ON ins.idem_key = i.k \
                 LEFT JOIN {t} r ON r.consumer = $1 AND r.idem_key = i.k"
            ),
            // Settles the batch just before COMMIT: clears the start counters, drops
            // the rows of messages that failed transiently, marks the poisoned ones,
            // and counts the kept rows (the pre-commit check: a transaction in which a
            // statement failed answers with an error here).
            finish: format!(
                "WITH cleared AS (DELETE FROM {starts} WHERE consumer = $1 AND idem_key = ANY($2::text[])), \
                 dropped AS (DELETE FROM {t} WHERE consumer = $1 AND idem_key = ANY($3::text[])), \
                 poisoned AS (UPDATE {t} SET state = '{POISONED}' WHERE consumer = $1 AND idem_key = ANY($4::text[])) \
                 SELECT CAST(count(*) AS BIGINT) FROM {t} WHERE consumer = $1 AND idem_key = ANY($5::text[])"
            ),
            clear_starts: format!(
                "DELETE FROM {starts} WHERE consumer = $1 AND idem_key = ANY($2::text[])"
            ),
            take_expired: format!(
                "UPDATE {t} SET state = '{SUCCEEDED}', owner = NULL, fingerprint = $3, expires_at = {now} + $4 \
                 WHERE consumer = $1 AND idem_key = $2 AND expires_at <= {now}"
            ),
            reopen: format!(
                "UPDATE {t} SET state = '{SUCCEEDED}', fingerprint = $3, expires_at = {now} + $4 \
                 WHERE consumer = $1 AND idem_key = $2 AND state = '{POISONED}'"
            ),
        }
    }

    /// Counts one more start of each key (autocommit); answers each key's count.
    pub(crate) async fn count_starts(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        keep_ms: i64,
        keys: &[String],
    ) -> Result<Vec<(String, i64)>, sqlx::Error> {
        let rows: Vec<PgRow> = sqlx::query(&self.count_starts)
            .bind(consumer)
            .bind(keep_ms)
            .bind(keys)
            .fetch_all(&mut *conn)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Inserts every key's row, or reads the row that is there.
    pub(crate) async fn admit(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        keep_ms: i64,
        keys: &[String],
        fingerprints: &[Option<String>],
    ) -> Result<Vec<Found>, sqlx::Error> {
        let rows: Vec<PgRow> = sqlx::query(&self.admit)
            .bind(consumer)
            .bind(keep_ms)
            .bind(keys)
            .bind(fingerprints)
            .fetch_all(&mut *conn)
            .await?;
        let mut found = Vec::with_capacity(rows.len());
        for r in &rows {
            let state: Option<String> = r.try_get(2)?;
            let left: Option<i64> = r.try_get(4)?;
            found.push(Found {
                key: r.try_get(0)?,
                acquired: r.try_get(1)?,
                row: state
                    .map(|s| Ok::<_, sqlx::Error>((s, r.try_get(3)?, left.unwrap_or(0))))
                    .transpose()?,
            });
        }
        Ok(found)
    }

    /// Takes over an expired row (`true`), or replays a poisoned one (`reopen`).
    pub(crate) async fn take(
        &self,
        conn: &mut PgConnection,
        reopen: bool,
        consumer: &str,
        key: &str,
        fingerprint: Option<&str>,
        keep_ms: i64,
    ) -> Result<bool, sqlx::Error> {
        let sql = if reopen {
            &self.reopen
        } else {
            &self.take_expired
        };
        let done = sqlx::query(sql)
            .bind(consumer)
            .bind(key)
            .bind(fingerprint)
            .bind(keep_ms)
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Settles the batch in its transaction; answers how many kept rows are there.
    pub(crate) async fn finish(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        settled: &Settled,
    ) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(&self.finish)
            .bind(consumer)
            .bind(&settled.started)
            .bind(&settled.dropped)
            .bind(&settled.poisoned)
            .bind(&settled.kept)
            .fetch_one(&mut *conn)
            .await
    }

    /// Clears the start counters of `keys` (autocommit).
    pub(crate) async fn clear_starts(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        keys: &[String],
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(&self.clear_starts)
            .bind(consumer)
            .bind(keys)
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected())
    }
}

/// How a batch settles in its transaction.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// Every key whose start was counted.
    pub(crate) started: Vec<String>,
    /// Rows to remove (the message failed transiently).
    pub(crate) dropped: Vec<String>,
    /// Rows to mark poisoned.
    pub(crate) poisoned: Vec<String>,
    /// Rows that commit as done (success, discard).
    pub(crate) kept: Vec<String>,
}
