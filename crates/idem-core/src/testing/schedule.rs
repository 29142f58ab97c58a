//! The trouble profile and the per-message plan drawn from it with the seed.

use std::fmt;

/// Where a simulated crash kills the delivery of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashPoint {
    /// After the dedup stage claimed the message (lease taken, or inbox transaction
    /// open), before the handler is called.
    BeforeHandler,
    /// After the handler returned `Ok` (its effect is done), before the dedup record
    /// is marked done or the inbox transaction commits.
    AfterEffect,
    /// After the consumer settled the message (record done, transaction committed),
    /// before the ack reaches the broker.
    AfterCommit,
}

impl CrashPoint {
    /// Every crash point, in pipeline order.
    pub const ALL: [CrashPoint; 3] = [
        CrashPoint::BeforeHandler,
        CrashPoint::AfterEffect,
        CrashPoint::AfterCommit,
    ];
}

impl fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CrashPoint::BeforeHandler => "before the handler",
            CrashPoint::AfterEffect => {
                "after the handler's effect, before the dedup record completes"
            }
            CrashPoint::AfterCommit => "after commit, before the ack",
        })
    }
}

/// How much trouble the harness injects. Probabilities are per message, in `0.0..=1.0`.
///
/// The [default](Profile::default) gives every message 1 to 3 copies, a third of
/// them concurrent, a crash for 30 % of the messages, 1 or 2 transient failures for
/// 20 %, and takes 30 % of deliveries out of order.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// Each message is published 1 to `max_copies` times (at least 1).
    pub max_copies: u32,
    /// Chance that the copies of a message start together, as two workers would
    /// receive them.
    pub concurrent: f64,
    /// Chance that a message gets one crash, at a point drawn from `crash_points`.
    pub crash: f64,
    /// The points a crash may hit (an empty list means no crashes).
    pub crash_points: Vec<CrashPoint>,
    /// Chance that a message gets injected transient failures before its handler.
    pub transient: f64,
    /// How many transient failures such a message gets: 1 to `max_transient`. Keep it
    /// below the consumer's retry budget, or the message dead-letters (a finding).
    pub max_transient: u32,
    /// Chance that the next delivery is taken at random from those ready instead of
    /// the earliest one (out-of-order delivery and redelivery).
    pub reorder: f64,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            max_copies: 3,
            concurrent: 0.33,
            crash: 0.3,
            crash_points: CrashPoint::ALL.to_vec(),
            transient: 0.2,
            max_transient: 2,
            reorder: 0.3,
        }
    }
}

impl Profile {
    /// No trouble at all: one copy of each message, in order. A baseline.
    pub fn calm() -> Self {
        Profile {
            max_copies: 1,
            concurrent: 0.0,
            crash: 0.0,
            crash_points: Vec::new(),
            transient: 0.0,
            max_transient: 0,
            reorder: 0.0,
        }
    }

    /// Only crashes, at `point`, for every message (one copy each): the sharpest test
    /// of one point.
    pub fn crash_at(point: CrashPoint) -> Self {
        Profile {
            crash: 1.0,
            crash_points: vec![point],
            ..Profile::calm()
        }
    }

    pub(crate) fn draw(&self, rng: &mut fastrand::Rng) -> Plan {
        let chance = |rng: &mut fastrand::Rng, p: f64| p > 0.0 && rng.f64() < p;
        let copies = rng.u32(1..=self.max_copies.max(1));
        let concurrent = copies > 1 && chance(rng, self.concurrent);
        let crash = if !self.crash_points.is_empty() && chance(rng, self.crash) {
            Some(self.crash_points[rng.usize(..self.crash_points.len())])
        } else {
            None
        };
        let transient = if self.max_transient > 0 && chance(rng, self.transient) {
            rng.u32(1..=self.max_transient)
        } else {
            0
        };
        Plan {
            copies,
            concurrent,
            crash,
            transient,
        }
    }
}

/// The trouble planned for one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Copies published.
    pub copies: u32,
    /// The copies start together.
    pub concurrent: bool,
    /// The crash, if any: it hits the first delivery of the message that reaches this
    /// point.
    pub crash: Option<CrashPoint>,
    /// Transient failures injected into the first deliveries that reach the handler.
    pub transient: u32,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cop{}{}",
            self.copies,
            if self.copies == 1 { "y" } else { "ies" },
            if self.concurrent { " (concurrent)" } else { "" }
        )?;
        match self.crash {
            Some(p) => write!(f, ", crash {p}")?,
            None => f.write_str(", no crash")?,
        }
        write!(f, ", {} transient failure(s)", self.transient)
    }
}
