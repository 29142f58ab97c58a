//! tower's own middleware under the handler, on the in-memory broker: a concurrency
//! limit, a rate limit (a service that is not `Clone`) and load shedding.
//!
//! The clock is tokio's paused test clock: sleeps and rate-limit windows advance it
//! only when every task waits, so the counts below do not depend on the machine's
//! speed.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::backoff::Jitter;
use idem_core::memory::MemoryBroker;
use idem_core::{Backoff, Consumer, HandlerService, MemoryStore, Message, Metadata, State, Stats};
use tokio::time::Instant;
use tower::limit::{ConcurrencyLimitLayer, RateLimitLayer};
use tower::load_shed::LoadShedLayer;
use tower::ServiceBuilder;

fn publish(broker: &MemoryBroker, queue: &str, n: usize) {
    for i in 0..n {
        broker.publish(queue, Message::new("{}").with_message_id(format!("m-{i}")));
    }
}

/// How many handlers run now, and the most seen at once.
#[derive(Clone, Default)]
struct Gauge {
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    runs: Arc<AtomicUsize>,
}

async fn busy_for_20ms(State(g): State<Gauge>) {
    let now = g.now.fetch_add(1, Ordering::SeqCst) + 1;
    g.max.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
    g.now.fetch_sub(1, Ordering::SeqCst);
    g.runs.fetch_add(1, Ordering::SeqCst);
}

/// 30 messages on `queue` (prefetch 16) for `busy_for_20ms`, under a concurrency
/// limit of `limit` handlers if one is given: the worker's stats and the gauge.
async fn run_busy(queue: &str, limit: Option<usize>) -> (Stats, Gauge) {
    let broker = MemoryBroker::new();
    publish(&broker, queue, 30);
    let gauge = Gauge::default();
    let mut builder = Consumer::builder(queue).store(MemoryStore::new());
    if let Some(limit) = limit {
        builder = builder.layer(ConcurrencyLimitLayer::new(limit));
    }
    let consumer = builder
        .handler_with_state(busy_for_20ms, gauge.clone())
        .unwrap();
    let stats = broker
        .worker(queue, consumer)
        .prefetch(16)
        .run_until_idle()
        .await;
    (stats, gauge)
}

#[tokio::test(start_paused = true)]
async fn concurrency_limit_caps_the_handlers_running_at_once() {
    let (stats, gauge) = run_busy("limit", Some(3)).await;
    assert_eq!(
        (stats.processed, stats.retries, stats.dead_lettered),
        (30, 0, 0)
    );
    assert_eq!(gauge.runs.load(Ordering::SeqCst), 30);
    // Never more than 3; and 3 were reached, so the limit is what bound them.
    assert_eq!(gauge.max.load(Ordering::SeqCst), 3);

    // Control: without the layer, the prefetch alone lets more run at once.
    let (_, gauge) = run_busy("nolimit", None).await;
    assert!(gauge.max.load(Ordering::SeqCst) > 3);
}

type Starts = Arc<Mutex<Vec<Instant>>>;

async fn record_start(State(starts): State<Starts>) {
    starts.lock().unwrap().push(Instant::now());
}

/// The most handler starts in any span of `width` beginning at a start.
fn densest(starts: &[Instant], width: Duration) -> usize {
    starts
        .iter()
        .map(|&t| starts.iter().filter(|&&s| s >= t && s < t + width).count())
        .max()
        .unwrap_or(0)
}

#[tokio::test(start_paused = true)]
async fn rate_limit_spreads_handler_starts_over_time() {
    // tower's RateLimit is not Clone; `service` takes it as it is.
    let broker = MemoryBroker::new();
    publish(&broker, "rate", 10);
    let starts = Starts::default();
    let limited = ServiceBuilder::new()
        .rate_limit(2, Duration::from_millis(100))
        .service(HandlerService::new(record_start, starts.clone()));
    let consumer = Consumer::builder("rate")
        .store(MemoryStore::new())
        .service(limited)
        .unwrap();
    let began = Instant::now();
    let stats = broker.worker("rate", consumer).run_until_idle().await;
    assert_eq!((stats.processed, stats.dead_lettered), (10, 0));
    let starts = starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 10);
    // 2 starts per 100 ms: never more than 2 close together (a span a little shorter
    // than the window), and 10 starts need at least 5 windows, so the last one comes
    // at least 400 ms after the first (allowing 50 ms).
    assert!(
        densest(&starts, Duration::from_millis(90)) <= 2,
        "{starts:?}"
    );
    let last = starts.iter().max().unwrap().duration_since(began);
    assert!(last >= Duration::from_millis(350), "{last:?}");

    // The same through `layer`, and the control without it: all 10 start at once.
    for (queue, limit) in [("rate-layer", true), ("rate-none", false)] {
        let broker = MemoryBroker::new();
        publish(&broker, queue, 10);
        let starts = Starts::default();
        let mut builder = Consumer::builder(queue).store(MemoryStore::new());
        if limit {
            builder = builder.layer(RateLimitLayer::new(2, Duration::from_millis(100)));
        }
        let consumer = builder
            .handler_with_state(record_start, starts.clone())
            .unwrap();
        broker.worker(queue, consumer).run_until_idle().await;
        let starts = starts.lock().unwrap().clone();
        let dense = densest(&starts, Duration::from_millis(90));
        if limit {
            assert!(dense <= 2, "{queue}: {starts:?}");
        } else {
            assert_eq!(dense, 10, "{queue}: {starts:?}");
        }
    }
}

type Runs = Arc<Mutex<HashMap<String, u32>>>;

async fn slow_once_per_id(State(runs): State<Runs>, meta: Metadata) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    let id = meta.properties.message_id.unwrap_or_default();
    *runs.lock().unwrap().entry(id).or_default() += 1;
}

#[tokio::test(start_paused = true)]
async fn load_shed_rejections_are_retried_as_transient_not_lost() {
    let broker = MemoryBroker::new();
    publish(&broker, "shed", 8);
    let runs = Runs::default();
    let consumer = Consumer::builder("shed")
        .store(MemoryStore::new())
        .backoff(
            Backoff::exponential(Duration::from_millis(100))
                .jitter(Jitter::Full)
                .max_attempts(50),
        )
        .layer(LoadShedLayer::new())
        .layer(ConcurrencyLimitLayer::new(1))
        .handler_with_state(slow_once_per_id, runs.clone())
        .unwrap();
    let stats = broker
        .worker("shed", consumer)
        .prefetch(4)
        .run_until_idle()
        .await;
    // Deliveries arriving while the one slot is taken were shed, and retried.
    assert!(stats.retries > 0, "{stats}");
    // None lost, none dead-lettered, each handled exactly once.
    assert_eq!((stats.processed, stats.dead_lettered), (8, 0), "{stats}");
    assert!(broker.is_empty("shed.dlq"));
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), 8);
    assert!(runs.values().all(|&n| n == 1), "{runs:?}");
}

#[tokio::test(start_paused = true)]
async fn a_shed_delivery_is_a_transient_failure_naming_the_overload() {
    // One delivery holds the only slot; a second one arriving meanwhile is shed.
    let runs = Runs::default();
    let consumer = Consumer::builder("shed-one")
        .layer(LoadShedLayer::new())
        .layer(ConcurrencyLimitLayer::new(1))
        .handler_with_state(slow_once_per_id, runs.clone())
        .unwrap();
    let first = tokio::spawn({
        let c = consumer.clone();
        async move { c.process(Message::new("{}").with_message_id("a")).await }
    });
    tokio::task::yield_now().await;
    let shed = consumer
        .process(Message::new("{}").with_message_id("b"))
        .await;
    let text = format!("{shed:?}");
    assert!(text.starts_with("Retry"), "{text}");
    assert!(
        text.contains("Transient") && text.contains("service overloaded"),
        "{text}"
    );
    let first = format!("{:?}", first.await.unwrap());
    assert!(first.starts_with("Ack"), "{first}");
    assert_eq!(runs.lock().unwrap().len(), 1);
}

#[test]
fn a_consumer_with_layers_is_built_outside_a_runtime() {
    // tower's RateLimit needs a runtime when it is created: the consumer creates its
    // layers on the first delivery, so building it here, with no runtime, is fine.
    let starts = Starts::default();
    let consumer = Consumer::builder("outside")
        .layer(RateLimitLayer::new(1, Duration::from_secs(1)))
        .handler_with_state(record_start, starts.clone())
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..2 {
            let d = consumer
                .process(Message::new("{}").with_message_id(format!("m-{i}")))
                .await;
            assert!(format!("{d:?}").starts_with("Ack"), "{d:?}");
        }
    });
    let starts = starts.lock().unwrap();
    assert_eq!(starts.len(), 2);
    assert!(starts[1].duration_since(starts[0]) >= Duration::from_millis(900));
}
