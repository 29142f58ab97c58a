//! Retry policy: exponential backoff with a cap, jitter, an attempt budget and an
//! optional total time budget.
//!
//! The defaults end: 10 attempts (9 retries) at 1 s, 2 s, 4 s ... capped at 10 min,
//! equal jitter, which spans about 8.5 minutes before the message is dead-lettered.
//!
//! ```
//! use std::time::Duration;
//! use idem_core::backoff::{Backoff, Jitter};
//!
//! let policy = Backoff::exponential(Duration::from_millis(200))
//!     .multiplier(3.0)
//!     .cap(Duration::from_secs(60))
//!     .jitter(Jitter::None)
//!     .max_attempts(4);
//! assert_eq!(policy.delay_after(1), Duration::from_millis(200));
//! assert_eq!(policy.delay_after(2), Duration::from_millis(600));
//! assert_eq!(policy.next_delay(4, Duration::ZERO), None); // budget spent
//! ```

use std::time::Duration;

/// How a computed delay is randomised, to spread retries of many messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the computed delay.
    None,
    /// Uniform in `[0, delay]`.
    Full,
    /// Uniform in `[delay / 2, delay]` (the default).
    Equal,
}

/// Exponential backoff with cap, jitter and budgets.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    base: Duration,
    multiplier: f64,
    cap: Duration,
    jitter: Jitter,
    max_attempts: u32,
    total_budget: Option<Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            multiplier: 2.0,
            cap: Duration::from_secs(600),
            jitter: Jitter::Equal,
            max_attempts: 10,
            total_budget: None,
        }
    }
}

impl Backoff {
    /// Default policy with this first delay.
    pub fn exponential(base: Duration) -> Self {
        Backoff {
            base,
            ..Backoff::default()
        }
    }

    /// Growth factor per attempt (values below 1.0 are treated as 1.0).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = if multiplier.is_finite() && multiplier >= 1.0 {
            multiplier
        } else {
            1.0
        };
        self
    }

    /// Largest single delay.
    pub fn cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    /// Jitter mode.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Total number of attempts, the first delivery included (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Stop retrying once this much time has passed since the first failure.
    pub fn total_budget(mut self, budget: Duration) -> Self {
        self.total_budget = Some(budget);
        self
    }

    /// The attempt budget.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The total time budget, if one was set with [`total_budget`](Self::total_budget).
    pub fn time_budget(&self) -> Option<Duration> {
        self.total_budget
    }

    /// The un-jittered delay after the `failed`-th failure (1-based), capped.
    pub fn delay_after(&self, failed: u32) -> Duration {
        let exp = failed.saturating_sub(1).min(1024) as i32;
        let secs = self.base.as_secs_f64() * self.multiplier.powi(exp);
        let cap = self.cap.as_secs_f64();
        if !secs.is_finite() || secs >= cap {
            self.cap
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay before the next attempt after the `failed`-th failure, jittered, or
    /// `None` when the attempt budget or the time budget is spent. `elapsed` is the
    /// time since the first failure.
    pub fn next_delay(&self, failed: u32, elapsed: Duration) -> Option<Duration> {
        if failed >= self.max_attempts {
            return None;
        }
        let delay = apply_jitter(self.delay_after(failed), self.jitter);
        match self.total_budget {
            Some(budget) if elapsed.saturating_add(delay) > budget => None,
            _ => Some(delay),
        }
    }

    /// The longest time between a first failure and the last retry: the sum of the
    /// un-jittered delays, bounded by the time budget. Dedup retention must cover it.
    pub fn horizon(&self) -> Duration {
        let sum = (1..self.max_attempts)
            .map(|n| self.delay_after(n))
            .fold(Duration::ZERO, Duration::saturating_add);
        match self.total_budget {
            Some(budget) => sum.min(budget),
            None => sum,
        }
    }
}

fn apply_jitter(delay: Duration, jitter: Jitter) -> Duration {
    let nanos = delay.as_nanos().min(u64::MAX as u128) as u64;
    match jitter {
        Jitter::None => delay,
        Jitter::Full => Duration::from_nanos(fastrand::u64(0..=nanos)),
        Jitter::Equal => {
            let half = nanos / 2;
            Duration::from_nanos(half + fastrand::u64(0..=nanos - half))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> impl Strategy<Value = Backoff> {
        (
            1u64..5_000,
            1.0f64..5.0,
            1u64..600_000,
            prop_oneof![Just(Jitter::None), Just(Jitter::Full), Just(Jitter::Equal)],
            1u32..30,
        )
            .prop_map(|(base, mult, cap, jitter, max)| {
                Backoff::exponential(Duration::from_millis(base))
                    .multiplier(mult)
                    .cap(Duration::from_millis(cap))
                    .jitter(jitter)
                    .max_attempts(max)
            })
    }

    proptest! {
        #[test]
        fn delays_stay_within_cap_and_jitter_bounds(p in policy(), failed in 1u32..40) {
            let raw = p.delay_after(failed);
            prop_assert!(raw <= p.cap);
            if let Some(d) = p.next_delay(failed, Duration::ZERO) {
                prop_assert!(failed < p.max_attempts);
                prop_assert!(d <= raw);
                match p.jitter {
                    Jitter::None => prop_assert_eq!(d, raw),
                    Jitter::Equal => prop_assert!(d.as_nanos() >= raw.as_nanos() / 2),
                    Jitter::Full => {}
                }
            } else {
                prop_assert!(failed >= p.max_attempts);
            }
        }

        #[test]
        fn raw_delays_never_decrease(p in policy(), failed in 1u32..40) {
            prop_assert!(p.delay_after(failed) <= p.delay_after(failed + 1));
        }

        #[test]
        fn retries_end_and_fit_in_the_horizon(p in policy()) {
            // Walk a message through every failure: it must stop at max_attempts, and
            // the time spent waiting never exceeds the horizon.
            let mut waited = Duration::ZERO;
            let mut failed = 1;
            while let Some(d) = p.next_delay(failed, waited) {
                waited += d;
                failed += 1;
                prop_assert!(failed <= p.max_attempts);
            }
            prop_assert_eq!(failed, p.max_attempts);
            prop_assert!(waited <= p.horizon());
        }

        #[test]
        fn total_budget_is_never_exceeded(p in policy(), budget_ms in 0u64..100_000) {
            let p = p.total_budget(Duration::from_millis(budget_ms));
            let mut waited = Duration::ZERO;
            let mut failed = 1;
            while let Some(d) = p.next_delay(failed, waited) {
                waited += d;
                failed += 1;
            }
            prop_assert!(waited <= Duration::from_millis(budget_ms));
        }
    }

    #[test]
    fn defaults_end_within_ten_minutes() {
        let p = Backoff::default();
        assert_eq!(p.attempts(), 10);
        assert_eq!(p.horizon(), Duration::from_secs(511));
        assert_eq!(p.next_delay(10, Duration::ZERO), None);
    }
}
