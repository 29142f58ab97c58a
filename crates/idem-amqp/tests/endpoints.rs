//! Several broker URLs (`Endpoints`) against the real local RabbitMQ (`AMQP_URL`,
//! default `amqp://guest:guest@127.0.0.1:5672/%2f`; see the README section "Set-up").
//! A dead endpoint is a closed port (127.0.0.1:1) or a local listener that drops every
//! connection. Unique queue names, deleted at the end.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_amqp::{Endpoints, Error, Publisher, Topology, Worker};
use idem_core::{Consumer, MemoryStore, Message, TlsConfig};
use tokio::net::TcpListener;

const DEAD: &str = "amqp://guest:hunter2@127.0.0.1:1/%2f";

fn url() -> String {
    idem_amqp::amqp_url_from_env()
}

async fn admin() -> lapin::Connection {
    idem_amqp::connect(&url(), "idem-test-endpoints-admin")
        .await
        .unwrap_or_else(|e| {
            panic!("RabbitMQ not reachable: {e}. See the README section Set-up, or set AMQP_URL")
        })
}

fn unique(prefix: &str) -> String {
    format!("idem-test-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A port that accepts TCP connections and closes them at once, counting them: a node
/// that is "there" but never completes the AMQP handshake.
async fn dropping_node() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (format!("amqp://guest:hunter2@127.0.0.1:{port}/%2f"), hits)
}

#[tokio::test]
async fn a_dead_first_endpoint_is_skipped_by_connect_publisher_and_worker() {
    let list = format!("{DEAD},{}", url());
    let conn = admin().await;
    let ch = conn.create_channel().await.unwrap();

    // connect: a comma-separated string.
    let c = idem_amqp::connect(list.as_str(), "idem-test-endpoints")
        .await
        .unwrap();
    assert!(c.status().connected());
    c.close(200, "bye".into()).await.unwrap();

    // Publisher: a typed list.
    let topo = Topology::new(unique("endpoints"))
        .tiers(idem_amqp::DelayTiers::new([Duration::from_secs(1)]).unwrap());
    topo.declare_on(&ch).await.unwrap();
    let publisher = Publisher::builder(Endpoints::from([DEAD.to_owned(), url()]))
        .connection_name("idem-test-endpoints-publisher")
        .connect()
        .await
        .unwrap();
    let mut msgs: Vec<Message> = (0..3)
        .map(|i| Message::new("x").with_message_id(format!("e{i}")))
        .collect();
    publisher
        .publish_batch("", topo.queue(), &mut msgs)
        .await
        .unwrap();

    // Worker: the same string.
    let consumer = Consumer::builder("endpoints-test")
        .store(MemoryStore::new())
        .handler(|| async {})
        .unwrap();
    let worker = Worker::builder(list.as_str(), topo.clone(), consumer.clone())
        .build()
        .unwrap();
    let running = worker.spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while consumer.stats().processed < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not consumed through the second endpoint: {}",
            consumer.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown_and_join().await.unwrap();
    publisher.close().await;
    topo.delete_on(&ch).await.unwrap();
}

#[tokio::test]
async fn all_dead_endpoints_fail_naming_each_without_passwords() {
    let (dropping, _) = dropping_node().await;
    let list = format!("{DEAD},{dropping}");
    for err in [
        idem_amqp::connect(list.as_str(), "idem-test-endpoints")
            .await
            .unwrap_err(),
        Publisher::connect(list.as_str()).await.unwrap_err(),
    ] {
        let text = err.to_string();
        assert!(matches!(err, Error::NoEndpoint { .. }), "{text}");
        assert!(text.contains("none of the 2 RabbitMQ endpoints"), "{text}");
        assert!(text.contains("guest:***@127.0.0.1:1/"), "{text}");
        assert!(text.contains(&idem_amqp::redact_url(&dropping)), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
    let consumer = Consumer::builder("endpoints-dead")
        .handler(|| async {})
        .unwrap();
    let worker = Worker::builder(list.as_str(), "q", consumer)
        .build()
        .unwrap();
    let err = worker.run(std::future::pending()).await.unwrap_err();
    assert!(matches!(err, Error::NoEndpoint { .. }), "{err}");
}

#[tokio::test]
async fn the_next_connection_starts_after_the_endpoint_last_used() {
    let _ = admin().await;
    let (dropping, hits) = dropping_node().await;
    // The live node first, the dropping one second.
    let endpoints = Endpoints::from([url(), dropping]);
    let tls = TlsConfig::default();
    let first = endpoints.connect("idem-test-rotation", &tls).await.unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the first URL answered");
    // As after a loss: the next connection tries the second URL first, then wraps.
    let second = endpoints.connect("idem-test-rotation", &tls).await.unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 1, "rotation tried URL 2 first");
    assert!(second.status().connected());
    for c in [first, second] {
        c.close(200, "bye".into()).await.unwrap();
    }
}
