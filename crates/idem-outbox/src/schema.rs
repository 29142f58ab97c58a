use std::time::{Duration, UNIX_EPOCH};

use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::error::OutboxError;
use crate::message::{headers_to_json, NotBefore, OutboxMessage};

/// An outbox table. Cheap to clone.
///
/// The table name is validated as an SQL identifier (optionally `schema.table`), so
/// nothing from configuration is spliced into SQL unchecked. The library creates its own
/// table with [`ensure_schema`](Self::ensure_schema) and never touches the
/// application's migrations.
#[derive(Clone, Debug)]
pub struct Outbox {
    table: String,
    channel: String,
}

/// How far behind the relay is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutboxStatus {
    /// Rows not yet published (delayed rows that are not due yet included).
    pub pending: i64,
    /// How long the oldest due row has waited (the outbox lag), if any: counted from
    /// its enqueue, or for a [delayed](OutboxMessage::delay) row from the time it
    /// became due.
    pub oldest_pending_age: Option<Duration>,
    /// Rows published and not yet cleaned up.
    pub published: i64,
}

/// `name` or `schema.name`, each part a plain SQL identifier (the check idem-sql uses
/// too).
pub(crate) fn valid_identifier(name: &str) -> bool {
    idem_core::__private::split_table_name(name).is_some()
}

impl Outbox {
    /// An outbox stored in `table` (default name: `idem_outbox`).
    pub fn new(table: &str) -> Result<Self, OutboxError> {
        if !valid_identifier(table) {
            return Err(OutboxError::InvalidTableName(table.to_owned()));
        }
        Ok(Outbox {
            table: table.to_owned(),
            channel: table.replace('.', "_"),
        })
    }

    /// The table name.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The LISTEN/NOTIFY channel relays wait on (the table name, `.` replaced by `_`).
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Creates the table and its indexes if they do not exist. Idempotent and safe to
    /// call from several processes at once (serialised by an advisory lock).
    pub async fn ensure_schema(&self, pool: &PgPool) -> Result<(), OutboxError> {
        let t = &self.table;
        let idx = self.channel.as_str();
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("idem-outbox-schema:{t}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                id BIGSERIAL PRIMARY KEY,
                message_id TEXT NOT NULL UNIQUE,
                exchange TEXT NOT NULL,
                routing_key TEXT NOT NULL,
                headers TEXT NOT NULL DEFAULT '{{}}',
                content_type TEXT,
                body BYTEA NOT NULL,
                ordering_key TEXT,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                available_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                published_at TIMESTAMPTZ
            )"
        ))
        .execute(&mut *tx)
        .await?;
        for index in [
            format!("CREATE INDEX IF NOT EXISTS {idx}_pending ON {t} (id) WHERE published_at IS NULL"),
            format!("CREATE INDEX IF NOT EXISTS {idx}_ordering ON {t} (ordering_key, id) WHERE published_at IS NULL AND ordering_key IS NOT NULL"),
            format!("CREATE INDEX IF NOT EXISTS {idx}_published ON {t} (published_at) WHERE published_at IS NOT NULL"),
        ] {
            sqlx::query(&index).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Writes `msg` into the outbox inside the caller's transaction (pass `&mut tx`).
    /// It is published only if that transaction commits. Returns the message's
    /// idempotency key (its AMQP `message_id`).
    ///
    /// A message with an [ordering key](OutboxMessage::ordering_key) takes a
    /// transaction-scoped advisory lock on this table and key first: another
    /// transaction enqueueing the same key waits until this one ends. Keys are thus
    /// published in commit order. A transaction that enqueues several keys while others
    /// enqueue them too should take them in a consistent order (PostgreSQL aborts one
    /// side of a lock cycle with a deadlock error, which is worth a retry).
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        msg: OutboxMessage,
    ) -> Result<Uuid, OutboxError> {
        #[cfg(feature = "otel")]
        let msg = crate::otel::with_enqueuer_context(msg);
        let t = &self.table;
        if msg.exchange.is_empty() && msg.routing_key.is_empty() {
            return Err(OutboxError::InvalidMessage(
                "both exchange and routing key are empty: the message could not be routed".into(),
            ));
        }
        if msg.exchange.len() > 255 || msg.routing_key.len() > 255 {
            return Err(OutboxError::InvalidMessage(
                "exchange and routing key are limited to 255 bytes by AMQP".into(),
            ));
        }
        crate::message::check_publishable(&msg)?;
        // Rows of one ordering key are serialised: the advisory lock (per table and key,
        // held until the enclosing transaction ends) is taken in the same statement,
        // before the row's id is drawn. So a later enqueue of the same key waits for the
        // earlier transaction to commit or roll back, and draws a larger id: per key,
        // id order is commit order, which is the order the relay publishes in.
        let columns = "message_id, exchange, routing_key, headers, content_type, body, \
                       ordering_key, available_at";
        // $8: seconds (a delay, or a Unix time) for `available_at`.
        let (available_at, seconds) = match msg.not_before {
            None => ("now() + make_interval(secs => $8)", 0.0),
            Some(NotBefore::After(delay)) => {
                ("now() + make_interval(secs => $8)", delay.as_secs_f64())
            }
            Some(NotBefore::At(time)) => (
                // Never earlier than now: the outbox lag counts from `available_at`.
                "GREATEST(now(), to_timestamp($8))",
                time.duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
            ),
        };
        if !seconds.is_finite() {
            return Err(OutboxError::InvalidMessage(
                "the not-before time is out of range".into(),
            ));
        }
        let sql = match &msg.ordering_key {
            Some(_) => format!(
                "INSERT INTO {t} ({columns})
                 SELECT $1, $2, $3, $4, $5, $6, $7, {available_at}
                 FROM (SELECT pg_advisory_xact_lock(hashtextextended($9, 0))) AS serialise_key"
            ),
            None => format!(
                "INSERT INTO {t} ({columns}) VALUES ($1, $2, $3, $4, $5, $6, $7, {available_at})"
            ),
        };
        let mut insert = sqlx::query(&sql)
            .bind(msg.id.to_string())
            .bind(&msg.exchange)
            .bind(&msg.routing_key)
            .bind(headers_to_json(&msg.headers))
            .bind(&msg.content_type)
            .bind(&msg.body)
            .bind(&msg.ordering_key)
            .bind(seconds);
        if let Some(key) = &msg.ordering_key {
            insert = insert.bind(format!("idem-outbox-key:{t}:{key}"));
        }
        insert.execute(&mut *conn).await?;
        // Delivered to listening relays only when the transaction commits.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.channel)
            .execute(&mut *conn)
            .await?;
        Ok(msg.id)
    }

    /// Pending rows, the outbox lag, and published rows awaiting cleanup.
    pub async fn status(&self, pool: &PgPool) -> Result<OutboxStatus, OutboxError> {
        let row = sqlx::query(&format!(
            "SELECT count(*) FILTER (WHERE published_at IS NULL),
                    EXTRACT(EPOCH FROM now() - min(CASE WHEN attempts = 0 THEN available_at ELSE created_at END)
                        FILTER (WHERE published_at IS NULL AND (attempts > 0 OR available_at <= now())))::float8,
                    count(*) FILTER (WHERE published_at IS NOT NULL)
             FROM {}",
            self.table
        ))
        .fetch_one(pool)
        .await?;
        let age: Option<f64> = row.try_get(1)?;
        Ok(OutboxStatus {
            pending: row.try_get(0)?,
            oldest_pending_age: age.map(|s| Duration::from_secs_f64(s.max(0.0))),
            published: row.try_get(2)?,
        })
    }

    /// Deletes rows published more than `older_than` ago, `batch` rows per statement so
    /// no statement holds many locks. Returns how many were deleted.
    pub async fn cleanup(
        &self,
        pool: &PgPool,
        older_than: Duration,
        batch: i64,
    ) -> Result<u64, OutboxError> {
        let mut total = 0;
        loop {
            let done = sqlx::query(&format!(
                "DELETE FROM {t} WHERE id IN (
                    SELECT id FROM {t}
                    WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1)
                    ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)",
                t = self.table
            ))
            .bind(older_than.as_secs_f64())
            .bind(batch.max(1))
            .execute(pool)
            .await?
            .rows_affected();
            total += done;
            if done < batch.max(1) as u64 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_checked() {
        assert!(Outbox::new("idem_outbox").is_ok());
        assert!(Outbox::new("app.outbox_1").is_ok());
        for bad in [
            "",
            "1abc",
            "a;drop table x",
            "a.b.c",
            "x y",
            "\"q\"",
            &"a".repeat(64),
        ] {
            assert!(Outbox::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
