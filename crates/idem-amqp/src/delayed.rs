//! Delayed publish: [`Publisher::publish_delayed`] delivers a message to a work queue
//! after a delay, through the same delay queues (`Q.retry.<tier>`, see
//! [`Topology`]) that carry the worker's retries. No broker plugin, and a delayed
//! message survives a restart of the publisher, of the worker and (with durable
//! queues) of the broker.
//!
//! **Rounding.** RabbitMQ holds one TTL per delay queue, so a delay is rounded **up**
//! to the smallest tier at least as long: the message arrives *not before* the delay
//! asked for, and at most one tier later (1 s asked for waits 1 s with the default
//! tiers; 6 s waits 30 s). A zero delay publishes straight to the queue. A delay
//! longer than the longest tier is refused with [`Error::DelayTooLong`] rather than
//! delivered early; keep such a message in an outbox row with a not-before time
//! instead. On top of the tier, the broker adds its own expiry lag (usually
//! milliseconds; seconds under load).
//!
//! **Topology.** The delay queues must exist: a worker of the queue declares them
//! when it starts (or call [`Topology::declare_on`]). The publish is `mandatory`, so
//! a missing delay queue is an error ([`Error::Returned`]), never a lost message.
//! Use the same [`Topology`] (the same tiers) as the queue's worker.
//!
//! ```no_run
//! # async fn demo() -> Result<(), idem_amqp::Error> {
//! use std::time::Duration;
//! use idem_amqp::{Publisher, Topology};
//! use idem_core::Message;
//!
//! let publisher = Publisher::connect(&idem_amqp::amqp_url_from_env()).await?;
//! let reminders = Topology::new("reminders"); // default tiers: 1 s, 5 s, 30 s, 2 min, 10 min, 30 min
//! let mut msg = Message::new(r#"{"invoice":42}"#).with_message_id("remind-42");
//! let waits = publisher
//!     .publish_delayed(&reminders, &mut msg, Duration::from_secs(90))
//!     .await?;
//! assert_eq!(waits, Duration::from_secs(120)); // rounded up to the 2 min tier
//! # Ok(()) }
//! ```

use std::time::Duration;

use idem_core::Message;

use crate::error::Error;
use crate::publisher::Publisher;
use crate::topology::Topology;

/// The tier a delayed publish of `delay` waits in: the smallest tier at least
/// `delay` long; `None` if every tier is shorter. A zero delay needs no tier
/// (`Some(ZERO)`).
pub fn tier_for_delay(topology: &Topology, delay: Duration) -> Option<Duration> {
    if delay.is_zero() {
        return Some(Duration::ZERO);
    }
    topology
        .get_tiers()
        .as_slice()
        .iter()
        .copied()
        .find(|t| *t >= delay)
}

impl Publisher {
    /// Publishes `msg` (persistent, mandatory, confirmed) so that it reaches
    /// `topology`'s queue after `delay`, rounded up to a delay tier (see the
    /// [module docs](crate::delayed)). Returns how long the message waits: the tier
    /// used, or zero when `delay` is zero (published straight to the queue).
    ///
    /// A missing `message_id` is set as for [`publish`](Self::publish), so publishing
    /// again after an error cannot make a second distinct message.
    pub async fn publish_delayed(
        &self,
        topology: &Topology,
        msg: &mut Message,
        delay: Duration,
    ) -> Result<Duration, Error> {
        let Some(tier) = tier_for_delay(topology, delay) else {
            let longest = topology
                .get_tiers()
                .as_slice()
                .last()
                .copied()
                .unwrap_or_default();
            return Err(Error::DelayTooLong {
                delay,
                longest,
                queue: topology.queue().to_owned(),
            });
        };
        let target = if tier.is_zero() {
            topology.queue().to_owned()
        } else {
            topology.retry_queue(tier)
        };
        // Through the default exchange: the delay queue dead-letters the message back
        // to the work queue (exchange "", routing key = the queue) once its TTL ends.
        self.publish("", &target, msg).await?;
        Ok(tier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DelayTiers;

    #[test]
    fn delays_round_up_to_a_tier_and_never_down() {
        let t = Topology::new("q");
        let s = Duration::from_secs;
        assert_eq!(tier_for_delay(&t, Duration::ZERO), Some(Duration::ZERO));
        assert_eq!(tier_for_delay(&t, Duration::from_millis(1)), Some(s(1)));
        assert_eq!(tier_for_delay(&t, s(1)), Some(s(1)));
        assert_eq!(tier_for_delay(&t, Duration::from_millis(1001)), Some(s(5)));
        assert_eq!(tier_for_delay(&t, s(6)), Some(s(30)));
        assert_eq!(tier_for_delay(&t, s(1800)), Some(s(1800)));
        assert_eq!(tier_for_delay(&t, s(1801)), None);
        let custom = Topology::new("q").tiers(DelayTiers::new([s(2), s(4)]).unwrap());
        assert_eq!(tier_for_delay(&custom, s(3)), Some(s(4)));
        assert_eq!(tier_for_delay(&custom, s(5)), None);
    }
}
