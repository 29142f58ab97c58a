use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::{Consumer, Disposition, Json, MemoryStore, State};

#[derive(Clone, Default)]
struct Seen {
    calls: Arc<AtomicUsize>,
    sizes: Arc<Mutex<Vec<usize>>>,
    handled: Arc<Mutex<Vec<i64>>>,
}

/// Negative numbers are poison, 0 is transient, 1000 drops the message; the rest
/// succeed and are recorded.
async fn each_number(
    State(seen): State<Seen>,
    batch: Batch<Json<i64>>,
) -> Result<(), HandlerError> {
    seen.calls.fetch_add(1, Ordering::SeqCst);
    seen.sizes.lock().unwrap().push(batch.len());
    batch
        .each(|item| {
            let seen = seen.clone();
            async move {
                let Json(n) = item.into_inner();
                match n {
                    n if n < 0 => Err(HandlerError::permanent("negative")),
                    0 => Err(HandlerError::transient("zero, try later")),
                    1000 => Err(HandlerError::discard("not wanted")),
                    n => {
                        seen.handled.lock().unwrap().push(n);
                        Ok(())
                    }
                }
            }
        })
        .await
}

fn consumer(seen: &Seen, size: usize, wait: Duration) -> Consumer {
    Consumer::builder("batch-test")
        .store(MemoryStore::new())
        .batch_size(size)
        .batch_wait(wait)
        .batch_handler_with_state(each_number, seen.clone())
        .unwrap()
}

fn msg(id: &str, body: &str) -> Message {
    Message::new(body.to_owned()).with_message_id(id)
}

#[tokio::test]
async fn each_message_keeps_its_own_outcome() {
    let seen = Seen::default();
    let c = consumer(&seen, 6, Duration::from_secs(5));
    let bodies = ["1", "-1", "0", "1000", "not json", "2"];
    let all = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| c.process(msg(&format!("m{i}"), b)));
    let d = futures_util::future::join_all(all).await;
    assert_eq!(d[0], Disposition::Ack { duplicate: false });
    assert!(matches!(d[1], Disposition::DeadLetter { .. }), "{:?}", d[1]);
    assert!(matches!(d[2], Disposition::Retry { .. }), "{:?}", d[2]);
    assert!(matches!(d[3], Disposition::Discard { .. }), "{:?}", d[3]);
    assert!(matches!(d[4], Disposition::DeadLetter { .. }), "bad JSON");
    assert_eq!(d[5], Disposition::Ack { duplicate: false });
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1, "one handler call");
    assert_eq!(*seen.sizes.lock().unwrap(), vec![5], "bad JSON left out");
    assert_eq!(*seen.handled.lock().unwrap(), vec![1, 2]);
    // Duplicates (done, discarded) are acked without reaching the handler.
    let again =
        futures_util::future::join_all([c.process(msg("m0", "1")), c.process(msg("m3", "1000"))])
            .await;
    assert_eq!(again[0], Disposition::Ack { duplicate: true });
    assert_eq!(again[1], Disposition::Ack { duplicate: true });
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1);
    let stats = c.stats();
    assert_eq!(
        (stats.dead_lettered, stats.retries, stats.duplicates),
        (2, 1, 2)
    );
}

#[tokio::test]
async fn a_batch_closes_at_its_size_or_after_its_wait() {
    let seen = Seen::default();
    let c = consumer(&seen, 3, Duration::from_millis(50));
    let all = (0..7).map(|i| c.process(msg(&format!("s{i}"), "5")));
    let d = futures_util::future::join_all(all).await;
    assert!(d
        .iter()
        .all(|d| *d == Disposition::Ack { duplicate: false }));
    let mut sizes = seen.sizes.lock().unwrap().clone();
    sizes.sort_unstable();
    assert_eq!(
        sizes,
        vec![1, 3, 3],
        "two full batches, one closed by the wait"
    );
}

/// Two messages with `bodies` at once through the consumer `name`, which batches them
/// in twos for `handler`; their dispositions.
async fn two_at_once<H, T>(name: &str, handler: H, bodies: [&str; 2]) -> [Disposition; 2]
where
    H: BatchHandler<T, ()>,
    T: 'static,
{
    let c = Consumer::builder(name)
        .store(MemoryStore::new())
        .batch_size(2)
        .batch_handler(handler)
        .unwrap();
    let (a, b) = tokio::join!(
        c.process(msg(&format!("{name}-1"), bodies[0])),
        c.process(msg(&format!("{name}-2"), bodies[1]))
    );
    [a, b]
}

async fn fails_whole(batch: Batch<Message>) -> Result<(), HandlerError> {
    assert!(!batch.is_empty());
    Err(HandlerError::permanent("bulk insert failed"))
}

#[tokio::test]
async fn a_whole_batch_error_retries_every_message_charging_an_attempt() {
    for d in two_at_once("whole", fails_whole, ["x", "y"]).await {
        match d {
            Disposition::Retry { failure, .. } => {
                assert_eq!(failure.attempts, 1, "one attempt charged");
                assert_eq!(failure.error, "bulk insert failed");
            }
            other => panic!("expected a retry, got {other:?}"),
        }
    }
}

async fn bulk(batch: Batch<Json<i64>>) -> Result<(), HandlerError> {
    for item in batch.iter() {
        if item.0 < 0 {
            batch.fail(item, HandlerError::permanent("negative"));
        }
    }
    assert!(batch.iter().any(|i| batch.is_failed(i)));
    Ok(())
}

#[tokio::test]
async fn a_bulk_handler_fails_single_messages() {
    let [a, b] = two_at_once("bulk", bulk, ["3", "-3"]).await;
    assert_eq!(a, Disposition::Ack { duplicate: false });
    assert!(matches!(b, Disposition::DeadLetter { .. }), "{b:?}");
}

async fn all_ok(batch: Batch<Message>) {
    assert_eq!(batch.len(), 1);
}

#[tokio::test]
async fn layers_wrap_each_message_on_its_way_into_the_batch() {
    let shed = Consumer::builder("layers")
        .store(MemoryStore::new())
        .layer(tower::load_shed::LoadShedLayer::new())
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .batch_size(2)
        .batch_wait(Duration::from_millis(20))
        .batch_handler(all_ok)
        .unwrap();
    let (a, b) = tokio::join!(shed.process(msg("l1", "3")), shed.process(msg("l2", "4")));
    // One slot: the second message is shed (transient, retried), the first runs in a
    // batch of its own once the wait closes it.
    let mut d = [a, b];
    d.sort_by_key(|d| d.name());
    assert_eq!(d[0], Disposition::Ack { duplicate: false });
    assert!(matches!(d[1], Disposition::Retry { .. }), "{:?}", d[1]);
}
