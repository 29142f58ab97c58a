//! [`Service`]: several consumers in one process, stopped together.
//!
//! A service is a list of [`Worker`]s, one per consumer, that start together, share
//! one metrics and probe listener (optional, see [`ServiceBuilder::listen`]), and stop
//! together: on SIGINT/SIGTERM ([`Service::run_until_signal`]), when a
//! [`WorkerHandle`] asks ([`Service::spawn`]), or when the future given to
//! [`Service::run`] completes. Each consumer is one call of
//! [`ServiceBuilder::consumer`], whose closure sets that consumer's prefetch,
//! concurrency and the other [`WorkerBuilder`] settings.
//!
//! See [`Service`] for an example.
//!
//! # Stopping
//!
//! - **Graceful stop**: every worker and hosted task is asked to stop at the same
//!   moment. A worker stops as a lone worker does (cancels its consumer, lets in-flight
//!   handlers finish and settles them, sends the pending acks, closes); a task finishes
//!   the work under way (the relay: its current round) and returns. They drain
//!   concurrently, so the one [`shutdown_timeout`](ServiceBuilder::shutdown_timeout)
//!   bounds the whole stop (plus the time to send the last acks and close the
//!   connections). The service's timeout replaces any timeout set in a consumer's
//!   closure; a task still running when it passes is dropped.
//! - **A task fails** (returns an error): as a worker that fails, the others are
//!   stopped gracefully and the service returns [`Error::Task`] naming it. A task
//!   that ends on its own without an error stops nothing; a service whose consumers
//!   and tasks have all ended returns.
//! - **A worker fails**: a worker fails only when its first connection or topology
//!   declaration fails (see [`Worker::run`]). The service then stops the other workers
//!   gracefully and returns [`Error::Consumer`] naming the consumer that failed (the
//!   first, if several did).
//! - **A handler panics the worker task**: the others are stopped gracefully, then the
//!   panic is resumed.
//! - **Dropping** the `run` future (or the [`WorkerHandle`] of [`Service::spawn`]) is a
//!   hard stop of every worker, as described under
//!   [Dropping a worker](crate::worker#dropping-a-worker).
//!
//! # Connections
//!
//! By default each consumer keeps **its own AMQP connection** (named `idem:<consumer>`
//! unless its closure sets [`WorkerBuilder::connection_name`]), exactly as a lone
//! [`Worker`]. With [`ServiceBuilder::connections`]`(n)` the consumers share `n`
//! connections instead (consumer `i` on connection `i % n`), each consumer with its
//! own channels on it (one to consume, one to publish its retry and dead-letter
//! copies and, with the `prometheus` feature, one for the dead-letter sampler). On a
//! shared connection:
//!
//! - **A channel error** (a refused declaration, a broker-side cancel) ends that
//!   consumer's channels only; it opens new ones on the same connection.
//! - **A lost connection** ends the channels of every consumer on it. The first of
//!   them to reconnect opens the new connection (same backoff as a lone worker), the
//!   others open their channels on it: never two connections for one slot.
//! - **A breaker pause** closes only the paused consumer's channels (which hands its
//!   prefetched deliveries back); the connection stays for the others.
//! - **Stop**: each consumer closes its channels; the service closes the connections
//!   once every consumer has stopped. A hard stop (drop) closes the channels as they
//!   are dropped and the connection with its last handle.
//! - The connection's name and TLS settings are the service's
//!   ([`ServiceBuilder::connection_name`], [`ServiceBuilder::tls`]); a consumer's own
//!   `connection_name` and `tls` are not used.
//!
//! Sharing trades isolation for fewer connections: a connection-level failure stops
//! every consumer on it until it is back, and its consumers share one TCP socket's
//! throughput and the broker's flow control (a blocked connection blocks all of them).
//!
//! # Hosted tasks: the outbox relay
//!
//! [`ServiceBuilder::task`] adds work that is not a consumer, a [`HostedTask`]: it
//! starts with the consumers, is told to stop at the same moment, and has the same
//! shutdown timeout (see [`task`] for what happens when a task fails or overruns).
//! The outbox relay (`idem_outbox::Relay`) is one: `idem-outbox` builds on this
//! crate, so it implements the trait and the service never names it. A relay built
//! with `RelayBuilder::readiness(&Readiness::global(), max_age)` reports into the
//! registry the service's listener serves, so `/ready` turns 503 when its oldest
//! pending row is too old.
//!
//! # Names
//!
//! Consumer names must differ within a service ([`Error::DuplicateConsumer`]
//! otherwise): metrics (`consumer="..."`), readiness reasons and errors name
//! consumers by their name. Task names need not (two relays of one outbox table
//! compete for its rows, as they would in two processes).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::FutureExt;
use idem_core::{Consumer, Stats, WorkerHandle};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::endpoints::Endpoints;
use crate::error::Error;
use crate::readiness::Readiness;
use crate::topology::Topology;
use crate::worker::{SharedConnection, Worker, WorkerBuilder};

pub mod task;
pub use task::{HostedTask, TaskContext, TaskError};

/// Default time a service's workers have to drain in-flight handlers on shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Configures one consumer's worker: what [`ServiceBuilder::consumer`] takes.
type Configure = Box<dyn FnOnce(WorkerBuilder) -> WorkerBuilder + Send>;

/// Configures a [`Service`]. See [`Service::builder`].
pub struct ServiceBuilder {
    endpoints: Endpoints,
    connections: Option<usize>,
    connection_name: String,
    tls: idem_core::TlsConfig,
    #[cfg(feature = "prometheus")]
    listen: Option<std::net::SocketAddr>,
    shutdown_timeout: Duration,
    consumers: Vec<(Topology, Consumer, Configure)>,
    tasks: Vec<Box<dyn HostedTask>>,
}

impl std::fmt::Debug for ServiceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.consumers.iter().map(|(_, c, _)| c.name()).collect();
        let tasks: Vec<String> = self.tasks.iter().map(|t| t.name()).collect();
        f.debug_struct("ServiceBuilder")
            .field("endpoints", &self.endpoints)
            .field("consumers", &names)
            .field("tasks", &tasks)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

/// Several consumers run, and stopped, together in one process: how they stop, and
/// what they share, under the [module docs](self).
///
/// ```no_run
/// use std::time::Duration;
/// use idem_amqp::{Service, Topology};
/// use idem_core::{Consumer, MemoryStore};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let billing = Consumer::builder("billing").store(MemoryStore::new()).handler(|| async {})?;
/// let emails = Consumer::builder("emails").store(MemoryStore::new()).handler(|| async {})?;
/// let service = Service::builder(idem_amqp::amqp_url_from_env())
///     .listen("0.0.0.0:9090".parse()?) // /metrics, /live, /ready for both
///     .connections(1) // both on one connection, a channel each
///     .consumer(Topology::new("charges"), billing, |w| w.prefetch(100).concurrency(20))
///     .consumer(Topology::new("emails"), emails, |w| w.prefetch(10))
///     .shutdown_timeout(Duration::from_secs(20))
///     .build()?;
/// for (consumer, stats) in service.run_until_signal().await? {
///     println!("{consumer}: {stats}");
/// }
/// # Ok(()) }
/// ```
pub struct Service {
    workers: Vec<(String, Worker)>,
    tasks: Vec<Box<dyn HostedTask>>,
    shutdown_timeout: Duration,
    /// The shared connections (empty: each consumer has its own).
    pool: Vec<Arc<SharedConnection>>,
    #[cfg(feature = "prometheus")]
    listen: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.workers.iter().map(|(n, _)| n.as_str()).collect();
        let tasks: Vec<String> = self.tasks.iter().map(|t| t.name()).collect();
        f.debug_struct("Service")
            .field("consumers", &names)
            .field("tasks", &tasks)
            .finish_non_exhaustive()
    }
}

/// Each consumer's stats when the service stopped, in the order they were added
/// (hosted tasks have none here: a task keeps its own counts, e.g. `Relay::stats`).
pub type ServiceStats = Vec<(String, Stats)>;

impl Service {
    /// A service whose consumers connect to `endpoints` (one URL, a comma-separated
    /// list or an [`Endpoints`] value, as for [`Worker::builder`]).
    pub fn builder(endpoints: impl Into<Endpoints>) -> ServiceBuilder {
        ServiceBuilder {
            endpoints: endpoints.into(),
            connections: None,
            connection_name: "idem:service".to_owned(),
            tls: idem_core::TlsConfig::default(),
            #[cfg(feature = "prometheus")]
            listen: None,
            shutdown_timeout: SHUTDOWN_TIMEOUT,
            consumers: Vec::new(),
            tasks: Vec::new(),
        }
    }
}

impl ServiceBuilder {
    /// Adds a consumer: one [`Worker`] consuming `topology`'s queue with `consumer`.
    /// `configure` sets that worker's settings (prefetch, concurrency, acks, TLS...);
    /// pass `|w| w` for the defaults.
    pub fn consumer(
        mut self,
        topology: impl Into<Topology>,
        consumer: Consumer,
        configure: impl FnOnce(WorkerBuilder) -> WorkerBuilder + Send + 'static,
    ) -> Self {
        self.consumers
            .push((topology.into(), consumer, Box::new(configure)));
        self
    }

    /// Adds a hosted task (the outbox relay, or any [`HostedTask`]): run beside the
    /// consumers, stopped with them within the one shutdown timeout. See
    /// [Hosted tasks](self#hosted-tasks-the-outbox-relay).
    pub fn task(mut self, task: impl HostedTask) -> Self {
        self.tasks.push(Box::new(task));
        self
    }

    /// Serves this process's metrics at `http://<addr>/metrics` and the probes `/live`
    /// and `/ready` (every consumer of the service is a readiness source) while the
    /// service runs: one listener for all consumers. See [`crate::prometheus`].
    #[cfg(feature = "prometheus")]
    pub fn listen(mut self, addr: std::net::SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Consumers share `n` connections (at least 1), one channel pair each: consumer
    /// `i` (in the order added) uses connection `i % n`. Default: no sharing, each
    /// consumer opens its own connection. See [Connections](self#connections).
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = Some(n.max(1));
        self
    }

    /// Name the broker shows for the shared connections (default `idem:service`;
    /// with several, `#1`, `#2`... appended). Only with [`connections`](Self::connections).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// TLS settings of the shared connections (see [`crate::tls`]). Only with
    /// [`connections`](Self::connections); a consumer's own connection takes the
    /// settings of its closure ([`WorkerBuilder::tls`]).
    pub fn tls(mut self, tls: idem_core::TlsConfig) -> Self {
        self.tls = tls;
        self
    }

    /// How long a stop waits for in-flight handlers, for all consumers at once, and
    /// for the hosted tasks to return (default 30 s). Replaces a timeout set in a
    /// consumer's closure.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Checks every consumer's configuration (as [`WorkerBuilder::build`] does) and
    /// builds the service. Fails with [`Error::DuplicateConsumer`] when two consumers
    /// share a name, and with [`Error::Consumer`] naming the consumer whose settings
    /// were refused.
    pub fn build(self) -> Result<Service, Error> {
        let mut workers: Vec<(String, Worker)> = Vec::with_capacity(self.consumers.len());
        let n = self.connections.unwrap_or(0);
        let pool: Vec<Arc<SharedConnection>> = (0..n)
            .map(|i| {
                let name = match n {
                    1 => self.connection_name.clone(),
                    _ => format!("{}#{}", self.connection_name, i + 1),
                };
                Arc::new(SharedConnection::new(
                    self.endpoints.clone(),
                    self.tls.clone(),
                    name,
                ))
            })
            .collect();
        for (i, (topology, consumer, configure)) in self.consumers.into_iter().enumerate() {
            let name = consumer.name().to_owned();
            if workers.iter().any(|(n, _)| *n == name) {
                return Err(Error::DuplicateConsumer(name));
            }
            let builder = Worker::builder(&self.endpoints, topology, consumer);
            let mut builder = configure(builder).shutdown_timeout(self.shutdown_timeout);
            if let Some(conn) = pool.get(i % n.max(1)) {
                builder = builder.shared_connection(conn.clone());
            }
            let worker = builder.build().map_err(|e| Error::consumer(&name, e))?;
            workers.push((name, worker));
        }
        Ok(Service {
            workers,
            tasks: self.tasks,
            shutdown_timeout: self.shutdown_timeout,
            pool,
            #[cfg(feature = "prometheus")]
            listen: self.listen,
        })
    }
}

/// A task of the service's [`JoinSet`] that ended.
enum Ended {
    /// A consumer's worker: its index and what its `run` returned.
    Worker(usize, Result<Stats, Error>),
    /// A hosted task: its name and what it returned (`None`: dropped at the shutdown
    /// timeout).
    Task(String, Option<Result<(), TaskError>>),
}

/// What the service's tasks ended with so far.
struct Outcome {
    stats: Vec<Option<Stats>>,
    failed: Option<Error>,
    panic: Option<Box<dyn std::any::Any + Send>>,
}

impl Outcome {
    /// Records `joined`; returns whether the service must stop because of it.
    fn record(
        &mut self,
        joined: Result<Ended, tokio::task::JoinError>,
        names: &[String],
        stopping: bool,
    ) -> bool {
        match joined {
            Ok(Ended::Worker(i, Ok(s))) => self.stats[i] = Some(s),
            Ok(Ended::Worker(i, Err(e))) => {
                tracing::error!(consumer = %names[i], error = %e, "consumer failed; stopping the service");
                self.failed
                    .get_or_insert_with(|| Error::consumer(&names[i], e));
                return true;
            }
            Ok(Ended::Task(name, Some(Ok(())))) if stopping => {
                tracing::debug!(task = %name, "hosted task stopped");
            }
            Ok(Ended::Task(name, Some(Ok(())))) => {
                tracing::info!(task = %name, "hosted task finished its work; the service carries on");
            }
            Ok(Ended::Task(name, Some(Err(e)))) => {
                tracing::error!(task = %name, error = %e, "hosted task failed; stopping the service");
                self.failed.get_or_insert(Error::Task {
                    task: name,
                    source: e,
                });
                return true;
            }
            Ok(Ended::Task(name, None)) => {
                tracing::warn!(task = %name, "hosted task still running at the shutdown timeout; dropped");
            }
            Err(e) if e.is_panic() => {
                tracing::error!(
                    "a consumer's worker or a hosted task panicked; stopping the service"
                );
                self.panic.get_or_insert(e.into_panic());
                return true;
            }
            // Cancelled: only when the runtime shuts down; nothing left to report.
            Err(_) => return true,
        }
        false
    }
}

impl Service {
    /// The consumers' names, in the order they were added.
    pub fn consumers(&self) -> impl Iterator<Item = &str> {
        self.workers.iter().map(|(n, _)| n.as_str())
    }

    /// The hosted tasks' names, in the order they were added.
    pub fn tasks(&self) -> impl Iterator<Item = String> + '_ {
        self.tasks.iter().map(|t| t.name())
    }

    /// Runs every consumer and hosted task until SIGINT (Ctrl-C) or SIGTERM, then
    /// stops them all gracefully. See [Stopping](self#stopping).
    pub async fn run_until_signal(self) -> Result<ServiceStats, Error> {
        self.run(crate::shutdown::signal()).await
    }

    /// Runs the service on its own tokio task until the handle asks it to stop; the
    /// handle's [`shutdown_and_join`](WorkerHandle::shutdown_and_join) stops every
    /// consumer and task gracefully and returns what [`run`](Self::run) returns.
    /// Dropping the handle is a hard stop of every consumer and task.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(self) -> WorkerHandle<Result<ServiceStats, Error>> {
        WorkerHandle::spawn(|shutdown| self.run(shutdown.wait()))
    }

    /// Starts every worker (with its readiness source in `ready`) and task on `set`;
    /// returns the consumers' names.
    fn start(
        self,
        ready: Vec<crate::readiness::Registration>,
        set: &mut JoinSet<Ended>,
        stop: &watch::Sender<bool>,
    ) -> Vec<String> {
        let mut names = Vec::with_capacity(self.workers.len());
        let workers = self.workers.into_iter().zip(ready);
        for (i, ((name, worker), ready)) in workers.enumerate() {
            let mut asked = stop.subscribe();
            let stopped = async move {
                // An error means the service is gone: stop as well.
                let _ = asked.wait_for(|s| *s).await;
            };
            set.spawn(async move { Ended::Worker(i, worker.run_registered(ready, stopped).await) });
            names.push(name);
        }
        for task in self.tasks {
            let name = task.name();
            let ctx = TaskContext::new(stop.subscribe(), Readiness::global());
            let overdue = {
                let stopped = ctx.shutdown();
                let timeout = self.shutdown_timeout;
                async move {
                    stopped.await;
                    tokio::time::sleep(timeout).await;
                }
            };
            set.spawn(async move {
                let ended = tokio::select! {
                    r = task.run(ctx) => Some(r),
                    () = overdue => None,
                };
                Ended::Task(name, ended)
            });
        }
        names
    }

    /// Runs every consumer and hosted task until `shutdown` completes, then stops
    /// them all gracefully and returns each consumer's stats. If a consumer fails
    /// (its first connection or declaration) or a task returns an error, stops the
    /// others and returns [`Error::Consumer`] or [`Error::Task`] naming it. A
    /// service with neither consumers nor tasks waits for `shutdown` and returns no
    /// stats. See [Stopping](self#stopping).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<ServiceStats, Error> {
        // Every worker is a readiness source before the listener serves: `/ready`
        // never answers 200 for a service whose consumers are not known yet.
        let ready: Vec<_> = self
            .workers
            .iter()
            .map(|(_, w)| w.register_readiness())
            .collect();
        // Bound before any worker starts: a wrong address fails the whole service.
        #[cfg(feature = "prometheus")]
        let _listener = match self.listen {
            Some(addr) => Some(crate::prometheus::listen(addr)?),
            None => None,
        };
        let (stop, _) = watch::channel(false);
        let pool = self.pool.clone();
        let tasks = self.tasks.len();
        // Owned by this future: dropping it aborts every worker and task (a hard stop).
        let mut set: JoinSet<Ended> = JoinSet::new();
        let names = self.start(ready, &mut set, &stop);
        if set.is_empty() {
            // Nothing to run: serve the listener (if any) until asked to stop.
            shutdown.await;
            return Ok(Vec::new());
        }
        let mut outcome = Outcome {
            stats: vec![None; names.len()],
            failed: None,
            panic: None,
        };
        let mut shutdown = std::pin::pin!(shutdown.fuse());
        loop {
            let joined = tokio::select! {
                _ = &mut shutdown, if !*stop.borrow() => {
                    tracing::info!(consumers = names.len(), tasks, "service stopping");
                    stop.send_replace(true);
                    continue;
                }
                joined = set.join_next() => joined,
            };
            let Some(joined) = joined else { break };
            if outcome.record(joined, &names, *stop.borrow()) {
                stop.send_replace(true);
            }
        }
        for conn in &pool {
            conn.close().await;
        }
        if let Some(p) = outcome.panic {
            std::panic::resume_unwind(p);
        }
        if let Some(e) = outcome.failed {
            return Err(e);
        }
        Ok(names
            .into_iter()
            .zip(outcome.stats)
            .map(|(n, s)| (n, s.unwrap_or_default()))
            .collect())
    }
}
