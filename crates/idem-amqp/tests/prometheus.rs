//! The worker's Prometheus endpoint serves the consumer's metrics. Its own test binary:
//! it installs the process-global metrics recorder.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::time::Duration;

use idem_amqp::{Publisher, Topology, Worker};
use idem_core::{Consumer, MemoryStore, Message};
use idem_testkit::http::get_raw;
use tokio::net::TcpListener;

#[tokio::test]
async fn worker_serves_consumer_metrics_on_its_endpoint() {
    let url = idem_amqp::amqp_url_from_env();
    let admin = idem_testkit::rabbitmq("idem-test-metrics-admin").await;
    let ch = admin.create_channel().await.unwrap();
    let topo = Topology::new(format!(
        "idem-test-metrics-{}",
        uuid::Uuid::new_v4().simple()
    ));
    topo.declare_on(&ch).await.unwrap();
    // The consumer is built before the worker installs the recorder.
    let consumer = Consumer::builder("metrics-test")
        .store(MemoryStore::new())
        .handler(|| async {})
        .unwrap();
    let publisher = Publisher::connect(&url).await.unwrap();
    let mut msgs: Vec<Message> = (0..4)
        .map(|i| Message::new("x").with_message_id(format!("m{i}")))
        .chain([Message::new("x").with_message_id("m0")])
        .collect();
    publisher
        .publish_batch("", topo.queue(), &mut msgs)
        .await
        .unwrap();

    let addr = {
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        probe.local_addr().unwrap()
    };
    let worker = Worker::builder(&url, topo.clone(), consumer.clone())
        .prometheus(addr)
        .build()
        .unwrap();
    let running = worker.spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while consumer.stats().processed + consumer.stats().duplicates < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages not consumed: {}",
            consumer.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = get_raw(addr, "/metrics").await;
    running.shutdown_and_join().await.unwrap();
    topo.delete_on(&ch).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains(r#"idem_processed_total{consumer="metrics-test"} 4"#),
        "{body}"
    );
    assert!(
        body.contains(r#"idem_duplicates_total{consumer="metrics-test"} 1"#),
        "{body}"
    );
    assert!(body.contains("idem_handler_duration_seconds"), "{body}");
}
