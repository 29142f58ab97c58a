//! `idem_core::testing` with the Redis lease store (REDIS_URL, default
//! redis://127.0.0.1:6379): a crash after the handler's effect, before the dedup
//! record completes, re-runs the handler once the lease expires. The harness reports
//! those re-runs as the lease-store window, apart from violations, and hides none.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::testing::{CrashPoint, Expected, Harness, Profile};
use idem_core::{Consumer, DedupLayer, IdempotencyKey, Message, State};

mod common;
use common::{cleanup, store};

type Effects = Arc<Mutex<HashMap<String, u64>>>;

async fn send_email(State(fx): State<Effects>, key: IdempotencyKey) {
    *fx.lock().unwrap().entry(key.0).or_default() += 1;
}

async fn run(prefix: &str, profile: Profile, n: usize, seed: u64) -> idem_core::testing::Report {
    let s = store(prefix).await;
    let fx = Effects::default();
    let (state, counted) = (fx.clone(), fx.clone());
    let layer_store = s.clone();
    let report = Harness::new(move |trouble| {
        // A short lease: a crashed delivery's claim expires in real time.
        let dedup = DedupLayer::new(layer_store).lease(Duration::from_secs(2));
        Consumer::builder("harness-redis")
            .dedup(dedup)
            .layer(trouble)
            .handler_with_state(send_email, state)
    })
    .messages((0..n).map(|i| Message::new("{}").with_message_id(format!("mail-{i}"))))
    .profile(profile)
    .seed(seed)
    .run(move |key| {
        let n = counted.lock().unwrap().get(&key).copied().unwrap_or(0);
        async move { Ok::<u64, std::convert::Infallible>(n) }
    })
    .await
    .unwrap();
    cleanup(&s).await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_effect_reruns_are_reported_as_the_lease_window() {
    let prefix = idem_testkit::unique("harness");
    let report = run(&prefix, Profile::crash_at(CrashPoint::AfterEffect), 10, 1).await;
    // Every message crashed after its effect: each re-ran once the lease expired.
    assert_eq!(report.windows().len(), 10, "{report}");
    assert!(report.violations().is_empty(), "{report}");
    for w in report.windows() {
        assert_eq!(
            (w.expected, w.observed),
            (Expected::ExactlyOne, 2),
            "{report}"
        );
        assert!(
            w.events[0]
                .contains("crashed after the handler's effect, before the dedup record completes"),
            "{report}"
        );
    }
    let text = report.to_string();
    assert!(
        text.contains("lease store") && text.contains("10 key(s) re-ran in the lease-store window"),
        "{text}"
    );
    report.assert_ok_allowing_lease_window();
    assert!(std::panic::catch_unwind(|| report.assert_ok()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_profile_has_no_violation_and_names_its_windows() {
    let prefix = idem_testkit::unique("harness");
    let report = run(&prefix, Profile::default(), 200, 7).await;
    // This handler's effect is a plain counter: the repeats are real, and only the
    // opt-in assertion accepts them.
    report.assert_ok_allowing_lease_window();
    assert!(!report.is_ok());
    let t = report.totals();
    // The other crash points never repeat an effect on a lease store; only crashes
    // after the effect can, and each such key is named.
    assert!(!report.windows().is_empty(), "{report}");
    assert!(
        report.windows().len() as u64 <= t.crashes[CrashPoint::AfterEffect as usize],
        "{report}"
    );
}
