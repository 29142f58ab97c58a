//! The lease store's calls on many keys (a batch handler's claims, completions and
//! releases): on PostgreSQL one statement per call (`pg_claims` for the claims, the
//! batch statement of `pg_batch` for the completions and releases), elsewhere the
//! single-key statements one after the other.

use std::time::Duration;

use idem_core::dedup::{
    Claim, ClaimRequest, CompleteRequest, DedupStore, OwnerToken, ReleaseRequest, ScopedKey,
    StoreError, StoreErrorKind,
};

use super::SqlStore;
#[cfg(feature = "postgres")]
use super::{ms, pg_batch, pg_claims, state_of};
use crate::backend::Backend;

impl<DB: Backend> SqlStore<DB> {
    /// [`DedupStore::claim_many`].
    pub(super) async fn claims(
        &self,
        requests: &[ClaimRequest],
        lease: Duration,
        memory: Duration,
    ) -> Vec<Result<(Claim, Option<u32>), StoreError>> {
        #[cfg(feature = "postgres")]
        if let Some(batch) = &self.inner.batch {
            return pg_claims::claim_many(self, batch.executor(), requests, lease).await;
        }
        let mut answers = Vec::with_capacity(requests.len());
        for r in requests {
            let fingerprint = r.fingerprint.as_deref();
            answers.push(
                self.claim_counting(&r.key, &r.owner, fingerprint, lease, memory)
                    .await,
            );
        }
        answers
    }

    /// [`DedupStore::complete_many`].
    pub(super) async fn completions(
        &self,
        requests: &[CompleteRequest],
        retention: Duration,
    ) -> Vec<Result<bool, StoreError>> {
        #[cfg(feature = "postgres")]
        if let Some(batch) = &self.inner.batch {
            let ops = requests
                .iter()
                .map(|r| pg_batch::Op::Update {
                    key: r.key.clone(),
                    owner: r.owner.clone(),
                    state: Some(state_of(r.completion)),
                    ms: ms(retention),
                })
                .collect();
            return pg_batch::settle_many(batch.executor(), ops).await;
        }
        let mut answers = Vec::with_capacity(requests.len());
        for r in requests {
            answers.push(
                self.complete(&r.key, &r.owner, r.completion, retention)
                    .await,
            );
        }
        answers
    }

    /// [`DedupStore::release_many`].
    pub(super) async fn releases(
        &self,
        requests: &[ReleaseRequest],
    ) -> Vec<Result<bool, StoreError>> {
        #[cfg(feature = "postgres")]
        if let Some(batch) = &self.inner.batch {
            let ops = requests
                .iter()
                .map(|r| pg_batch::Op::Release {
                    key: r.key.clone(),
                    owner: r.owner.clone(),
                })
                .collect();
            return pg_batch::settle_many(batch.executor(), ops).await;
        }
        let mut answers = Vec::with_capacity(requests.len());
        for r in requests {
            answers.push(self.release(&r.key, &r.owner).await);
        }
        answers
    }
}

/// Refuses a claim whose key, owner or fingerprint is longer than the table allows.
pub(super) fn check_claim<DB: Backend>(
    key: &ScopedKey,
    owner: &OwnerToken,
    fingerprint: Option<&str>,
) -> Result<(), StoreError> {
    DB::DIALECT
        .check_lengths(key.consumer(), key.key(), Some(owner.as_str()), fingerprint)
        .map_err(|m| {
            StoreError::new(format!("SQL dedup claim of {key} refused: {m}"))
                .with_kind(StoreErrorKind::Invalid)
        })
}
