//! [`Bounded`]: a [`DedupStore`] whose every call gives up after a time limit.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::store::{
    Answers, Claim, ClaimRequest, CompleteRequest, Completion, CountedClaim, DedupStore, HeldClaim,
    StoreError, StoreErrorKind, StoreResult, Terms,
};

/// Default limit on one store call (connection or pool wait included): 5 s.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// Wraps a store so that no call takes longer than `timeout`, whatever the client
/// library's own timeouts are (a pool waiting for a connection, a TCP connect to a
/// host that drops packets, a server that stopped answering). A call that runs out of
/// time is a [`StoreError`] like any other: the message is not assumed done, and the
/// circuit breaker counts it. The store call is dropped; every store operation is
/// fenced by its owner token, so a late effect of a dropped call (a claim that did get
/// written) is harmless: the claim's lease expires.
#[derive(Clone)]
pub struct Bounded {
    inner: Arc<dyn DedupStore>,
    timeout: Duration,
}

impl std::fmt::Debug for Bounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounded")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Bounded {
    /// `store` with every call limited to `timeout`.
    pub fn new(store: Arc<dyn DedupStore>, timeout: Duration) -> Self {
        Bounded {
            inner: store,
            timeout,
        }
    }

    /// The limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn run<T>(
        &self,
        op: &str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::new(format!(
                "store {op} timed out after {:?} (store_timeout)",
                self.timeout
            ))
            .with_kind(StoreErrorKind::Timeout)),
        }
    }
}

impl Bounded {
    /// A call for `n` keys within the limit: when it runs out of time, every key gets
    /// a copy of the timeout.
    async fn run_many<T>(
        &self,
        op: &str,
        n: usize,
        fut: impl Future<Output = Vec<Result<T, StoreError>>>,
    ) -> Vec<Result<T, StoreError>> {
        match self.run(op, async { Ok(fut.await) }).await {
            Ok(answers) => answers,
            Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
        }
    }
}

#[async_trait]
impl DedupStore for Bounded {
    async fn claim(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<Claim> {
        self.run("claim", self.inner.claim(req, terms)).await
    }
    async fn claim_counting(&self, req: &ClaimRequest, terms: Terms) -> StoreResult<CountedClaim> {
        self.run("claim", self.inner.claim_counting(req, terms))
            .await
    }
    async fn extend(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        self.run("extend", self.inner.extend(held, terms)).await
    }
    async fn complete(&self, held: &HeldClaim, how: Completion, terms: Terms) -> StoreResult<bool> {
        let call = self.inner.complete(held, how, terms);
        self.run("complete", call).await
    }
    async fn release(&self, held: &HeldClaim) -> StoreResult<bool> {
        self.run("release", self.inner.release(held)).await
    }
    async fn reopen_poisoned(&self, held: &HeldClaim, terms: Terms) -> StoreResult<bool> {
        self.run("reopen", self.inner.reopen_poisoned(held, terms))
            .await
    }
    async fn claim_many(&self, requests: &[ClaimRequest], terms: Terms) -> Answers<CountedClaim> {
        let call = self.inner.claim_many(requests, terms);
        self.run_many("claim", requests.len(), call).await
    }
    async fn complete_many(&self, requests: &[CompleteRequest], terms: Terms) -> Answers<bool> {
        let call = self.inner.complete_many(requests, terms);
        self.run_many("complete", requests.len(), call).await
    }
    async fn release_many(&self, claims: &[HeldClaim]) -> Vec<Result<bool, StoreError>> {
        let call = self.inner.release_many(claims);
        self.run_many("release", claims.len(), call).await
    }
    async fn health(&self) -> Result<(), StoreError> {
        self.run("health probe", self.inner.health()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::{MemoryStore, OwnerToken, ScopedKey};

    use crate::dedup::fakes::FakeStore;

    #[tokio::test]
    async fn a_store_that_does_not_answer_in_time_is_a_timeout() {
        let bounded = Bounded::new(Arc::new(FakeStore::silent()), Duration::from_millis(20));
        let req = ClaimRequest::new(ScopedKey::new("c", "k"), OwnerToken::generate(), None);
        let terms = Terms::new(Duration::from_secs(1), Duration::from_secs(60));
        let err = bounded.claim(&req, terms).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Timeout);
        assert!(err.to_string().contains("timed out"), "{err}");
        // An answer in time is passed through untouched.
        let quick = Bounded::new(Arc::new(MemoryStore::new()), Duration::from_secs(5));
        let claim = quick.claim(&req, terms);
        assert_eq!(claim.await.unwrap(), Claim::Acquired);
    }
}
