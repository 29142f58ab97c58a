//! The behavioural suite every [`DedupStore`] must pass.
//!
//! idem runs it against the in-memory, Redis, PostgreSQL, SQLite and MariaDB stores so
//! they cannot drift apart; run it against your own store too. Each check uses keys
//! under the `scope` you pass (make it unique per run so runs can share a database)
//! and panics with a description on the first violation. It takes about two seconds:
//! lease expiry is tested with real time.
//!
//! It is compiled only with the `conformance` feature (`idem`'s feature of the same
//! name), which belongs in your dev-dependencies, so production builds compile none of
//! it. Call it from an integration test with a scope no other run uses:
//!
//! ```no_run
//! # async fn demo() {
//! let store = idem_core::MemoryStore::new();
//! let scope = format!("my-store-{}", uuid::Uuid::new_v4());
//! idem_core::conformance::run(&store, &scope).await;
//! # }
//! ```

use std::time::Duration;

use crate::dedup::{
    Claim, ClaimRequest, Completion, DedupStore, HeldClaim, OwnerToken, ScopedKey, StoreError,
    Terms,
};

mod batch;
mod concurrent;

pub use batch::{claim_many_as_one_by_one, complete_and_release_many};
pub use concurrent::{concurrent, race};

const LEASE: Duration = Duration::from_millis(400);
/// An hour's lease and retention: longer than any check.
const LONG: Terms = Terms::new(Duration::from_secs(3600), Duration::from_secs(3600));
/// Claims that run out within a check ([`LEASE`]), records that outlast it.
const SHORT_LEASE: Terms = Terms::new(LEASE, LONG.retention);
/// Claims that outlast a check, records that run out within it ([`LEASE`]).
const SHORT_RETENTION: Terms = Terms::new(LONG.lease, LEASE);

fn key(scope: &str, name: &str) -> ScopedKey {
    ScopedKey::new(format!("{scope}-consumer"), format!("{scope}-{name}"))
}

/// A claim of `k` by a fresh owner.
fn holder(k: &ScopedKey) -> HeldClaim {
    HeldClaim::new(k.clone(), OwnerToken::generate())
}

/// Claims `h` with fingerprint `fp-1`.
async fn claim(store: &dyn DedupStore, h: &HeldClaim, terms: Terms) -> Claim {
    let req = ClaimRequest {
        held: h.clone(),
        fingerprint: Some("fp-1".into()),
    };
    match store.claim(&req, terms).await {
        Ok(c) => c,
        Err(e) => panic!("claim of {} failed: {e}", h.key),
    }
}

/// Completes `h` with `completion`, kept for `terms.retention`.
async fn complete(
    store: &dyn DedupStore,
    h: &HeldClaim,
    completion: Completion,
    terms: Terms,
) -> bool {
    ok(store.complete(h, completion, terms).await, "complete")
}

/// `h` does not hold its key (a stranger, a stale owner): complete, release and
/// extend are refused.
async fn fenced_off(store: &dyn DedupStore, h: &HeldClaim, who: &str) {
    assert!(
        !complete(store, h, Completion::Succeeded, LONG).await,
        "{who} must not complete"
    );
    assert!(
        !ok(store.release(h).await, "release"),
        "{who} must not release"
    );
    assert!(
        !ok(store.extend(h, LONG).await, "extend"),
        "{who} must not extend"
    );
}

fn ok<T>(r: Result<T, StoreError>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

/// Runs every check. See the [module docs](self).
pub async fn run(store: &dyn DedupStore, scope: &str) {
    claim_complete_duplicate(store, scope).await;
    busy_while_held(store, scope).await;
    fencing(store, scope).await;
    release_frees(store, scope).await;
    poison_and_reopen(store, scope).await;
    scoped_by_consumer(store, scope).await;
    lease_expiry_and_extension(store, scope).await;
    retention_expiry(store, scope).await;
    claim_many_as_one_by_one(store, scope).await;
    complete_and_release_many(store, scope).await;
}

/// Absent -> processing -> done; a later claim sees `Done` with the fingerprint.
pub async fn claim_complete_duplicate(store: &dyn DedupStore, scope: &str) {
    let k = key(scope, "complete");
    let a = holder(&k);
    assert_eq!(claim(store, &a, LONG).await, Claim::Acquired, "first claim");
    assert!(
        complete(store, &a, Completion::Succeeded, LONG).await,
        "owner completes"
    );
    assert_eq!(
        claim(store, &holder(&k), LONG).await,
        Claim::Done {
            completion: Completion::Succeeded,
            fingerprint: Some("fp-1".into())
        },
        "claim after completion must see done"
    );
}

/// A live claim makes others wait, and says how long.
pub async fn busy_while_held(store: &dyn DedupStore, scope: &str) {
    let k = key(scope, "busy");
    assert_eq!(claim(store, &holder(&k), LONG).await, Claim::Acquired);
    match claim(store, &holder(&k), LONG).await {
        Claim::Busy { retry_in } => assert!(
            retry_in <= LONG.lease && retry_in > Duration::ZERO,
            "retry_in {retry_in:?}"
        ),
        other => panic!("second claim while held must be Busy, got {other:?}"),
    }
}

/// Only the owner may complete, release or extend.
pub async fn fencing(store: &dyn DedupStore, scope: &str) {
    let k = key(scope, "fencing");
    let (a, b) = (holder(&k), holder(&k));
    assert_eq!(claim(store, &a, LONG).await, Claim::Acquired);
    fenced_off(store, &b, "stranger").await;
    assert!(ok(store.extend(&a, LONG).await, "extend"), "owner extends");
    assert!(
        matches!(claim(store, &b, LONG).await, Claim::Busy { .. }),
        "still held by the owner"
    );
}

/// Release returns the key to absent.
pub async fn release_frees(store: &dyn DedupStore, scope: &str) {
    let k = key(scope, "release");
    let a = holder(&k);
    assert_eq!(claim(store, &a, LONG).await, Claim::Acquired);
    assert!(ok(store.release(&a).await, "release"), "owner releases");
    assert!(
        !ok(store.release(&a).await, "release"),
        "second release is a no-op"
    );
    assert_eq!(
        claim(store, &holder(&k), LONG).await,
        Claim::Acquired,
        "released key can be claimed"
    );
}

/// Poisoned records are done, and only they can be reopened.
pub async fn poison_and_reopen(store: &dyn DedupStore, scope: &str) {
    let k = key(scope, "poison");
    let (a, b, c) = (holder(&k), holder(&k), holder(&k));
    assert_eq!(claim(store, &a, LONG).await, Claim::Acquired);
    assert!(complete(store, &a, Completion::Poisoned, LONG).await);
    assert!(matches!(
        claim(store, &b, LONG).await,
        Claim::Done {
            completion: Completion::Poisoned,
            ..
        }
    ));
    assert!(
        ok(store.reopen_poisoned(&b, LONG).await, "reopen"),
        "poisoned record reopens"
    );
    assert!(
        !ok(store.reopen_poisoned(&c, LONG).await, "reopen"),
        "reopened record is processing now"
    );
    assert!(
        complete(store, &b, Completion::Succeeded, LONG).await,
        "new owner completes"
    );
    assert!(
        !ok(store.reopen_poisoned(&c, LONG).await, "reopen"),
        "succeeded record never reopens"
    );
}

/// The same key under two consumers is two records.
pub async fn scoped_by_consumer(store: &dyn DedupStore, scope: &str) {
    let k1 = ScopedKey::new(format!("{scope}-c1"), format!("{scope}-fanout"));
    let k2 = ScopedKey::new(format!("{scope}-c2"), format!("{scope}-fanout"));
    assert_eq!(claim(store, &holder(&k1), LONG).await, Claim::Acquired);
    assert_eq!(
        claim(store, &holder(&k2), LONG).await,
        Claim::Acquired,
        "other consumer claims independently"
    );
}

/// An expired lease can be taken over; the stale owner is then fenced off. An
/// extended lease is not taken over.
pub async fn lease_expiry_and_extension(store: &dyn DedupStore, scope: &str) {
    let k = key(scope, "expiry");
    let kx = key(scope, "extended");
    let (a, b, x, y) = (holder(&k), holder(&k), holder(&kx), holder(&kx));
    assert_eq!(claim(store, &a, SHORT_LEASE).await, Claim::Acquired);
    assert_eq!(claim(store, &x, SHORT_LEASE).await, Claim::Acquired);
    // Each extension asks for four leases: without them `kx` would lapse with `k`,
    // and the margin keeps the check from failing on a slow machine (a claim that
    // takes a few hundred milliseconds under load must still find `kx` held).
    for _ in 0..3 {
        tokio::time::sleep(LEASE / 3).await;
        assert!(
            ok(
                store
                    .extend(&x, Terms::new(LEASE * 4, LONG.retention))
                    .await,
                "extend"
            ),
            "extension of a live lease"
        );
    }
    tokio::time::sleep(LEASE / 3).await;
    // `k` is now past its lease; `kx` was extended a moment ago.
    assert!(
        matches!(claim(store, &y, SHORT_LEASE).await, Claim::Busy { .. }),
        "extended lease still held"
    );
    assert_eq!(
        claim(store, &b, LONG).await,
        Claim::Acquired,
        "expired lease is taken over"
    );
    fenced_off(store, &a, "stale owner").await;
    assert!(
        complete(store, &b, Completion::Succeeded, LONG).await,
        "new owner completes"
    );
}

/// A `done` record is forgotten after its retention.
pub async fn retention_expiry(store: &dyn DedupStore, scope: &str) {
    let k = key(scope, "retention");
    let a = holder(&k);
    assert_eq!(claim(store, &a, LONG).await, Claim::Acquired);
    assert!(complete(store, &a, Completion::Succeeded, SHORT_RETENTION).await);
    tokio::time::sleep(LEASE + LEASE / 2).await;
    assert_eq!(
        claim(store, &holder(&k), LONG).await,
        Claim::Acquired,
        "expired done record is gone"
    );
}
