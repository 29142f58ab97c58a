//! A `Service` runs several consumers in one process and stops them together: against
//! the real local RabbitMQ (`AMQP_URL`), with `rabbitmqctl` to read what the broker
//! holds. Its own test binary: the service installs the process-global metrics
//! recorder.
//!
//! - Three consumers (three queues, an in-memory dedup store each) share 300 messages;
//!   the service is stopped (its handle's graceful stop, what SIGTERM does) while
//!   handlers run: every handler that started finishes, nothing stays unacked, and a
//!   second service finishes the rest with every message applied exactly once. One
//!   scrape of the shared listener shows all three consumers' series.
//! - A consumer whose queue cannot be declared fails the service: the others are
//!   stopped and the error names it.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{broker, unique, url};
use idem_amqp::{Error, Publisher, Service, Topology};
use idem_core::{Consumer, IdempotencyKey, MemoryStore, Message, State};
use idem_testkit::broker::{connection_open, declare_queue, queue_counts, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PER_CONSUMER: usize = 100;

/// What the handlers of every consumer saw.
#[derive(Default)]
struct Probe {
    started: AtomicUsize,
    finished: AtomicUsize,
    effects: Mutex<HashMap<String, usize>>,
}

impl Probe {
    fn applied(&self) -> usize {
        self.effects.lock().unwrap().len()
    }
}

/// Takes a while (so a stop finds handlers in flight), then applies its effect.
async fn handler(State(probe): State<Arc<Probe>>, key: IdempotencyKey) {
    probe.started.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
    *probe
        .effects
        .lock()
        .unwrap()
        .entry(key.as_str().to_owned())
        .or_default() += 1;
    probe.finished.fetch_add(1, Ordering::SeqCst);
}

/// One consumer of the test: its queue, name and dedup store.
struct Lane {
    topology: Topology,
    name: String,
    store: MemoryStore,
}

impl Lane {
    fn consumer(&self, probe: &Arc<Probe>) -> Consumer {
        Consumer::builder(self.name.as_str())
            .store(self.store.clone())
            .handler_with_state(handler, probe.clone())
            .unwrap()
    }
}

fn service(lanes: &[Lane], probe: &Arc<Probe>) -> idem_amqp::ServiceBuilder {
    lanes.iter().fold(Service::builder(url()), |s, lane| {
        s.consumer(lane.topology.clone(), lane.consumer(probe), |w| {
            w.prefetch(10).concurrency(4)
        })
    })
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn wait_for(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    assert!(
        wait_until(limit, async || cond()).await,
        "timed out waiting for {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_stops_all_consumers_together_and_loses_nothing() {
    let (_conn, ch) = broker("idem-test-service-admin").await;
    let lanes: Vec<Lane> = ["a", "b", "c"]
        .iter()
        .map(|l| {
            let queue = unique(&format!("service-{l}"));
            Lane {
                name: format!("{queue}-consumer"),
                topology: Topology::new(queue),
                store: MemoryStore::new(),
            }
        })
        .collect();
    let publisher = Publisher::connect(&url()).await.unwrap();
    for lane in &lanes {
        lane.topology.declare_on(&ch).await.unwrap();
        let mut msgs: Vec<Message> = (0..PER_CONSUMER)
            .map(|i| Message::new("x").with_message_id(format!("{}-{i}", lane.name)))
            .collect();
        publisher
            .publish_batch("", lane.topology.queue(), &mut msgs)
            .await
            .unwrap();
    }
    let addr = {
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        probe.local_addr().unwrap()
    };

    // First run: stopped while handlers of every consumer are running.
    let first = Arc::new(Probe::default());
    let running = service(&lanes, &first)
        .listen(addr)
        .shutdown_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .spawn();
    wait_for("60 messages applied", Duration::from_secs(30), || {
        first.applied() >= 60
    })
    .await;
    let body = scrape(addr).await;
    let in_flight = first.started.load(Ordering::SeqCst) - first.finished.load(Ordering::SeqCst);
    let stats = running.shutdown_and_join().await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for lane in &lanes {
        let series = format!(r#"idem_processed_total{{consumer="{}"}}"#, lane.name);
        assert!(body.contains(&series), "no {series} in:\n{body}");
    }
    assert!(in_flight > 0, "the stop found no handler running");
    assert_eq!(
        first.started.load(Ordering::SeqCst),
        first.finished.load(Ordering::SeqCst),
        "a handler in flight at the stop was cut off"
    );
    let names: Vec<&str> = stats.iter().map(|(n, _)| n.as_str()).collect();
    let expected: Vec<&str> = lanes.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, expected);
    let first_applied = first.applied();
    assert!(
        first_applied < 3 * PER_CONSUMER,
        "nothing left for the second run"
    );
    for lane in &lanes {
        let q = lane.topology.queue().to_owned();
        let settled = wait_until(Duration::from_secs(5), async || {
            let c = queue_counts(&q).await;
            c.unacked == 0 && c.consumers == 0
        })
        .await;
        assert!(settled, "{q} after the stop: {:?}", queue_counts(&q).await);
        assert!(!connection_open(&format!("idem:{}", lane.name)).await);
    }
    let left: u64 = {
        let mut n = 0;
        for lane in &lanes {
            n += queue_counts(lane.topology.queue()).await.ready;
        }
        n
    };
    assert_eq!(
        left as usize + first_applied,
        3 * PER_CONSUMER,
        "every message is either applied (and acked) or back in its queue"
    );

    // Second run: finishes the rest.
    let second = Arc::new(Probe::default());
    let running = service(&lanes, &second).build().unwrap().spawn();
    wait_for("every message applied", Duration::from_secs(30), || {
        first_applied + second.applied() >= 3 * PER_CONSUMER
    })
    .await;
    let stats = running.shutdown_and_join().await.unwrap();
    for (name, s) in &stats {
        assert_eq!(
            s.duplicates, 0,
            "{name}: an ack of the first run was not sent"
        );
    }
    let mut all = first.effects.lock().unwrap().clone();
    for (key, n) in second.effects.lock().unwrap().iter() {
        *all.entry(key.clone()).or_default() += n;
    }
    assert_eq!(all.len(), 3 * PER_CONSUMER);
    let twice: Vec<_> = all.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    for lane in &lanes {
        let q = lane.topology.queue().to_owned();
        let empty = wait_until(Duration::from_secs(5), async || {
            let c = queue_counts(&q).await;
            c.ready == 0 && c.unacked == 0 && c.consumers == 0
        })
        .await;
        assert!(empty, "{q} at the end: {:?}", queue_counts(&q).await);
        lane.topology.delete_on(&ch).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_fails_naming_the_consumer_and_stops_the_others() {
    let (_conn, ch) = broker("idem-test-service-fail-admin").await;
    let good = Topology::new(unique("service-good"));
    let bad = Topology::new(unique("service-bad"));
    // A plain queue under the bad topology's name: its declaration is refused.
    declare_queue(&ch, bad.queue()).await;
    let good_name = format!("{}-consumer", good.queue());
    let bad_name = format!("{}-consumer", bad.queue());
    let consumer = |name: &str| {
        Consumer::builder(name)
            .store(MemoryStore::new())
            .handler(|| async {})
            .unwrap()
    };
    let service = Service::builder(url())
        .consumer(good.clone(), consumer(&good_name), |w| w)
        .consumer(bad.clone(), consumer(&bad_name), |w| w)
        .build()
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), service.run(std::future::pending()))
        .await
        .expect("the service did not stop after a consumer failed")
        .unwrap_err();
    match &err {
        Error::Consumer { consumer, source } => {
            assert_eq!(consumer, &bad_name);
            assert!(matches!(**source, Error::Inequivalent { .. }), "{source}");
        }
        other => panic!("expected Error::Consumer, got {other}"),
    }
    assert!(err.to_string().contains(&bad_name), "{err}");
    let closed = wait_until(Duration::from_secs(5), async || {
        !connection_open(&format!("idem:{good_name}")).await
    })
    .await;
    assert!(closed, "the good consumer's connection stayed open");

    // Two consumers with one name are refused before anything runs.
    let dup = Service::builder(url())
        .consumer(good.clone(), consumer(&good_name), |w| w)
        .consumer(bad.clone(), consumer(&good_name), |w| w)
        .build()
        .unwrap_err();
    assert!(
        matches!(dup, Error::DuplicateConsumer(ref n) if *n == good_name),
        "{dup}"
    );

    good.delete_on(&ch).await.unwrap();
    bad.delete_on(&ch).await.unwrap();
}
