//! The worker samples its dead-letter queue: `idem_dlq_messages{queue}` follows the
//! depth without consuming anything, `idem_dlq_oldest_age_seconds{queue}` counts from
//! the first dead letter and drops to 0 when the queue is seen empty.
//!
//! Needs RabbitMQ (`AMQP_URL`, see README, `bash .ci/services`). Its own test binary:
//! it installs the process-global metrics recorder.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::time::{Duration, Instant};

use idem_amqp::{Publisher, Topology, Worker};
use idem_core::{Consumer, HandlerError, MemoryStore, Message};
use lapin::options::QueuePurgeOptions;

fn gauge(text: &str, name: &str, queue: &str) -> Option<f64> {
    let prefix = format!("{name}{{queue=\"{queue}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_depth_and_age_are_sampled_without_consuming() {
    let metrics = idem_amqp::prometheus::install_recorder().unwrap();
    let url = idem_amqp::amqp_url_from_env();
    let conn = idem_testkit::rabbitmq("idem-test-dlq-metrics").await;
    let ch = conn.create_channel().await.unwrap();
    let topo = Topology::new(idem_testkit::unique("dlq-metrics"));
    topo.declare_on(&ch).await.unwrap();
    let dlq = topo.dlq();
    let consumer = Consumer::builder(idem_testkit::unique("dlq-metrics"))
        .store(MemoryStore::new())
        .handler(|| async { Err::<(), _>(HandlerError::permanent(std::io::Error::other("bad"))) })
        .unwrap();
    let worker = Worker::builder(url.as_str(), topo.clone(), consumer.clone())
        .dlq_sample_interval(Duration::from_millis(100))
        .build()
        .unwrap()
        .spawn();
    let wait_for = |what: &'static str, depth: f64, check: fn(f64) -> bool| {
        let metrics = metrics.clone();
        let dlq = dlq.clone();
        async move {
            let start = Instant::now();
            loop {
                let text = metrics.render();
                let d = gauge(&text, "idem_dlq_messages", &dlq);
                let age = gauge(&text, "idem_dlq_oldest_age_seconds", &dlq);
                if d == Some(depth) && age.is_some_and(check) {
                    return age.unwrap();
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{what}: depth {d:?}, age {age:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for("empty at start", 0.0, |age| age == 0.0).await;

    let publisher = Publisher::connect(&url).await.unwrap();
    for i in 0..2 {
        let mut msg = Message::new("x").with_message_id(format!("m-{i}"));
        publisher.publish("", topo.queue(), &mut msg).await.unwrap();
    }
    let first = wait_for("two dead letters", 2.0, |_| true).await;
    // Samples keep seeing both: reading the depth consumes nothing.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = wait_for("still two, older", 2.0, |age| age > 0.5).await;
    assert!(later > first, "{later} > {first}");

    ch.queue_purge(dlq.as_str().into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    wait_for("purged", 0.0, |age| age == 0.0).await;

    worker.shutdown_and_join().await.unwrap();
    publisher.close().await;
    assert_eq!(idem_testkit::broker::ready_count(&ch, &dlq).await, 0);
    assert_eq!(consumer.stats().dead_lettered, 2);
    topo.delete_on(&ch).await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
}
