//! The ordered path of a session: deliveries of one key run in their key's lane
//! (see [`crate::ordered`]).

use std::sync::Arc;
use std::time::SystemTime;

use idem_core::ordered::{process_in_place, AfterDeadLetter, Lanes, OrderKey};
use idem_core::{Consumer, Disposition, ErrorKind, Failure, Message};
use lapin::Channel;
use tokio::sync::{watch, OwnedSemaphorePermit};

use super::settle::{run_prepared, Prepared, Record};
use super::Shared;
use crate::acks::AckSettler;

/// Why a follower of a dead-lettered head is dead-lettered without running.
const FOLLOWED: &str = "an earlier message of its ordering key was dead-lettered (AfterDeadLetter::FollowToDlq); not run";

/// A worker's ordering state: shared by its sessions, so a redelivery after a
/// reconnect parks behind a head the old session still runs.
pub(crate) struct Ordered {
    pub(crate) key: OrderKey,
    pub(crate) after: AfterDeadLetter,
    pub(crate) lanes: Lanes<Job>,
}

/// A delivery admitted to a lane.
pub(super) struct Job {
    prepared: Prepared,
    settler: Option<AckSettler<Record>>,
    publish: Arc<Channel>,
    /// Turns true when the delivery's session ends.
    stop: watch::Receiver<bool>,
}

impl Job {
    pub(super) fn new(
        prepared: Prepared,
        settler: Option<AckSettler<Record>>,
        publish: Arc<Channel>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Job {
            prepared,
            settler,
            publish,
            stop,
        }
    }
}

/// The lane a delivery runs in, as [`run_prepared`] sees it.
pub(crate) struct LaneRun<'a> {
    ordered: &'a Ordered,
    key: &'a str,
    stop: watch::Receiver<bool>,
}

impl LaneRun<'_> {
    /// Runs `msg` as its lane's head: retried in place; dead-lettered without running
    /// when its key follows a dead-lettered head (its failure record from the
    /// delivery's context, as the consumer's: no dedup stage ran, so it names the
    /// message id, not the ordering key).
    pub(super) async fn process(&self, consumer: &Consumer, msg: Message) -> Disposition {
        if self.ordered.after == AfterDeadLetter::FollowToDlq
            && self.ordered.lanes.is_poisoned(self.key)
        {
            let now = SystemTime::now();
            let failure = Failure::for_delivery(&msg.context, ErrorKind::Permanent, FOLLOWED, now);
            return Disposition::dead_letter(&msg, consumer.name(), failure);
        }
        let mut stop = self.stop.clone();
        let stopped = async move {
            // An error means the session is gone: stop too.
            let _ = stop.wait_for(|s| *s).await;
        };
        process_in_place(consumer, msg, stopped).await
    }

    /// The head's dead-letter copy was confirmed.
    pub(super) fn dead_lettered(&self) {
        if self.ordered.after == AfterDeadLetter::FollowToDlq {
            self.ordered.lanes.poison(self.key);
        }
    }
}

/// Runs `key`'s lane from `first` until no message of the key is parked; holds one
/// handler permit throughout.
pub(super) async fn run_lane(
    shared: Arc<Shared>,
    key: String,
    first: Job,
    _permit: OwnedSemaphorePermit,
) {
    let Some(ordered) = shared.ordered.as_ref() else {
        return;
    };
    let mut job = first;
    loop {
        let Job {
            prepared,
            settler,
            publish,
            stop,
        } = job;
        let lane = LaneRun {
            ordered,
            key: &key,
            stop,
        };
        run_prepared(&shared, &publish, prepared, settler, Some(&lane)).await;
        match ordered.lanes.next(&key) {
            Some(next) => job = next,
            None => break,
        }
    }
}

/// Runs a delivery without a key: unordered, at once.
pub(super) async fn run_unkeyed(
    shared: Arc<Shared>,
    publish: Arc<Channel>,
    prepared: Prepared,
    settler: Option<AckSettler<Record>>,
    _permit: OwnedSemaphorePermit,
) {
    run_prepared(&shared, &publish, prepared, settler, None).await;
}
