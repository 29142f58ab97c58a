//! A graceful stop that starts while handlers are held in flight, for the tests that
//! run several consumers in one process, stop it mid-run and let a second run
//! finish the rest: [`Gated`] is a consumer whose handlers wait at a gate and report
//! to a [`Probe`], and [`stop_while_held`] is the stop and its checks.

use std::sync::Arc;
use std::time::Duration;

use idem_core::{Consumer, IdempotencyKey, MemoryStore, State, WorkerHandle};
use tokio::sync::Semaphore;

use crate::probe::Probe;

/// What a test consumer keeps across both runs: its in-memory dedup store (so the
/// second run knows what the first completed) and the gate its handlers wait at,
/// closed at first. Clones share both.
#[derive(Clone, Debug)]
pub struct Gated {
    store: MemoryStore,
    gate: Arc<Semaphore>,
}

impl Default for Gated {
    fn default() -> Self {
        Gated {
            store: MemoryStore::new(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

/// A handler's state: where it reports, where it waits, how long it works and what
/// its effects are called.
#[derive(Clone)]
struct Ctx {
    probe: Arc<Probe>,
    gate: Arc<Semaphore>,
    pause: Duration,
    prefix: Arc<str>,
}

async fn handler(State(ctx): State<Ctx>, key: IdempotencyKey) {
    let effect = format!("{}{key}", ctx.prefix);
    ctx.probe.run(&ctx.gate, ctx.pause, effect).await;
}

impl Gated {
    /// A consumer named `name` over the store whose handler runs through `probe`
    /// (see [`Probe::run`]): it waits for a permit of the gate, works for `pause`
    /// and applies the effect `<prefix><idempotency key>`.
    pub fn consumer(
        &self,
        name: impl Into<String>,
        probe: &Arc<Probe>,
        pause: Duration,
        prefix: &str,
    ) -> Consumer {
        let ctx = Ctx {
            probe: probe.clone(),
            gate: self.gate.clone(),
            pause,
            prefix: prefix.into(),
        };
        Consumer::builder(name)
            .store(self.store.clone())
            .handler_with_state(handler, ctx)
            .unwrap()
    }

    /// Lets `runs` more handler runs through the gate.
    pub fn admit(&self, runs: usize) {
        self.gate.add_permits(runs);
    }

    /// Opens the gate for every later run.
    pub fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 8);
    }
}

/// Stops `running` (its handle's graceful stop, what SIGTERM does) while the
/// handlers that `probe` counts are held at their gates, and returns what it
/// returned.
///
/// Notes how many handlers are in flight, asks for the stop, lets 100 ms pass so the
/// stop has begun while they are still held, then calls `open_gates` and waits for
/// the process to end. Panics if no handler was in flight when the stop began, or if
/// one of them was cut off.
pub async fn stop_while_held<T: Send + 'static>(
    running: WorkerHandle<T>,
    probe: &Probe,
    open_gates: impl FnOnce(),
) -> T {
    let in_flight = probe.in_flight();
    running.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    open_gates();
    let result = running.join().await;
    assert!(in_flight > 0, "the stop found no handler running");
    probe.assert_none_cut_off();
    result
}
