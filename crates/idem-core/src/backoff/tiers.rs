//! Delay tiers: a broker cannot hold one timer per message cheaply, so delayed
//! retries go to a small set of delay queues and each delay is rounded to a tier.

use std::time::Duration;

/// A sorted, non-empty set of delays that retries are rounded to.
///
/// Computed backoff delays go to the *nearest* tier (on a log scale); an explicit
/// `HandlerError::retry_after(d)` goes to the smallest tier `>= d` (it asked for "not before"), or the
/// largest tier if none is that long.
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
    }
}
