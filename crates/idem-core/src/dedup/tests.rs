use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tower::{Service, ServiceBuilder, ServiceExt};

use super::*;
use crate::classify::ClassifyLayer;
use crate::error::{ErrorKind, HandlerError};
use crate::message::Message;

type Svc = tower::util::BoxCloneSyncService<Message, Processed, HandlerError>;

/// How many times a handler of [`stack`] ran.
#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

impl Runs {
    /// The runs so far.
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// `layer` over a handler that answers `result` and counts its runs.
fn stack(layer: DedupLayer, result: fn(&Message) -> Result<(), HandlerError>) -> (Svc, Runs) {
    let runs = Runs::default();
    let counter = runs.0.clone();
    let handler = tower::service_fn(move |m: Message| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            result(&m)
        }
    });
    let svc = tower::util::BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(layer)
            .layer(ClassifyLayer::default())
            .service(handler),
    );
    (svc, runs)
}

/// The dedup layer on `store`, scope `c`.
fn scoped(store: impl DedupStore) -> DedupLayer {
    DedupLayer::new(store).scope("c")
}

/// A message with body `body` and key `k`.
fn keyed(body: &str) -> Message {
    Message::new(body.to_owned()).with_message_id("k")
}

/// Sends `m` through `svc` twice: the first is handled, the second is a duplicate.
async fn assert_handled_then_duplicate(svc: &Svc, m: Message) {
    assert_eq!(
        svc.clone().oneshot(m.clone()).await.unwrap(),
        Processed::Handled
    );
    assert_eq!(svc.clone().oneshot(m).await.unwrap(), Processed::Duplicate);
}

#[tokio::test]
async fn duplicate_is_acked_without_running() {
    let (svc, runs) = stack(scoped(MemoryStore::new()), |_| Ok(()));
    assert_handled_then_duplicate(&svc, keyed("a")).await;
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn same_key_different_payload_is_poison() {
    let (svc, runs) = stack(scoped(MemoryStore::new()), |_| Ok(()));
    svc.clone().oneshot(keyed("a")).await.unwrap();
    let err = svc.oneshot(keyed("b")).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::Permanent));
    assert!(err.chain().contains("different payload"), "{}", err.chain());
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn missing_key_is_poison_or_content_hash() {
    let (svc, runs) = stack(scoped(MemoryStore::new()), |_| Ok(()));
    let err = svc.oneshot(Message::new("a")).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::Permanent));
    assert_eq!(runs.get(), 0, "no key, no run");

    let layer = scoped(MemoryStore::new()).missing_key(MissingKey::ContentHash);
    let (svc, _) = stack(layer, |_| Ok(()));
    assert_handled_then_duplicate(&svc, Message::new("a")).await;
    assert!(svc.oneshot(Message::new("b")).await.unwrap().is_handled());
}

#[tokio::test]
async fn oversized_key_is_poison() {
    let (svc, runs) = stack(scoped(MemoryStore::new()), |_| Ok(()));
    let err = svc
        .oneshot(Message::new("a").with_message_id("k".repeat(MAX_KEY_LEN + 1)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::Permanent));
    assert_eq!(runs.get(), 0);
}

#[tokio::test]
async fn transient_failure_releases_so_a_retry_runs() {
    let store = MemoryStore::new();
    let (failing, runs) = stack(scoped(store.clone()), |_| {
        Err(HandlerError::transient("db down"))
    });
    let msg = keyed("a");
    let ctx = msg.context.clone();
    let err = failing.oneshot(msg).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::Transient));
    assert_eq!(
        ctx.key(),
        Some("k"),
        "the key is recorded in the delivery's context for the DLQ headers"
    );
    let (ok, retried) = stack(scoped(store), |_| Ok(()));
    assert!(ok.oneshot(keyed("a")).await.unwrap().is_handled());
    assert_eq!((runs.get(), retried.get()), (1, 1));
}

#[tokio::test]
async fn poison_is_done_and_only_a_replay_reopens_it() {
    let store = MemoryStore::new();
    let (poison, runs) = stack(scoped(store.clone()), |m| {
        if m.header_str(REPLAY_HEADER).is_some() {
            Ok(())
        } else {
            Err(HandlerError::permanent("bad"))
        }
    });
    assert!(poison.clone().oneshot(keyed("a")).await.is_err());
    let again = poison.clone().oneshot(keyed("a")).await.unwrap_err();
    assert_eq!(
        again.kind(),
        Some(ErrorKind::Permanent),
        "a plain redelivery is dead-lettered again, not dropped"
    );
    assert!(again.chain().contains("dead-lettered as poison before"));
    let replay = keyed("a").with_header(REPLAY_HEADER, "op-1");
    assert!(
        poison
            .clone()
            .oneshot(replay.clone())
            .await
            .unwrap()
            .is_handled(),
        "operator replay reruns it"
    );
    assert!(
        poison.oneshot(replay).await.unwrap().is_duplicate(),
        "a replay of a success is a duplicate"
    );
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn an_edited_replay_is_a_new_version_of_the_same_message() {
    let store = MemoryStore::new();
    // Fails on a negative amount, as a validation error would.
    let (svc, runs) = stack(scoped(store.clone()), |m| {
        if m.body.starts_with(b"-") {
            Err(HandlerError::permanent("negative amount"))
        } else {
            Ok(())
        }
    });
    let original = Message::new("-500").with_message_id("k");
    assert!(svc.clone().oneshot(original.clone()).await.is_err());
    let original_fp = super::key::sha256_hex(b"-500");
    let edited = || {
        Message::new("500")
            .with_message_id("k")
            .with_header(EDITED_HEADER, "2026-12-06T08:00:00.000Z")
            .with_header(ORIGINAL_FINGERPRINT_HEADER, original_fp.as_str())
    };
    // Edited but not replayed: the poisoned record still holds it back.
    assert!(svc.clone().oneshot(edited()).await.is_err());
    // Replayed: no payload mismatch, runs once on the edited body.
    let replayed = edited().with_header(REPLAY_HEADER, "op-1");
    assert!(svc
        .clone()
        .oneshot(replayed.clone())
        .await
        .unwrap()
        .is_handled());
    assert_eq!(runs.get(), 2);
    // Once done, a redelivery of the edited copy and a replay of the original are
    // duplicates.
    assert!(svc.clone().oneshot(replayed).await.unwrap().is_duplicate());
    let original_replay = original.with_header(REPLAY_HEADER, "op-2");
    assert!(svc
        .clone()
        .oneshot(original_replay)
        .await
        .unwrap()
        .is_duplicate());
    // A body that claims to be edited from another payload is still a mismatch.
    let unrelated = Message::new("700")
        .with_message_id("k")
        .with_header(
            ORIGINAL_FINGERPRINT_HEADER,
            super::key::sha256_hex(b"other").as_str(),
        )
        .with_header(REPLAY_HEADER, "op-3");
    let err = svc.oneshot(unrelated).await.unwrap_err();
    assert!(err.chain().contains("different payload"), "{}", err.chain());
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn busy_elsewhere_is_retried_without_spending_an_attempt() {
    let store = MemoryStore::new();
    store
        .claim(&fresh_claim("c", "k"), lease_of(Duration::from_secs(20)))
        .await
        .unwrap();
    let (svc, runs) = stack(scoped(store), |_| Ok(()));
    let err = svc.oneshot(keyed("a")).await.unwrap_err();
    assert!(!err.counts_attempt());
    assert_eq!(err.kind(), Some(ErrorKind::Transient));
    let delay = err.retry_delay().unwrap();
    assert!(
        delay > Duration::from_secs(1) && delay <= Duration::from_secs(20),
        "{delay:?}"
    );
    assert_eq!(runs.get(), 0);
}

use super::fakes::{fresh_claim, lease_of, FakeStore};

#[tokio::test]
async fn store_down_is_transient_and_the_handler_does_not_run() {
    let (svc, runs) = stack(scoped(FakeStore::down()), |_| Ok(()));
    let err = svc.oneshot(keyed("a")).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::Transient));
    assert!(err.counts_attempt());
    assert!(
        err.chain().contains("dedup store unavailable"),
        "{}",
        err.chain()
    );
    assert_eq!(runs.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn long_handler_keeps_its_lease() {
    let store = MemoryStore::new();
    let layer = DedupLayer::new(store.clone())
        .scope("c")
        .lease(Duration::from_secs(3));
    let slow = tower::service_fn(|_m: Message| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok::<(), HandlerError>(())
    });
    let mut svc = ServiceBuilder::new().layer(layer).service(slow);
    let fut = svc.call(keyed("a"));
    let handle = tokio::spawn(fut);
    tokio::time::sleep(Duration::from_secs(7)).await;
    // Well past the 3 s lease: still held thanks to extensions.
    let other = store
        .claim(&fresh_claim("c", "k"), lease_of(Duration::from_secs(3)))
        .await
        .unwrap();
    assert!(matches!(other, Claim::Busy { .. }), "{other:?}");
    assert!(handle.await.unwrap().unwrap().is_handled());
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Claim(usize),
    Complete(usize),
    Release(usize),
    Extend(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..2usize).prop_map(Op::Claim),
        (0..2usize).prop_map(Op::Complete),
        (0..2usize).prop_map(Op::Release),
        (0..2usize).prop_map(Op::Extend),
        (0..1500u64).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Random interleavings of two owners against a reference model: both never hold a
    /// live claim at once, a stale owner never changes state, and a completion is never
    /// lost.
    #[test]
    fn state_machine_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let terms = Terms::new(Duration::from_millis(1000), Duration::from_secs(1_000_000));
            let store = MemoryStore::new();
            let owners = [fresh_claim("c", "k"), fresh_claim("c", "k")];
            // Model: who holds the claim and until when (ms), or done.
            let mut now: u64 = 0;
            let mut holder: Option<(usize, u64)> = None;
            let mut done = false;
            for op in ops {
                let live = |h: Option<(usize, u64)>, now: u64| h.filter(|&(_, until)| until > now);
                match op {
                    Op::Advance(ms) => {
                        tokio::time::advance(Duration::from_millis(ms)).await;
                        now += ms;
                    }
                    Op::Claim(o) => {
                        let got = store.claim(&owners[o], terms).await.unwrap();
                        let expected_acquire = !done && live(holder, now).is_none();
                        if done {
                            prop_assert!(matches!(got, Claim::Done { .. }), "completion lost: {:?}", got);
                        } else if expected_acquire {
                            prop_assert_eq!(got, Claim::Acquired);
                            holder = Some((o, now + 1000));
                        } else {
                            prop_assert!(matches!(got, Claim::Busy { .. }), "both could run: {:?}", got);
                        }
                    }
                    Op::Complete(o) => {
                        let ok = store.complete(&owners[o].held, Completion::Succeeded, terms).await.unwrap();
                        let expected = live(holder, now).is_some_and(|(h, _)| h == o) && !done;
                        prop_assert_eq!(ok, expected, "complete by {}", o);
                        if ok { done = true; holder = None; }
                    }
                    Op::Release(o) => {
                        let ok = store.release(&owners[o].held).await.unwrap();
                        let expected = live(holder, now).is_some_and(|(h, _)| h == o) && !done;
                        prop_assert_eq!(ok, expected, "release by {}", o);
                        if ok { holder = None; }
                    }
                    Op::Extend(o) => {
                        let ok = store.extend(&owners[o].held, terms).await.unwrap();
                        let expected = live(holder, now).is_some_and(|(h, _)| h == o) && !done;
                        prop_assert_eq!(ok, expected, "extend by {}", o);
                        if ok { holder = Some((o, now + 1000)); }
                    }
                }
            }
            Ok(())
        })?;
    }
}

/// A worker that claimed `key` and died: the claim is never settled.
async fn crash_once(store: &MemoryStore, key: &str, lease: Duration) -> Option<u32> {
    let (claim, earlier) = store
        .claim_counting(
            &fresh_claim("c", key),
            Terms::new(lease, Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(claim, Claim::Acquired);
    tokio::time::sleep(lease + Duration::from_millis(15)).await;
    earlier
}

#[tokio::test]
async fn crash_limit_dead_letters_without_running() {
    let store = MemoryStore::new();
    let lease = Duration::from_millis(30);
    let (svc, runs) = stack(scoped(store.clone()).lease(lease), |_| Ok(()));
    for n in 0..3 {
        assert_eq!(crash_once(&store, "k", lease).await, Some(n));
    }
    let mut m = keyed("a");
    m.context = m.context.with_crash_guard(crate::crash::CrashGuard::new(3));
    let err = svc.clone().oneshot(m).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::Permanent));
    assert!(
        err.chain().contains("crashed or hung the worker 3 times"),
        "{}",
        err.chain()
    );
    assert_eq!(runs.get(), 0, "not run again");
    // Recorded as poison: a plain redelivery is dead-lettered again, still without running.
    let again = svc.oneshot(keyed("a")).await.unwrap_err();
    assert_eq!(again.kind(), Some(ErrorKind::Permanent));
    assert_eq!(runs.get(), 0);
}

#[tokio::test]
async fn crash_count_below_the_limit_runs_and_a_settled_outcome_clears_it() {
    let store = MemoryStore::new();
    let lease = Duration::from_millis(30);
    let (svc, runs) = stack(scoped(store.clone()).lease(lease), |_| {
        Err(HandlerError::transient("down"))
    });
    for n in 0..2 {
        assert_eq!(crash_once(&store, "k", lease).await, Some(n));
    }
    let mut m = keyed("a");
    m.context = m.context.with_crash_guard(crate::crash::CrashGuard::new(3));
    let err = svc.oneshot(m).await.unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::Transient));
    assert_eq!(runs.get(), 1, "two crashes are below the limit");
    // The transient failure settled the start: counting begins again.
    assert_eq!(crash_once(&store, "k", lease).await, Some(0));
}

/// The consumer's name scopes the keys, whatever scope the layer was given: the
/// dedup scope is always the name in `x-idem-consumer`.
#[tokio::test]
async fn consumer_name_scopes_the_keys() {
    use crate::{Consumer, Disposition};
    let store = MemoryStore::new();
    let consumer = |name: &str, layer: DedupLayer| {
        Consumer::builder(name)
            .dedup(layer)
            .handler(|| async {})
            .unwrap()
    };
    let billing = consumer("billing", DedupLayer::new(store.clone()).scope("other"));
    assert_eq!(
        billing.process(keyed("a")).await,
        Disposition::Ack { duplicate: false }
    );
    // Same consumer name, different layer scope: still the same keys.
    let again = consumer("billing", DedupLayer::new(store.clone()));
    assert_eq!(
        again.process(keyed("a")).await,
        Disposition::Ack { duplicate: true }
    );
    // Another consumer on the same store has keys of its own.
    let audit = consumer("audit", DedupLayer::new(store.clone()));
    assert_eq!(
        audit.process(keyed("a")).await,
        Disposition::Ack { duplicate: false }
    );
    let lease = lease_of(Duration::from_secs(1));
    assert!(matches!(
        store
            .claim(&fresh_claim("billing", "k"), lease)
            .await
            .unwrap(),
        Claim::Done { .. }
    ));
    assert_eq!(
        store
            .claim(&fresh_claim("other", "k"), lease)
            .await
            .unwrap(),
        Claim::Acquired
    );
}
