//! Names, URLs and connections shared by the controller and the workers.

use std::time::Duration;

use idem_amqp::{DelayTiers, QueueType, Topology};
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

/// The broker URL(s) this process connects to: `AMQP_URL` on single nodes; on a
/// cluster ([`cluster`]) every node, comma-separated, the preferred one first
/// (idem-amqp connects to the first that answers and moves on after a loss).
pub(crate) fn amqp_url() -> String {
    match cluster() {
        Some(c) => c.amqp_urls.join(","),
        None => idem_amqp::amqp_url_from_env(),
    }
}

/// Every broker URL to try, in order of preference (one on single nodes).
pub(crate) fn amqp_urls() -> Vec<String> {
    match cluster() {
        Some(c) => c.amqp_urls.clone(),
        None => vec![idem_amqp::amqp_url_from_env()],
    }
}

/// The Redis URL(s) of the store: `REDIS_URL`, or on a cluster `REDIS_CLUSTER_URL`.
pub(crate) fn redis_url() -> String {
    match cluster() {
        Some(c) => c.redis_url.clone(),
        None => std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned()),
    }
}

/// The broker URLs of the cluster `.ci/cluster` starts (override: `AMQP_CLUSTER_URL`,
/// comma-separated, in the same node order as `IDEM_CLUSTER_NODES`).
pub(crate) const DEFAULT_AMQP_CLUSTER_URL: &str = "amqp://guest:guest@127.0.0.1:5701/%2f,amqp://guest:guest@127.0.0.1:5702/%2f,amqp://guest:guest@127.0.0.1:5703/%2f";
/// The seed nodes of the Redis Cluster `.ci/cluster` starts (override:
/// `REDIS_CLUSTER_URL`).
pub(crate) const DEFAULT_REDIS_CLUSTER_URL: &str =
    "redis://127.0.0.1:7001,redis://127.0.0.1:7002,redis://127.0.0.1:7003";
/// The Erlang node names of the cluster (override: `IDEM_CLUSTER_NODES`).
pub(crate) const DEFAULT_CLUSTER_NODES: &str =
    "idem-c1@localhost,idem-c2@localhost,idem-c3@localhost";

/// A run on the RabbitMQ and Redis clusters of `.ci/cluster` (`--cluster`).
#[derive(Debug)]
pub(crate) struct Cluster {
    /// One URL per RabbitMQ node, in node order.
    pub(crate) amqp_urls: Vec<String>,
    /// The Redis Cluster seed URLs, comma-separated.
    pub(crate) redis_url: String,
    /// The RabbitMQ node names (`rabbitmqctl -n`), in node order.
    pub(crate) nodes: Vec<String>,
    /// The `.ci/cluster` script: node restarts go through it.
    pub(crate) script: std::path::PathBuf,
}

static CLUSTER: std::sync::OnceLock<Cluster> = std::sync::OnceLock::new();

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Switches this process to cluster mode (once, at start-up).
pub(crate) fn use_cluster() -> Result<&'static Cluster, BoxError> {
    let amqp_urls = list("AMQP_CLUSTER_URL", DEFAULT_AMQP_CLUSTER_URL);
    let nodes = list("IDEM_CLUSTER_NODES", DEFAULT_CLUSTER_NODES);
    if amqp_urls.is_empty() || nodes.is_empty() {
        return Err("AMQP_CLUSTER_URL and IDEM_CLUSTER_NODES must not be empty".into());
    }
    let script = std::env::var_os("IDEM_CLUSTER_SCRIPT").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ci/cluster"),
        std::path::PathBuf::from,
    );
    let c = Cluster {
        amqp_urls,
        redis_url: std::env::var("REDIS_CLUSTER_URL")
            .unwrap_or_else(|_| DEFAULT_REDIS_CLUSTER_URL.to_owned()),
        nodes,
        script,
    };
    Ok(CLUSTER.get_or_init(|| c))
}

/// The cluster this process runs on, if `--cluster`.
pub(crate) fn cluster() -> Option<&'static Cluster> {
    CLUSTER.get()
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

/// Delay tiers short enough for a run of a few seconds; quorum queues on a cluster.
/// [`topology`], single-active-consumer for an ordered run (controller and workers
/// must declare it alike).
pub(crate) fn topology_for(queue: &str, ordered: bool) -> Topology {
    topology(queue).single_active_consumer(ordered)
}

pub(crate) fn topology(queue: &str) -> Topology {
    let tiers = DelayTiers::new([
        Duration::from_secs(1),
        Duration::from_secs(2),
        Duration::from_secs(5),
    ]);
    let mut topology = Topology::new(queue);
    if cluster().is_some() {
        // Replicated on every node of the cluster: a node kill loses no message.
        topology = topology.queue_type(QueueType::Quorum);
    }
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
    let opts: PgConnectOptions = url
        .parse()
        .map_err(|e| invalid_url("DATABASE_URL", url, e))?;
    PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts.application_name(application_name))
        .await
        .map_err(|e| not_reachable("PostgreSQL", "DATABASE_URL", url, e))
}

/// A connection to the first broker node that answers.
pub(crate) async fn rabbit(name: &str) -> Result<lapin::Connection, BoxError> {
    let e = match idem_amqp::connect(&amqp_url(), name).await {
        Ok(conn) => return Ok(conn),
        Err(e) => e,
    };
    Err(match cluster() {
        Some(_) => format!("no RabbitMQ cluster node reachable ({e}): see the README section \"Running on a cluster\", or set AMQP_CLUSTER_URL"),
        None => format!("RabbitMQ not reachable ({e}): is RabbitMQ running? see the README section \"Running the tests\", or set AMQP_URL"),
    }
    .into())
}

pub(crate) async fn redis_conn(url: &str) -> Result<redis::aio::ConnectionManager, BoxError> {
    let client = redis::Client::open(url).map_err(|e| invalid_url("REDIS_URL", url, e))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(3);
    redis::aio::ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| not_reachable("Redis", "REDIS_URL", url, e))
}

/// The error for a `url` (from `var`) that does not parse; the password redacted.
fn invalid_url(var: &str, url: &str, e: impl std::fmt::Display) -> BoxError {
    format!("invalid {var} {}: {e}", idem_core::redact::redact_url(url)).into()
}

/// The error for a `service` that does not answer at `url` (from `var`): what to
/// start, where to read, what to set. The password redacted.
fn not_reachable(service: &str, var: &str, url: &str, e: impl std::fmt::Display) -> BoxError {
    format!(
        "{service} not reachable at {} ({e}): is {service} running? see the README section \"Running the tests\", or set {var}",
        idem_core::redact::redact_url(url)
    )
    .into()
}
