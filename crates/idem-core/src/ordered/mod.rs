//! Ordered consumption by key: per-key lanes, retries in place, the rule after a
//! head is dead-lettered. Broker-free; transports (idem-amqp's ordered worker) drive
//! it.
//!
//! - **Lanes** ([`Lanes`]): messages of one key run one at a time, in the order they
//!   arrived; a message of a key whose lane is busy is *parked* behind it. Different
//!   keys run concurrently (the transport's concurrency limit still applies).
//!   Messages without a key (the [`OrderKey`] extractor answers `None`) run at once,
//!   unordered.
//! - **Bounded**: at most [`OrderLimits::per_key`] parked messages per key and
//!   [`OrderLimits::total`] in all. Over a bound, [`Lanes::admit`] waits: the
//!   transport stops taking deliveries until a lane moves (back-pressure). Nothing is
//!   dropped, nothing overtakes.
//! - **Retries in place** ([`process_in_place`]): a transient failure of a lane's head
//!   is retried in this process after its backoff delay, without a retry copy, so the
//!   messages parked behind it stay behind it. Each rerun carries the retry headers a
//!   copy would have carried (`x-idem-attempts` counts up), so the attempt budget and
//!   the dead-letter decision are the consumer's usual ones.
//! - **After a dead-letter** ([`AfterDeadLetter`]): by default the key's later
//!   messages continue; with [`AfterDeadLetter::FollowToDlq`] the messages parked
//!   behind a dead-lettered head (and those of the key arriving while its lane is
//!   still busy) are dead-lettered after it without running.
//!
//! The full rule, with its costs, is in `docs/ordering.md`.

use std::fmt;
use std::sync::Arc;

use crate::dedup::KeyExtractor;
use crate::message::Message;

mod in_place;
mod lanes;

pub use in_place::process_in_place;
pub use lanes::{Admit, Lanes};

/// Where a message's ordering key comes from: any [`KeyExtractor`] (the dedup key
/// machinery), e.g. [`HeaderKey`](crate::dedup::HeaderKey) or a closure. Cheap to
/// clone.
#[derive(Clone)]
pub struct OrderKey(Arc<dyn KeyExtractor>);

impl OrderKey {
    /// Orders by the key `extractor` finds.
    pub fn new(extractor: impl KeyExtractor) -> Self {
        OrderKey(Arc::new(extractor))
    }

    /// The message's ordering key; `None` when it has none, or the key's source holds
    /// a value that cannot be a key (such a message runs unordered; the dedup stage
    /// rejects a bad idempotency key on its own).
    pub fn key_of(&self, msg: &Message) -> Option<String> {
        self.0.try_extract(msg).ok().flatten()
    }
}

impl fmt::Debug for OrderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OrderKey(..)")
    }
}

/// What happens to a key's later messages once its head exhausted its attempts (or
/// failed permanently) and was dead-lettered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum AfterDeadLetter {
    /// The later messages run, in order (the default): one poisoned message does not
    /// stop its key for good, and the dead-letter queue holds only what failed.
    #[default]
    Continue,
    /// The messages parked behind the dead-lettered head, and those of the key that
    /// arrive while its lane is still busy, are dead-lettered after it, in order,
    /// without running. Replaying the key's dead letters (oldest first) then runs them
    /// in their original order. Once the lane empties, new messages run again.
    FollowToDlq,
}

/// Bounds on parked messages (those waiting behind a busy lane).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OrderLimits {
    /// Most messages parked behind one key (default 32).
    pub per_key: usize,
    /// Most messages parked in all (default 1024; a transport also caps it by its
    /// prefetch).
    pub total: usize,
}

impl Default for OrderLimits {
    fn default() -> Self {
        OrderLimits {
            per_key: 32,
            total: 1024,
        }
    }
}

impl OrderLimits {
    /// `per_key` and `total`, each at least 1.
    pub fn new(per_key: usize, total: usize) -> Self {
        OrderLimits {
            per_key: per_key.max(1),
            total: total.max(1),
        }
    }
}

#[cfg(test)]
mod tests;
