//! [`WorkerBuilder`]: the worker's settings and the checks `build` makes.

use std::sync::Arc;
use std::time::Duration;

use idem_core::{Consumer, SettleHook, Settled};

use super::{Shared, Worker};
use crate::endpoints::Endpoints;
use crate::error::Error;
use crate::topology::{short, Topology};

/// Default longest wait before a settled delivery's ack is sent.
const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(1);

/// Default interval of the dead-letter queue sampler.
#[cfg(feature = "prometheus")]
const DLQ_SAMPLE_INTERVAL: Duration = Duration::from_secs(15);

/// Configures a [`Worker`]. See [`Worker::builder`].
pub struct WorkerBuilder {
    endpoints: Endpoints,
    tls: idem_core::TlsConfig,
    topology: Topology,
    consumer: Consumer,
    prefetch: u16,
    concurrency: Option<usize>,
    connection_name: Option<String>,
    broker_timeout: Duration,
    shutdown_timeout: Duration,
    on_settle: Option<SettleHook>,
    coalesce_acks: bool,
    ack_flush_interval: Duration,
    ack_flush_batch: Option<usize>,
    #[cfg(feature = "prometheus")]
    prometheus: Option<std::net::SocketAddr>,
    #[cfg(feature = "prometheus")]
    dlq_sample_interval: Duration,
    readiness: Option<crate::readiness::Readiness>,
    shared_connection: Option<Arc<super::SharedConnection>>,
    ordering: Option<crate::ordered::Ordering>,
}

/// How the worker acks: coalesced (`flush` set) or one `basic.ack` per delivery.
#[derive(Clone, Copy, Debug)]
pub(super) struct AckConfig {
    /// `(batch, interval)` when acks are coalesced.
    pub(super) flush: Option<(usize, Duration)>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("endpoints", &self.endpoints)
            .field("topology", &self.topology)
            .field("consumer", &self.consumer)
            .field("prefetch", &self.prefetch)
            .field("coalesce_acks", &self.coalesce_acks)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker consuming `topology`'s queue (a queue name converts) with `consumer`,
    /// at `endpoints`: one URL, a comma-separated list or an [`Endpoints`] value
    /// (connects to the first that answers, and after a loss from the next one; see
    /// [`crate::endpoints`]).
    pub fn builder(
        endpoints: impl Into<Endpoints>,
        topology: impl Into<Topology>,
        consumer: Consumer,
    ) -> WorkerBuilder {
        WorkerBuilder {
            endpoints: endpoints.into(),
            tls: idem_core::TlsConfig::default(),
            topology: topology.into(),
            consumer,
            prefetch: 50,
            concurrency: None,
            connection_name: None,
            broker_timeout: Duration::from_secs(30 * 60), // RabbitMQ's default consumer_timeout
            shutdown_timeout: Duration::from_secs(30),
            on_settle: None,
            coalesce_acks: true,
            ack_flush_interval: ACK_FLUSH_INTERVAL,
            ack_flush_batch: None,
            #[cfg(feature = "prometheus")]
            prometheus: None,
            #[cfg(feature = "prometheus")]
            dlq_sample_interval: DLQ_SAMPLE_INTERVAL,
            readiness: None,
            shared_connection: None,
            ordering: None,
        }
    }
}

impl WorkerBuilder {
    /// Most unacked deliveries (`basic.qos`), default 50, at least 1.
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Most handlers running at once; default and maximum: the prefetch.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency.max(1));
        self
    }

    /// Connection name shown by the broker (default `idem:<consumer name>`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// The broker's `consumer_timeout` (default 30 min). The handler timeout and the
    /// dedup lease must be shorter; checked by [`build`](Self::build).
    pub fn broker_consumer_timeout(mut self, timeout: Duration) -> Self {
        self.broker_timeout = timeout;
        self
    }

    /// How long shutdown waits for in-flight handlers (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// TLS settings for an `amqps://` URL (CA file, client certificate): see
    /// [`crate::tls`]. Default: verified against the system roots.
    pub fn tls(mut self, tls: idem_core::TlsConfig) -> Self {
        self.tls = tls;
        self
    }

    /// Coalesced acks (default on): the worker acks runs of settled deliveries with
    /// one `basic.ack multiple=true`, see [Acks](super#acks) in the worker module docs. Off: one `basic.ack` per
    /// delivery, sent as soon as it is settled.
    pub fn coalesce_acks(mut self, on: bool) -> Self {
        self.coalesce_acks = on;
        self
    }

    /// With coalesced acks, the longest a settled delivery waits for its ack to be
    /// sent (default 1 ms; tokio's timer has a 1 ms resolution, so a wait can end up
    /// to one tick late). Zero: send the ack of whatever run is settled each time the
    /// flusher wakes up.
    pub fn ack_flush_interval(mut self, interval: Duration) -> Self {
        self.ack_flush_interval = interval;
        self
    }

    /// With coalesced acks, send the ack as soon as this many deliveries in a row are
    /// settled, without waiting for the interval. Default: a quarter of the prefetch
    /// (at least 1), so the broker keeps three quarters of its window in flight while
    /// acks are pending. Clamped to `1..=prefetch`.
    pub fn ack_flush_batch(mut self, batch: usize) -> Self {
        self.ack_flush_batch = Some(batch);
        self
    }

    /// Called once per delivery after it is settled on the wire: its ack (or the ack
    /// covering it, with coalesced acks) was sent, or it was handed back, or its copy
    /// was confirmed and the original acked. When the channel died first, the hook
    /// still runs once and the broker redelivers the message. Runs on the worker's
    /// tasks: keep it short (tests, custom metrics, benchmarks). The same hook type as
    /// the in-memory broker's ([`Settled`]).
    pub fn on_settle(mut self, hook: impl Fn(Settled<'_>) + Send + Sync + 'static) -> Self {
        self.on_settle = Some(Arc::new(hook));
        self
    }

    /// Serves the `metrics` of this process in the Prometheus text format at
    /// `http://<addr>/metrics`, and the probes `/live` and `/ready`, while the worker
    /// runs: [`prometheus::listen`](crate::prometheus::listen) held for the worker's
    /// run. For a process of one lone worker; a process of several consumers (or a
    /// consumer and the outbox relay) runs them in a [`Service`](crate::Service) and
    /// gives the address once, to [`ServiceBuilder::listen`](crate::ServiceBuilder::listen).
    /// One listener per process: the first worker binds it and installs the global
    /// recorder, later workers given the same address join it, and a worker given
    /// another address fails to start with [`Error::Metrics`]. See
    /// [`crate::prometheus`].
    #[cfg(feature = "prometheus")]
    pub fn prometheus(mut self, addr: std::net::SocketAddr) -> Self {
        self.prometheus = Some(addr);
        self
    }

    /// How often the worker samples its dead-letter queue for `idem_dlq_messages` and
    /// `idem_dlq_oldest_age_seconds` (default 15 s; zero turns sampling off). See
    /// [`crate::health`].
    #[cfg(feature = "prometheus")]
    pub fn dlq_sample_interval(mut self, every: Duration) -> Self {
        self.dlq_sample_interval = every;
        self
    }

    /// The readiness registry this worker reports into while it runs (default:
    /// [`Readiness::global`](crate::readiness::Readiness::global), the one the
    /// Prometheus listener serves at `/ready`). See [`crate::readiness`].
    pub fn readiness(mut self, registry: crate::readiness::Readiness) -> Self {
        self.readiness = Some(registry);
        self
    }

    /// Runs deliveries in per-key lanes: one at a time per key, in queue order,
    /// transient failures retried in place (see [`crate::ordered`]). Turns coalesced
    /// acks off unless [`Ordering::coalesce_acks`](crate::ordered::Ordering::coalesce_acks)
    /// keeps them. With several processes, consume a single-active-consumer queue
    /// ([`Topology::single_active_consumer`], [`crate::ordered::Shards`]).
    ///
    /// [`build`](Self::build) refuses a backoff whose retry horizon (the sum of its
    /// delays, which a delivery now waits unacked) is not below the broker's consumer
    /// timeout.
    pub fn ordered(mut self, ordering: crate::ordered::Ordering) -> Self {
        self.ordering = Some(ordering);
        self
    }

    /// Consume on `conn`, shared with other workers of a [`Service`](crate::Service),
    /// instead of a connection of the worker's own.
    pub(crate) fn shared_connection(mut self, conn: Arc<super::SharedConnection>) -> Self {
        self.shared_connection = Some(conn);
        self
    }

    /// Checks the configuration and builds the worker.
    ///
    /// Refuses a dedup retention shorter than the retry horizon *in broker time*
    /// ([`Error::RetentionTooShortForTiers`]): each backoff delay waits in the delay
    /// tier it is rounded to, which can be longer than the delay (base = cap = 20 min
    /// waits in the 30 min tier of the default tiers), see [`DelayTiers::horizon`](crate::DelayTiers::horizon).
    pub fn build(self) -> Result<Worker, Error> {
        self.consumer.check_broker_timeout(self.broker_timeout)?;
        if let Some(retention) = self.consumer.retention() {
            let horizon = self.topology.get_tiers().horizon(self.consumer.backoff());
            if retention < horizon {
                return Err(Error::RetentionTooShortForTiers { retention, horizon });
            }
        }
        self.topology.check_names()?;
        if let Some(limit) = self.topology.effective_delivery_limit() {
            if limit <= self.consumer.crash_limit() {
                tracing::warn!(
                    delivery_limit = limit,
                    crash_limit = self.consumer.crash_limit(),
                    "x-delivery-limit is not above the consumer's crash limit: the broker also counts deliveries a crashed worker only held prefetched, so it may dead-letter healthy neighbours of a crashing message; raise the delivery limit"
                );
            }
        }
        if self.ordering.is_some() {
            let horizon = self.consumer.backoff().horizon();
            if horizon >= self.broker_timeout {
                return Err(idem_core::ConfigError::TimeoutTooLong {
                    what: "the ordered worker's in-place retry horizon (sum of backoff delays)",
                    value: horizon,
                    broker: self.broker_timeout,
                }
                .into());
            }
        }
        let concurrency = self
            .concurrency
            .unwrap_or(usize::from(self.prefetch))
            .min(usize::from(self.prefetch));
        let prefetch = usize::from(self.prefetch);
        let acks = AckConfig {
            // Ordered: a head retried in place would hold back every later ack.
            flush: (self.coalesce_acks && self.ordering.as_ref().is_none_or(|o| o.coalesce_acks))
                .then(|| {
                    let batch = self
                        .ack_flush_batch
                        .unwrap_or(prefetch / 4)
                        .clamp(1, prefetch);
                    (batch, self.ack_flush_interval)
                }),
        };
        let retry_queues = self
            .topology
            .get_tiers()
            .as_slice()
            .iter()
            .map(|t| (*t, self.topology.retry_queue(*t)))
            .collect();
        let shared = Shared {
            queue: short(self.topology.queue())?,
            dlq: self.topology.dlq(),
            retry_queues,
            connection_name: self
                .connection_name
                .unwrap_or_else(|| format!("idem:{}", self.consumer.name())),
            endpoints: self.endpoints,
            tls: self.tls,
            topology: self.topology,
            consumer: self.consumer,
            prefetch: self.prefetch,
            concurrency: u32::try_from(concurrency).unwrap_or(u32::MAX),
            shutdown_timeout: self.shutdown_timeout,
            on_settle: self.on_settle,
            acks,
            #[cfg(feature = "prometheus")]
            prometheus: self.prometheus,
            #[cfg(feature = "prometheus")]
            dlq_sample_interval: self.dlq_sample_interval,
            readiness: self
                .readiness
                .unwrap_or_else(crate::readiness::Readiness::global),
            health: Arc::default(),
            shared_connection: self.shared_connection,
            ordered: self.ordering.map(|o| super::lane::Ordered {
                key: o.key,
                after: o.after,
                lanes: idem_core::ordered::Lanes::new(idem_core::ordered::OrderLimits::new(
                    o.limits.per_key,
                    o.limits.total.min(prefetch),
                )),
            }),
        };
        Ok(Worker {
            shared: Arc::new(shared),
        })
    }
}
