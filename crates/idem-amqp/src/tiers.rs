//! Delay tiers: RabbitMQ cannot hold one timer per message cheaply, so a delayed
//! retry waits in one of a few delay queues (`Q.retry.<tier>`, see
//! [`Topology`](crate::Topology)) and its delay is rounded to that queue's TTL.
//!
//! The rounding is this transport's business: the consumer asks for a delay and says
//! whether it is a backoff delay ([`DelayKind::Backoff`], rounded to the nearest tier)
//! or a floor set by the handler ([`DelayKind::AtLeast`], rounded up). Because a
//! rounded delay can be longer than the one asked for, the worker checks at build
//! time that the dedup retention covers the retry horizon *in tiers*
//! ([`DelayTiers::horizon`]).

use std::time::Duration;

use idem_core::outcome::DelayKind;
use idem_core::Backoff;

/// A sorted, non-empty set of delays that retries are rounded to.
///
/// Backoff delays ([`DelayKind::Backoff`]) go to the *nearest* tier (on a log scale);
/// a delay the handler asked for with `HandlerError::retry_after(d)`
/// ([`DelayKind::AtLeast`]) goes to the smallest tier `>= d` (it asked for "not
/// before"), or the largest tier if none is that long. See [`tier_for`](Self::tier_for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelayTiers(Vec<Duration>);

impl Default for DelayTiers {
    /// 1 s, 5 s, 30 s, 2 min, 10 min, 30 min.
    fn default() -> Self {
        DelayTiers(
            [1, 5, 30, 120, 600, 1800]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
        )
    }
}

impl DelayTiers {
    /// Tiers from a list; zero delays and duplicates are dropped. `None` if nothing is left.
    pub fn new(tiers: impl IntoIterator<Item = Duration>) -> Option<Self> {
        let mut v: Vec<Duration> = tiers.into_iter().filter(|d| !d.is_zero()).collect();
        v.sort();
        v.dedup();
        (!v.is_empty()).then_some(DelayTiers(v))
    }

    /// The tiers, shortest first.
    pub fn as_slice(&self) -> &[Duration] {
        &self.0
    }

    /// The tier nearest to `delay` on a log scale.
    pub fn nearest(&self, delay: Duration) -> Duration {
        let target = delay.as_secs_f64().max(1e-3).ln();
        let mut best = self.0[0];
        let mut best_dist = f64::INFINITY;
        for &t in &self.0 {
            let dist = (t.as_secs_f64().ln() - target).abs();
            if dist < best_dist {
                best = t;
                best_dist = dist;
            }
        }
        best
    }

    /// The smallest tier at least `delay` long, else the largest.
    pub fn at_least(&self, delay: Duration) -> Duration {
        self.0
            .iter()
            .copied()
            .find(|t| *t >= delay)
            .unwrap_or(self.0[self.0.len() - 1])
    }

    /// The tier a retry of `delay` waits in: [`nearest`](Self::nearest) for a backoff
    /// delay, [`at_least`](Self::at_least) for a delay the handler asked for (never
    /// shorter than asked, unless no tier is that long).
    pub fn tier_for(&self, delay: Duration, kind: DelayKind) -> Duration {
        match kind {
            DelayKind::Backoff => self.nearest(delay),
            DelayKind::AtLeast => self.at_least(delay),
        }
    }

    /// The retry horizon of `backoff` in broker time: like [`Backoff::horizon`], but
    /// each delay counted as the tier it really waits in (the nearest tier of the
    /// un-jittered delay: jitter only shortens a delay, and the nearest tier never
    /// shrinks as the delay grows). With a time budget, the last retry is scheduled
    /// within the budget but then waits its whole tier, so the bound is the budget plus
    /// the longest tier used.
    ///
    /// Delays a handler asks for with `HandlerError::retry_after` are its own choice
    /// and not covered (as for [`Backoff::horizon`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use idem_amqp::DelayTiers;
    /// use idem_core::backoff::{Backoff, Jitter};
    ///
    /// let twenty = Duration::from_secs(20 * 60);
    /// let policy = Backoff::exponential(twenty).cap(twenty).jitter(Jitter::None).max_attempts(2);
    /// assert_eq!(policy.horizon(), twenty);
    /// // With the default tiers (.., 10 min, 30 min), 20 min is nearer to 30 min.
    /// assert_eq!(DelayTiers::default().horizon(&policy), Duration::from_secs(30 * 60));
    /// ```
    pub fn horizon(&self, backoff: &Backoff) -> Duration {
        let used: Vec<Duration> = (1..backoff.attempts())
            .map(|n| self.nearest(backoff.delay_after(n)))
            .collect();
        let sum = used
            .iter()
            .copied()
            .fold(Duration::ZERO, Duration::saturating_add);
        match backoff.time_budget() {
            Some(budget) => {
                let longest = used.iter().copied().max().unwrap_or(Duration::ZERO);
                sum.min(budget.saturating_add(longest))
            }
            None => sum,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        let t = DelayTiers::default();
        assert_eq!(
            t.nearest(Duration::from_millis(100)),
            Duration::from_secs(1)
        );
        assert_eq!(t.nearest(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(t.nearest(Duration::from_secs(3)), Duration::from_secs(5));
        assert_eq!(
            t.nearest(Duration::from_secs(3600)),
            Duration::from_secs(1800)
        );
        assert_eq!(t.at_least(Duration::from_secs(2)), Duration::from_secs(5));
        assert_eq!(
            t.at_least(Duration::from_secs(7200)),
            Duration::from_secs(1800)
        );
        assert!(DelayTiers::new([Duration::ZERO]).is_none());
        // Backoff delays go to the nearest tier, delays asked for never earlier.
        assert_eq!(
            t.tier_for(Duration::from_secs(6), DelayKind::Backoff),
            Duration::from_secs(5)
        );
        assert_eq!(
            t.tier_for(Duration::from_secs(6), DelayKind::AtLeast),
            Duration::from_secs(30)
        );
    }
}
