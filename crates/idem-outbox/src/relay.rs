use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_amqp::readiness::{Readiness, Registration, SourceKind};
use idem_amqp::{Endpoints, Outgoing, Publisher, PublisherBuilder};
use idem_core::{Message, TlsConfig};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row as _};

use crate::error::OutboxError;
use crate::message::headers_from_json;
use crate::schema::Outbox;

/// A row as the relay publishes it.
struct Row {
    id: i64,
    ordering_key: Option<String>,
    outgoing: Outgoing,
}

/// What a relay has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Rows published and marked.
    pub published: u64,
    /// Publishes the broker refused (returned unroutable or nacked); those rows are
    /// retried later with backoff.
    pub refused: u64,
}

/// Publishes committed outbox rows to RabbitMQ with publisher confirms, then marks them.
///
/// Each round leases up to `batch_size` due rows with `FOR UPDATE SKIP LOCKED` in a
/// transaction, publishes them in id order on one confirm channel, waits for the
/// confirms, marks the confirmed rows published and commits. A crash before the commit
/// leaves the rows unmarked: they are published again (same `message_id`) by the next
/// round of any relay. A row whose ordering key has an earlier unpublished row that this
/// round did not lease (another relay holds it, or it waits for a retry) is left for a
/// later round, so one key's messages go out in order. Rows the broker refuses
/// (unroutable with `mandatory`, or nacked) are retried with backoff (1 s doubling, at
/// most 5 min); they stay pending and count in the outbox lag.
pub struct Relay {
    pool: PgPool,
    outbox: Outbox,
    publisher: Publisher,
    batch_size: i64,
    poll_interval: Duration,
    cleanup_after: Duration,
    published: AtomicU64,
    refused: AtomicU64,
    /// Where [`run`](Relay::run) reports readiness, and the oldest pending age it allows.
    readiness: Option<(Readiness, Duration)>,
    /// When the oldest pending row was enqueued, as of the last status read.
    oldest_pending_since: Arc<Mutex<Option<Instant>>>,
    #[cfg(feature = "_failpoints")]
    fail_after_publish: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("outbox", &self.outbox)
            .field("publisher", &self.publisher)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

/// Configures a [`Relay`]. See [`Relay::builder`].
pub struct RelayBuilder {
    pool: PgPool,
    outbox: Outbox,
    /// The relay's publisher: endpoints, connection name and TLS.
    publisher: PublisherBuilder,
    batch_size: i64,
    poll_interval: Duration,
    cleanup_after: Duration,
    readiness: Option<(Readiness, Duration)>,
    #[cfg(feature = "_failpoints")]
    fail_after_publish: u32,
}

impl std::fmt::Debug for RelayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("outbox", &self.outbox)
            .field("publisher", &self.publisher)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl RelayBuilder {
    /// Connection name shown by the broker (default `idem-outbox-relay`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.publisher = self.publisher.connection_name(name);
        self
    }

    /// TLS settings for `amqps://` broker URLs: a private CA, a client certificate
    /// (mutual TLS). Default: verified against the system roots. Certificate
    /// verification cannot be turned off for the broker: a config with
    /// `danger_accept_invalid_certs` makes every round fail.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.publisher = self.publisher.tls(tls);
        self
    }

    /// Rows per round (1 to 10 000; default 500).
    pub fn batch_size(mut self, rows: i64) -> Self {
        self.batch_size = rows.clamp(1, 10_000);
        self
    }

    /// Polling fallback for missed notifications (default 1 s, at least 10 ms).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every.max(Duration::from_millis(10));
        self
    }

    /// How long published rows are kept before cleanup deletes them (default 7 days).
    pub fn cleanup_after(mut self, age: Duration) -> Self {
        self.cleanup_after = age;
        self
    }

    /// While [`run`](Relay::run) runs, report readiness into `registry` (usually
    /// [`Readiness::global`], which the workers' Prometheus listener serves at
    /// `/ready`): not ready while the oldest pending row is older than
    /// `max_pending_age`. The age is the one read at the end of each round that was
    /// not full (the rounds that set `idem_outbox_oldest_pending_seconds`), grown by
    /// the time since: a relay that cannot reach its database or the broker turns not
    /// ready once its oldest row passes the threshold. The source is named after the
    /// outbox table. Default: no readiness source.
    pub fn readiness(mut self, registry: &Readiness, max_pending_age: Duration) -> Self {
        self.readiness = Some((registry.clone(), max_pending_age));
        self
    }

    /// Test-only crash point (internal feature `_failpoints`): the first `times` rounds fail
    /// right after their batch was published and confirmed, before the rows are
    /// marked, as if the process died there. The rows stay pending and are published
    /// again.
    #[cfg(feature = "_failpoints")]
    #[doc(hidden)]
    pub fn fail_after_publish(mut self, times: u32) -> Self {
        self.fail_after_publish = times;
        self
    }

    /// The relay. It connects to the broker on its first round (a broker that is down
    /// at start is retried like any outage).
    pub fn build(self) -> Relay {
        Relay {
            pool: self.pool,
            outbox: self.outbox,
            publisher: self.publisher.build(),
            batch_size: self.batch_size,
            poll_interval: self.poll_interval,
            cleanup_after: self.cleanup_after,
            published: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            readiness: self.readiness,
            oldest_pending_since: Arc::default(),
            #[cfg(feature = "_failpoints")]
            fail_after_publish: std::sync::atomic::AtomicU32::new(self.fail_after_publish),
        }
    }
}

impl Relay {
    /// A relay for `outbox` in `pool`, publishing to the broker at `endpoints` (one
    /// AMQP URL, a comma-separated list or an [`Endpoints`] value: the first that
    /// answers, and after a loss the next one). The pool needs at least two
    /// connections while [`run`](Self::run) is used: one is held by the LISTEN
    /// connection.
    pub fn builder(pool: PgPool, outbox: Outbox, endpoints: impl Into<Endpoints>) -> RelayBuilder {
        RelayBuilder {
            pool,
            outbox,
            publisher: Publisher::builder(endpoints).connection_name("idem-outbox-relay"),
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            cleanup_after: Duration::from_secs(7 * 24 * 3600),
            readiness: None,
            #[cfg(feature = "_failpoints")]
            fail_after_publish: 0,
        }
    }

    #[cfg(feature = "_failpoints")]
    fn crash_point(&self) -> bool {
        self.fail_after_publish
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// The outbox table this relay publishes.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Closes the relay's broker connection (after [`run`](Self::run) or
    /// [`drain`](Self::drain) returned). A hosted relay closes it when it stops.
    pub async fn close(self) {
        self.publisher.close().await;
    }

    /// Counts so far.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            published: self.published.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// One round: lease a batch, publish, mark. Returns how many rows were leased
    /// (0 when nothing is due).
    pub async fn relay_once(&self) -> Result<usize, OutboxError> {
        let t = self.outbox.table_name();
        let mut tx = self.pool.begin().await?;
        let fetched = sqlx::query(&format!(
            "SELECT id, message_id, exchange, routing_key, headers, content_type, body, ordering_key
             FROM {t} WHERE published_at IS NULL AND available_at <= now()
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .bind(self.batch_size)
        .fetch_all(&mut *tx)
        .await?;
        let leased = fetched.len();
        if leased == 0 {
            return Ok(0);
        }
        let mut rows = Vec::with_capacity(leased);
        for r in fetched {
            let mut message = Message::new(r.try_get::<Vec<u8>, _>(6)?);
            message.headers = headers_from_json(r.try_get::<&str, _>(4)?);
            message.properties.message_id = Some(r.try_get(1)?);
            message.properties.content_type = r.try_get(5)?;
            rows.push(Row {
                id: r.try_get(0)?,
                ordering_key: r.try_get(7)?,
                outgoing: Outgoing::new(
                    r.try_get::<String, _>(2)?,
                    r.try_get::<String, _>(3)?,
                    message,
                ),
            });
        }

        self.keep_key_order(&mut tx, &mut rows).await?;

        let (ids, mut batch): (Vec<i64>, Vec<Outgoing>) =
            rows.into_iter().map(|r| (r.id, r.outgoing)).unzip();
        let results = match self.publish(&mut batch).await {
            Ok(results) => results,
            Err(e) => {
                // Release the leased rows now: a dropped transaction is rolled back in
                // the background, and until then the next round's SKIP LOCKED would
                // pass over the rows and find nothing due.
                let _ = tx.rollback().await;
                return Err(e);
            }
        };
        #[cfg(feature = "_failpoints")]
        if self.crash_point() {
            // As if the process died here: published, not marked; the transaction rolls
            // back (explicitly, for the reason above: a test drains right after).
            let _ = tx.rollback().await;
            return Err(OutboxError::Failpoint("relay-after-publish"));
        }
        let mut ok_ids = Vec::with_capacity(ids.len());
        let mut refused = 0u64;
        for ((id, out), result) in ids.into_iter().zip(&batch).zip(results) {
            match result {
                Ok(()) => ok_ids.push(id),
                Err(reason) => {
                    refused += 1;
                    let message_id = out.message.properties.message_id.as_deref().unwrap_or("");
                    tracing::warn!(%message_id, exchange = %out.exchange, routing_key = %out.routing_key, %reason, "outbox publish refused; will retry");
                    sqlx::query(&format!(
                        "UPDATE {t} SET attempts = attempts + 1, last_error = $2,
                         available_at = now() + make_interval(secs => LEAST(300, power(2, LEAST(attempts, 20)))::float8)
                         WHERE id = $1"
                    ))
                    .bind(id)
                    .bind(&reason)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        sqlx::query(&format!(
            "UPDATE {t} SET published_at = now() WHERE id = ANY($1)"
        ))
        .bind(&ok_ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.published
            .fetch_add(ok_ids.len() as u64, Ordering::Relaxed);
        self.refused.fetch_add(refused, Ordering::Relaxed);
        metrics::counter!("idem_outbox_published_total").increment(ok_ids.len() as u64);
        Ok(leased)
    }

    /// Publishes `rows` in order on one confirm channel ([`Publisher::publish_each`]).
    /// Per row: `Ok`, or why the broker refused it (returned unroutable, nacked, a
    /// name too long for AMQP). A failed channel or connection fails the whole round:
    /// nothing is marked, every row is published again (same `message_id`).
    async fn publish(
        &self,
        batch: &mut [Outgoing],
    ) -> Result<Vec<Result<(), String>>, OutboxError> {
        let results = self
            .publisher
            .publish_each(batch)
            .await
            .map_err(OutboxError::Broker)?;
        let mut out = Vec::with_capacity(results.len());
        for result in results {
            out.push(match result {
                Ok(()) => Ok(()),
                Err(e @ idem_amqp::Error::Amqp { .. }) => return Err(OutboxError::Broker(e)),
                Err(refused) => Err(refused.to_string()),
            });
        }
        Ok(out)
    }

    /// Drops from `rows` every row that must not go out yet to keep its key in order.
    ///
    /// A row of ordering key `k` may be published only if every unpublished row of `k`
    /// with a smaller id is in this batch too. Rows skipped by `SKIP LOCKED` (another
    /// relay holds them) or not yet due (a refused row waiting for its retry) can sit
    /// *between* two rows of this batch, so checking only the first row of each key is
    /// not enough: for each key we find the smallest pending id this batch does not
    /// hold, and keep only the rows below it.
    async fn keep_key_order(
        &self,
        tx: &mut sqlx::PgConnection,
        rows: &mut Vec<Row>,
    ) -> Result<(), OutboxError> {
        let mut keys: Vec<&str> = rows
            .iter()
            .filter_map(|r| r.ordering_key.as_deref())
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        keys.sort_unstable();
        keys.dedup();
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let missing: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT ordering_key, min(id) FROM {t}
             WHERE published_at IS NULL AND ordering_key = ANY($1) AND NOT (id = ANY($2))
             GROUP BY ordering_key",
            t = self.outbox.table_name()
        ))
        .bind(&keys)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        if missing.is_empty() {
            return Ok(());
        }
        let first_missing: HashMap<String, i64> = missing.into_iter().collect();
        rows.retain(|r| match r.ordering_key.as_ref() {
            Some(k) => first_missing.get(k).is_none_or(|&gap| r.id < gap),
            None => true,
        });
        Ok(())
    }

    /// Runs rounds until nothing is due. Errors stop it (for tests and batch jobs).
    pub async fn drain(&self) -> Result<RelayStats, OutboxError> {
        while self.relay_once().await? > 0 {}
        Ok(self.stats())
    }

    /// Relays until `shutdown` completes. Broker and database failures are logged and
    /// retried with backoff (rows stay in the outbox meanwhile); the relay never gives
    /// up. Wakes on NOTIFY from [`Outbox::enqueue`], polls as a fallback, cleans up old
    /// published rows, and reports the gauges `idem_outbox_pending` and
    /// `idem_outbox_oldest_pending_seconds`. To run it inside an
    /// [`idem_amqp::Service`] beside the consumers, with their listener and stop,
    /// pass the relay to [`ServiceBuilder::task`](idem_amqp::ServiceBuilder::task)
    /// (see [`crate::hosted`]).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<RelayStats, OutboxError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let _ready = self.register_readiness();
        let mut listener: Option<PgListener> = None;
        let mut failures = 0u32;
        let mut last_cleanup = tokio::time::Instant::now();
        loop {
            if listener.is_none() {
                listener = self.listen().await;
            }
            let full = match self.relay_once().await {
                Ok(n) => {
                    failures = 0;
                    n as i64 >= self.batch_size
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = Duration::from_millis(100u64 << failures.min(8))
                        .min(Duration::from_secs(30));
                    tracing::warn!(error = %e, retry_in = ?wait, "outbox relay round failed");
                    // Readiness and the lag gauges still follow the rows while rounds fail.
                    self.report_gauges().await;
                    tokio::select! {
                        _ = &mut shutdown => return Ok(self.stats()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            };
            if full {
                continue;
            }
            self.report_gauges().await;
            if last_cleanup.elapsed() > Duration::from_secs(60) {
                last_cleanup = tokio::time::Instant::now();
                if let Err(e) = self
                    .outbox
                    .cleanup(&self.pool, self.cleanup_after, 1000)
                    .await
                {
                    tracing::warn!(error = %e, "outbox cleanup failed");
                }
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => return Ok(self.stats()),
                r = notified => if r.is_err() { listener = None },
                _ = tokio::time::sleep(self.poll_interval) => {}
            }
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut l = PgListener::connect_with(&self.pool).await.ok()?;
        l.listen(self.outbox.channel()).await.ok()?;
        Some(l)
    }

    async fn report_gauges(&self) {
        if let Ok(s) = self.outbox.status(&self.pool).await {
            metrics::gauge!("idem_outbox_pending").set(s.pending as f64);
            metrics::gauge!("idem_outbox_oldest_pending_seconds")
                .set(s.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()));
            *lock(&self.oldest_pending_since) = s
                .oldest_pending_age
                .and_then(|age| Instant::now().checked_sub(age));
        }
    }

    /// The relay's readiness source, when asked for (see [`RelayBuilder::readiness`]).
    fn register_readiness(&self) -> Option<Registration> {
        let (registry, max_age) = self.readiness.as_ref()?;
        let (since, max_age) = (self.oldest_pending_since.clone(), *max_age);
        Some(registry.register(
            SourceKind::Relay,
            self.outbox.table_name(),
            move || match *lock(&since) {
                Some(t) if t.elapsed() > max_age => vec![format!(
                    "oldest pending outbox row is {} s old (threshold {} s)",
                    t.elapsed().as_secs(),
                    max_age.as_secs()
                )],
                _ => Vec::new(),
            },
        ))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
