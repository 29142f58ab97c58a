//! The lease-store batch path (`layer_batch`), on the memory store: each message of a
//! batch gets the outcome the per-message admission gives it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::fakes::{fresh_claim, lease_of, FakeStore};
use super::*;
use crate::batch::Batch;
use crate::crash::CrashLoopError;
use crate::{Consumer, Disposition, HandlerError, Message, State};

/// What the handler saw: one entry per call, the message ids of that call.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Vec<String>>>>);

impl Seen {
    fn calls(&self) -> Vec<Vec<String>> {
        self.0.lock().unwrap().clone()
    }
}

/// Body `poison` fails permanently, `sleep` takes 400 ms; the rest succeed.
async fn handler(State(seen): State<Seen>, batch: Batch<Message>) -> Result<(), HandlerError> {
    let ids = batch
        .iter()
        .map(|m| m.properties.message_id.clone().unwrap_or_default())
        .collect();
    seen.0.lock().unwrap().push(ids);
    batch
        .each(|item| async move {
            match &item.message().body[..] {
                b"poison" => Err(HandlerError::permanent("poison")),
                b"sleep" => {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Ok(())
                }
                _ => Ok(()),
            }
        })
        .await
}

fn consumer(layer: DedupLayer, size: usize, seen: &Seen) -> Consumer {
    Consumer::builder("lb")
        .dedup(layer)
        .batch_size(size)
        .batch_wait(Duration::from_secs(5))
        .batch_handler_with_state(handler, seen.clone())
        .unwrap()
}

/// A consumer of batches of two on `store` with a 90 ms lease (a `sleep` body outlasts
/// several), and what its handler saw.
fn short_lease_consumer(store: impl DedupStore) -> (Consumer, Seen) {
    let seen = Seen::default();
    let layer = DedupLayer::new(store).lease(Duration::from_millis(90));
    (consumer(layer, 2, &seen), seen)
}

/// Every delivery was acked, as a duplicate or not as `duplicate` says.
fn assert_all_acked(d: &[Disposition], duplicate: bool) {
    assert!(
        d.iter().all(|d| *d == Disposition::Ack { duplicate }),
        "{d:?}"
    );
}

fn msg(id: &str, body: &str) -> Message {
    Message::new(body.to_owned()).with_message_id(id)
}

async fn all(c: &Consumer, messages: Vec<Message>) -> Vec<Disposition> {
    futures_util::future::join_all(messages.into_iter().map(|m| c.process(m))).await
}

/// What a stranger's claim of `id` finds.
async fn look(store: &dyn DedupStore, id: &str) -> Claim {
    let stranger = fresh_claim("lb", id);
    let terms = lease_of(Duration::from_secs(1));
    store.claim(&stranger, terms).await.unwrap()
}

#[tokio::test]
async fn missing_keys_and_keys_twice_in_a_batch_are_decided_before_the_claim() {
    let seen = Seen::default();
    let c = consumer(DedupLayer::new(MemoryStore::new()), 3, &seen);
    let d = all(
        &c,
        vec![msg("a", "x"), Message::new("no id"), msg("a", "x")],
    )
    .await;
    assert_eq!(d[0], Disposition::Ack { duplicate: false });
    assert!(
        matches!(&d[1], Disposition::DeadLetter { failure, .. } if failure.error.contains("key")),
        "missing key is poison: {:?}",
        d[1]
    );
    assert!(
        matches!(&d[2], Disposition::Retry { failure, .. } if failure.attempts == 0),
        "the same key twice in one batch: the second is busy, {:?}",
        d[2]
    );
    assert_eq!(seen.calls(), vec![vec!["a".to_owned()]]);

    // With content hashes, a message without a key runs.
    let seen = Seen::default();
    let hashed = DedupLayer::new(MemoryStore::new()).missing_key(MissingKey::ContentHash);
    let c = consumer(hashed, 1, &seen);
    assert_eq!(
        c.process(Message::new("no id")).await,
        Disposition::Ack { duplicate: false }
    );
    assert_eq!(seen.calls().len(), 1);
}

#[tokio::test]
async fn a_crash_looping_message_is_dead_lettered_without_running() {
    let store = MemoryStore::new();
    let seen = Seen::default();
    let c = consumer(DedupLayer::new(store.clone()), 5, &seen);
    // Three starts that never settled (their leases ran out).
    for _ in 0..3 {
        let terms = Terms::new(Duration::from_millis(1), Duration::from_secs(60));
        let crashy = fresh_claim("lb", "crashy");
        let started = store.claim_counting(&crashy, terms);
        assert!(matches!(started.await.unwrap(), (Claim::Acquired, _)));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut suspect = msg("crashy", "x");
    suspect.delivery.redelivered = true;
    match c.process(suspect).await {
        Disposition::DeadLetter { failure, .. } => assert_eq!(
            failure.error,
            CrashLoopError { times: 3 }.to_string(),
            "the crash-loop error"
        ),
        other => panic!("expected a dead letter, got {other:?}"),
    }
    assert!(seen.calls().is_empty(), "the handler never ran");
    assert!(matches!(
        look(&store, "crashy").await,
        Claim::Done {
            completion: Completion::Poisoned,
            ..
        }
    ));
}

#[tokio::test]
async fn a_poisoned_key_runs_again_only_when_an_operator_replays_it() {
    let seen = Seen::default();
    let c = consumer(DedupLayer::new(MemoryStore::new()), 2, &seen);
    let d = all(&c, vec![msg("p", "poison"), msg("ok", "x")]).await;
    assert!(matches!(d[0], Disposition::DeadLetter { .. }), "{:?}", d[0]);
    let d = all(&c, vec![msg("p", "poison"), msg("ok", "x")]).await;
    assert!(
        matches!(&d[0], Disposition::DeadLetter { failure, .. } if failure.error.contains("dead-lettered as poison before")),
        "a plain redelivery of a poisoned key: {:?}",
        d[0]
    );
    assert_eq!(d[1], Disposition::Ack { duplicate: true });
    let replay = msg("p", "poison").with_header(REPLAY_HEADER, "op-1");
    let again = msg("p2", "x");
    let d = all(&c, vec![replay, again]).await;
    assert!(
        matches!(d[0], Disposition::DeadLetter { .. }),
        "poisoned again: {:?}",
        d[0]
    );
    assert_eq!(d[1], Disposition::Ack { duplicate: false });
    let calls = seen.calls();
    assert_eq!(
        calls.len(),
        2,
        "the plain redelivery's batch had nothing to run"
    );
    assert_eq!(
        calls[1],
        vec!["p".to_owned(), "p2".to_owned()],
        "the replay ran"
    );
}

#[tokio::test]
async fn a_store_that_does_not_answer_fails_each_message_as_a_store_failure() {
    let seen = Seen::default();
    let layer = DedupLayer::new(FakeStore::silent()).store_timeout(Duration::from_millis(30));
    let c = consumer(layer, 2, &seen);
    let d = all(&c, vec![msg("s1", "x"), msg("s2", "x")]).await;
    for d in d {
        match d {
            Disposition::Retry { failure, .. } => {
                assert!(failure.error.contains("timed out"), "{}", failure.error)
            }
            Disposition::Release { reason } => assert!(reason.contains("timed out"), "{reason}"),
            other => panic!("expected a store failure, got {other:?}"),
        }
    }
    assert!(seen.calls().is_empty(), "never run without a claim");
}

#[tokio::test(start_paused = true)]
async fn leases_are_extended_while_the_batch_runs() {
    let store = MemoryStore::new();
    let (c, _seen) = short_lease_consumer(store.clone());
    let running = tokio::spawn({
        let c = c.clone();
        async move { all(&c, vec![msg("l1", "sleep"), msg("l2", "x")]).await }
    });
    // Well past the first lease: both keys are still held.
    tokio::time::sleep(Duration::from_millis(250)).await;
    for id in ["l1", "l2"] {
        assert!(
            matches!(look(&store, id).await, Claim::Busy { .. }),
            "{id} is held"
        );
    }
    let d = running.await.unwrap();
    assert_all_acked(&d, false);
}

#[tokio::test(start_paused = true)]
async fn completions_that_find_their_leases_gone_are_recorded_all_the_same() {
    let (c, seen) = short_lease_consumer(FakeStore::no_extend());
    let d = all(&c, vec![msg("e1", "sleep"), msg("e2", "sleep")]).await;
    assert_all_acked(&d, false);
    // No one took the keys meanwhile: the redeliveries are duplicates.
    let d = all(&c, vec![msg("e1", "sleep"), msg("e2", "sleep")]).await;
    assert_all_acked(&d, true);
    assert_eq!(seen.calls().len(), 1);
}

/// Counts the calls on many keys, forwarding everything to a memory store.
#[derive(Clone, Default)]
struct Many {
    store: MemoryStore,
    claims: Arc<AtomicUsize>,
    completions: Arc<AtomicUsize>,
    single: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl DedupStore for Many {
    async fn claim(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<Claim> {
        self.single.fetch_add(1, Ordering::SeqCst);
        self.store.claim(req, terms).await
    }
    async fn claim_many(&self, requests: &[ClaimRequest], terms: Terms) -> Answers<CountedClaim> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        self.store.claim_many(requests, terms).await
    }
    async fn extend(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        self.store.extend(held, terms).await
    }
    async fn complete(&self, held: &HeldClaim, how: Completion, terms: Terms) -> StoreResult<bool> {
        self.single.fetch_add(1, Ordering::SeqCst);
        self.store.complete(held, how, terms).await
    }
    async fn complete_many(&self, requests: &[CompleteRequest], terms: Terms) -> Answers<bool> {
        self.completions.fetch_add(1, Ordering::SeqCst);
        self.store.complete_many(requests, terms).await
    }
    async fn release(&self, held: &HeldClaim) -> StoreResult<bool> {
        self.single.fetch_add(1, Ordering::SeqCst);
        self.store.release(held).await
    }
    async fn reopen_poisoned(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        self.store.reopen_poisoned(held, terms).await
    }
}

#[tokio::test]
async fn a_batch_is_one_claim_call_and_one_completion_call() {
    let store = Many::default();
    let seen = Seen::default();
    let c = consumer(DedupLayer::new(store.clone()), 4, &seen);
    let d = all(
        &c,
        vec![
            msg("m1", "x"),
            msg("m2", "poison"),
            msg("m3", "x"),
            msg("m4", "x"),
        ],
    )
    .await;
    assert!(matches!(d[1], Disposition::DeadLetter { .. }));
    assert_eq!(store.claims.load(Ordering::SeqCst), 1);
    assert_eq!(store.completions.load(Ordering::SeqCst), 1);
    assert_eq!(store.single.load(Ordering::SeqCst), 0, "no single-key call");
}

async fn count_each(
    State(fx): State<Arc<Mutex<std::collections::HashMap<String, u64>>>>,
    batch: Batch<crate::IdempotencyKey>,
) {
    for item in batch {
        *fx.lock().unwrap().entry(item.into_inner().0).or_default() += 1;
    }
}

/// `idem_core::testing`'s harness (duplicates, concurrent copies, crashes, transient
/// failures, reordering) on a batch handler over the memory store: no violation. The
/// trouble layer wraps each message on its way into the batch stage, so its crash
/// points sit outside the batch's claim and completion; the lease-store window (a
/// crash between a batch's effects and its completion call) is allowed, as for every
/// lease store, and is exercised by the chaos runs' kills instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_passes_on_a_batch_handler_over_a_lease_store() {
    let fx: Arc<Mutex<std::collections::HashMap<String, u64>>> = Arc::default();
    let state = fx.clone();
    let report = crate::testing::Harness::new(move |trouble| {
        Consumer::builder("harness-batch")
            .dedup(DedupLayer::new(MemoryStore::new()).lease(Duration::from_secs(2)))
            .layer(trouble)
            .batch_size(8)
            .batch_wait(Duration::from_millis(5))
            .batch_handler_with_state(count_each, state)
    })
    .messages((0..60).map(|i| Message::new("{}").with_message_id(format!("h-{i}"))))
    .seed(5)
    .run(move |key| {
        let n = fx.lock().unwrap().get(&key).copied().unwrap_or(0);
        std::future::ready(Ok::<u64, std::convert::Infallible>(n))
    })
    .await
    .unwrap();
    eprintln!("{report}");
    report.assert_ok_allowing_lease_window();
}
