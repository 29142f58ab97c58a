//! Full idem stack on the in-memory transport against the bare handler called directly.
//!
//! `cargo bench -p idem-core --bench stack`. `consumer_process` runs the stack
//! without a broker (one delivery at a time), `memory_broker_full_stack` adds the
//! in-memory broker (prefetch 100, task per delivery). Both sides handle the same 1 000 JSON
//! messages with unique keys per iteration; the ratio of their times is idem's
//! per-message overhead (extractors, classification, timeout, dedup claim/complete in
//! the in-memory store, tracing span, metrics, broker queueing and settlement).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use idem_core::memory::MemoryBroker;
use idem_core::{Consumer, HandlerError, Json, MemoryStore, Message};

const BATCH: usize = 1000;

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
    cents: u64,
}

async fn handle(Json(order): Json<Order>) -> Result<(), HandlerError> {
    std::hint::black_box(order.id + order.cents);
    Ok(())
}

fn messages(round: u64) -> Vec<Message> {
    (0..BATCH as u64)
        .map(|i| {
            Message::new(format!(r#"{{"id":{i},"cents":{}}}"#, i * 3))
                .with_message_id(format!("r{round}-m{i}"))
                .with_content_type("application/json")
        })
        .collect()
}

/// A batch of messages per call, with keys of their own (round 1, 2, ...).
fn fresh_batches() -> impl FnMut() -> Vec<Message> {
    let mut round = 0u64;
    move || {
        round += 1;
        messages(round)
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("stack");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.measurement_time(Duration::from_secs(8));

    let mut batches = fresh_batches();
    group.bench_function("bare_handler", |b| {
        b.to_async(&rt).iter_batched(
            &mut batches,
            |msgs| async move {
                for m in msgs {
                    let Json(order) =
                        <Json<Order> as idem_core::FromMessage<()>>::from_message(&m, &())
                            .expect("valid JSON");
                    handle(Json(order)).await.expect("handler ok");
                }
            },
            BatchSize::SmallInput,
        )
    });

    let store = MemoryStore::new();
    let direct = Consumer::builder("bench-direct")
        .store(store.clone())
        .handler(handle)
        .expect("valid consumer");
    let mut batches = fresh_batches();
    group.bench_function("consumer_process", |b| {
        b.to_async(&rt).iter_batched(
            &mut batches,
            |msgs| {
                let direct = direct.clone();
                async move {
                    for m in msgs {
                        std::hint::black_box(direct.process(m).await);
                    }
                }
            },
            BatchSize::SmallInput,
        )
    });

    let consumer = Consumer::builder("bench")
        .store(store)
        .handler(handle)
        .expect("valid consumer");
    let mut batches = fresh_batches();
    group.bench_function("memory_broker_full_stack", |b| {
        b.to_async(&rt).iter_batched(
            || {
                let broker = MemoryBroker::new();
                for m in batches() {
                    broker.publish("bench", m);
                }
                broker
            },
            |broker| {
                let consumer = consumer.clone();
                async move {
                    broker
                        .worker("bench", consumer)
                        .prefetch(100)
                        .run_until_idle()
                        .await;
                }
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
