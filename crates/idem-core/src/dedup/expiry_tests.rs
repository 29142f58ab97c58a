//! A lease that runs out before the `done` record is written.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::{Service, ServiceBuilder, ServiceExt};

use super::fakes::{fresh_claim, FakeStore};
use super::*;
use crate::error::HandlerError;
use crate::message::Message;

const LEASE: Duration = Duration::from_secs(3);

/// A handler that takes 10 s (past the 3 s lease) and counts its runs.
fn slow(runs: Arc<AtomicUsize>) -> tower::util::BoxCloneSyncService<Message, (), HandlerError> {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_m: Message| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<(), HandlerError>(())
        }
    }))
}

/// A store whose extensions fail, and the dedup stage over [`slow`] on it.
fn stack() -> (FakeStore, Stack, Arc<AtomicUsize>) {
    let store = FakeStore::no_extend();
    let layer = DedupLayer::new(store.clone()).scope("c").lease(LEASE);
    let runs = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(slow(runs.clone()));
    (store, svc, runs)
}

type Stack = DedupService<tower::util::BoxCloneSyncService<Message, (), HandlerError>>;

#[tokio::test(start_paused = true)]
async fn a_lease_that_ran_out_unclaimed_still_gets_its_done_record() {
    let (_store, svc, runs) = stack();
    let first = svc
        .clone()
        .oneshot(Message::new("a").with_message_id("k"))
        .await
        .unwrap();
    assert!(first.is_handled());
    // The redelivery of the same message is a duplicate: the effect does not run again.
    let again = svc
        .oneshot(Message::new("a").with_message_id("k"))
        .await
        .unwrap();
    assert_eq!(again, Processed::Duplicate);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_key_taken_over_after_the_lease_ran_out_is_left_to_its_new_owner() {
    let (store, svc, runs) = stack();
    let mut first = svc.clone();
    let first = tokio::spawn(first.call(Message::new("a").with_message_id("k")));
    // Past the first claim's lease: another owner takes the key and holds it.
    tokio::time::sleep(LEASE + Duration::from_secs(1)).await;
    let other = fresh_claim("c", "k");
    let minute = Terms::new(Duration::from_secs(60), Duration::from_secs(60));
    let taken = store.claim(&other, minute).await;
    assert_eq!(taken.unwrap(), Claim::Acquired);
    assert!(first.await.unwrap().unwrap().is_handled());
    // The first run's late completion did not overwrite the new owner's claim.
    assert!(store
        .memory()
        .complete(&other.held, Completion::Succeeded, minute)
        .await
        .unwrap());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
