//! Ordered consumption by key against the real local RabbitMQ (`AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`): per-key lanes, retries in place,
//! dead-letters that the key's later messages follow. Every test uses its own queues
//! and deletes them.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_amqp::ordered::{AfterDeadLetter, Ordering};
use idem_amqp::Topology;
use idem_core::dedup::HeaderKey;
use idem_core::{Attempt, Consumer, HandlerError, MemoryStore, Message};

mod common;
use common::wait_until;

/// What the handler saw: key, sequence number, attempt, and whether it succeeded.
type Log = Arc<Mutex<Vec<(String, u32, u32, bool)>>>;

fn msg(key: &str, seq: u32) -> Message {
    Message::new(format!("{key}-{seq}"))
        .with_message_id(format!("{key}-{seq}"))
        .with_header("x-key", key)
        .with_header("x-seq", seq.to_string())
}

fn seq_of(m: &Message) -> u32 {
    m.header_str("x-seq").unwrap().parse().unwrap()
}

/// A consumer logging every call; `fails(key, seq, attempt)` says which calls fail
/// (`Some(true)`: transient, `Some(false)`: permanent, after 300 ms, so that the
/// key's later messages park behind it).
fn consumer(
    name: &str,
    first_retry: Duration,
    attempts: u32,
    log: Log,
    fails: fn(&str, u32, u32) -> Option<bool>,
) -> Consumer {
    Consumer::builder(name)
        .store(MemoryStore::new())
        .backoff(idem_testkit::backoff(first_retry, attempts))
        .handler(move |m: Message, Attempt(n): Attempt| {
            let log = log.clone();
            async move {
                let key = m.header_str("x-key").unwrap().to_owned();
                let seq = seq_of(&m);
                let fail = fails(&key, seq, n);
                log.lock().unwrap().push((key, seq, n, fail.is_none()));
                match fail {
                    None => Ok(()),
                    Some(true) => Err(HandlerError::transient(std::io::Error::other("not yet"))),
                    Some(false) => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Err(HandlerError::permanent(std::io::Error::other("bad")))
                    }
                }
            }
        })
        .unwrap()
}

fn successes(log: &Log, key: &str) -> Vec<u32> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(k, _, _, ok)| k == key && *ok)
        .map(|(_, s, _, _)| *s)
        .collect()
}

async fn queue_len(ch: &lapin::Channel, queue: &str) -> u32 {
    idem_testkit::broker::ready_count(ch, queue).await
}

/// Ordering by the `x-key` header.
fn by_key() -> Ordering {
    Ordering::by(HeaderKey::new("x-key"))
}

/// The common fixture and the log of the consumers it makes.
struct Fixture {
    base: common::Fixture,
    /// What the handlers of [`Fixture::consumer`] saw.
    log: Log,
}

impl std::ops::Deref for Fixture {
    type Target = common::Fixture;

    fn deref(&self) -> &common::Fixture {
        &self.base
    }
}

impl Fixture {
    async fn new(name: &'static str, shape: impl FnOnce(Topology) -> Topology) -> Fixture {
        Fixture {
            base: common::Fixture::with(name, shape).await,
            log: Log::default(),
        }
    }

    /// [`consumer`] named after the test, logging into the fixture's log.
    fn consumer(
        &self,
        first_retry: Duration,
        attempts: u32,
        fails: fn(&str, u32, u32) -> Option<bool>,
    ) -> Consumer {
        consumer(self.name, first_retry, attempts, self.log.clone(), fails)
    }
}

/// Waits up to `secs` seconds until `consumer` has processed `n` messages.
async fn processed(consumer: &Consumer, n: u64, secs: u64) {
    let what = format!("{n} processed");
    wait_until(&what, Duration::from_secs(secs), || {
        consumer.stats().processed == n
    })
    .await;
}

/// Issue 24's head-of-line test: key A's head fails 3 times; key B's 100 messages
/// finish meanwhile; A's later messages run after its head, in order; no retry copy
/// goes through a delay queue.
#[tokio::test]
async fn failing_head_blocks_only_its_key() {
    let f = Fixture::new("ordered-hol", |t| t).await;
    // A0 fails on attempts 1..=3, then succeeds; retries after 0.5, 1 and 2 s.
    let consumer = f.consumer(Duration::from_millis(500), 10, |k, s, n| {
        (k == "A" && s == 0 && n <= 3).then_some(true)
    });
    let running = f.start(&consumer, |w| w.prefetch(20).ordered(by_key()));
    let mut batch = vec![msg("A", 0)];
    batch.extend((0..50).map(|i| msg("B", i)));
    batch.extend([msg("A", 1), msg("A", 2)]);
    batch.extend((50..100).map(|i| msg("B", i)));
    batch.extend([msg("A", 3), msg("A", 4)]);
    f.publish(batch).await;

    processed(&consumer, 105, 30).await;
    let stats = running.shutdown_and_join().await.unwrap();
    assert_eq!(
        (stats.processed, stats.retries, stats.dead_lettered),
        (105, 3, 0)
    );
    let log = f.log.lock().unwrap().clone();
    // Every call of key A, in order: the head's 4 attempts, then its followers.
    let a: Vec<(u32, u32)> = log
        .iter()
        .filter(|e| e.0 == "A")
        .map(|e| (e.1, e.2))
        .collect();
    assert_eq!(
        a,
        vec![
            (0, 1),
            (0, 2),
            (0, 3),
            (0, 4),
            (1, 1),
            (2, 1),
            (3, 1),
            (4, 1)
        ]
    );
    // B ran to the end while A's head waited, in order.
    let head_done = log.iter().position(|e| e.0 == "A" && e.3).unwrap();
    let b_before: Vec<u32> = log[..head_done]
        .iter()
        .filter(|e| e.0 == "B")
        .map(|e| e.1)
        .collect();
    assert_eq!(
        b_before,
        (0..100).collect::<Vec<_>>(),
        "B must finish meanwhile, in order"
    );
    // Retried in place: nothing went through a delay queue or the DLQ.
    f.assert_empty_and_delete().await;
}

/// The control: the same traffic without ordering lets A's followers overtake its
/// failing head (the retry copy rejoins the queue behind them).
#[tokio::test]
async fn without_ordering_followers_overtake_the_head() {
    let f = Fixture::new("unordered-hol", |t| t).await;
    let consumer = f.consumer(Duration::from_millis(500), 10, |k, s, n| {
        (k == "A" && s == 0 && n <= 1).then_some(true)
    });
    let running = f.start(&consumer, |w| w.prefetch(20));
    f.publish((0..5).map(|i| msg("A", i))).await;
    processed(&consumer, 5, 30).await;
    running.shutdown_and_join().await.unwrap();
    let a = successes(&f.log, "A");
    assert_ne!(
        a,
        vec![0, 1, 2, 3, 4],
        "the head's retry copy should land after its followers"
    );
    assert_eq!(a.last(), Some(&0));
    f.delete().await;
}

/// With `FollowToDlq`, the messages parked behind a dead-lettered head follow it to
/// the DLQ in order without running; once the lane has emptied, the key runs again.
#[tokio::test]
async fn followers_follow_a_dead_lettered_head() {
    let f = Fixture::new("ordered-dlq", |t| t).await;
    let (ch, topo) = (&f.ch, &f.topo);
    // A0 fails permanently; its handler call is slow enough for A1..A3 to park.
    let consumer = f.consumer(Duration::from_millis(100), 10, |k, s, _| {
        (k == "A" && s == 0).then_some(false)
    });
    let ordering = by_key().after_dead_letter(AfterDeadLetter::FollowToDlq);
    let running = f.start(&consumer, |w| w.prefetch(10).ordered(ordering));
    let mut batch: Vec<Message> = (0..4).map(|i| msg("A", i)).collect();
    batch.push(msg("B", 0));
    f.publish(batch).await;
    // The head counts as dead-lettered; its followers did not run.
    common::wait_until_async("4 dead letters", Duration::from_secs(20), || {
        let ch = ch.clone();
        let dlq = topo.dlq();
        async move { queue_len(&ch, &dlq).await == 4 }
    })
    .await;
    assert_eq!(consumer.stats().dead_lettered, 1);
    processed(&consumer, 1, 20).await;
    // The lane is empty now: a new message of A runs.
    f.publish(vec![msg("A", 4)]).await;
    processed(&consumer, 2, 20).await;
    running.shutdown_and_join().await.unwrap();
    assert_eq!(successes(&f.log, "A"), vec![4]);
    let calls_a: Vec<u32> = f
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.0 == "A")
        .map(|e| e.1)
        .collect();
    assert_eq!(calls_a, vec![0, 4], "A1..A3 must not run");
    let mut dead = Vec::new();
    while let Some(m) = ch
        .basic_get(
            topo.dlq().as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        dead.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    assert_eq!(dead, vec!["A-0", "A-1", "A-2", "A-3"], "in order");
    topo.delete_on(ch).await.unwrap();
}

/// A worker stopped while its head waits to retry in place hands the head back; the
/// next worker runs the key from its head, in order, nothing lost.
#[tokio::test]
async fn stop_during_an_in_place_wait_keeps_the_order() {
    let f = Fixture::new("ordered-stop", |t| t).await;
    // The first worker's A0 fails and waits 60 s to retry; the second's succeeds.
    let first = f.consumer(Duration::from_secs(60), 3, |k, s, n| {
        (k == "A" && s == 0 && n == 1).then_some(true)
    });
    let w1 = f.start(&first, |w| w.prefetch(10).ordered(by_key()));
    f.publish((0..5).map(|i| msg("A", i))).await;
    wait_until("A0's first failure", Duration::from_secs(10), || {
        first.stats().retries == 1
    })
    .await;
    w1.shutdown_and_join().await.unwrap();
    assert_eq!(
        first.stats().processed,
        0,
        "followers must not run while the head waits"
    );
    let second = f.consumer(Duration::from_secs(60), 3, |_, _, _| None);
    let w2 = f.start(&second, |w| w.prefetch(10).ordered(by_key()));
    processed(&second, 5, 20).await;
    w2.shutdown_and_join().await.unwrap();
    assert_eq!(successes(&f.log, "A"), vec![0, 1, 2, 3, 4]);
    f.delete().await;
}

/// Bounded parking: with 2 parked per key, a third message of a key whose head is
/// stuck stops the worker from taking deliveries (head-of-line blocking, documented),
/// and nothing is dropped: once the head finishes, every message runs, in order.
#[tokio::test]
async fn a_full_lane_stops_intake_and_drops_nothing() {
    use idem_amqp::ordered::OrderLimits;
    use idem_core::State;
    let f = Fixture::new("ordered-full", |t| t).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    async fn handle(
        State((log, gate)): State<(Log, Arc<tokio::sync::Semaphore>)>,
        m: Message,
    ) -> Result<(), HandlerError> {
        let key = m.header_str("x-key").unwrap().to_owned();
        let seq = seq_of(&m);
        if key == "A" && seq == 0 {
            // The head waits until the test opens the gate.
            let _ = gate.acquire().await.unwrap();
        }
        log.lock().unwrap().push((key, seq, 1, true));
        Ok(())
    }
    let consumer = Consumer::builder("ordered-full")
        .store(MemoryStore::new())
        .handler_with_state(handle, (f.log.clone(), gate.clone()))
        .unwrap();
    let ordering = by_key().limits(OrderLimits::new(2, 100));
    let running = f.start(&consumer, |w| w.prefetch(20).ordered(ordering));
    let mut batch: Vec<Message> = vec![msg("B", 0)];
    batch.extend((0..6).map(|i| msg("A", i)));
    batch.extend((1..5).map(|i| msg("B", i)));
    f.publish(batch).await;
    processed(&consumer, 1, 10).await;
    // A0 runs, A1 and A2 park, A3 waits for room: B1..B4 behind it are not taken.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(consumer.stats().processed, 1, "{:?}", f.log.lock().unwrap());
    gate.add_permits(1);
    processed(&consumer, 11, 10).await;
    running.shutdown_and_join().await.unwrap();
    assert_eq!(successes(&f.log, "A"), (0..6).collect::<Vec<_>>());
    assert_eq!(successes(&f.log, "B"), (0..5).collect::<Vec<_>>());
    f.assert_empty_and_delete().await;
}

/// Across processes: two ordered workers on a single-active-consumer queue. Only one
/// receives at a time; when it stops, the other takes over from where it left off, and
/// each key's messages are applied once each, in order.
#[tokio::test]
async fn single_active_consumer_hands_over_in_order() {
    let f = Fixture::new("ordered-sac", |t| t.single_active_consumer(true)).await;
    let (ch, topo) = (&f.ch, &f.topo);
    // (worker, key, seq) in the order the handlers finished.
    let log: Arc<Mutex<Vec<(u8, String, u32)>>> = Arc::default();
    let store = MemoryStore::new();
    let make = |id: u8| {
        let log = log.clone();
        Consumer::builder("ordered-sac")
            .store(store.clone())
            .handler(move |m: Message| {
                let log = log.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let key = m.header_str("x-key").unwrap().to_owned();
                    log.lock().unwrap().push((id, key, seq_of(&m)));
                    Ok::<(), HandlerError>(())
                }
            })
            .unwrap()
    };
    let (c1, c2) = (make(1), make(2));
    let w1 = f.start(&c1, |w| w.prefetch(10).ordered(by_key()));
    // The first consumer to subscribe is the active one.
    common::wait_until_async("w1 subscribed", Duration::from_secs(10), || {
        let ch = ch.clone();
        let q = topo.queue().to_owned();
        async move {
            idem_testkit::broker::inspect_queue(&ch, &q)
                .await
                .is_ok_and(|q| q.consumer_count() == 1)
        }
    })
    .await;
    let w2 = f.start(&c2, |w| w.prefetch(10).ordered(by_key()));
    let mut batch = Vec::new();
    for i in 0..25 {
        batch.extend([msg("A", i), msg("B", i)]);
    }
    f.publish(batch).await;
    wait_until("w1 handled 10", Duration::from_secs(20), || {
        c1.stats().processed >= 10
    })
    .await;
    assert_eq!(
        c2.stats().processed,
        0,
        "w2 must stand by while w1 is active"
    );
    w1.shutdown_and_join().await.unwrap();
    wait_until("50 handled", Duration::from_secs(30), || {
        c1.stats().processed + c2.stats().processed == 50
    })
    .await;
    w2.shutdown_and_join().await.unwrap();
    let log = log.lock().unwrap().clone();
    for key in ["A", "B"] {
        let seqs: Vec<u32> = log.iter().filter(|e| e.1 == key).map(|e| e.2).collect();
        assert_eq!(seqs, (0..25).collect::<Vec<_>>(), "key {key}");
    }
    let first_of_w2 = log.iter().position(|e| e.0 == 2).unwrap();
    assert!(
        log[first_of_w2..].iter().all(|e| e.0 == 2),
        "one active consumer at a time"
    );
    f.assert_empty_and_delete().await;
}
