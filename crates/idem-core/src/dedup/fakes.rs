//! Stores that fail on purpose, for the unit tests of the dedup stage, the bound on
//! store calls and the consumer.

use std::time::Duration;

use async_trait::async_trait;

use super::{Claim, Completion, DedupStore, OwnerToken, ScopedKey, StoreError};

/// A store whose every call fails the same way.
#[derive(Clone, Copy, Debug)]
pub(crate) enum BrokenStore {
    /// Every call answers "connection refused": the stage must fail closed.
    Down,
    /// No call ever answers.
    Silent,
}

impl BrokenStore {
    async fn fail<T>(self) -> Result<T, StoreError> {
        match self {
            BrokenStore::Down => Err(StoreError::new("connection refused")),
            BrokenStore::Silent => std::future::pending().await,
        }
    }
}

#[async_trait]
impl DedupStore for BrokenStore {
    async fn claim(
        &self,
        _: &ScopedKey,
        _: &OwnerToken,
        _: Option<&str>,
        _: Duration,
    ) -> Result<Claim, StoreError> {
        self.fail().await
    }
    async fn extend(&self, _: &ScopedKey, _: &OwnerToken, _: Duration) -> Result<bool, StoreError> {
        self.fail().await
    }
    async fn complete(
        &self,
        _: &ScopedKey,
        _: &OwnerToken,
        _: Completion,
        _: Duration,
    ) -> Result<bool, StoreError> {
        self.fail().await
    }
    async fn release(&self, _: &ScopedKey, _: &OwnerToken) -> Result<bool, StoreError> {
        self.fail().await
    }
    async fn reopen_poisoned(
        &self,
        _: &ScopedKey,
        _: &OwnerToken,
        _: Duration,
    ) -> Result<bool, StoreError> {
        self.fail().await
    }
}
