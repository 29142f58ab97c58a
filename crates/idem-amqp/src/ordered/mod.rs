//! Ordered consumption by key on RabbitMQ: [`Ordering`] (set with
//! [`WorkerBuilder::ordered`](crate::WorkerBuilder::ordered)) and [`Shards`] (one
//! active consumer per key across processes). The rule in full is in
//! `docs/ordering.md`; in short:
//!
//! - **In a process**: deliveries of one key run one at a time, in the order the
//!   queue delivered them (per-key lanes, [`idem_core::ordered::Lanes`]); different
//!   keys run concurrently up to the worker's concurrency. A delivery without a key
//!   runs at once, unordered.
//! - **Retries in place**: a transient failure is retried in the worker, after its
//!   backoff delay, with the delivery kept unacked, instead of a copy through a delay
//!   queue (which would rejoin the queue behind the key's later messages). The later
//!   messages of the key stay parked behind it; other keys go on. A crash or lost
//!   connection returns the unacked deliveries to the queue, ahead of what was never
//!   delivered, so the key's order holds (the in-place attempts are not carried: the
//!   redelivered head starts its attempt count again; the crash guard and a quorum
//!   queue's delivery limit still count its deliveries).
//! - **Acks are per delivery** (coalescing is turned off unless
//!   [`Ordering::coalesce_acks`] keeps it): a head waiting in place would otherwise
//!   hold back the coalesced ack of every later delivery, and with them the whole
//!   prefetch window.
//! - **Bounded**: parked deliveries are bounded per key and in all
//!   ([`OrderLimits`]; the total never above the prefetch). Over a bound the worker
//!   stops taking deliveries until the lane moves: nothing is dropped or reordered,
//!   at the cost of head-of-line blocking for every key while one key is full.
//! - **After a dead-letter**: [`AfterDeadLetter`] (default: the key's later messages
//!   continue).
//! - **Across processes**: one queue declared single-active-consumer
//!   ([`Topology::single_active_consumer`]), or [`Shards`]: N such queues, the
//!   publisher choosing the shard by a stable hash of the key.

use idem_core::dedup::KeyExtractor;
pub use idem_core::ordered::{AfterDeadLetter, OrderKey, OrderLimits};

use crate::topology::Topology;

/// How a worker orders its deliveries: by the key an extractor finds (any dedup
/// [`KeyExtractor`]: [`HeaderKey`](idem_core::dedup::HeaderKey),
/// [`JsonFieldKey`](idem_core::dedup::JsonFieldKey), a closure...).
///
/// ```
/// use idem_amqp::ordered::{AfterDeadLetter, OrderLimits, Ordering};
/// use idem_core::dedup::HeaderKey;
///
/// let ordering = Ordering::by(HeaderKey::new("x-order-id"))
///     .limits(OrderLimits::new(16, 256))
///     .after_dead_letter(AfterDeadLetter::FollowToDlq);
/// # let _ = ordering;
/// ```
#[derive(Clone, Debug)]
pub struct Ordering {
    pub(crate) key: OrderKey,
    pub(crate) limits: OrderLimits,
    pub(crate) after: AfterDeadLetter,
    pub(crate) coalesce_acks: bool,
}

impl Ordering {
    /// Orders by the key `extractor` finds; default limits, later messages continue
    /// after a dead-letter.
    pub fn by(extractor: impl KeyExtractor) -> Self {
        Ordering {
            key: OrderKey::new(extractor),
            limits: OrderLimits::default(),
            after: AfterDeadLetter::default(),
            coalesce_acks: false,
        }
    }

    /// Keeps the worker's coalesced acks (default false: one ack per delivery).
    /// Faster when failures are rare, but while a head waits to retry in place it
    /// holds back the ack of every later delivery, so once the prefetch window is full
    /// of them the worker stops receiving, for every key, until the head settles.
    pub fn coalesce_acks(mut self, on: bool) -> Self {
        self.coalesce_acks = on;
        self
    }

    /// Bounds on parked deliveries (default 32 per key, 1024 in all; the total is
    /// capped by the prefetch).
    pub fn limits(mut self, limits: OrderLimits) -> Self {
        self.limits = limits;
        self
    }

    /// What happens to a key's later messages after its head is dead-lettered.
    pub fn after_dead_letter(mut self, after: AfterDeadLetter) -> Self {
        self.after = after;
        self
    }
}

/// N shard queues `<base>.shard-<i>`, each single-active-consumer with its own delay
/// queues and dead-letter queue. A publisher sends a message of key `k` to
/// [`queue_for(k)`](Self::queue_for) (a stable hash of the key, the same in every
/// process and version), so all of a key's messages share one queue and, through it,
/// one active consumer. Run a worker per shard in every process: the broker makes one
/// consumer per shard active and fails over to another when it goes; adding
/// processes adds standby consumers, adding shards spreads keys (changing the number
/// of shards moves keys: drain the shards first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shards {
    base: String,
    count: u16,
}

impl Shards {
    /// `count` shards (at least 1) named after `base`.
    pub fn new(base: impl Into<String>, count: u16) -> Self {
        Shards {
            base: base.into(),
            count: count.max(1),
        }
    }

    /// The number of shards.
    pub fn count(&self) -> u16 {
        self.count
    }

    /// The shard of `key`: FNV-1a (64 bit) of its bytes, modulo the count.
    pub fn shard_of(&self, key: &str) -> u16 {
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        u16::try_from(hash % u64::from(self.count)).unwrap_or(0)
    }

    /// The queue of shard `i`.
    pub fn queue(&self, i: u16) -> String {
        format!("{}.shard-{i}", self.base)
    }

    /// The queue a message of `key` is published to.
    pub fn queue_for(&self, key: &str) -> String {
        self.queue(self.shard_of(key))
    }

    /// The topology of shard `i`: its queue, single-active-consumer.
    pub fn topology(&self, i: u16) -> Topology {
        Topology::new(self.queue(i)).single_active_consumer(true)
    }

    /// Every shard's topology, shard 0 first.
    pub fn topologies(&self) -> Vec<Topology> {
        (0..self.count).map(|i| self.topology(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_choice_is_stable_and_spread() {
        let s = Shards::new("orders", 4);
        // Pinned: publishers of every version must agree.
        assert_eq!(s.shard_of(""), (0xcbf2_9ce4_8422_2325_u64 % 4) as u16);
        assert_eq!(s.queue_for("order-1"), s.queue_for("order-1"));
        let mut used = [0u32; 4];
        for i in 0..1000 {
            used[usize::from(s.shard_of(&format!("order-{i}")))] += 1;
        }
        assert!(used.iter().all(|n| *n > 150), "{used:?}");
        assert_eq!(s.queue(3), "orders.shard-3");
        assert_eq!(Shards::new("x", 0).count(), 1);
        assert_eq!(s.topologies().len(), 4);
    }
}
