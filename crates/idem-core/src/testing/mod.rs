//! A harness that proves *your* consumer (your handler, your store or inbox, your
//! database writes) applies each effect as its delivery mode promises, under
//! duplicates, concurrent copies, crashes, transient failures and out-of-order
//! redelivery. Enabled by the `testing` feature.
//!
//! You give it:
//! - a factory that builds your consumer with the harness's [`TroubleLayer`] added
//!   through [`ConsumerBuilder::layer`](crate::ConsumerBuilder::layer) (add it first, so
//!   it sits right around your handler, under the dedup stage);
//! - the messages (each with its own idempotency key, read as the default key
//!   extractor does: `message_id`, else the `x-idempotency-key` header);
//! - a probe: an async closure that counts the effects of one key in your system
//!   (e.g. a `SELECT count(*)`).
//!
//! It draws a [`Plan`] per message from the [`Profile`] and the seed, drives every
//! delivery itself through [`Consumer::process`], acts on each [`Disposition`] as a
//! broker would, then probes every key and checks the promise of the consumer's
//! [`DeliveryMode`]: effectively-once -> exactly one effect, at-least-once -> at least
//! one, at-most-once -> at most one. The [`Report`] names the seed, and per finding
//! the key, its plan, what happened to each delivery, and the expected and observed
//! counts.
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::{Arc, Mutex};
//! use idem_core::testing::{Harness, Profile};
//! use idem_core::{Consumer, IdempotencyKey, Message, MemoryStore, State};
//!
//! type Effects = Arc<Mutex<HashMap<String, u64>>>;
//!
//! async fn handle(State(fx): State<Effects>, key: IdempotencyKey) {
//!     *fx.lock().unwrap().entry(key.to_string()).or_default() += 1;
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let effects = Effects::default();
//! let fx = effects.clone();
//! let messages = (0..50).map(|i| Message::new("{}").with_message_id(format!("m-{i}")));
//! let report = Harness::new(move |trouble| {
//!     Consumer::builder("doc")
//!         .store(MemoryStore::new())
//!         .layer(trouble)
//!         .handler_with_state(handle, fx)
//! })
//! .messages(messages)
//! .seed(7)
//! .profile(Profile::calm())
//! .run(move |key| {
//!     let n = effects.lock().unwrap().get(&key).copied().unwrap_or(0);
//!     async move { Ok::<u64, std::convert::Infallible>(n) }
//! })
//! .await
//! .unwrap();
//! report.assert_ok();
//! # }
//! ```
//!
//! # What a crash simulates, and what it cannot
//!
//! A crash drops the in-flight `Consumer::process` future at its [`CrashPoint`], as a
//! killed worker stops running it, then redelivers the same copy (same headers, the
//! `redelivered` flag set) as the broker does with a dead consumer's unacked
//! delivery. So:
//! - an open inbox transaction is dropped uncommitted, and the database rolls it back
//!   (sqlx sends the rollback when the dropped connection goes back to its pool, as a
//!   server does when a client's connection dies);
//! - a lease store's claim stays held until its lease expires, in real time: the
//!   redelivered copy is answered "busy" until then, and the harness redelivers it
//!   after a short real wait (at most 50 ms at a time). **Give lease stores a short
//!   lease in these tests** (e.g. `DedupLayer::new(..).lease(Duration::from_millis(300))`)
//!   or every crash costs a full lease (30 s by default) of test time;
//! - a crash after the handler's effect on a lease store re-runs the handler once the
//!   lease expires: the effect and the dedup record are not atomic there. That is
//!   the window lease stores leave open, and the harness reports such re-runs under
//!   [`Report::windows`], never hides them: [`Report::assert_ok`] fails on them,
//!   since your effect did happen twice (the fix is an idempotent effect, or the
//!   SQL inbox); [`Report::assert_ok_allowing_lease_window`] is the opt-in for
//!   handlers whose repeats are harmless.
//!
//! It cannot simulate:
//! - the loss of process memory: the crash kills one delivery, not the process. A
//!   [`MemoryStore`](crate::MemoryStore), in-memory caches, the consumer's circuit
//!   breaker and its tower layers keep their state across the "crash" (a real
//!   restart of a process with a memory store forgets every record);
//! - a crash *inside* a store or database call (half-sent statements, a commit whose
//!   reply was lost): crashes hit only the three points between stages;
//! - work your handler spawns onto other tasks: it is not dropped with the delivery;
//! - a broker: deliveries, copies and retries are made by the harness, with retry
//!   delays on a virtual clock (see below), not published anywhere.
//!
//! # Time, order and determinism
//!
//! Retry delays are not slept: each waiting delivery has a due time on a virtual
//! clock (a retry is due after its un-jittered backoff delay, or the delay the error
//! asked for), and the harness takes the earliest due one next (or, with chance
//! [`Profile::reorder`], a random one of those ready). Only "busy" answers (a live
//! lease) and released deliveries wait in real time, briefly. Up to
//! [`Harness::concurrency`] deliveries run at once (default 8), each as a tokio task
//! of its own, as a worker runs them (so a delivery keeps extending its lease while
//! the harness schedules others).
//!
//! A lease must still outlast the longest pause of the test machine: a delivery whose
//! lease lapses while its handler runs (a starved process, a lease shorter than a
//! store round trip) lets a copy of the message run too. The harness reports that as
//! a violation, as it would happen in production with the same lease.
//!
//! The plan of every message (copies, concurrency, crash point, transient failures)
//! and the random choices of the scheduler come from the seed, so a run with the same
//! seed injects the same trouble. With real services the interleaving of concurrent
//! deliveries also depends on their timing; with `concurrency(1)` and no concurrent
//! copies the order is fixed too. The default seed is read from `IDEM_HARNESS_SEED`,
//! else drawn at random; the report always names it.
//!
//! A message that is dead-lettered is a violation (the harness expects every message
//! it is given to be handled), as is a run still unfinished after
//! [`Harness::time_limit`] (an error naming the keys still pending).

mod report;
mod schedule;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;
use tower::{Layer, Service};

use crate::backoff::Backoff;
use crate::consumer::{ConfigError, Consumer, DeliveryMode, HandlerStack};
use crate::dedup::DefaultKey;
use crate::error::{BoxError, HandlerError};
use crate::message::Message;
use crate::outcome::{DelayKind, Disposition};

pub use report::{Expected, Finding, Report, Totals};
pub use schedule::{CrashPoint, Plan, Profile};

/// Longest real wait before a "busy" or released delivery is tried again.
const REAL_POLL: Duration = Duration::from_millis(50);

/// The error the harness injects as a transient failure.
#[derive(Debug, thiserror::Error)]
#[error("transient failure injected by idem::testing")]
pub struct InjectedFailure;

/// Why a harness run could not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The factory refused the consumer's configuration.
    #[error("the consumer factory failed: {0}")]
    Config(#[from] ConfigError),
    /// A message has no idempotency key.
    #[error(
        "message #{0} has no idempotency key (set message_id or the x-idempotency-key header)"
    )]
    NoKey(usize),
    /// Two messages have the same key (the harness makes the copies itself).
    #[error("two messages have the idempotency key {0:?}; give each message its own key")]
    DuplicateKey(String),
    /// No message was given.
    #[error("no messages to deliver")]
    NoMessages,
    /// Handlers ran but never passed through the trouble layer.
    #[error(
        "the TroubleLayer given to the factory is not in the consumer: add it with .layer(trouble)"
    )]
    LayerMissing,
    /// The probe failed for a key.
    #[error("the probe failed for key {key:?}: {source}")]
    Probe {
        /// The key probed.
        key: String,
        /// The probe's error.
        source: BoxError,
    },
    /// Deliveries were still pending when the time limit ran out.
    #[error("still delivering after {limit:?} (seed {seed}); keys not settled: {keys:?} (a lease longer than the test allows? see idem::testing)")]
    TimeLimit {
        /// The limit.
        limit: Duration,
        /// The run's seed.
        seed: u64,
        /// Up to 10 keys still in flight or waiting.
        keys: Vec<String>,
    },
}

type Factory = Box<dyn FnOnce(TroubleLayer) -> Result<Consumer, ConfigError> + Send>;

/// Drives a consumer through trouble and checks its effects. See the
/// [module docs](self).
pub struct Harness {
    factory: Factory,
    messages: Vec<Message>,
    seed: Option<u64>,
    profile: Profile,
    concurrency: usize,
    time_limit: Duration,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("messages", &self.messages.len())
            .field("seed", &self.seed)
            .field("profile", &self.profile)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl Harness {
    /// A harness for the consumer `factory` builds; the factory must add the
    /// [`TroubleLayer`] it is given with `.layer(trouble)`.
    pub fn new<F>(factory: F) -> Self
    where
        F: FnOnce(TroubleLayer) -> Result<Consumer, ConfigError> + Send + 'static,
    {
        Harness {
            factory: Box::new(factory),
            messages: Vec::new(),
            seed: None,
            profile: Profile::default(),
            concurrency: 8,
            time_limit: Duration::from_secs(120),
        }
    }

    /// The messages to deliver, each with its own idempotency key.
    pub fn messages(mut self, messages: impl IntoIterator<Item = Message>) -> Self {
        self.messages.extend(messages);
        self
    }

    /// The seed (default: `IDEM_HARNESS_SEED`, else random).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The trouble to inject (default [`Profile::default`]).
    pub fn profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    /// Deliveries in flight at once (default 8, at least 1). Concurrent copies of one
    /// message may go beyond it.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How long the deliveries may take before the run fails (default 120 s).
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = limit;
        self
    }

    /// Builds the consumer, delivers every message with its planned trouble until all
    /// are settled, then probes each key once. `probe(key)` returns the number of
    /// effects of `key` in your system.
    pub async fn run<P, Fut, E>(self, mut probe: P) -> Result<Report, HarnessError>
    where
        P: FnMut(String) -> Fut,
        Fut: Future<Output = Result<u64, E>>,
        E: Into<BoxError>,
    {
        let started = Instant::now();
        let seed = self.seed.unwrap_or_else(default_seed);
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut keys = Vec::with_capacity(self.messages.len());
        let mut seen = std::collections::HashSet::new();
        for (i, msg) in self.messages.iter().enumerate() {
            let key = DefaultKey::key_of(msg).ok_or(HarnessError::NoKey(i))?;
            if !seen.insert(key.clone()) {
                return Err(HarnessError::DuplicateKey(key));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(HarnessError::NoMessages);
        }
        let layer = TroubleLayer {
            used: Arc::new(AtomicBool::new(false)),
        };
        let consumer = (self.factory)(layer.clone())?;
        let mode = consumer.mode();
        let lease_stage = consumer.lease().is_some();

        let mut sched = Scheduler {
            rng: fastrand::Rng::with_seed(seed ^ 0x9e37_79b9_7f4a_7c15),
            reorder: self.profile.reorder,
            pending: Vec::new(),
            vnow: 0,
            next_group: 0,
        };
        let mut cells = Vec::with_capacity(keys.len());
        let mut totals = Totals {
            messages: keys.len(),
            ..Totals::default()
        };
        for (i, msg) in self.messages.into_iter().enumerate() {
            let plan = self.profile.draw(&mut rng);
            let cell = Arc::new(KeyCell {
                key: keys[i].clone(),
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

        let deadline = started + self.time_limit;
        let mut in_flight = FuturesUnordered::new();
        let mut in_flight_keys = Vec::<usize>::new();
        let mut dead = vec![None::<String>; cells.len()];
        loop {
            while in_flight.len() < self.concurrency {
                let Some((item, reordered)) = sched.take(Instant::now()) else {
                    break;
                };
                let mut batch = vec![item];
                if let Some(g) = batch[0].group {
                    batch.extend(sched.take_group(g));
                }
                let concurrent = batch.len() > 1;
                for p in batch {
                    totals.deliveries += 1;
                    totals.reordered += u64::from(reordered);
                    in_flight_keys.push(p.cell);
                    // Each delivery is a task of its own, as in a worker: it keeps
                    // extending its lease however busy the harness loop is.
                    in_flight.push(tokio::spawn(deliver(
                        consumer.clone(),
                        cells[p.cell].clone(),
                        p,
                        concurrent,
                    )));
                }
            }
            if in_flight.is_empty() && sched.pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let mut stuck: Vec<String> = in_flight_keys
                    .iter()
                    .chain(sched.pending.iter().map(|p| &p.cell))
                    .map(|&i| cells[i].key.clone())
                    .collect();
                stuck.sort();
                stuck.dedup();
                stuck.truncate(10);
                for task in in_flight.iter() {
                    task.abort();
                }
                return Err(HarnessError::TimeLimit {
                    limit: self.time_limit,
                    seed,
                    keys: stuck,
                });
            }
            let wake = sched.next_wake().unwrap_or(deadline).min(deadline);
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
            let (p, outcome) = match done {
                Some(Ok(settled)) => settled,
                // `process` catches handler panics; a panic here is the harness's own.
                Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Some(Err(_)) | None => continue,
            };
            if let Some(pos) = in_flight_keys.iter().position(|&k| k == p.cell) {
                in_flight_keys.swap_remove(pos);
            }
            let cell = cells[p.cell].clone();
            let step = match outcome {
                Outcome::Crashed(point) => {
                    totals.crashes[point as usize] += 1;
                    cell.log(format!("{}: crashed {point}", p.label));
                    Step::Crashed
                }
                Outcome::Settled(d) => {
                    if matches!(*d, Disposition::Ack { .. }) && cell.fire(CrashPoint::AfterCommit) {
                        totals.crashes[CrashPoint::AfterCommit as usize] += 1;
                        cell.log(format!(
                            "{}: {} then crashed {}",
                            p.label,
                            d.name(),
                            CrashPoint::AfterCommit
                        ));
                        Step::Crashed
                    } else {
                        let step = next_step(&d, &p.msg, consumer.backoff());
                        cell.log(format!("{}: {}", p.label, describe(&d)));
                        step
                    }
                }
            };
            let vnow = sched.vnow;
            match step {
                Step::Done => {}
                // A killed worker's unacked delivery comes back, flagged; an
                // at-most-once consumer acked it on receipt, so it is gone.
                Step::Crashed if mode == DeliveryMode::AtMostOnce => {}
                Step::Crashed => {
                    let mut msg = p.msg;
                    msg.delivery.redelivered = true;
                    sched.push(Pending {
                        due: vnow,
                        not_before: None,
                        msg,
                        label: format!("{} (redelivered)", base_label(&p.label)),
                        group: None,
                        ..p
                    });
                }
                Step::Redeliver { msg, delay, wait } => {
                    totals.retries += 1;
                    sched.push(Pending {
                        due: vnow + delay.as_millis() as u64,
                        not_before: wait.then(|| Instant::now() + delay.min(REAL_POLL)),
                        msg: *msg,
                        label: format!("{} (retry)", base_label(&p.label)),
                        group: None,
                        ..p
                    });
                }
                Step::DeadLetter(error) => dead[p.cell] = Some(error),
            }
        }
        drop(in_flight);
        if !layer.used.load(Ordering::SeqCst) && consumer.stats().processed > 0 {
            return Err(HarnessError::LayerMissing);
        }

        let expected = Expected::of(mode);
        let mut violations = Vec::new();
        let mut windows = Vec::new();
        for (i, cell) in cells.iter().enumerate() {
            let observed = probe(cell.key.clone())
                .await
                .map_err(|e| HarnessError::Probe {
                    key: cell.key.clone(),
                    source: e.into(),
                })?;
            let st = cell.lock();
            totals.transient_failures += u64::from(cell.plan.transient - st.transient_left);
            let finding = |reason: String| Finding {
                key: cell.key.clone(),
                expected,
                observed,
                plan: cell.plan,
                events: st.events.clone(),
                reason,
            };
            if let Some(error) = &dead[i] {
                violations.push(finding(format!("dead-lettered: {error}")));
            } else if expected.holds(observed) {
                continue;
            } else if expected == Expected::ExactlyOne
                && lease_stage
                && observed > 1
                && observed <= 1 + u64::from(st.window_crashes)
            {
                windows.push(finding(format!(
                    "{} re-run(s) after a crash after the effect on a lease store",
                    observed - 1
                )));
            } else {
                let reason = match observed {
                    0 => "the effect is missing".to_owned(),
                    n if n > 1 => format!("the effect happened {n} times"),
                    _ => "unexpected count".to_owned(),
                };
                violations.push(finding(reason));
            }
        }
        Ok(Report {
            seed,
            consumer: consumer.name().to_owned(),
            mode,
            lease_stage,
            totals,
            elapsed: started.elapsed(),
            violations,
            windows,
        })
    }
}

fn default_seed() -> u64 {
    std::env::var("IDEM_HARNESS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
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
            let wait = failure.attempts <= delivered.failed_attempts();
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

struct Pending {
    due: u64,
    not_before: Option<Instant>,
    cell: usize,
    msg: Message,
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

enum Outcome {
    Settled(Box<Disposition>),
    Crashed(CrashPoint),
}

async fn deliver(
    consumer: Consumer,
    cell: Arc<KeyCell>,
    p: Pending,
    concurrent: bool,
) -> (Pending, Outcome) {
    let (tx, rx) = oneshot::channel();
    let mut msg = p.msg.clone();
    msg.extensions = Default::default();
    msg.extensions.insert(Ticket {
        cell,
        concurrent,
        crash: Arc::new(Mutex::new(Some(tx))),
    });
    let outcome = tokio::select! {
        biased;
        Ok(point) = rx => Outcome::Crashed(point),
        d = consumer.process(msg) => Outcome::Settled(Box::new(d)),
    };
    (p, outcome)
}

#[derive(Default)]
struct KeyState {
    transient_left: u32,
    crash: Option<CrashPoint>,
    window_crashes: u32,
    events: Vec<String>,
}

struct KeyCell {
    key: String,
    plan: Plan,
    state: Mutex<KeyState>,
}

impl KeyCell {
    fn lock(&self) -> MutexGuard<'_, KeyState> {
        // Every critical section is a few field updates: a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log(&self, event: String) {
        self.lock().events.push(event);
    }

    /// Fires the planned crash if it is at `point` and has not fired yet.
    fn fire(&self, point: CrashPoint) -> bool {
        let mut st = self.lock();
        if st.crash != Some(point) {
            return false;
        }
        st.crash = None;
        if point == CrashPoint::AfterEffect {
            st.window_crashes += 1;
        }
        true
    }
}

/// What the trouble layer finds in a delivery's extensions.
#[derive(Clone)]
struct Ticket {
    cell: Arc<KeyCell>,
    concurrent: bool,
    crash: Arc<Mutex<Option<oneshot::Sender<CrashPoint>>>>,
}

impl Ticket {
    /// Kills the delivery: tells the harness to drop it, then never completes.
    async fn crash(&self, point: CrashPoint) -> Result<(), BoxError> {
        let tx = self.crash.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(point);
        }
        std::future::pending().await
    }
}

/// The tower layer through which the harness injects transient failures and
/// crashes around your handler. Obtained from [`Harness::new`]'s factory argument;
/// add it with [`ConsumerBuilder::layer`](crate::ConsumerBuilder::layer), first (so it
/// wraps the handler and your other layers, under the dedup stage). Outside a harness
/// run it passes every message straight through.
#[derive(Clone, Debug)]
pub struct TroubleLayer {
    used: Arc<AtomicBool>,
}

impl Layer<HandlerStack> for TroubleLayer {
    type Service = TroubleService;

    fn layer(&self, inner: HandlerStack) -> TroubleService {
        TroubleService {
            inner,
            used: self.used.clone(),
        }
    }
}

/// The service of a [`TroubleLayer`].
pub struct TroubleService {
    inner: HandlerStack,
    used: Arc<AtomicBool>,
}

impl std::fmt::Debug for TroubleService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TroubleService").finish_non_exhaustive()
    }
}

impl Service<Message> for TroubleService {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let Some(ticket) = msg.extensions.get::<Ticket>().cloned() else {
            return self.inner.call(msg);
        };
        self.used.store(true, Ordering::SeqCst);
        let inject = {
            let mut st = ticket.cell.lock();
            if st.transient_left > 0 {
                st.transient_left -= 1;
                true
            } else {
                false
            }
        };
        if inject {
            return Box::pin(async { Err(HandlerError::transient(InjectedFailure).into()) });
        }
        if ticket.cell.fire(CrashPoint::BeforeHandler) {
            return Box::pin(async move { ticket.crash(CrashPoint::BeforeHandler).await });
        }
        let concurrent = ticket.concurrent;
        let fut = self.inner.call(msg);
        Box::pin(async move {
            if concurrent {
                // Let the other copies of the message reach their dedup stage too.
                tokio::task::yield_now().await;
            }
            let result = fut.await;
            if result.is_ok() && ticket.cell.fire(CrashPoint::AfterEffect) {
                return ticket.crash(CrashPoint::AfterEffect).await;
            }
            result
        })
    }
}

#[cfg(test)]
mod tests;
