//! A worker's own health, as its readiness source and its dead-letter queue metrics
//! see it: the state of its current broker connection, whether it is stopping, and
//! since when its dead-letter queue holds messages.
//!
//! **Dead-letter queue metrics** (with the `prometheus` feature), sampled by each
//! worker on its own channel every
//! [`dlq_sample_interval`](crate::WorkerBuilder::dlq_sample_interval) (default 15 s):
//!
//! - `idem_dlq_messages{queue}`: the depth of `Q.dlq`, from a passive `queue.declare`
//!   (it reads the count; it consumes nothing and creates nothing);
//! - `idem_dlq_oldest_age_seconds{queue}`: how long the queue has held messages
//!   without being seen empty. The clock starts at the first dead letter this worker
//!   confirmed into an empty queue, or, when a sample finds messages the worker did
//!   not put there (another process, or before it started), at that sample; a sample
//!   finding the queue empty resets it to 0. Reading the failure time header of the
//!   oldest message would mean consuming it, which a metric must not do. So the value
//!   is exact for the oldest message while the queue is only appended to, and an
//!   upper bound once some (not all) of its messages were replayed or deleted:
//!   exactly the "dead letters have waited this long for an operator" an alert wants.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
#[cfg(feature = "prometheus")]
use std::time::Duration;
use std::time::Instant;

use idem_core::breaker::CircuitBreaker;
use lapin::ConnectionStatus;

/// What a worker's readiness source reads. Shared by the worker loop, its sessions
/// and the readiness check.
#[derive(Default)]
pub(crate) struct WorkerHealth {
    /// The current session's connection, while there is one.
    connection: Mutex<Option<ConnectionStatus>>,
    stopping: AtomicBool,
    /// Since when the dead-letter queue holds messages (`None`: seen empty, or not
    /// known to hold any).
    dlq_since: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WorkerHealth {
    pub(crate) fn connected(&self, status: ConnectionStatus) {
        *lock(&self.connection) = Some(status);
    }

    pub(crate) fn disconnected(&self) {
        *lock(&self.connection) = None;
    }

    pub(crate) fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// The worker confirmed a dead-letter copy into its queue.
    pub(crate) fn dead_lettered(&self) {
        lock(&self.dlq_since).get_or_insert_with(Instant::now);
    }

    /// Why the worker should not be sent work now (empty: ready).
    pub(crate) fn reasons(&self, breaker: Option<&CircuitBreaker>) -> Vec<String> {
        if self.stopping.load(Ordering::SeqCst) {
            return vec!["shutting down".into()];
        }
        if let Some(b) = breaker.filter(|b| b.is_open()) {
            let cause = b.cause().unwrap_or_else(|| "no cause recorded".into());
            // A paused worker closes its connection on purpose: the breaker is the reason.
            return vec![format!("circuit breaker open: {cause}")];
        }
        match &*lock(&self.connection) {
            Some(s) if s.connected() => Vec::new(),
            Some(_) => vec!["broker connection lost; reconnecting".into()],
            None => vec!["no broker connection".into()],
        }
    }

    /// Records a sampled depth of the dead-letter queue; returns the age to publish.
    #[cfg(feature = "prometheus")]
    fn sampled(&self, depth: u32) -> Duration {
        let mut since = lock(&self.dlq_since);
        if depth == 0 {
            *since = None;
            return Duration::ZERO;
        }
        since.get_or_insert_with(Instant::now).elapsed()
    }
}

/// Samples `dlq`'s depth on `channel` (its own: a passive declare of a missing queue
/// closes the channel) every `every`, publishing the two gauges, until the channel
/// dies (the session's end aborts it sooner).
#[cfg(feature = "prometheus")]
pub(crate) async fn sample_dlq(
    channel: lapin::Channel,
    dlq: String,
    every: Duration,
    health: std::sync::Arc<WorkerHealth>,
) {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;

    let depth = metrics::gauge!("idem_dlq_messages", "queue" => dlq.clone());
    let age = metrics::gauge!("idem_dlq_oldest_age_seconds", "queue" => dlq.clone());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let declared = channel
            .queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(q) => {
                depth.set(f64::from(q.message_count()));
                age.set(health.sampled(q.message_count()).as_secs_f64());
            }
            Err(e) => {
                tracing::warn!(queue = %dlq, error = %e, "cannot read the dead-letter queue's depth; idem_dlq_messages is not sampled until the worker reconnects");
                return;
            }
        }
    }
}

/// Counts `idem_crash_loop_dead_lettered_total{consumer}` when `disposition` is a dead
/// letter of the crash-loop guard ([`idem_core::CrashLoopError`]: the message crashed
/// or hung its worker too often). With `None`, only makes sure the series exists.
#[cfg(feature = "prometheus")]
pub(crate) fn count_crash_loop(
    consumer: &idem_core::Consumer,
    disposition: Option<&idem_core::Disposition>,
) {
    let crash = match disposition {
        Some(idem_core::Disposition::DeadLetter { failure, .. }) => failure
            .error_type
            .as_deref()
            .is_some_and(|t| t.ends_with("CrashLoopError")),
        _ => false,
    };
    metrics::counter!("idem_crash_loop_dead_lettered_total", "consumer" => consumer.name().to_owned())
        .increment(u64::from(crash));
}
