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
//! delivery itself through [`Consumer::process`], acts on each [`Disposition`](crate::Disposition) as a
//! broker would, then probes every key and checks the promise of the consumer's
//! [`DeliveryMode`](crate::DeliveryMode): effectively-once -> exactly one effect, at-least-once -> at least
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
//!   lease in these tests** (e.g. `DedupLayer::new(..).lease(Duration::from_secs(2))`)
//!   or every crash costs a full lease (30 s by default) of test time. Not much
//!   shorter: a lease is extended every third of it, and on a loaded machine (a CI
//!   runner building in parallel) a few hundred milliseconds can pass between two
//!   extensions, so a lease well under a second can run out under a handler that is
//!   still running, and another copy of its message runs beside it;
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

mod drive;
mod report;
mod schedule;
mod trouble;

use std::future::Future;
use std::time::{Duration, Instant};

use crate::consumer::{ConfigError, Consumer};
use crate::dedup::DefaultKey;
use crate::error::BoxError;
use crate::message::Message;

use drive::Drive;

pub use report::{Expected, Finding, Report, Totals};
pub use schedule::{CrashPoint, Plan, Profile};
pub use trouble::{TroubleLayer, TroubleService};

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
    pub async fn run<P, Fut, E>(self, probe: P) -> Result<Report, HarnessError>
    where
        P: FnMut(String) -> Fut,
        Fut: Future<Output = Result<u64, E>>,
        E: Into<BoxError>,
    {
        let started = Instant::now();
        let seed = self.seed.unwrap_or_else(default_seed);
        let keys = keys_of(&self.messages)?;
        let layer = TroubleLayer::new();
        let consumer = (self.factory)(layer.clone())?;
        let mut drive = Drive::plan(consumer, self.messages, keys, &self.profile, seed);
        drive
            .deliver_all(self.concurrency, started + self.time_limit)
            .await
            .map_err(|keys| HarnessError::TimeLimit {
                limit: self.time_limit,
                seed,
                keys,
            })?;
        if !layer.was_used() && drive.consumer.stats().processed > 0 {
            return Err(HarnessError::LayerMissing);
        }
        let lease_stage = drive.consumer.lease().is_some();
        let mode = drive.consumer.mode();
        let expected = Expected::of(mode);
        let (violations, windows) = probe_all(&mut drive, expected, lease_stage, probe).await?;
        Ok(Report {
            seed,
            consumer: drive.consumer.name().to_owned(),
            mode,
            lease_stage,
            totals: drive.totals,
            elapsed: started.elapsed(),
            violations,
            windows,
        })
    }
}

/// The idempotency key of every message, each its own.
fn keys_of(messages: &[Message]) -> Result<Vec<String>, HarnessError> {
    let mut keys = Vec::with_capacity(messages.len());
    let mut seen = std::collections::HashSet::new();
    for (i, msg) in messages.iter().enumerate() {
        let key = DefaultKey::key_of(msg).ok_or(HarnessError::NoKey(i))?;
        if !seen.insert(key.clone()) {
            return Err(HarnessError::DuplicateKey(key));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(HarnessError::NoMessages);
    }
    Ok(keys)
}

/// Probes every key once and sorts what it finds: promises broken (`violations`)
/// and effects repeated in a lease store's window (`windows`).
async fn probe_all<P, Fut, E>(
    drive: &mut Drive,
    expected: Expected,
    lease_stage: bool,
    mut probe: P,
) -> Result<(Vec<Finding>, Vec<Finding>), HarnessError>
where
    P: FnMut(String) -> Fut,
    Fut: Future<Output = Result<u64, E>>,
    E: Into<BoxError>,
{
    let mut violations = Vec::new();
    let mut windows = Vec::new();
    for (i, cell) in drive.cells.iter().enumerate() {
        let observed = probe(cell.key.clone())
            .await
            .map_err(|e| HarnessError::Probe {
                key: cell.key.clone(),
                source: e.into(),
            })?;
        let st = cell.lock();
        drive.totals.transient_failures += u64::from(cell.plan.transient - st.transient_left);
        let finding = |reason: String| Finding {
            key: cell.key.clone(),
            expected,
            observed,
            plan: cell.plan,
            events: st.events.clone(),
            reason,
        };
        if let Some(error) = &drive.dead[i] {
            violations.push(finding(format!("dead-lettered: {error}")));
        } else if expected.holds(observed) {
            continue;
        } else if in_lease_window(expected, lease_stage, observed, st.window_crashes) {
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
    Ok((violations, windows))
}

/// Whether the extra effects of a key are all explained by crashes between the
/// effect and the dedup record on a lease store (which writes the two separately).
fn in_lease_window(expected: Expected, lease_stage: bool, observed: u64, crashes: u32) -> bool {
    expected == Expected::ExactlyOne
        && lease_stage
        && observed > 1
        && observed <= 1 + u64::from(crashes)
}

fn default_seed() -> u64 {
    std::env::var("IDEM_HARNESS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

#[cfg(test)]
mod tests;
