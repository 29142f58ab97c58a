//! The harness's broker: schedules every copy of every message on a virtual clock,
//! runs them through the consumer, and carries out each disposition.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::task::JoinHandle;

use super::report::Totals;
use super::schedule::{CrashPoint, Profile};
use super::trouble::{deliver, KeyCell, KeyState, Outcome};
use crate::backoff::Backoff;
use crate::consumer::{Consumer, DeliveryMode};
use crate::message::Message;
use crate::outcome::{DelayKind, Disposition};

/// Longest real wait before a "busy" or released delivery is tried again.
const REAL_POLL: Duration = Duration::from_millis(50);
/// One run's deliveries: the consumer, each key's plan and history, what is pending,
/// and what happened.
pub(super) struct Drive {
    pub(super) consumer: Consumer,
    mode: DeliveryMode,
    pub(super) cells: Vec<Arc<KeyCell>>,
    sched: Scheduler,
    pub(super) totals: Totals,
    /// Per key, the error it was dead-lettered with, if it was.
    pub(super) dead: Vec<Option<String>>,
    in_flight_keys: Vec<usize>,
}

type InFlight = FuturesUnordered<JoinHandle<(Pending, Outcome)>>;

impl Drive {
    /// Draws each message's plan from `profile` and schedules its copies.
    pub(super) fn plan(
        consumer: Consumer,
        messages: Vec<Message>,
        keys: Vec<String>,
        profile: &Profile,
        seed: u64,
    ) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut sched = Scheduler {
            rng: fastrand::Rng::with_seed(seed ^ 0x9e37_79b9_7f4a_7c15),
            reorder: profile.reorder,
            pending: Vec::new(),
            vnow: 0,
            next_group: 0,
        };
        let mut cells = Vec::with_capacity(keys.len());
        let mut totals = Totals {
            messages: keys.len(),
            ..Totals::default()
        };
        for (i, (msg, key)) in messages.into_iter().zip(keys).enumerate() {
            let plan = profile.draw(&mut rng);
            let cell = Arc::new(KeyCell {
                key,
                plan,
                state: Mutex::new(KeyState {
                    transient_left: plan.transient,
                    crash: plan.crash,
                    ..KeyState::default()
                }),
            });
            totals.extra_copies += u64::from(plan.copies - 1);
            let group = plan.concurrent.then(|| sched.group());
            for c in 0..plan.copies {
                // Copies of a message land near each other; messages interleave a little.
                let due = i as u64 * 10 + if plan.concurrent { 0 } else { u64::from(c) * 7 };
                sched.push(Pending {
                    due,
                    not_before: None,
                    cell: i,
                    msg: msg.clone(),
                    label: format!("copy {}", c + 1),
                    group,
                });
            }
            cells.push(cell);
        }
        let dead = vec![None; cells.len()];
        Drive {
            mode: consumer.mode(),
            consumer,
            cells,
            sched,
            totals,
            dead,
            in_flight_keys: Vec::new(),
        }
    }

    /// Delivers until nothing is pending or in flight. At `deadline`, stops and
    /// returns up to 10 keys still unsettled.
    pub(super) async fn deliver_all(
        &mut self,
        concurrency: usize,
        deadline: Instant,
    ) -> Result<(), Vec<String>> {
        let mut in_flight = InFlight::new();
        loop {
            self.start_due(&mut in_flight, concurrency);
            if in_flight.is_empty() && self.sched.pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                for task in in_flight.iter() {
                    task.abort();
                }
                return Err(self.stuck_keys());
            }
            let wake = self.sched.next_wake().unwrap_or(deadline).min(deadline);
            let done = if in_flight.is_empty() {
                tokio::time::sleep_until(wake.into()).await;
                continue;
            } else {
                tokio::select! {
                    // Settle what finished before starting what is due.
                    biased;
                    d = in_flight.next() => d,
                    () = tokio::time::sleep_until(wake.into()) => continue,
                }
            };
            match done {
                Some(Ok((p, outcome))) => self.settled(p, outcome),
                // `process` catches handler panics; a panic here is the harness's own.
                Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Some(Err(_)) | None => {}
            }
        }
    }

    /// Starts the deliveries that are due, up to `concurrency` in flight (the
    /// concurrent copies of one message start together).
    fn start_due(&mut self, in_flight: &mut InFlight, concurrency: usize) {
        while in_flight.len() < concurrency {
            let Some((item, reordered)) = self.sched.take(Instant::now()) else {
                break;
            };
            let mut batch = vec![item];
            if let Some(g) = batch[0].group {
                batch.extend(self.sched.take_group(g));
            }
            let concurrent = batch.len() > 1;
            for p in batch {
                self.totals.deliveries += 1;
                self.totals.reordered += u64::from(reordered);
                self.in_flight_keys.push(p.cell);
                // Each delivery is a task of its own, as in a worker: it keeps
                // extending its lease however busy the harness loop is.
                in_flight.push(tokio::spawn(deliver(
                    self.consumer.clone(),
                    self.cells[p.cell].clone(),
                    p,
                    concurrent,
                )));
            }
        }
    }

    /// Up to 10 keys in flight or waiting, sorted.
    fn stuck_keys(&self) -> Vec<String> {
        let mut stuck: Vec<String> = self
            .in_flight_keys
            .iter()
            .chain(self.sched.pending.iter().map(|p| &p.cell))
            .map(|&i| self.cells[i].key.clone())
            .collect();
        stuck.sort();
        stuck.dedup();
        stuck.truncate(10);
        stuck
    }

    /// Records how delivery `p` ended and schedules what follows.
    fn settled(&mut self, p: Pending, outcome: Outcome) {
        if let Some(pos) = self.in_flight_keys.iter().position(|&k| k == p.cell) {
            self.in_flight_keys.swap_remove(pos);
        }
        let cell = self.cells[p.cell].clone();
        let step = match outcome {
            Outcome::Crashed(point) => {
                self.totals.crashes[point as usize] += 1;
                cell.log(format!("{}: crashed {point}", p.label));
                Step::Crashed
            }
            Outcome::Settled(d) => {
                if matches!(*d, Disposition::Ack { .. }) && cell.fire(CrashPoint::AfterCommit) {
                    self.totals.crashes[CrashPoint::AfterCommit as usize] += 1;
                    cell.log(format!(
                        "{}: {} then crashed {}",
                        p.label,
                        d.name(),
                        CrashPoint::AfterCommit
                    ));
                    Step::Crashed
                } else {
                    let step = next_step(&d, &p.msg, self.consumer.backoff());
                    cell.log(format!("{}: {}", p.label, describe(&d)));
                    step
                }
            }
        };
        let vnow = self.sched.vnow;
        match step {
            Step::Done => {}
            // A killed worker's unacked delivery comes back, flagged; an
            // at-most-once consumer acked it on receipt, so it is gone.
            Step::Crashed if self.mode == DeliveryMode::AtMostOnce => {}
            Step::Crashed => {
                let mut msg = p.msg;
                msg.delivery.redelivered = true;
                self.sched.push(Pending {
                    due: vnow,
                    not_before: None,
                    msg,
                    label: format!("{} (redelivered)", base_label(&p.label)),
                    group: None,
                    ..p
                });
            }
            Step::Redeliver { msg, delay, wait } => {
                self.totals.retries += 1;
                self.sched.push(Pending {
                    due: vnow + delay.as_millis() as u64,
                    not_before: wait.then(|| Instant::now() + delay.min(REAL_POLL)),
                    msg: *msg,
                    label: format!("{} (retry)", base_label(&p.label)),
                    group: None,
                    ..p
                });
            }
            Step::DeadLetter(error) => self.dead[p.cell] = Some(error),
        }
    }
}

fn base_label(label: &str) -> &str {
    label.split(" (").next().unwrap_or(label)
}

fn describe(d: &Disposition) -> String {
    match d {
        Disposition::Retry { delay, failure, .. } => {
            format!("retry after {delay:?} ({})", failure.error)
        }
        Disposition::DeadLetter { failure, .. } => format!("dead-lettered ({})", failure.error),
        Disposition::Release { reason } => format!("released ({reason})"),
        Disposition::Discard { reason } => format!("discarded ({reason})"),
        Disposition::Ack { .. } => d.name().to_owned(),
    }
}

/// What the harness does next with a delivery.
enum Step {
    Done,
    Crashed,
    /// Deliver `msg` again after `delay` on the virtual clock; `wait`: also wait (up
    /// to [`REAL_POLL`]) in real time, for a lease or a breaker.
    Redeliver {
        msg: Box<Message>,
        delay: Duration,
        wait: bool,
    },
    DeadLetter(String),
}

/// A settled delivery, as a broker carries it out. The one place that reads a
/// [`Disposition`].
fn next_step(d: &Disposition, delivered: &Message, backoff: &Backoff) -> Step {
    match d {
        Disposition::Ack { .. } | Disposition::Discard { .. } => Step::Done,
        Disposition::Retry {
            delay,
            failure,
            delay_kind,
            headers,
        } => {
            let mut msg = delivered.clone();
            msg.headers.extend(headers.clone());
            msg.delivery.redelivered = false;
            msg.delivery.attempt = failure.attempts.saturating_add(1);
            // No attempt spent: the key is busy under a live lease (or the store is
            // failing); that ends in real time, not on the virtual clock.
            let wait = failure.attempts <= delivered.context.failed_before();
            // The virtual clock uses the un-jittered backoff delay, so that a seed
            // replays the same order; explicit delays (retry_after, busy) as given.
            let delay = if *delay_kind == DelayKind::AtLeast {
                *delay
            } else {
                backoff.delay_after(failure.attempts)
            };
            Step::Redeliver {
                msg: Box::new(msg),
                delay,
                wait,
            }
        }
        Disposition::Release { .. } => {
            let mut msg = delivered.clone();
            msg.delivery.redelivered = true;
            Step::Redeliver {
                msg: Box::new(msg),
                delay: Duration::ZERO,
                wait: true,
            }
        }
        Disposition::DeadLetter { failure, .. } => Step::DeadLetter(failure.error.clone()),
    }
}

pub(super) struct Pending {
    due: u64,
    not_before: Option<Instant>,
    cell: usize,
    pub(super) msg: Message,
    label: String,
    group: Option<u64>,
}

struct Scheduler {
    rng: fastrand::Rng,
    reorder: f64,
    pending: Vec<Pending>,
    vnow: u64,
    next_group: u64,
}

impl Scheduler {
    fn group(&mut self) -> u64 {
        self.next_group += 1;
        self.next_group
    }

    fn push(&mut self, p: Pending) {
        self.pending.push(p);
    }

    /// The next delivery ready at `now`: the earliest due, or a random ready one.
    fn take(&mut self, now: Instant) -> Option<(Pending, bool)> {
        let ready: Vec<usize> = (0..self.pending.len())
            .filter(|&i| self.pending[i].not_before.is_none_or(|t| t <= now))
            .collect();
        let earliest = *ready.iter().min_by_key(|&&i| self.pending[i].due)?;
        let reorder = self.reorder > 0.0 && ready.len() > 1 && self.rng.f64() < self.reorder;
        let i = if reorder {
            ready[self.rng.usize(..ready.len())]
        } else {
            earliest
        };
        let p = self.pending.swap_remove(i);
        self.vnow = self.vnow.max(p.due);
        Some((p, reorder && i != earliest))
    }

    fn take_group(&mut self, g: u64) -> Vec<Pending> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].group == Some(g) {
                out.push(self.pending.swap_remove(i));
            } else {
                i += 1;
            }
        }
        out
    }

    fn next_wake(&self) -> Option<Instant> {
        self.pending.iter().filter_map(|p| p.not_before).min()
    }
}
