use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::{ConsumerBuilder, DedupLayer, Handler, IdempotencyKey, MemoryStore, State};

type Effects = Arc<Mutex<HashMap<String, u64>>>;

async fn count_effect(State(fx): State<Effects>, key: IdempotencyKey) {
    *fx.lock().unwrap().entry(key.0).or_default() += 1;
}

fn messages(n: usize, tag: &str) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new("{}").with_message_id(format!("{tag}-{i}")))
        .collect()
}

fn probe(fx: &Effects) -> impl FnMut(String) -> std::future::Ready<Result<u64, Infallible>> {
    let fx = fx.clone();
    move |key| std::future::ready(Ok(fx.lock().unwrap().get(&key).copied().unwrap_or(0)))
}

/// `n` messages tagged `tag` for the consumer `build` starts from the trouble layer,
/// finished with `handler`, whose effects are counted in `fx`.
fn harness_with<H, T, B>(fx: &Effects, handler: H, build: B, n: usize, tag: &str) -> Harness
where
    H: Handler<T, Effects>,
    T: 'static,
    B: FnOnce(TroubleLayer) -> ConsumerBuilder + Send + 'static,
{
    let fx = fx.clone();
    Harness::new(move |trouble| build(trouble).handler_with_state(handler, fx))
        .messages(messages(n, tag))
}

/// `n` messages tagged `tag` for a memory-store consumer with a short lease, so crashes
/// cost little real time.
fn memory_harness(fx: &Effects, n: usize, tag: &str) -> Harness {
    let store = DedupLayer::new(MemoryStore::new()).lease(Duration::from_secs(2));
    let build = |trouble| {
        Consumer::builder("harness-memory")
            .dedup(store)
            .layer(trouble)
    };
    harness_with(fx, count_effect, build, n, tag)
}

/// Runs `harness`, its effects counted in `fx`.
async fn run_counted(harness: Harness, fx: &Effects) -> Report {
    harness.run(probe(fx)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_default_profile_reports_only_lease_windows() {
    let fx = Effects::default();
    let report = run_counted(memory_harness(&fx, 200, "m").seed(11), &fx).await;
    report.assert_ok_allowing_lease_window();
    let t = report.totals();
    assert!(t.crashes.iter().all(|&c| c > 0), "{report}");
    assert!(t.transient_failures > 0 && t.extra_copies > 0, "{report}");
    // Crashes after the effect on a lease store re-run the handler: reported, not hidden.
    assert!(!report.windows().is_empty(), "{report}");
    assert!(report.windows().len() as u64 <= t.crashes[1], "{report}");
    for w in report.windows() {
        assert_eq!(w.observed, 2, "{report}");
        assert!(
            w.events
                .iter()
                .any(|e| e.contains("crashed after the handler's effect")),
            "{report}"
        );
    }
    assert!(report.to_string().contains("lease-store window"));
    assert!(!report.is_ok());
    let strict = std::panic::catch_unwind(|| report.assert_ok());
    assert!(strict.is_err(), "assert_ok accepts window re-runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_before_handler_and_after_commit_never_repeat_an_effect() {
    for point in [CrashPoint::BeforeHandler, CrashPoint::AfterCommit] {
        let fx = Effects::default();
        let harness = memory_harness(&fx, 30, "c")
            .profile(Profile::crash_at(point))
            .seed(3);
        let report = run_counted(harness, &fx).await;
        report.assert_ok();
        assert_eq!(report.totals().crashes[point as usize], 30, "{report}");
        assert!(fx.lock().unwrap().values().all(|&n| n == 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_effect_is_a_violation_naming_key_seed_and_schedule() {
    let fx = Effects::default();
    // The bug: the handler forgets the effect of message "lost-3".
    async fn forgetful(State(fx): State<Effects>, key: IdempotencyKey) {
        if key.0 != "lost-3" {
            *fx.lock().unwrap().entry(key.0).or_default() += 1;
        }
    }
    let build = |trouble| {
        Consumer::builder("forgetful")
            .store(MemoryStore::new())
            .layer(trouble)
    };
    let harness = harness_with(&fx, forgetful, build, 10, "lost")
        .profile(Profile::calm())
        .seed(99);
    let report = run_counted(harness, &fx).await;
    assert_eq!(report.violations().len(), 1, "{report}");
    let v = &report.violations()[0];
    assert_eq!((v.key.as_str(), v.observed), ("lost-3", 0));
    assert_eq!(v.expected, Expected::ExactlyOne);
    let text = report.to_string();
    for needle in [
        "seed 99",
        "IDEM_HARNESS_SEED=99",
        "\"lost-3\"",
        "expected exactly 1",
        "observed 0",
        "schedule: 1 copy",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let panic = std::panic::catch_unwind(|| report.assert_ok()).unwrap_err();
    let msg = panic.downcast_ref::<String>().unwrap();
    assert!(msg.contains("lost-3") && msg.contains("seed 99"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_without_store_accepts_repeats_but_not_losses() {
    let fx = Effects::default();
    let build = |trouble| Consumer::builder("alo").layer(trouble);
    let report = run_counted(
        harness_with(&fx, count_effect, build, 100, "alo").seed(5),
        &fx,
    )
    .await;
    report.assert_ok();
    assert_eq!(report.violations().len(), 0);
    // Without dedup the copies repeat the effect, which at-least-once allows.
    assert!(fx.lock().unwrap().values().any(|&n| n > 1), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_replays_the_same_trouble() {
    let run = |seed| async move {
        let fx = Effects::default();
        let profile = Profile {
            concurrent: 0.0,
            crash_points: vec![CrashPoint::AfterCommit],
            crash: 0.5,
            ..Profile::default()
        };
        let harness = memory_harness(&fx, 60, "seed")
            .profile(profile)
            .concurrency(1)
            .seed(seed);
        run_counted(harness, &fx).await
    };
    let (a, b, c) = (run(42).await, run(42).await, run(43).await);
    assert_eq!(a.totals(), b.totals());
    assert_eq!(a.seed(), 42);
    assert_ne!(a.totals(), c.totals(), "different seeds, same trouble");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_without_the_trouble_layer_is_refused() {
    let fx = Effects::default();
    let build = |_trouble| Consumer::builder("no-layer").store(MemoryStore::new());
    let err = harness_with(&fx, count_effect, build, 3, "nl")
        .run(probe(&fx))
        .await
        .unwrap_err();
    assert!(matches!(err, HarnessError::LayerMissing), "{err}");
    let dup = Harness::new(|t| Consumer::builder("d").layer(t).handler(|| async {}))
        .messages([
            Message::new("").with_message_id("k"),
            Message::new("").with_message_id("k"),
        ])
        .run(probe(&fx))
        .await
        .unwrap_err();
    assert!(
        matches!(dup, HarnessError::DuplicateKey(ref k) if k == "k"),
        "{dup}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_default_profile_memory_store() {
    let fx = Effects::default();
    let started = Instant::now();
    let report = run_counted(memory_harness(&fx, 1000, "k").seed(2026), &fx).await;
    let took = started.elapsed();
    // A counter on a lease store: its repeats in the lease-store window are real, so
    // only the opt-in accepts them; anything else still fails.
    report.assert_ok_allowing_lease_window();
    println!("1000 messages, default profile, memory store: {took:?}\n{report}");
    // Speed is measured, not asserted (README, Benchmarks): printed for the record.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_longer_than_the_time_limit_fails_naming_the_stuck_key() {
    let fx = Effects::default();
    // The default 30 s lease: a crashed claim blocks its key far beyond the limit.
    let build = |trouble| {
        Consumer::builder("long-lease")
            .store(MemoryStore::new())
            .layer(trouble)
    };
    let err = harness_with(&fx, count_effect, build, 1, "stuck")
        .profile(Profile::crash_at(CrashPoint::BeforeHandler))
        .seed(8)
        .time_limit(Duration::from_millis(300))
        .run(probe(&fx))
        .await
        .unwrap_err();
    match &err {
        HarnessError::TimeLimit { seed, keys, .. } => {
            assert_eq!((*seed, keys.as_slice()), (8, &["stuck-0".to_owned()][..]));
        }
        other => panic!("expected a time-limit error, got {other}"),
    }
    assert!(err.to_string().contains("seed 8"), "{err}");
}
