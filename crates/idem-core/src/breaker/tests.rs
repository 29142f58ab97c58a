use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use std::time::Instant;

use super::*;
use crate::backoff::{Backoff, Jitter};
use crate::consumer::Consumer;
use crate::dedup::StoreError;
use crate::memory::MemoryBroker;

use crate::dedup::fakes::FakeStore as Flaky;

fn backoff() -> Backoff {
    // The whole retry budget: 3 attempts within about 30 ms.
    Backoff::exponential(Duration::from_millis(10))
        .jitter(Jitter::None)
        .max_attempts(3)
}

fn config() -> BreakerConfig {
    BreakerConfig::new()
        .failure_threshold(3)
        .probe_backoff(Duration::from_millis(5), Duration::from_millis(20))
}

/// Records every state the breaker goes through.
fn watch_states(b: &CircuitBreaker) -> Arc<std::sync::Mutex<Vec<bool>>> {
    let seen = Arc::new(std::sync::Mutex::new(vec![b.is_open()]));
    let mut rx = b.inner.open_tx.subscribe();
    let s = seen.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let v = *rx.borrow_and_update();
            s.lock().unwrap().push(v);
        }
    });
    seen
}

const PREFETCH: usize = 10;

/// A broker whose queue `q` holds `n` messages, `m-0` to `m-<n-1>`.
fn queue_of(n: usize) -> MemoryBroker {
    let broker = MemoryBroker::new();
    for i in 0..n {
        broker.publish("q", Message::new("{}").with_message_id(format!("m-{i}")));
    }
    broker
}

/// Takes `store` down now and brings it back after `ms` milliseconds.
fn outage(store: &Flaky, ms: u64) {
    store.down.store(true, Ordering::SeqCst);
    let s = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        s.down.store(false, Ordering::SeqCst);
    });
}

/// A consumer of `store` with the test budget, the test breaker and a handler that
/// does nothing.
fn guarded(store: &Flaky) -> Consumer {
    Consumer::builder("c")
        .store(store.clone())
        .backoff(backoff())
        .circuit_breaker(config())
        .handler(|| async {})
        .unwrap()
}

#[tokio::test]
async fn an_outage_longer_than_the_retry_budget_pauses_the_worker_and_dead_letters_nothing() {
    let broker = queue_of(200);
    let store = Flaky::default();
    let handled = Arc::new(AtomicUsize::new(0));
    let (h, s) = (handled.clone(), store.clone());
    let consumer = Consumer::builder("c")
        .store(store.clone())
        .backoff(backoff())
        .circuit_breaker(config())
        .handler_with_state(
            move |crate::State(s): crate::State<Flaky>| {
                let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    if n == 50 {
                        // The store goes down for ten times the whole retry budget.
                        outage(&s, 300);
                    }
                }
            },
            s,
        )
        .unwrap();
    let breaker = consumer.breaker().unwrap().clone();
    let states = watch_states(&breaker);
    let stats = broker
        .worker("q", consumer)
        .prefetch(PREFETCH)
        .run_until_idle()
        .await;

    assert_eq!(stats.dead_lettered, 0, "{stats}");
    assert!(broker.is_empty("q.dlq"));
    assert_eq!(stats.processed, 200, "{stats}");
    // Only the failures before the breaker opened were charged (threshold - 1).
    assert!(stats.retries <= 2, "{stats}");
    let states = states.lock().unwrap().clone();
    assert_eq!(states.first(), Some(&false));
    assert!(
        states.contains(&true),
        "the breaker never opened: {states:?}"
    );
    assert_eq!(states.last(), Some(&false), "still open at the end");
    assert!(store.probes.load(Ordering::SeqCst) >= 1);
    // Paused: the deliveries in flight when it broke, and no more, reached the store.
    let hit = store.calls_while_down.load(Ordering::SeqCst) - store.probes.load(Ordering::SeqCst);
    assert!(
        hit <= 2 * PREFETCH,
        "{hit} store calls while down: the worker kept taking deliveries"
    );
}

#[tokio::test]
async fn without_a_breaker_the_same_outage_churns_retries_but_dead_letters_nothing() {
    // What the breaker saves: without it every delivery keeps hitting the dead store
    // and making retry copies for the whole outage. Store failures still never end in
    // the DLQ (a message past its budget is retried, uncharged).
    let broker = queue_of(20);
    let store = Flaky::default();
    outage(&store, 300);
    let consumer = Consumer::builder("c")
        .store(store)
        .backoff(backoff())
        .without_circuit_breaker()
        .handler(|| async {})
        .unwrap();
    assert!(consumer.breaker().is_none());
    let stats = broker.worker("q", consumer).run_until_idle().await;
    assert_eq!(stats.dead_lettered, 0, "{stats}");
    assert_eq!(stats.processed, 20, "{stats}");
    assert!(
        stats.retries >= 3 * 20,
        "every message retried past its budget of 3 while the store was down: {stats}"
    );
}

#[tokio::test]
async fn a_worker_started_while_the_store_is_down_waits_open_then_resumes() {
    let broker = queue_of(30);
    let store = Flaky::default();
    store.down.store(true, Ordering::SeqCst);
    let consumer = guarded(&store);
    let breaker = consumer.breaker().unwrap().clone();
    let worker = tokio::spawn(broker.worker("q", consumer).run_until_idle());
    tokio::time::timeout(Duration::from_secs(5), breaker.wait_open())
        .await
        .expect("the breaker opens at start");
    assert!(breaker.cause().unwrap().contains("at start"));
    // Many probe periods later: nothing taken, nothing charged.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!worker.is_finished(), "the worker must wait, not exit");
    assert_eq!(broker.len("q"), 30);
    assert_eq!(
        store.calls_while_down.load(Ordering::SeqCst),
        store.probes.load(Ordering::SeqCst),
        "only probes reach a store that is down"
    );
    store.down.store(false, Ordering::SeqCst);
    let stats = tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("resumes once the store answers")
        .unwrap();
    assert_eq!(
        (stats.processed, stats.retries, stats.dead_lettered),
        (30, 0, 0)
    );
}

#[tokio::test]
async fn state_machine_opens_after_the_threshold_and_closes_on_a_probe() {
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let health: HealthCheck = Arc::new(move || {
        let d = d.clone();
        Box::pin(async move {
            if d.load(Ordering::SeqCst) {
                Err(StoreError::new("down"))
            } else {
                Ok(())
            }
        })
    });
    let b = CircuitBreaker::new("c", config(), Some(health));
    assert!(!b.record_store_failure(&"e1"));
    assert!(!b.record_store_failure(&"e2"));
    // A call that reached the store resets the count.
    b.record_call(Instant::now(), false);
    assert!(!b.record_store_failure(&"e1"));
    assert!(!b.record_store_failure(&"e2"));
    assert!(b.record_store_failure(&"e3"), "third in a row opens");
    assert!(b.is_open());
    assert!(b
        .cause()
        .unwrap()
        .contains("3 store failures in a row, last: e3"));
    // Open: every further failure is reported as open (not charged).
    assert!(b.record_store_failure(&"e4"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(b.is_open(), "probes fail: stays open");
    down.store(false, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(5), b.wait_closed())
        .await
        .expect("closes once the probe answers");
    assert!(b.cause().is_none());
    assert!(!b.record_store_failure(&"after"), "count starts again");
}

#[tokio::test]
async fn open_breaker_releases_deliveries_without_spending_attempts() {
    let store = Flaky::default();
    let consumer = guarded(&store);
    store.down.store(true, Ordering::SeqCst);
    let msg = || Message::new("{}").with_message_id("m");
    // Below the threshold: ordinary transient failures, one attempt each.
    for _ in 0..2 {
        assert!(matches!(
            consumer.process(msg()).await,
            crate::Disposition::Retry { .. }
        ));
    }
    // The failure that opens it, and every delivery while open: released.
    for _ in 0..3 {
        match consumer.process(msg()).await {
            crate::Disposition::Release { reason } => {
                assert!(reason.contains("store"), "{reason}")
            }
            other => panic!("expected a release, got {other:?}"),
        }
    }
    assert_eq!(consumer.stats().dead_lettered, 0);
}

#[tokio::test]
async fn handler_failure_rate_opens_then_cools_down() {
    let config = BreakerConfig::new()
        .handler_failure_rate(0.5, Duration::from_secs(60), 10)
        .rate_cool_down(Duration::from_millis(50));
    let b = CircuitBreaker::new("c", config, None);
    for _ in 0..5 {
        b.record_call(Instant::now(), false);
    }
    for _ in 0..4 {
        b.record_call(Instant::now(), true);
    }
    assert!(!b.is_open(), "9 results are below min_calls");
    b.record_call(Instant::now(), true);
    assert!(b.is_open(), "5 of 10 transient failures reach 50%");
    assert!(b.cause().unwrap().contains("5 of the handler's last 10"));
    tokio::time::timeout(Duration::from_secs(5), b.wait_closed())
        .await
        .expect("closes after the cool-down");
    b.record_call(Instant::now(), true);
    assert!(!b.is_open(), "the window starts empty again");
}

#[tokio::test]
async fn a_call_that_started_before_the_failures_does_not_reset_the_count() {
    let b = CircuitBreaker::new("c", config(), None);
    // A handler claimed before the outage...
    let before = Instant::now();
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(!b.record_store_failure(&"e1"));
    assert!(!b.record_store_failure(&"e2"));
    // ...and finishes during it (its completion failing quietly): proves nothing.
    b.record_call(before, false);
    assert!(b.record_store_failure(&"e3"), "the count was not reset");
}

/// A message on its last attempt meets a store failure (before the breaker has opened):
/// the store, not the message, failed, so it is retried, never dead-lettered.
#[tokio::test]
async fn a_store_failure_on_the_last_attempt_is_retried_not_dead_lettered() {
    let store = Flaky::default();
    let consumer = guarded(&store);
    store.down.store(true, Ordering::SeqCst);
    // Two failures already spent of a budget of three.
    let msg = Message::new("{}")
        .with_message_id("last-try")
        .with_header(crate::outcome::headers::ATTEMPTS, 2i64);
    match consumer.process(msg).await {
        crate::Disposition::Retry { failure, delay, .. } => {
            assert_eq!(failure.attempts, 2, "the store failure is not charged");
            assert_eq!(delay, backoff().delay_after(2));
        }
        other => panic!("a store failure on the last attempt must be retried: {other:?}"),
    }
    // A failure of the handler itself on the last attempt still dead-letters.
    store.down.store(false, Ordering::SeqCst);
    let failing = Consumer::builder("c")
        .store(store.clone())
        .backoff(backoff())
        .handler(|| async { Err::<(), _>(crate::HandlerError::transient("down")) })
        .unwrap();
    let msg = Message::new("{}")
        .with_message_id("last-try-2")
        .with_header(crate::outcome::headers::ATTEMPTS, 2i64);
    assert!(matches!(
        failing.process(msg).await,
        crate::Disposition::DeadLetter { .. }
    ));
}
