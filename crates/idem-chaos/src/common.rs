//! Names, URLs and connections shared by the controller and the workers.

use std::time::Duration;

use idem_amqp::DelayTiers;
use idem_amqp::Topology;
use idem_core::{Backoff, Jitter};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The dedup store the workers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Store {
    /// The PostgreSQL transactional inbox (`PgInbox`): exactly-once effect.
    Postgres,
    /// The Redis lease store (`RedisStore`), effect written to PostgreSQL.
    Redis,
    /// Control group: no dedup at all (at-least-once). Shows that the checker does see
    /// duplicates: under kills and crash points this run must FAIL.
    None,
}

impl Store {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Store::Postgres => "postgres",
            Store::Redis => "redis",
            Store::None => "none",
        }
    }
}

pub(crate) const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub(crate) const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub(crate) fn amqp_url() -> String {
    idem_amqp::amqp_url_from_env()
}

pub(crate) fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

pub(crate) fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// Every name a run creates, derived from its id, so runs never collide and
/// clean-up knows what to drop.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    pub(crate) run: String,
}

impl Names {
    pub(crate) fn new(run: &str) -> Self {
        Names {
            run: run.to_owned(),
        }
    }
    /// The work queue (and prefix of its retry and dead-letter queues).
    pub(crate) fn queue(&self) -> String {
        format!("chaos-{}", self.run)
    }
    /// `chaos_<kind>_<run>`.
    pub(crate) fn table(&self, kind: &str) -> String {
        format!("chaos_{kind}_{}", self.run)
    }
    /// Prefix of every connection (AMQP name, PostgreSQL application_name, Redis
    /// client name) that faults may hit: the workers' and the producer's.
    pub(crate) fn conn_prefix(&self) -> String {
        format!("chaos-{}-", self.run)
    }
    /// Prefix of the workers' connections only.
    pub(crate) fn worker_prefix(&self) -> String {
        format!("chaos-{}-w", self.run)
    }
    pub(crate) fn redis_prefix(&self) -> String {
        format!("chaos-{}", self.run)
    }
}

/// Delay tiers short enough for a run of a few seconds.
pub(crate) fn topology(queue: &str) -> Topology {
    let tiers = DelayTiers::new([
        Duration::from_secs(1),
        Duration::from_secs(2),
        Duration::from_secs(5),
    ]);
    let topology = Topology::new(queue);
    match tiers {
        Some(t) => topology.tiers(t),
        None => topology,
    }
}

/// Transient failures (a killed connection) are retried many times, quickly: a
/// message dead-lettered for a technical reason would read as a loss.
pub(crate) fn backoff() -> Backoff {
    Backoff::exponential(Duration::from_millis(200))
        .multiplier(2.0)
        .cap(Duration::from_secs(2))
        .jitter(Jitter::Equal)
        .max_attempts(40)
}

pub(crate) async fn pg_pool(
    url: &str,
    application_name: &str,
    max: u32,
) -> Result<PgPool, BoxError> {
    let opts: PgConnectOptions = url.parse().map_err(|e| {
        format!(
            "invalid DATABASE_URL {}: {e}",
            idem_core::redact::redact_url(url)
        )
    })?;
    PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts.application_name(application_name))
        .await
        .map_err(|e| {
            format!(
                "PostgreSQL not reachable at {} ({e}): start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` or set DATABASE_URL",
                idem_core::redact::redact_url(url)
            )
            .into()
        })
}

pub(crate) async fn rabbit(name: &str) -> Result<lapin::Connection, BoxError> {
    let url = amqp_url();
    idem_amqp::connect(&url, name).await.map_err(|e| {
        format!("RabbitMQ not reachable ({e}): start it with `rabbitmq-server -detached` or set AMQP_URL").into()
    })
}

pub(crate) async fn redis_conn(url: &str) -> Result<redis::aio::ConnectionManager, BoxError> {
    let client = redis::Client::open(url).map_err(|e| {
        format!(
            "invalid REDIS_URL {}: {e}",
            idem_core::redact::redact_url(url)
        )
    })?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(3);
    redis::aio::ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| {
            format!(
                "Redis not reachable at {} ({e}): start it with `redis-server --daemonize yes` or set REDIS_URL",
                idem_core::redact::redact_url(url)
            )
            .into()
        })
}
