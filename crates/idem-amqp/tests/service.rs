//! A `Service` runs several consumers in one process and stops them together: against
//! the real local RabbitMQ (`AMQP_URL`), with `rabbitmqctl` to read what the broker
//! holds. Its own test binary: the service installs the process-global metrics
//! recorder.
//!
//! - Three consumers (three queues, an in-memory dedup store each) share 300 messages;
//!   the service is stopped (its handle's graceful stop, what SIGTERM does) while
//!   handlers run: every handler that started finishes, nothing stays unacked, and a
//!   second service finishes the rest with every message applied exactly once. Once
//!   with a connection per consumer, once with the three on one shared connection,
//!   where one scrape of the shared listener also shows all three consumers' series.
//! - The shared connection is closed by the broker mid-run: all three consumers carry
//!   on over one new connection, every message applied exactly once.
//! - A consumer whose queue cannot be declared fails the service: the others are
//!   stopped and the error names it.
//! - Hosted tasks: one that returns an error fails the service (its consumer is
//!   stopped, the error names the task); on a stop, a task waiting for its shutdown
//!   signal returns, and one that ignores it is dropped at the shutdown timeout. The
//!   outbox relay as a hosted task is tested in idem-outbox (`tests/host.rs`).

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{broker, short_tiers, unique, url};
use futures_util::future::BoxFuture;
use idem_amqp::service::{HostedTask, TaskContext, TaskError};
use idem_amqp::{Error, Publisher, Service, Topology};
use idem_core::{Consumer, MemoryStore, Message};
use idem_testkit::broker::{
    assert_settled, close_connections_named, connection_closes, connection_open, connections_named,
    declare_queue, queue_counts, wait_until,
};
use idem_testkit::graceful::{stop_while_held, Gated};
use idem_testkit::http::get_raw;
use idem_testkit::probe::{assert_each_once, Probe};
use tokio::net::TcpListener;

const PER_CONSUMER: usize = 100;

/// One consumer of the test: its queue, name, dedup store and gate.
struct Lane {
    topology: Topology,
    name: String,
    gated: Gated,
}

impl Lane {
    /// Its consumer: each run waits for a permit, then applies the message's key.
    fn consumer(&self, probe: &Arc<Probe>) -> Consumer {
        self.gated
            .consumer(self.name.as_str(), probe, Duration::from_millis(5), "")
    }
}

fn service(lanes: &[Lane], probe: &Arc<Probe>, shared: Option<&str>) -> idem_amqp::ServiceBuilder {
    let builder = match shared {
        Some(name) => Service::builder(url()).connections(1).connection_name(name),
        None => Service::builder(url()),
    };
    lanes.iter().fold(builder, |s, lane| {
        s.consumer(lane.topology.clone(), lane.consumer(probe), |w| {
            w.prefetch(10).concurrency(4)
        })
    })
}

async fn wait_for(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    assert!(
        wait_until(limit, async || cond()).await,
        "timed out waiting for {what}"
    );
}

/// Three lanes with unique queues (declared, with short delay tiers) and
/// `per_lane` messages published to each.
async fn lanes(ch: &lapin::Channel, per_lane: usize) -> Vec<Lane> {
    let publisher = Publisher::connect(&url()).await.unwrap();
    let mut lanes = Vec::new();
    for l in ["a", "b", "c"] {
        let queue = unique(&format!("service-{l}"));
        let lane = Lane {
            name: format!("{queue}-consumer"),
            topology: Topology::new(queue).tiers(short_tiers()),
            gated: Gated::default(),
        };
        lane.topology.declare_on(ch).await.unwrap();
        let mut msgs: Vec<Message> = (0..per_lane)
            .map(|i| Message::new("x").with_message_id(format!("{}-{i}", lane.name)))
            .collect();
        publisher
            .publish_batch("", lane.topology.queue(), &mut msgs)
            .await
            .unwrap();
        lanes.push(lane);
    }
    lanes
}

/// Runs `service` until it fails; panics if it is still running after 30 s, naming
/// `what` should have stopped it.
async fn failure(service: Service, what: &str) -> Error {
    tokio::time::timeout(Duration::from_secs(30), service.run(std::future::pending()))
        .await
        .unwrap_or_else(|_| panic!("the service did not stop after {what}"))
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_stops_all_consumers_together_and_loses_nothing() {
    stop_in_flight_then_finish(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_on_one_shared_connection_stops_together_and_serves_one_metrics() {
    stop_in_flight_then_finish(Some(unique("service-conn"))).await;
}

/// With `shared` (a connection name): on one shared connection, with the listener.
async fn stop_in_flight_then_finish(shared: Option<String>) {
    let (_conn, ch) = broker("idem-test-service-admin").await;
    let lanes = lanes(&ch, PER_CONSUMER).await;
    let addr = {
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        probe.local_addr().unwrap()
    };

    // First run: stopped while handlers of every consumer are running.
    let first = Arc::new(Probe::default());
    let mut builder =
        service(&lanes, &first, shared.as_deref()).shutdown_timeout(Duration::from_secs(10));
    if shared.is_some() {
        builder = builder.listen(addr);
    }
    let running = builder.build().unwrap().spawn();
    for lane in &lanes {
        lane.gated.admit(20);
    }
    wait_for(
        "20 messages applied per consumer, and handlers held",
        Duration::from_secs(30),
        || lanes.iter().all(|l| first.applied_with(&l.name) == 20) && first.in_flight() >= 3,
    )
    .await;
    if let Some(name) = &shared {
        let body = get_raw(addr, "/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        for lane in &lanes {
            let series = format!(r#"idem_processed_total{{consumer="{}"}}"#, lane.name);
            assert!(body.contains(&series), "no {series} in:\n{body}");
            let own = format!("idem:{}", lane.name);
            assert_eq!(connections_named(&own).await, 0, "{own}");
        }
        assert_eq!(connections_named(name).await, 1, "one shared connection");
    }
    let open_gates = || lanes.iter().for_each(|l| l.gated.open());
    let stats = stop_while_held(running, &first, open_gates).await.unwrap();
    let names: Vec<&str> = stats.iter().map(|(n, _)| n.as_str()).collect();
    let expected: Vec<&str> = lanes.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, expected);
    let first_applied = first.applied();
    assert!(
        first_applied < 3 * PER_CONSUMER,
        "nothing left for the second run"
    );
    for lane in &lanes {
        assert_settled(lane.topology.queue(), Duration::from_secs(5)).await;
        assert!(!connection_open(&format!("idem:{}", lane.name)).await);
    }
    if let Some(name) = &shared {
        assert!(
            !connection_open(name).await,
            "the shared connection stayed open"
        );
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
    for lane in &lanes {
        lane.gated.open();
    }
    let running = service(&lanes, &second, shared.as_deref())
        .build()
        .unwrap()
        .spawn();
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
    assert_exactly_once(&first.merged(&second), 3 * PER_CONSUMER);
    cleanup(&ch, &lanes).await;
}

fn assert_exactly_once(effects: &HashMap<String, usize>, total: usize) {
    assert_eq!(effects.len(), total);
    assert_each_once(effects);
}

/// Checks every lane's queue is empty and settled, then deletes its topology.
async fn cleanup(ch: &lapin::Channel, lanes: &[Lane]) {
    for lane in lanes {
        let q = lane.topology.queue().to_owned();
        let empty = wait_until(Duration::from_secs(5), async || {
            let c = queue_counts(&q).await;
            c.ready == 0 && c.unacked == 0 && c.consumers == 0
        })
        .await;
        assert!(empty, "{q} at the end: {:?}", queue_counts(&q).await);
        lane.topology.delete_on(ch).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_consumers_move_together_to_a_new_shared_connection() {
    const PER_LANE: usize = 50;
    let (_conn, ch) = broker("idem-test-service-reconnect-admin").await;
    let lanes = lanes(&ch, PER_LANE).await;
    let name = unique("service-conn");
    let probe = Arc::new(Probe::default());
    for lane in &lanes {
        lane.gated.open();
    }
    let running = service(&lanes, &probe, Some(&name))
        .build()
        .unwrap()
        .spawn();
    wait_for("30 messages applied", Duration::from_secs(30), || {
        probe.applied() >= 30
    })
    .await;
    assert_eq!(
        close_connections_named(&name, "idem-test: service reconnect").await,
        1
    );
    wait_for("every message applied", Duration::from_secs(60), || {
        probe.applied() >= 3 * PER_LANE
    })
    .await;
    assert_eq!(connections_named(&name).await, 1, "one connection again");
    let stats = running.shutdown_and_join().await.unwrap();
    assert_eq!(stats.len(), 3);
    let effects = probe.effects();
    assert_exactly_once(&effects, 3 * PER_LANE);
    cleanup(&ch, &lanes).await;
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
    let err = failure(service, "a consumer failed").await;
    match &err {
        Error::Consumer { consumer, source } => {
            assert_eq!(consumer, &bad_name);
            assert!(matches!(**source, Error::Inequivalent { .. }), "{source}");
        }
        other => panic!("expected Error::Consumer, got {other}"),
    }
    assert!(err.to_string().contains(&bad_name), "{err}");
    let closed = connection_closes(&format!("idem:{good_name}"), Duration::from_secs(5)).await;
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

/// A hosted task built from a closure.
struct FnTask<F>(&'static str, F);

impl<F, Fut> HostedTask for FnTask<F>
where
    F: FnOnce(TaskContext) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), TaskError>> + Send + 'static,
{
    fn name(&self) -> String {
        self.0.to_owned()
    }

    fn run(self: Box<Self>, ctx: TaskContext) -> BoxFuture<'static, Result<(), TaskError>> {
        Box::pin((self.1)(ctx))
    }
}

/// Sets its flag when dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn idle_consumer(name: &str) -> Consumer {
    Consumer::builder(name)
        .store(MemoryStore::new())
        .handler(|| async {})
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_task_error_stops_the_consumers_and_names_the_task() {
    let (_conn, ch) = broker("idem-test-service-task-admin").await;
    let topology = Topology::new(unique("service-task-fail"));
    let name = format!("{}-consumer", topology.queue());
    let service = Service::builder(url())
        .consumer(topology.clone(), idle_consumer(&name), |w| w)
        .task(FnTask("doomed", |_ctx| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Err::<(), TaskError>("the task's database is gone".into())
        }))
        .build()
        .unwrap();
    assert_eq!(service.tasks().collect::<Vec<_>>(), ["doomed"]);
    let err = failure(service, "a task failed").await;
    match &err {
        Error::Task { task, source } => {
            assert_eq!(task, "doomed");
            assert_eq!(source.to_string(), "the task's database is gone");
        }
        other => panic!("expected Error::Task, got {other}"),
    }
    assert_eq!(
        err.to_string(),
        r#"hosted task "doomed": the task's database is gone"#
    );
    let closed = connection_closes(&format!("idem:{name}"), Duration::from_secs(5)).await;
    assert!(closed, "the consumer's connection stayed open");
    topology.delete_on(&ch).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_stops_its_tasks_and_drops_one_that_overruns_the_shutdown_timeout() {
    let (_conn, ch) = broker("idem-test-service-task-admin").await;
    let topology = Topology::new(unique("service-task-stop"));
    let name = format!("{}-consumer", topology.queue());
    let (polite_stopped, stubborn_dropped) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (told, dropped) = (polite_stopped.clone(), stubborn_dropped.clone());
    let running = Service::builder(url())
        .consumer(topology.clone(), idle_consumer(&name), |w| w)
        .task(FnTask("polite", move |ctx: TaskContext| async move {
            assert!(!ctx.is_stopping());
            ctx.shutdown().await;
            assert!(ctx.is_stopping());
            told.store(true, Ordering::SeqCst);
            Ok(())
        }))
        .task(FnTask("stubborn", move |_ctx| async move {
            let _flag = DropFlag(dropped);
            std::future::pending::<Result<(), TaskError>>().await
        }))
        .shutdown_timeout(Duration::from_millis(500))
        .build()
        .unwrap()
        .spawn();
    assert!(
        wait_until(Duration::from_secs(10), async || {
            connection_open(&format!("idem:{name}")).await
        })
        .await,
        "the consumer did not connect"
    );
    assert!(!polite_stopped.load(Ordering::SeqCst));
    assert!(!stubborn_dropped.load(Ordering::SeqCst));
    let stats = tokio::time::timeout(Duration::from_secs(30), running.shutdown_and_join())
        .await
        .expect("the service did not stop")
        .unwrap();
    assert_eq!(stats.len(), 1, "stats are the consumers'");
    assert!(
        polite_stopped.load(Ordering::SeqCst),
        "a task was not told to stop"
    );
    assert!(
        stubborn_dropped.load(Ordering::SeqCst),
        "a task past the shutdown timeout was not dropped"
    );
    topology.delete_on(&ch).await.unwrap();
}
