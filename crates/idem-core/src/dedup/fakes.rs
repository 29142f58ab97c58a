//! A store that fails on purpose, for the unit tests of the dedup stage, the bound on
//! store calls, the circuit breaker and the consumer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    Claim, ClaimRequest, Completion, DedupStore, HeldClaim, MemoryStore, OwnerToken, ScopedKey,
    StoreError, StoreResult, Terms,
};

/// A claim of `consumer/key` by a fresh owner, without fingerprint.
pub(crate) fn fresh_claim(consumer: &str, key: &str) -> ClaimRequest {
    ClaimRequest::new(ScopedKey::new(consumer, key), OwnerToken::generate(), None)
}

/// Claims held for `lease`, `done` records kept a day: the terms of a test that
/// only claims.
pub(crate) fn lease_of(lease: Duration) -> Terms {
    Terms::new(lease, Duration::from_secs(24 * 3600))
}

/// A memory store that can be cut: while `down`, every call fails ("connection
/// refused"); a silent one never answers. Clones share the switch and the counts.
#[derive(Clone, Default)]
pub(crate) struct FakeStore {
    store: MemoryStore,
    /// Every call fails while this is set.
    pub(crate) down: Arc<AtomicBool>,
    /// No call ever answers.
    silent: bool,
    /// Lease extensions fail (a store or process too slow to extend in time): every
    /// claim runs out after its first lease.
    no_extend: bool,
    /// Calls that reached the store while it was down (probes included).
    pub(crate) calls_while_down: Arc<AtomicUsize>,
    /// Health probes run.
    pub(crate) probes: Arc<AtomicUsize>,
}

impl FakeStore {
    /// A store that is down from the start: the stage must fail closed.
    pub(crate) fn down() -> Self {
        let store = FakeStore::default();
        store.down.store(true, Ordering::SeqCst);
        store
    }

    /// A store that never answers.
    pub(crate) fn silent() -> Self {
        FakeStore {
            silent: true,
            ..FakeStore::default()
        }
    }

    /// A store whose lease extensions fail; everything else works.
    pub(crate) fn no_extend() -> Self {
        FakeStore {
            no_extend: true,
            ..FakeStore::default()
        }
    }

    /// The memory store behind the fake, to look at or change its records directly.
    pub(crate) fn memory(&self) -> &MemoryStore {
        &self.store
    }

    async fn gate(&self) -> Result<(), StoreError> {
        if self.silent {
            std::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            self.calls_while_down.fetch_add(1, Ordering::SeqCst);
            Err(StoreError::new("connection refused (test)"))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl DedupStore for FakeStore {
    async fn claim(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<Claim> {
        self.gate().await?;
        self.store.claim(req, terms).await
    }
    async fn extend(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        self.gate().await?;
        if self.no_extend {
            return Err(StoreError::new("timed out (test)"));
        }
        self.store.extend(held, terms).await
    }
    async fn complete(&self, held: &HeldClaim, how: Completion, terms: Terms) -> StoreResult<bool> {
        self.gate().await?;
        self.store.complete(held, how, terms).await
    }
    async fn release(&self, held: &HeldClaim) -> StoreResult<bool> {
        self.gate().await?;
        self.store.release(held).await
    }
    async fn reopen_poisoned(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        self.gate().await?;
        self.store.reopen_poisoned(held, terms).await
    }
    async fn health(&self) -> StoreResult<()> {
        self.probes.fetch_add(1, Ordering::SeqCst);
        self.gate().await
    }
}
