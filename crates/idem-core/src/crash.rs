//! Crash loops: a message that kills (or hangs) its worker ends in the dead-letter
//! queue, and the messages next to it do not pay for it.
//!
//! A handler that aborts the process, overflows its stack or wedges the runtime never
//! returns, so no failure is ever recorded for it: the broker redelivers it to the next
//! worker, which dies the same way. Two mechanisms end that loop.
//!
//! **Starts are counted, not only failures.** A dedup stage records that a message
//! *started* before its handler runs: lease stores count claims in the message's
//! record ([`DedupStore::claim_counting`](crate::DedupStore::claim_counting)), the SQL
//! inbox commits a start counter in a short transaction of its own. A settled outcome
//! (success, poison, transient failure) clears the count. So the count says how many
//! times the message started and never settled: a crash, a kill, or a hang long
//! enough for its lease to expire. When a message arrives with
//! [`CrashGuard::limit`] such starts behind it (default [`DEFAULT_CRASH_LIMIT`], set
//! with [`ConsumerBuilder::crash_limit`](crate::ConsumerBuilder::crash_limit)), it is
//! dead-lettered as poison with the error [`CrashLoopError`]
//! (`crashed or hung the worker N times`) **without running again**. The record is
//! then `done(poisoned)`, so an operator's replay runs it once more, deliberately.
//!
//! **Suspects run alone.** After an unclean stop the broker redelivers everything the
//! dead worker held unacked: the culprit and its healthy neighbours, all flagged
//! `redelivered`. Run concurrently again, the culprit would kill its neighbours in the
//! middle of their work at every crash (with a lease store, an effect done but not yet
//! recorded runs again). So a *suspect* delivery (see [`is_suspect`]) runs in
//! isolation: it waits until no other handler of the consumer runs, and no other
//! handler starts until it is done. Each crash after the first is then charged to the
//! one message that was running, and its neighbours are never cut. The cost: after an
//! unclean stop (or a broker restart, which also redelivers), the redelivered backlog
//! (at most the dead worker's prefetch) is processed one message at a time; fresh
//! deliveries wait behind each suspect. Messages that were never redelivered run
//! concurrently as before.
//!
//! The isolation is per consumer and per process: workers in other processes are
//! not held back (their handlers cannot kill this process).

use std::sync::Arc;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::message::Message;

/// How many unsettled starts (crashes, kills, hangs) a message may have behind it
/// before it is dead-lettered instead of run again.
pub const DEFAULT_CRASH_LIMIT: u32 = 3;

pub use crate::headers::BROKER_DELIVERY_COUNT as BROKER_DELIVERY_COUNT_HEADER;
pub use crate::headers::DELIVERY_COUNT as DELIVERY_COUNT_HEADER;

/// The message started `times` times and never settled (its worker crashed, was
/// killed or hung each time). Permanent: it is dead-lettered without running again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("crashed or hung the worker {times} times")]
pub struct CrashLoopError {
    /// Unsettled starts recorded for the message.
    pub times: u32,
}

// The one header rule (`crate::read`): huge counts saturate, malformed ones count as
// absent. Quiet: the count is read at several stages of one delivery.
fn header_count(msg: &Message, name: &str) -> u32 {
    crate::read::read_quiet::<u32>(msg, name).unwrap_or(0)
}

/// How many times this message was delivered before without being settled, as far as
/// the transport can tell: the count carried on idem's copies
/// ([`DELIVERY_COUNT_HEADER`]) plus this delivery's own redeliveries (the broker's
/// count, [`DeliveryInfo::delivery_count`](crate::DeliveryInfo::delivery_count), when
/// it is not 0, else 1 if it is flagged `redelivered`).
pub fn prior_deliveries(msg: &Message) -> u32 {
    let carried = header_count(msg, DELIVERY_COUNT_HEADER);
    let broker = msg.delivery.delivery_count;
    let own = if broker > 0 {
        broker
    } else {
        u32::from(msg.delivery.redelivered)
    };
    carried.saturating_add(own)
}

/// Whether a delivery may be the one that crashed a worker: it was redelivered by the
/// broker, or it is a copy of a message that was ([`DELIVERY_COUNT_HEADER`]).
pub fn is_suspect(msg: &Message) -> bool {
    prior_deliveries(msg) > 0
}

/// A consumer's crash-loop settings and its isolation lock. The [`Consumer`] puts
/// it into every message's [context](crate::DeliveryContext); dedup stages read it
/// there ([`DeliveryContext::crash_guard`](crate::DeliveryContext::crash_guard)).
/// Cheap to clone.
///
/// [`Consumer`]: crate::Consumer
#[derive(Clone, Debug)]
pub struct CrashGuard {
    limit: u32,
    turns: Arc<RwLock<()>>,
}

impl Default for CrashGuard {
    fn default() -> Self {
        CrashGuard::new(DEFAULT_CRASH_LIMIT)
    }
}

/// A message's turn to run: shared with other ordinary messages, or alone.
/// Dropping it ends the turn.
#[derive(Debug)]
pub enum Turn {
    /// An ordinary message: runs concurrently with others.
    Shared(OwnedRwLockReadGuard<()>),
    /// A suspect: no other handler of this consumer runs meanwhile.
    Alone(OwnedRwLockWriteGuard<()>),
}

impl Turn {
    /// Whether this turn runs alone.
    pub fn is_alone(&self) -> bool {
        matches!(self, Turn::Alone(_))
    }
}

impl CrashGuard {
    /// A guard dead-lettering messages with `limit` unsettled starts (at least 1).
    pub fn new(limit: u32) -> Self {
        CrashGuard {
            limit: limit.max(1),
            turns: Arc::new(RwLock::new(())),
        }
    }

    /// The crash limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The error for a message with `starts` unsettled starts behind it, if that
    /// reaches the limit.
    pub fn check(&self, starts: u32) -> Result<(), CrashLoopError> {
        if starts >= self.limit {
            Err(CrashLoopError { times: starts })
        } else {
            Ok(())
        }
    }

    /// Waits for `msg`'s turn: alone if it [is a suspect](is_suspect), else shared.
    /// Call it before recording the start, so that a message waiting for its turn
    /// when the process dies is not charged with the crash.
    pub async fn turn(&self, msg: &Message) -> Turn {
        if is_suspect(msg) {
            let turn = Turn::Alone(self.turns.clone().write_owned().await);
            tracing::debug!("redelivered message runs alone until it settles");
            turn
        } else {
            Turn::Shared(self.turns.clone().read_owned().await)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_carried_and_broker_deliveries() {
        let m = Message::new("x");
        assert_eq!(prior_deliveries(&m), 0);
        assert!(!is_suspect(&m));
        let mut r = Message::new("x");
        r.delivery.redelivered = true;
        assert_eq!(prior_deliveries(&r), 1);
        let mut q = r.clone();
        q.delivery.delivery_count = 2;
        assert_eq!(prior_deliveries(&q), 2);
        let c = Message::new("x").with_header(DELIVERY_COUNT_HEADER, 3u32);
        assert!(is_suspect(&c));
        let both = q.with_header(DELIVERY_COUNT_HEADER, 3u32);
        assert_eq!(prior_deliveries(&both), 5);
    }

    #[test]
    fn limit_is_reached_at_n() {
        let g = CrashGuard::new(3);
        assert!(g.check(2).is_ok());
        assert_eq!(
            g.check(3).unwrap_err().to_string(),
            "crashed or hung the worker 3 times"
        );
        assert_eq!(CrashGuard::new(0).limit(), 1);
    }

    #[tokio::test]
    async fn a_suspect_waits_for_running_handlers_and_blocks_new_ones() {
        let g = CrashGuard::new(3);
        let plain = Message::new("a");
        let mut suspect = Message::new("b");
        suspect.delivery.redelivered = true;
        let first = g.turn(&plain).await;
        assert!(!first.is_alone());
        let g2 = g.clone();
        let alone = tokio::spawn(async move { g2.turn(&suspect).await.is_alone() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !alone.is_finished(),
            "the suspect must wait for the running handler"
        );
        let g3 = g.clone();
        let later = tokio::spawn(async move {
            let _t = g3.turn(&Message::new("c")).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!later.is_finished());
        drop(first);
        assert!(alone.await.unwrap());
        later.await.unwrap();
    }
}
