//! The lease store's calls on many keys (a batch handler's claims, completions and
//! releases): on PostgreSQL one statement per call (`pg_claims` for the claims, the
//! batch statement of `pg_batch` for the completions and releases), elsewhere the
//! single-key statements one after the other.

use idem_core::dedup::{
    Answers, ClaimRequest, CompleteRequest, CountedClaim, DedupStore, HeldClaim, StoreError,
    StoreErrorKind, Terms,
};

use super::SqlStore;
#[cfg(feature = "postgres")]
use super::{pg_batch, pg_claims, state_of};
use crate::backend::Backend;

impl<DB: Backend> SqlStore<DB> {
    /// [`DedupStore::claim_many`].
    pub(super) async fn claims(
        &self,
        requests: &[ClaimRequest],
        terms: Terms,
    ) -> Answers<CountedClaim> {
        #[cfg(feature = "postgres")]
        if let Some(batch) = &self.inner.batch {
            return pg_claims::claim_many(self, batch.executor(), requests, terms.lease).await;
        }
        let mut answers = Vec::with_capacity(requests.len());
        for r in requests {
            answers.push(self.claim_counting(r, terms).await);
        }
        answers
    }

    /// [`DedupStore::complete_many`].
    pub(super) async fn completions(
        &self,
        requests: &[CompleteRequest],
        terms: Terms,
    ) -> Answers<bool> {
        #[cfg(feature = "postgres")]
        if let Some(batch) = &self.inner.batch {
            let keep = terms.retention;
            let ops = requests
                .iter()
                .map(|r| pg_batch::Op::update(&r.held, Some(state_of(r.completion)), keep))
                .collect();
            return pg_batch::settle_many(batch.executor(), ops).await;
        }
        let mut answers = Vec::with_capacity(requests.len());
        for r in requests {
            answers.push(self.complete(&r.held, r.completion, terms).await);
        }
        answers
    }

    /// [`DedupStore::release_many`].
    pub(super) async fn releases(&self, claims: &[HeldClaim]) -> Answers<bool> {
        #[cfg(feature = "postgres")]
        if let Some(batch) = &self.inner.batch {
            let ops = claims.iter().map(pg_batch::Op::release).collect();
            return pg_batch::settle_many(batch.executor(), ops).await;
        }
        let mut answers = Vec::with_capacity(claims.len());
        for held in claims {
            answers.push(self.release(held).await);
        }
        answers
    }
}

/// Refuses a claim whose key, owner or fingerprint is longer than the table allows.
pub(super) fn check_claim<DB: Backend>(req: &ClaimRequest) -> Result<(), StoreError> {
    let HeldClaim { key, owner, .. } = &req.held;
    let fingerprint = req.fingerprint.as_deref();
    DB::DIALECT
        .check_lengths(key.consumer(), key.key(), Some(owner.as_str()), fingerprint)
        .map_err(|m| {
            StoreError::new(format!("SQL dedup claim of {key} refused: {m}"))
                .with_kind(StoreErrorKind::Invalid)
        })
}
