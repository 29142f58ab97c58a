//! What the handlers of a test did: runs started and finished, and how many times
//! each effect was applied, with a gate that holds handlers in flight until the test
//! opens it. The service tests stop a process while its handlers run and then check
//! that none was cut off and that every effect happened once over two runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Semaphore;

/// Counts handler runs and the effects they applied (see the module docs).
#[derive(Debug, Default)]
pub struct Probe {
    started: AtomicUsize,
    finished: AtomicUsize,
    effects: Mutex<HashMap<String, usize>>,
}

impl Probe {
    /// The body of a test handler: counts a start, takes one permit of `gate` (and
    /// keeps it, so each permit lets one run through), sleeps `pause`, applies
    /// `effect` once and counts a finish.
    pub async fn run(&self, gate: &Semaphore, pause: Duration, effect: String) {
        self.started.fetch_add(1, Ordering::SeqCst);
        gate.acquire().await.unwrap().forget();
        tokio::time::sleep(pause).await;
        *self.effects.lock().unwrap().entry(effect).or_default() += 1;
        self.finished.fetch_add(1, Ordering::SeqCst);
    }

    /// How many different effects were applied.
    pub fn applied(&self) -> usize {
        self.effects.lock().unwrap().len()
    }

    /// How many different effects starting with `prefix` were applied.
    pub fn applied_with(&self, prefix: &str) -> usize {
        let effects = self.effects.lock().unwrap();
        effects.keys().filter(|k| k.starts_with(prefix)).count()
    }

    /// Runs started and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.started.load(Ordering::SeqCst) - self.finished.load(Ordering::SeqCst)
    }

    /// Panics unless every run that started has finished: after a graceful stop, no
    /// handler was cut off.
    pub fn assert_none_cut_off(&self) {
        assert_eq!(
            self.started.load(Ordering::SeqCst),
            self.finished.load(Ordering::SeqCst),
            "a handler in flight at the stop was cut off"
        );
    }

    /// Each effect of this probe and of `later` (a second run of the same test), with
    /// how many times the two applied it in all.
    pub fn merged(&self, later: &Probe) -> HashMap<String, usize> {
        let mut all = self.effects.lock().unwrap().clone();
        for (effect, n) in later.effects.lock().unwrap().iter() {
            *all.entry(effect.clone()).or_default() += n;
        }
        all
    }

    /// A copy of each effect applied and how many times.
    pub fn effects(&self) -> HashMap<String, usize> {
        self.effects.lock().unwrap().clone()
    }
}

/// Panics if an effect in `effects` was applied other than once, naming those.
pub fn assert_each_once(effects: &HashMap<String, usize>) {
    let twice: Vec<_> = effects.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_run_waits_for_a_permit_and_counts_its_effect() {
        let probe = std::sync::Arc::new(Probe::default());
        let gate = std::sync::Arc::new(Semaphore::new(0));
        let run = tokio::spawn({
            let (probe, gate) = (probe.clone(), gate.clone());
            async move { probe.run(&gate, Duration::ZERO, "q/a".to_owned()).await }
        });
        assert!(
            crate::broker::wait_until(Duration::from_secs(5), async || probe.in_flight() == 1)
                .await
        );
        assert_eq!(probe.applied(), 0, "held at the gate");
        gate.add_permits(1);
        run.await.unwrap();
        probe.assert_none_cut_off();
        let later = Probe::default();
        later
            .run(&Semaphore::new(1), Duration::ZERO, "q/a".to_owned())
            .await;
        later
            .run(&Semaphore::new(1), Duration::ZERO, "r/b".to_owned())
            .await;
        assert_eq!((later.applied(), later.applied_with("q/")), (2, 1));
        let all = probe.merged(&later);
        assert_eq!(all["q/a"], 2);
        assert!(std::panic::catch_unwind(|| assert_each_once(&all)).is_err());
        assert_each_once(&later.effects());
    }
}
