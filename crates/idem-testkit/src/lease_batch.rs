//! A batch handler over a lease store, checked end to end: [`check`] runs one batch of
//! 20 messages holding every per-message outcome through a consumer whose store is
//! wrapped in a [`CountingStore`], and asserts each message's disposition, what the
//! handler saw, the records left behind, and that the batch cost the store one claim
//! call and one completion call (plus one release call for its transiently failed message).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use idem_core::batch::Batch;
use idem_core::dedup::{
    Answers, Claim, ClaimRequest, CompleteRequest, Completion, CountedClaim, DedupStore, HeldClaim,
    OwnerToken, ScopedKey, StoreResult, Terms,
};
use idem_core::{Consumer, Disposition, HandlerError, IdempotencyKey, Message, State};

/// How many calls of each kind a [`CountingStore`] forwarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Calls {
    /// `claim` and `claim_counting`.
    pub claim: usize,
    /// `claim_many`.
    pub claim_many: usize,
    /// `complete`.
    pub complete: usize,
    /// `complete_many`.
    pub complete_many: usize,
    /// `release`.
    pub release: usize,
    /// `release_many`.
    pub release_many: usize,
    /// `extend` and `reopen_poisoned`.
    pub other: usize,
}

#[derive(Default)]
struct Counters([AtomicUsize; 7]);

/// A [`DedupStore`] that forwards every call to another and counts them by kind.
pub struct CountingStore {
    inner: Arc<dyn DedupStore>,
    counts: Counters,
}

impl std::fmt::Debug for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingStore")
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}

impl CountingStore {
    /// Counts the calls made to `inner`.
    pub fn new(inner: Arc<dyn DedupStore>) -> Self {
        CountingStore {
            inner,
            counts: Counters::default(),
        }
    }

    /// The calls so far.
    pub fn calls(&self) -> Calls {
        let n = |i: usize| self.counts.0[i].load(Ordering::SeqCst);
        Calls {
            claim: n(0),
            claim_many: n(1),
            complete: n(2),
            complete_many: n(3),
            release: n(4),
            release_many: n(5),
            other: n(6),
        }
    }

    fn count(&self, i: usize) {
        self.counts.0[i].fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl DedupStore for CountingStore {
    async fn claim(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<Claim> {
        self.count(0);
        self.inner.claim(req, terms).await
    }
    async fn claim_counting(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<CountedClaim> {
        self.count(0);
        self.inner.claim_counting(req, terms).await
    }
    async fn claim_many(&self, requests: &[ClaimRequest], terms: Terms) -> Answers<CountedClaim> {
        self.count(1);
        self.inner.claim_many(requests, terms).await
    }
    async fn extend(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        self.count(6);
        self.inner.extend(held, terms).await
    }
    async fn complete(&self, held: &HeldClaim, how: Completion, terms: Terms) -> StoreResult<bool> {
        self.count(2);
        self.inner.complete(held, how, terms).await
    }
    async fn complete_many(&self, requests: &[CompleteRequest], terms: Terms) -> Answers<bool> {
        self.count(3);
        self.inner.complete_many(requests, terms).await
    }
    async fn release(&self, held: &HeldClaim) -> StoreResult<bool> {
        self.count(4);
        self.inner.release(held).await
    }
    async fn release_many(&self, claims: &[HeldClaim]) -> Answers<bool> {
        self.count(5);
        self.inner.release_many(claims).await
    }
    async fn reopen_poisoned(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        self.count(6);
        self.inner.reopen_poisoned(held, terms).await
    }
}

/// What the batch handler saw: its calls, and the keys of the messages in them.
#[derive(Clone, Default)]
struct Seen {
    calls: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<String>>>,
}

/// Bodies `poison`, `transient` and `discard` fail that way; the rest succeed.
async fn by_body(State(seen): State<Seen>, batch: Batch<Message>) -> Result<(), HandlerError> {
    seen.calls.fetch_add(1, Ordering::SeqCst);
    batch
        .each(|item| {
            let seen = seen.clone();
            async move {
                let IdempotencyKey(key) = item.extract()?;
                seen.keys.lock().unwrap().push(key);
                match &item.message().body[..] {
                    b"poison" => Err(HandlerError::permanent("poison")),
                    b"transient" => Err(HandlerError::transient("try later")),
                    b"discard" => Err(HandlerError::discard("not wanted")),
                    _ => Ok(()),
                }
            }
        })
        .await
}

fn msg(id: &str, body: &str) -> Message {
    Message::new(body.to_owned()).with_message_id(id)
}

async fn process_all(consumer: &Consumer, messages: Vec<Message>) -> Vec<Disposition> {
    let tasks: Vec<_> = messages
        .into_iter()
        .map(|m| {
            let c = consumer.clone();
            tokio::spawn(async move { c.process(m).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The messages of [`check`]'s batch besides its 14 successes: key (`<name>-` and
/// this), body, and the disposition it must get.
type Outcome = (&'static str, &'static str, fn(&Disposition) -> bool);

/// [`Outcome`]s: poison, transient, discarded, duplicate, payload mismatch, busy.
const OUTCOMES: [Outcome; 6] = [
    ("poison", "poison", |d| {
        matches!(d, Disposition::DeadLetter { .. })
    }),
    (
        "transient",
        "transient",
        |d| matches!(d, Disposition::Retry { failure, .. } if failure.attempts == 1),
    ),
    ("discard", "discard", |d| {
        matches!(d, Disposition::Discard { .. })
    }),
    ("dup", "ok", |d| *d == Disposition::Ack { duplicate: true }),
    (
        "mismatch",
        "B",
        |d| matches!(d, Disposition::DeadLetter { failure, .. } if failure.error.contains("different payload")),
    ),
    // Retried without spending an attempt.
    (
        "busy",
        "ok",
        |d| matches!(d, Disposition::Retry { failure, .. } if failure.attempts == 0),
    ),
];

/// One batch of 20 messages of consumer `name` over `store` (keys are the message ids
/// `<name>-...`; the caller cleans the store up): 14 that succeed, and one each that
/// is poison, fails transiently, is discarded, is a duplicate (its key done), carries
/// another payload than its done key's, and is busy (its key held elsewhere). Asserts
/// every message's disposition, that only the 17 admitted messages reached the
/// handler (in one call), the records left behind, and the store calls of the batch:
/// one `claim_many`, one `complete_many`, one `release` (one key to give back),
/// and no other call.
pub async fn check(store: Arc<dyn DedupStore>, name: &str) {
    let id = |what: &str| format!("{name}-{what}");
    prepare(&store, name).await;
    let counting = Arc::new(CountingStore::new(store.clone()));
    let seen = Seen::default();
    let consumer = Consumer::builder(name)
        .store(counting.clone())
        .batch_size(20)
        .batch_wait(Duration::from_secs(30))
        .batch_handler_with_state(by_body, seen.clone())
        .unwrap();
    let mut messages: Vec<Message> = (0..14).map(|i| msg(&id(&format!("ok{i}")), "ok")).collect();
    messages.extend(OUTCOMES.iter().map(|(what, body, _)| msg(&id(what), body)));
    let d = process_all(&consumer, messages).await;

    for (i, d) in d.iter().take(14).enumerate() {
        assert_eq!(*d, Disposition::Ack { duplicate: false }, "ok{i}");
    }
    for ((what, _, expected), d) in OUTCOMES.iter().zip(&d[14..]) {
        assert!(expected(d), "{what}: {d:?}");
    }

    assert_eq!(seen.calls.load(Ordering::SeqCst), 1, "one handler call");
    let mut keys = seen.keys.lock().unwrap().clone();
    keys.sort();
    let mut admitted: Vec<String> = (0..14).map(|i| id(&format!("ok{i}"))).collect();
    admitted.extend(["poison", "transient", "discard"].map(id));
    admitted.sort();
    assert_eq!(keys, admitted, "only admitted messages reach the handler");

    assert_eq!(
        counting.calls(),
        Calls {
            claim_many: 1,
            complete_many: 1,
            // One key to give back: the single-key call.
            release: 1,
            ..Calls::default()
        },
        "one claim call, one completion call and one release call for the batch"
    );

    records_left(&store, name).await;
}

/// An hour's lease and retention: longer than the check.
const LONG: Terms = Terms::new(Duration::from_secs(3600), Duration::from_secs(3600));

/// The done and held keys of [`check`]: `dup` done with body `ok`, `mismatch` done
/// with body `A` (through a per-message consumer), `busy` held by a stranger.
async fn prepare(store: &Arc<dyn DedupStore>, name: &str) {
    let id = |what: &str| format!("{name}-{what}");
    let single = Consumer::builder(name)
        .store(store.clone())
        .handler(|| async {})
        .unwrap();
    for (what, body) in [("dup", "ok"), ("mismatch", "A")] {
        let d = single.process(msg(&id(what), body)).await;
        assert_eq!(d, Disposition::Ack { duplicate: false });
    }
    assert_eq!(look(store, name, "busy").await, Claim::Acquired);
}

/// A claim of `{name}-{what}` (consumer `name`) by a fresh owner: what the store holds.
async fn look(store: &Arc<dyn DedupStore>, name: &str, what: &str) -> Claim {
    let key = ScopedKey::new(name, format!("{name}-{what}"));
    let req = ClaimRequest::new(key, OwnerToken::generate(), None);
    store.claim(&req, LONG).await.unwrap()
}

/// The records [`check`]'s batch left: done for the succeeded and discarded, poisoned,
/// released for the transient failure, the busy key untouched.
async fn records_left(store: &Arc<dyn DedupStore>, name: &str) {
    let look = |what| look(store, name, what);
    for what in ["ok0", "ok13", "discard"] {
        let found = look(what).await;
        assert!(
            matches!(
                found,
                Claim::Done {
                    completion: Completion::Succeeded,
                    ..
                }
            ),
            "{what}: {found:?}"
        );
    }
    let found = look("poison").await;
    assert!(
        matches!(
            found,
            Claim::Done {
                completion: Completion::Poisoned,
                ..
            }
        ),
        "poison: {found:?}"
    );
    assert_eq!(
        look("transient").await,
        Claim::Acquired,
        "transient: released"
    );
    assert!(
        matches!(look("busy").await, Claim::Busy { .. }),
        "busy: untouched"
    );
}
