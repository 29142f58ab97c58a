//! [`Lanes`]: per-key lanes with bounded parking.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use super::OrderLimits;

/// What [`Lanes::admit`] did with an item.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Admit<T> {
    /// The key had no busy lane: the item is its lane's head now. The caller runs it,
    /// then asks [`Lanes::next`] for the next one until it answers `None`.
    Run(T),
    /// Parked behind the key's busy lane; [`Lanes::next`] hands it out in turn.
    Parked,
}

struct Lane<T> {
    parked: VecDeque<T>,
    /// Its head was dead-lettered under [`AfterDeadLetter::FollowToDlq`](super::AfterDeadLetter::FollowToDlq).
    poisoned: bool,
}

struct State<T> {
    lanes: HashMap<String, Lane<T>>,
    parked: usize,
}

/// Per-key lanes: one item of a key runs at a time, in admission order; items of a
/// busy key are parked, within [`OrderLimits`]. See the [module docs](super).
///
/// A lane exists while its key has a running head; the runner of a lane (the task
/// that got [`Admit::Run`]) loops over [`next`](Self::next) until the lane closes,
/// so a key never has two runners.
pub struct Lanes<T> {
    state: Mutex<State<T>>,
    room: Notify,
    limits: OrderLimits,
}

impl<T> std::fmt::Debug for Lanes<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("active", &self.active())
            .field("parked", &self.parked())
            .field("limits", &self.limits)
            .finish()
    }
}

impl<T> Lanes<T> {
    /// No lanes yet, parking within `limits`.
    pub fn new(limits: OrderLimits) -> Self {
        Lanes {
            state: Mutex::new(State {
                lanes: HashMap::new(),
                parked: 0,
            }),
            room: Notify::new(),
            limits: OrderLimits::new(limits.per_key, limits.total),
        }
    }

    /// The bounds in force.
    pub fn limits(&self) -> OrderLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // The state is consistent after every statement: a panic elsewhere leaves
        // nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits `item` of `key` without waiting: `Err(item)` when parking it would
    /// pass a bound (the caller keeps it, in order, and tries again later).
    pub fn try_admit(&self, key: &str, item: T) -> Result<Admit<T>, T> {
        let mut state = self.lock();
        let State { lanes, parked } = &mut *state;
        match lanes.get_mut(key) {
            None => {
                lanes.insert(
                    key.to_owned(),
                    Lane {
                        parked: VecDeque::new(),
                        poisoned: false,
                    },
                );
                Ok(Admit::Run(item))
            }
            Some(lane)
                if lane.parked.len() < self.limits.per_key && *parked < self.limits.total =>
            {
                lane.parked.push_back(item);
                *parked += 1;
                Ok(Admit::Parked)
            }
            Some(_) => Err(item),
        }
    }

    /// Admits `item` of `key`, waiting while parking it would pass a bound (until a
    /// lane moves). Callers admit one item at a time, in arrival order, so a waiting
    /// item is never overtaken.
    pub async fn admit(&self, key: &str, mut item: T) -> Admit<T> {
        loop {
            let notified = self.room.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check: a lane moving in between still wakes us.
            notified.as_mut().enable();
            match self.try_admit(key, item) {
                Ok(admitted) => return admitted,
                Err(back) => item = back,
            }
            notified.await;
        }
    }

    /// The head of `key`'s lane finished: the next parked item (the new head), or
    /// `None`, and the lane closes (its poisoned mark goes with it).
    pub fn next(&self, key: &str) -> Option<T> {
        let mut state = self.lock();
        let State { lanes, parked } = &mut *state;
        let next = match lanes.get_mut(key) {
            Some(lane) => match lane.parked.pop_front() {
                Some(item) => {
                    *parked -= 1;
                    Some(item)
                }
                None => {
                    lanes.remove(key);
                    None
                }
            },
            None => None,
        };
        drop(state);
        self.room.notify_waiters();
        next
    }

    /// Marks `key`'s lane poisoned: its head was dead-lettered and the key's later
    /// messages follow it ([`AfterDeadLetter::FollowToDlq`](super::AfterDeadLetter::FollowToDlq)),
    /// until the lane closes. No effect without a lane.
    pub fn poison(&self, key: &str) {
        if let Some(lane) = self.lock().lanes.get_mut(key) {
            lane.poisoned = true;
        }
    }

    /// Whether `key`'s lane is poisoned.
    pub fn is_poisoned(&self, key: &str) -> bool {
        self.lock().lanes.get(key).is_some_and(|l| l.poisoned)
    }

    /// Empties every lane and returns the parked items, oldest first per key (e.g. a
    /// session ended and they go back to the broker). Running heads are not touched:
    /// their runners find no next item.
    pub fn clear(&self) -> Vec<T> {
        let mut state = self.lock();
        state.parked = 0;
        let out = state
            .lanes
            .values_mut()
            .flat_map(|l| std::mem::take(&mut l.parked))
            .collect();
        drop(state);
        self.room.notify_waiters();
        out
    }

    /// Keys with a busy lane.
    pub fn active(&self) -> usize {
        self.lock().lanes.len()
    }

    /// Items parked in all.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }

    /// Items parked behind `key`.
    pub fn parked_behind(&self, key: &str) -> usize {
        self.lock().lanes.get(key).map_or(0, |l| l.parked.len())
    }
}
