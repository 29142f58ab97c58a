//! Outcome counts: [`Stats`] for the program, metrics for the recorder.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use super::policy::Decision;

/// Counts of outcomes since the consumer was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Messages whose handler succeeded.
    pub processed: u64,
    /// Messages acked as duplicates without running the handler.
    pub duplicates: u64,
    /// Retry copies scheduled.
    pub retries: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// At-most-once failures (acked before the handler, not retried).
    pub dropped: u64,
    /// Immediate (in-process) retries run; not counted in `retries`, which counts
    /// retry copies (see [`ConsumerBuilder::immediate_retries`](super::ConsumerBuilder::immediate_retries)).
    pub immediate_retries: u64,
    /// Messages the handler dropped on purpose ([`HandlerError::discard`](crate::HandlerError::discard)).
    pub discarded: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "processed={} duplicates={} retries={} dead_lettered={}",
            self.processed, self.duplicates, self.retries, self.dead_lettered
        )?;
        if self.dropped > 0 {
            write!(f, " dropped={}", self.dropped)?;
        }
        if self.immediate_retries > 0 {
            write!(f, " immediate_retries={}", self.immediate_retries)?;
        }
        if self.discarded > 0 {
            write!(f, " discarded={}", self.discarded)?;
        }
        Ok(())
    }
}

#[derive(Default)]
pub(super) struct Counters {
    processed: AtomicU64,
    duplicates: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    dropped: AtomicU64,
    immediate_retries: AtomicU64,
    discarded: AtomicU64,
}

pub(super) struct Meters {
    processed: metrics::Counter,
    duplicates: metrics::Counter,
    retries: metrics::Counter,
    dead_lettered: metrics::Counter,
    immediate_retries: metrics::Counter,
    discarded: metrics::Counter,
    pub(super) latency: metrics::Histogram,
}

impl Meters {
    pub(super) fn new(name: &str) -> Self {
        let c = name.to_owned();
        Meters {
            processed: metrics::counter!("idem_processed_total", "consumer" => c.clone()),
            duplicates: metrics::counter!("idem_duplicates_total", "consumer" => c.clone()),
            retries: metrics::counter!("idem_retries_total", "consumer" => c.clone()),
            dead_lettered: metrics::counter!("idem_dead_lettered_total", "consumer" => c.clone()),
            immediate_retries: metrics::counter!("idem_immediate_retries_total", "consumer" => c.clone()),
            discarded: metrics::counter!("idem_discarded_total", "consumer" => c.clone()),
            latency: metrics::histogram!("idem_handler_duration_seconds", "consumer" => c),
        }
    }
}

impl Counters {
    /// The counts so far.
    pub(super) fn snapshot(&self) -> Stats {
        Stats {
            processed: self.processed.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            immediate_retries: self.immediate_retries.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
        }
    }

    /// Counts one immediate retry.
    pub(super) fn immediate_retry(&self, meters: &Meters) {
        self.immediate_retries.fetch_add(1, Ordering::Relaxed);
        meters.immediate_retries.increment(1);
    }

    /// Counts the outcome of one delivery, in [`Stats`] and in the metrics.
    pub(super) fn record(&self, decision: Decision, meters: &Meters) {
        let (counter, meter) = match decision {
            Decision::Ack { duplicate: false } => (&self.processed, Some(&meters.processed)),
            Decision::Ack { duplicate: true } => (&self.duplicates, Some(&meters.duplicates)),
            Decision::Retry { .. } => (&self.retries, Some(&meters.retries)),
            Decision::DeadLetter { .. } => (&self.dead_lettered, Some(&meters.dead_lettered)),
            Decision::Discard => (&self.discarded, Some(&meters.discarded)),
            // At-most-once failures have no metric of their own (the warn log says it).
            Decision::Dropped => (&self.dropped, None),
            Decision::Release => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(meter) = meter {
            meter.increment(1);
        }
    }
}
