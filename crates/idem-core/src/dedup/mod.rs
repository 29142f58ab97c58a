//! Idempotency-key dedup: the second arrival of a message is a no-op.
//!
//! [`DedupLayer`] wraps a classified handler stack (errors already carry an
//! [`ErrorKind`](crate::ErrorKind), see [`ClassifyLayer`](crate::classify::ClassifyLayer))
//! and drives the state machine of a [`DedupStore`]:
//!
//! | store says | the layer |
//! |---|---|
//! | absent (claim acquired) | runs the handler, extending the lease while it runs |
//! | done | acks without running the handler ([`Processed::Duplicate`]) |
//! | processing under a live lease | does not run it and does not drop it: retry later, no attempt spent |
//! | store error or timeout | transient failure: never "duplicate", never run without a claim; counted by the consumer's [circuit breaker](crate::breaker), which hands the message back uncharged once it opens |
//!
//! After the handler: `Ok` -> `done`; permanent error -> `done` (poisoned, so a replay
//! is a deliberate operator act, header `x-idem-replay`); transient error -> release.
//! A plain redelivery of a poisoned message is dead-lettered again (never acked as a
//! duplicate): its first dead-letter copy may not have been confirmed.
//! Keys are scoped by the name of the consumer the layer is given to
//! (`Consumer::builder(name).dedup(layer)`); a layer used on its own is scoped by
//! [`DedupLayer::scope`]. A message whose key is missing is poison (unless
//! [`MissingKey::ContentHash`]); one whose key is already `done` with a different payload
//! fingerprint is poison too ("same key, different payload").
//!
//! # Edited messages
//!
//! An operator may fix a dead letter's body before replaying it (`idem dlq edit`). The
//! edited copy keeps its key and carries the fingerprint of the body before the edit
//! in [`ORIGINAL_FINGERPRINT_HEADER`]. The payload check accepts either fingerprint:
//! a key recorded with the original body's fingerprint is *the same message* for the
//! edited copy. So:
//!
//! | record | edited copy, replayed |
//! |---|---|
//! | absent | runs (claim acquired) |
//! | done (poisoned), original fingerprint | reopened and run once, on the edited body |
//! | done (succeeded), original fingerprint | a duplicate: the message took effect already |
//! | done, any other fingerprint | [`PayloadMismatchError`], as for any message |
//!
//! The record keeps the original fingerprint after the edited copy ran, so a
//! redelivery of the edited copy, and a replay of an unedited copy of the original,
//! are both duplicates: the key takes effect once, whichever body ran. The header only
//! ever widens "same payload" to the body the key was first recorded with; it cannot
//! make a message with an unrelated payload run under a key that succeeded.
//!
//! # Batch handlers
//!
//! Under a [batch handler](crate::batch) the layer admits a whole batch at once: one
//! [`DedupStore::claim_many`] call for every key, each key decided as above, the
//! handler on the admitted messages (their leases extended while it runs), then one
//! [`DedupStore::complete_many`] call for the succeeded, discarded and poisoned
//! messages and one [`DedupStore::release_many`] call for the transiently failed
//! ones. A batch of one message uses the single-key calls. See `docs/batch.md`.
//!
//! The SQL transactional inbox (`idem_sql::SqlInbox`) admits messages through the same
//! steps (the `admission` module, not part of the public API) and shares the same settings ([`DedupSettings`]); only the
//! storage differs.
//!
//! ```
//! use std::time::Duration;
//! use idem_core::dedup::{DedupLayer, MemoryStore};
//! use idem_core::classify::ClassifyLayer;
//! use idem_core::{HandlerService, Message};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! async fn charge() {}
//! let store = MemoryStore::new();
//! let svc = ServiceBuilder::new()
//!     .layer(DedupLayer::new(store).scope("billing").lease(Duration::from_secs(30)))
//!     .layer(ClassifyLayer::default())
//!     .service(HandlerService::new(charge, ()));
//! let first = svc.clone().oneshot(Message::new("{}").with_message_id("c-1")).await.unwrap();
//! let again = svc.oneshot(Message::new("{}").with_message_id("c-1")).await.unwrap();
//! assert!(first.is_handled() && again.is_duplicate());
//! # }
//! ```

pub(crate) mod admission;
pub mod batch;
mod bounded;
pub(crate) mod key;
mod layer;
mod layer_batch;
mod memory;
pub(crate) mod store;

pub use admission::DedupSettings;
pub use batch::{BatchExecutor, Batcher, DEFAULT_MAX_BATCH};
pub use bounded::{Bounded, DEFAULT_STORE_TIMEOUT};
pub use key::{
    DefaultKey, HeaderKey, JsonFieldKey, KeyExtractor, KeyTooLongError, KeyTypeError, MissingKey,
    MissingKeyError, MAX_KEY_LEN,
};
pub use layer::{
    DedupLayer, DedupService, PayloadMismatchError, PreviouslyPoisonedError, Processed,
    EDITED_HEADER, ORIGINAL_FINGERPRINT_HEADER, REPLAY_HEADER,
};
pub use memory::MemoryStore;
pub use store::{
    Answers, Claim, ClaimRequest, CompleteRequest, Completion, CountedClaim, DedupStore, HeldClaim,
    OwnerToken, ScopedKey, StoreError, StoreErrorKind, StoreResult, Terms,
};

#[cfg(test)]
mod batch_admit_tests;
#[cfg(test)]
mod expiry_tests;
#[cfg(test)]
pub(crate) mod fakes;
#[cfg(test)]
mod tests;
