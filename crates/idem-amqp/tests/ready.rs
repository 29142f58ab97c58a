//! `/ready` tells the truth: it turns 503 while a worker's broker connection is gone or
//! its consumer's circuit breaker is open, and 200 again once the worker is back; and
//! several workers of one process share one listener.
//!
//! Needs RabbitMQ (`AMQP_URL`, and `rabbitmqctl` on the PATH, which the test uses to
//! close the worker's connection and to give it a vhost of its own) and Redis on
//! 127.0.0.1:6379 (see README, `bash .ci/services`). Its own test binary: the listener
//! installs the process-global metrics recorder. The tests run one at a time (each
//! holds `SERIAL`): they share the process's one listener and readiness registry.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use idem_amqp::prometheus::Listener;
use idem_amqp::{Publisher, Topology, Worker};
use idem_core::{Consumer, MemoryStore, Message};
use idem_redis::RedisStore;
use idem_testkit::broker::{close_connections_named, rabbitmqctl};
use idem_testkit::fault_proxy::{FaultProxy, Mode};
use idem_testkit::http::get;
use idem_testkit::Service;
use tokio::sync::MutexGuard;

mod common;
use common::{unique, wait_processed};

/// The tests of this binary run one after the other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How soon `/ready` must follow a change.
const FLIP: Duration = Duration::from_secs(2);

/// What each test starts from: its turn (held until the guard drops), the broker's
/// URL and an admin connection to it.
async fn take_turn() -> (MutexGuard<'static, ()>, String, lapin::Connection) {
    let turn = SERIAL.lock().await;
    let url = idem_amqp::amqp_url_from_env();
    let admin = idem_testkit::rabbitmq("idem-test-ready-admin").await;
    (turn, url, admin)
}

/// A consumer named `name` with an in-memory store whose handler does nothing.
fn idle_consumer(name: impl Into<String>) -> Consumer {
    Consumer::builder(name)
        .store(MemoryStore::new())
        .handler(|| async {})
        .unwrap()
}

/// Polls `/ready` every 10 ms until it answers `status`; returns how long that took
/// and the body. Fails after `limit`.
async fn ready_becomes(
    addr: SocketAddr,
    status: u16,
    limit: Duration,
    what: &str,
) -> (Duration, String) {
    let start = Instant::now();
    loop {
        let (got, body) = get(addr, "/ready").await;
        if got == status {
            return (start.elapsed(), body);
        }
        assert!(
            start.elapsed() < limit,
            "{what}: /ready still {got} after {limit:?} (wanted {status}): {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A listener of this process at a free port: the workers of the test join it.
fn listener() -> Listener {
    idem_amqp::prometheus::listen("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// `url` with its vhost replaced by `vhost`.
fn in_vhost(url: &str, vhost: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let base = match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    };
    format!("{base}/{vhost}")
}

/// A vhost of the test's own (removed on drop), so that it can refuse the worker's
/// reconnection for a while without touching anyone else's.
struct Vhost(String);

impl Vhost {
    fn new() -> Vhost {
        let name = unique("ready-vhost");
        rabbitmqctl(&["add_vhost", &name]);
        let v = Vhost(name);
        v.allow(true);
        v
    }

    fn allow(&self, yes: bool) {
        if yes {
            rabbitmqctl(&["set_permissions", "-p", &self.0, "guest", ".*", ".*", ".*"]);
        } else {
            rabbitmqctl(&["clear_permissions", "-p", &self.0, "guest"]);
        }
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_when_the_broker_connection_is_closed_and_200_after_reconnecting() {
    let (_serial, url, admin) = take_turn().await;
    let _ = admin.close(200, "bye".into()).await;
    let vhost = tokio::task::spawn_blocking(Vhost::new).await.unwrap();
    let vurl = in_vhost(&url, &vhost.0);
    let listener = listener();
    let addr = listener.local_addr();
    let name = unique("ready-broker");
    let consumer = idle_consumer(name.clone());
    let conn_name = format!("{name}-conn");
    let worker = Worker::builder(vurl.as_str(), Topology::new(name.clone()), consumer)
        .connection_name(conn_name.clone())
        .prometheus(addr)
        .build()
        .unwrap()
        .spawn();
    let (t, _) = ready_becomes(addr, 200, Duration::from_secs(10), "worker started").await;
    eprintln!("[ready-broker] ready {t:?} after the worker started");

    // Refuse its reconnection for a while, so that the 503 lasts long enough to be
    // seen (an unhindered reconnect takes a few milliseconds).
    tokio::task::spawn_blocking({
        let vhost = vhost.0.clone();
        move || rabbitmqctl(&["clear_permissions", "-p", &vhost, "guest"])
    })
    .await
    .unwrap();
    let closed = (
        close_connections_named(&conn_name, "idem-test: /ready test").await,
        Instant::now(),
    );
    assert_eq!(
        closed.0, 1,
        "the worker's connection {conn_name} was not found"
    );
    let (down, body) = ready_becomes(addr, 503, FLIP, "connection closed").await;
    assert!(
        body.contains(&name) && body.contains("broker connection"),
        "{body}"
    );
    assert!(body.contains(r#""ready":false"#), "{body}");
    eprintln!("[ready-broker] 503 {down:?} after close_connection returned: {body}");
    // Still 503 while the broker refuses it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(addr, "/ready").await.0, 503);

    tokio::task::spawn_blocking({
        let vhost = vhost.0.clone();
        move || rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"])
    })
    .await
    .unwrap();
    // The worker retries with backoff (200 ms doubling): it is back within seconds.
    let (up, body) = ready_becomes(addr, 200, Duration::from_secs(15), "permissions back").await;
    assert!(body.contains(r#""ready":true"#), "{body}");
    eprintln!("[ready-broker] 200 again {up:?} after the broker accepted the worker again");
    let (_, metrics) = get(addr, "/metrics").await;
    assert!(
        metrics.contains(&format!("idem_consumer_ready{{consumer=\"{name}\"}} 1")),
        "{metrics}"
    );

    worker.shutdown_and_join().await.unwrap();
    drop(listener);
    tokio::task::spawn_blocking(move || drop(vhost))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_when_redis_is_cut_and_200_when_it_returns() {
    let (_serial, url, admin) = take_turn().await;
    let ch = admin.create_channel().await.unwrap();
    let redis_url = "redis://127.0.0.1:6379";
    let direct = Service::Redis.expect_connected(redis_url, RedisStore::connect(redis_url).await);
    drop(direct);
    let proxy = FaultProxy::start("127.0.0.1:6379").await;
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let store = RedisStore::builder(&format!("redis://127.0.0.1:{}", proxy.port()))
        .prefix(prefix.clone())
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300))
        .reconnect(2, Duration::from_millis(20), Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let name = unique("ready-redis");
    let topo = Topology::new(name.clone());
    topo.declare_on(&ch).await.unwrap();
    let consumer = Consumer::builder(name.clone())
        .store(store)
        .handler(|| async {})
        .unwrap();
    let listener = listener();
    let addr = listener.local_addr();
    let worker = Worker::builder(url.as_str(), topo.clone(), consumer.clone())
        .prefetch(10)
        .prometheus(addr)
        .build()
        .unwrap()
        .spawn();
    // Steady traffic: the breaker opens on the store failures of deliveries.
    let publisher = Publisher::connect(&url).await.unwrap();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let traffic = tokio::spawn({
        let queue = name.clone();
        async move {
            for i in 0.. {
                let mut msg = Message::new("{}").with_message_id(format!("m-{i}"));
                publisher.publish("", &queue, &mut msg).await.unwrap();
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
            publisher.close().await;
        }
    });
    ready_becomes(addr, 200, Duration::from_secs(10), "worker started").await;
    wait_processed("no traffic", Duration::from_secs(10), &consumer, 20).await;

    proxy.set(Mode::Refuse);
    let (down, body) = ready_becomes(addr, 503, FLIP, "Redis cut").await;
    assert!(
        body.contains(&name) && body.contains("circuit breaker open"),
        "{body}"
    );
    eprintln!("[ready-redis] 503 {down:?} after the cut: {body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(addr, "/ready").await.0, 503, "still cut");
    let (_, metrics) = get(addr, "/metrics").await;
    assert!(
        metrics.contains(&format!("idem_consumer_ready{{consumer=\"{name}\"}} 0")),
        "{metrics}"
    );

    proxy.set(Mode::Up);
    let (up, _) = ready_becomes(addr, 200, FLIP, "Redis back").await;
    eprintln!("[ready-redis] 200 {up:?} after Redis came back");

    let _ = stop.send(());
    traffic.await.unwrap();
    worker.shutdown_and_join().await.unwrap();
    drop(listener);
    topo.delete_on(&ch).await.unwrap();
    let mut redis = idem_testkit::redis().await;
    idem_testkit::delete_redis_keys(&mut redis, &format!("{prefix}*")).await;
    let _ = admin.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_metrics_of_two_workers_on_one_listener() {
    let (_serial, url, admin) = take_turn().await;
    let ch = admin.create_channel().await.unwrap();
    let listener = listener();
    let addr = listener.local_addr();
    let names = [unique("ready-a"), unique("ready-b")];
    let mut consumers = Vec::new();
    let mut workers = Vec::new();
    for name in &names {
        let topo = Topology::new(name.clone());
        topo.declare_on(&ch).await.unwrap();
        let consumer = idle_consumer(name.clone());
        workers.push(
            Worker::builder(url.as_str(), topo, consumer.clone())
                .prometheus(addr)
                .build()
                .unwrap()
                .spawn(),
        );
        consumers.push(consumer);
    }
    // A worker given another address does not start.
    let elsewhere = idle_consumer(unique("ready-c"));
    let err = Worker::builder(url.as_str(), Topology::new(unique("ready-c")), elsewhere)
        .prometheus("127.0.0.1:1".parse().unwrap())
        .build()
        .unwrap()
        .run(std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, idem_amqp::Error::Metrics(_)), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    let publisher = Publisher::connect(&url).await.unwrap();
    for name in &names {
        let mut msg = Message::new("x").with_message_id("m-1");
        publisher.publish("", name, &mut msg).await.unwrap();
    }
    let started = Instant::now();
    while consumers.iter().any(|c| c.stats().processed < 1) {
        assert!(started.elapsed() < Duration::from_secs(10), "not consumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, ready) = ready_becomes(addr, 200, Duration::from_secs(10), "both workers").await;
    let (_, metrics) = get(addr, "/metrics").await;
    for name in &names {
        assert!(
            ready.contains(&format!(r#""name":"{name}","ready":true"#)),
            "{ready}"
        );
        for series in [
            format!("idem_processed_total{{consumer=\"{name}\"}} 1"),
            format!("idem_consumer_ready{{consumer=\"{name}\"}} 1"),
        ] {
            assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
        }
    }

    for w in workers {
        w.shutdown_and_join().await.unwrap();
    }
    drop(listener);
    publisher.close().await;
    for name in &names {
        Topology::new(name.clone()).delete_on(&ch).await.unwrap();
    }
    let _ = admin.close(200, "bye".into()).await;
}
