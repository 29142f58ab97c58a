//! One process hosts two consumers and the outbox relay: an `idem_amqp::Service` with
//! the relay as a hosted task, against the real local RabbitMQ and PostgreSQL
//! (`AMQP_URL`, `DATABASE_URL`; see "Running the tests" in the README). Its own test
//! binary: the service's listener installs the process-global metrics recorder, and
//! `/ready` answers for every source of the process.
//!
//! - `/ready` knows both consumers from its first answer, and follows the relay: 200 while its outbox is empty, 503 naming the relay
//!   once a row it cannot publish (no queue is bound to its routing key) is older than
//!   the relay's threshold, 200 again once the queue exists and the relay's retry has
//!   published the row. The consumers stay ready throughout.
//! - A producer enqueues rows for the two consumers' queues while the host runs; the
//!   host is stopped (its handle's graceful stop, what SIGTERM does) while handlers of
//!   both consumers are running and rows keep coming: every handler that started
//!   finishes, nothing stays unacked, every row the relay marked published is applied
//!   or waits in its queue, and the rows enqueued after the stop stay pending. A second
//!   host finishes the rest: every row applied exactly once, no duplicate delivery (a
//!   relay cut between publish and mark, or an ack lost at the stop, would show as one).

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_amqp::readiness::{Readiness, SourceKind};
use idem_amqp::{DelayTiers, Service, ServiceBuilder, Topology};
use idem_core::Consumer;
use idem_outbox::{Outbox, OutboxMessage, Relay};
use idem_testkit::broker::{
    assert_settled, connection_open, declare_queue, ready_count, wait_until,
};
use idem_testkit::graceful::{stop_while_held, Gated};
use idem_testkit::http::{get, try_get};
use idem_testkit::probe::{assert_each_once, Probe};
use sqlx::PgPool;
use tokio::net::TcpListener;

/// One consumer of the host: its queue, and its dedup store (kept across both hosts)
/// and gate.
struct Lane {
    topology: Topology,
    gated: Gated,
}

impl Lane {
    async fn new(ch: &lapin::Channel, tag: &str) -> Self {
        let topology = Topology::new(idem_testkit::unique(tag))
            .tiers(DelayTiers::new([Duration::from_secs(1)]).unwrap());
        topology.declare_on(ch).await.unwrap();
        Lane {
            topology,
            gated: Gated::default(),
        }
    }

    fn queue(&self) -> &str {
        self.topology.queue()
    }

    /// Its consumer: each run waits for a permit, then applies `<queue>/<message id>`.
    fn consumer(&self, probe: &Arc<Probe>) -> Consumer {
        let name = format!("{}-consumer", self.queue());
        let prefix = format!("{}/", self.queue());
        self.gated
            .consumer(name, probe, Duration::from_millis(2), &prefix)
    }
}

/// A host: both lanes' consumers on one shared connection, the relay of `outbox` as a
/// hosted task reporting into the global registry (threshold 1 s), the listener at
/// `addr`.
fn host(
    lanes: &[Lane; 2],
    probe: &Arc<Probe>,
    pool: &PgPool,
    outbox: &Outbox,
    addr: SocketAddr,
    connection: &str,
) -> ServiceBuilder {
    let url = idem_amqp::amqp_url_from_env();
    let relay = Relay::builder(pool.clone(), outbox.clone(), url.as_str())
        .connection_name(format!("{connection}-relay"))
        .batch_size(20)
        .poll_interval(Duration::from_millis(50))
        .readiness(&Readiness::global(), Duration::from_secs(1))
        .build();
    let mut service = Service::builder(url.as_str())
        .listen(addr)
        .connections(1)
        .connection_name(connection)
        .shutdown_timeout(Duration::from_secs(10))
        .task(relay);
    for lane in lanes {
        service = service.consumer(lane.topology.clone(), lane.consumer(probe), |w| {
            w.prefetch(10).concurrency(4)
        });
    }
    service
}

/// Polls `/ready` until it answers `status` with a source for the relay of `table`
/// (which registers once it runs); the JSON body then.
async fn ready_turns(
    addr: SocketAddr,
    table: &str,
    status: u16,
    limit: Duration,
) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let last = try_get(addr, "/ready").await;
        if let Some((got, body)) = &last {
            let body: serde_json::Value = serde_json::from_str(body).unwrap();
            if *got == status && has_source(&body, "relay", table) {
                return body;
            }
        }
        assert!(
            start.elapsed() < limit,
            "/ready did not turn {status} within {limit:?}; last answer: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The source of `kind` named `name` in a `/ready` body, if it is there.
fn source<'a>(
    body: &'a serde_json::Value,
    kind: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    body["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == kind && s["name"] == name)
}

fn has_source(body: &serde_json::Value, kind: &str, name: &str) -> bool {
    source(body, kind, name).is_some()
}

/// The `ready` field of the source of `kind` named `name` in a `/ready` body.
fn source_ready(body: &serde_json::Value, kind: &str, name: &str) -> bool {
    source(body, kind, name).unwrap_or_else(|| panic!("no {kind} {name} in {body}"))["ready"]
        .as_bool()
        .unwrap()
}

/// Rows of `outbox` to `queues`, published (marked) or still pending.
async fn rows(pool: &PgPool, outbox: &Outbox, queues: &[&str], published: bool) -> usize {
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE routing_key = ANY($1) AND (published_at IS NOT NULL) = $2",
        outbox.table_name()
    ))
    .bind(queues)
    .bind(published)
    .fetch_one(pool)
    .await
    .unwrap();
    n as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_two_consumers_and_relay_drain_on_stop_and_ready_follows_the_relay() {
    let pool = common::pg().await;
    let outbox = Outbox::new(&idem_testkit::unique("host_outbox")).unwrap();
    outbox.ensure_schema(&pool).await.unwrap();
    let (_conn, ch) = common::rabbit().await;
    let lanes = [
        Lane::new(&ch, "host_a").await,
        Lane::new(&ch, "host_b").await,
    ];
    let queues = [lanes[0].queue(), lanes[1].queue()];
    let late_queue = idem_testkit::unique("host_late");
    let connection = idem_testkit::unique("host_conn");
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let table = outbox.table_name().to_owned();

    let first = Arc::new(Probe::default());
    let service = host(&lanes, &first, &pool, &outbox, addr, &connection)
        .build()
        .unwrap();
    assert_eq!(
        service.tasks().collect::<Vec<_>>(),
        [format!("outbox-relay:{table}")]
    );
    let running = service.spawn();

    // The consumers are readiness sources before the listener answers at all.
    let start = std::time::Instant::now();
    let first_answer = loop {
        if let Some((_, body)) = try_get(addr, "/ready").await {
            break serde_json::from_str::<serde_json::Value>(&body).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the listener never answered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for lane in &lanes {
        let name = format!("{}-consumer", lane.queue());
        assert!(
            has_source(&first_answer, "consumer", &name),
            "{first_answer}"
        );
    }

    // `/ready` follows the relay.
    let body = ready_turns(addr, &table, 200, Duration::from_secs(20)).await;
    assert!(source_ready(&body, "relay", &table), "{body}");
    let late = OutboxMessage::new("", late_queue.as_str(), b"late".to_vec());
    common::enqueue(&pool, &outbox, late).await;
    let body = ready_turns(addr, &table, 503, Duration::from_secs(15)).await;
    let reasons: Vec<&str> = body["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 1, "{body}");
    assert!(
        reasons[0].starts_with(&format!("relay {table}: oldest pending outbox row")),
        "{body}"
    );
    for lane in &lanes {
        let name = format!("{}-consumer", lane.queue());
        assert!(source_ready(&body, "consumer", &name), "{body}");
    }
    declare_queue(&ch, &late_queue).await;
    let body = ready_turns(addr, &table, 200, Duration::from_secs(30)).await;
    assert!(source_ready(&body, "relay", &table), "{body}");
    assert_eq!(
        ready_count(&ch, &late_queue).await,
        1,
        "the late row was published"
    );

    // Rows keep coming; the host is stopped while handlers of both consumers run.
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (pool, outbox, producing) = (pool.clone(), outbox.clone(), producing.clone());
        let queues = queues.map(str::to_owned);
        tokio::spawn(async move {
            let mut ids = HashSet::new();
            for i in 0..2000 {
                if !producing.load(Ordering::SeqCst) {
                    break;
                }
                let queue = &queues[i % 2];
                let mut tx = pool.begin().await.unwrap();
                let msg = OutboxMessage::new("", queue.as_str(), b"x".to_vec());
                let id = outbox.enqueue(&mut tx, msg).await.unwrap();
                tx.commit().await.unwrap();
                ids.insert(format!("{queue}/{id}"));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ids
        })
    };
    for lane in &lanes {
        lane.gated.admit(20);
    }
    assert!(
        wait_until(Duration::from_secs(30), async || {
            queues.iter().all(|q| first.applied_with(q) == 20) && first.in_flight() >= 2
        })
        .await,
        "20 rows applied per consumer and handlers held: applied {} in flight {}",
        first.applied(),
        first.in_flight()
    );
    let (_, metrics) = get(addr, "/metrics").await;
    for q in queues {
        let series = format!(r#"idem_processed_total{{consumer="{q}-consumer"}}"#);
        assert!(metrics.contains(&series), "no {series} in:\n{metrics}");
    }
    assert!(metrics.contains("idem_outbox_published_total"), "{metrics}");
    let open_gates = || lanes.iter().for_each(|l| l.gated.open());
    let stats = stop_while_held(running, &first, open_gates).await.unwrap();
    assert_eq!(stats.len(), 2);
    // Rows enqueued after the stop: nothing publishes them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    producing.store(false, Ordering::SeqCst);
    let produced = producer.await.unwrap();

    for q in queues {
        assert_settled(q, Duration::from_secs(5)).await;
    }
    assert!(
        !connection_open(&connection).await,
        "the shared connection stayed open"
    );
    assert!(
        !connection_open(&format!("{connection}-relay")).await,
        "the relay's connection stayed open"
    );
    let report = Readiness::global().report();
    assert!(
        report.sources.iter().all(|s| s.kind != SourceKind::Relay),
        "the relay's readiness source stayed: {report:?}"
    );
    let published = rows(&pool, &outbox, &queues, true).await;
    let pending = rows(&pool, &outbox, &queues, false).await;
    assert_eq!(published + pending, produced.len());
    assert!(pending > 0, "no row was left pending by the stop");
    let queued = ready_count(&ch, queues[0]).await + ready_count(&ch, queues[1]).await;
    assert_eq!(
        first.applied() + queued as usize,
        published,
        "every row the relay marked published is applied or waits in its queue"
    );

    // A second host finishes the rest.
    let second = Arc::new(Probe::default());
    for lane in &lanes {
        lane.gated.open();
    }
    let running = host(&lanes, &second, &pool, &outbox, addr, &connection)
        .build()
        .unwrap()
        .spawn();
    assert!(
        wait_until(Duration::from_secs(60), async || {
            first.applied() + second.applied() >= produced.len()
                && rows(&pool, &outbox, &queues, false).await == 0
        })
        .await,
        "every row applied: {} + {} of {}",
        first.applied(),
        second.applied(),
        produced.len()
    );
    let stats = running.shutdown_and_join().await.unwrap();
    for (name, s) in &stats {
        assert_eq!(s.duplicates, 0, "{name}: a duplicate delivery");
    }
    let all = first.merged(&second);
    let applied: HashSet<String> = all.keys().cloned().collect();
    assert_eq!(applied, produced, "the rows applied are the rows enqueued");
    assert_each_once(&all);

    for lane in &lanes {
        lane.topology.delete_on(&ch).await.unwrap();
    }
    ch.queue_delete(late_queue.as_str().into(), Default::default())
        .await
        .unwrap();
    idem_testkit::drop_pg_table(&pool, &table).await;
}
