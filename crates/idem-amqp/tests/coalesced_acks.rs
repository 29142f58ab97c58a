//! Coalesced acks against the real local RabbitMQ (`AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; the crash test also needs PostgreSQL at
//! `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`, and
//! `rabbitmqctl` to read the unacked counts).
//!
//! - Mixed outcomes (acks, duplicates, retries, dead letters, and requeues while the
//!   circuit breaker opens and the worker pauses and reconnects) end with every
//!   message acked: the work queue holds nothing ready and nothing unacked, each effect
//!   applied once, and the channel never closed by the broker (a double ack or an ack
//!   of an unknown tag would close it with `PRECONDITION_FAILED`). The same scenario
//!   runs with coalescing off.
//! - A worker process killed between settling deliveries and sending their coalesced
//!   ack (failpoint `before-ack-flush`) loses nothing: a restarted worker with the
//!   PostgreSQL inbox absorbs the redelivered run as duplicates and applies the rest,
//!   every effect exactly once.

#![allow(clippy::unwrap_used)] // tests may unwrap (project rule)

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use idem_amqp::{DelayTiers, Publisher, Topology, Worker};
use idem_core::breaker::BreakerConfig;
use idem_core::{
    Body, Consumer, HandlerError, IdempotencyKey, MemoryStore, Message, ResultExt, State,
};
use idem_sql::sqlx::postgres::PgPoolOptions;
use idem_sql::sqlx::{PgPool, Postgres};
use idem_sql::{PgInbox, Tx};
use idem_testkit::logs::LogCapture as Captured;
use idem_testkit::Service;
use lapin::Channel;

mod common;
use common::{unique, url};
use idem_testkit::broker::wait_until;

async fn broker() -> (lapin::Connection, Channel) {
    common::broker("idem-test-acks").await
}

async fn ready(ch: &Channel, queue: &str) -> u32 {
    idem_testkit::broker::ready_count(ch, queue).await
}

/// `(ready, unacked)` of `queue` as the broker counts them (`rabbitmqctl`).
async fn broker_counts(queue: &str) -> (u64, u64) {
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || {
        let out = Command::new("rabbitmqctl")
            .args([
                "list_queues",
                "name",
                "messages_ready",
                "messages_unacknowledged",
                "--quiet",
                "--no-table-headers",
            ])
            .output()
            .expect("rabbitmqctl must be installed to run this test (it ships with RabbitMQ)");
        assert!(out.status.success(), "rabbitmqctl list_queues: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|line| {
                let mut f = line.split_whitespace();
                (f.next()? == queue).then(|| {
                    let ready = f.next().and_then(|v| v.parse().ok()).unwrap();
                    let unacked = f.next().and_then(|v| v.parse().ok()).unwrap();
                    (ready, unacked)
                })
            })
            .unwrap_or_else(|| panic!("queue {queue} not listed by rabbitmqctl:\n{text}"))
    })
    .await
    .unwrap()
}

async fn wait_for(what: &str, limit: Duration, cond: impl AsyncFnMut() -> bool) {
    assert!(
        wait_until(limit, cond).await,
        "timed out after {limit:?} waiting for {what}"
    );
}

/// Waits until the work queue holds nothing ready or unacked and its delay queues
/// nothing ready. The delay queues are read before and after the work queue, so a copy
/// moving from a delay queue into the work queue between two reads is still seen.
async fn drained(ch: &Channel, topo: &Topology) {
    let tiers = topo.get_tiers().as_slice().to_vec();
    wait_for(
        "the work and delay queues to hold nothing ready or unacked",
        Duration::from_secs(30),
        async || {
            let mut delayed = 0;
            for t in &tiers {
                delayed += ready(ch, &topo.retry_queue(*t)).await;
            }
            let work = broker_counts(topo.queue()).await;
            for t in &tiers {
                delayed += ready(ch, &topo.retry_queue(*t)).await;
            }
            delayed == 0 && work == (0, 0)
        },
    )
    .await;
}

/// How many of each disposition name.
fn summary(names: &[&'static str]) -> Vec<(&'static str, usize)> {
    let mut out: Vec<(&'static str, usize)> = Vec::new();
    for n in names {
        match out.iter_mut().find(|(m, _)| m == n) {
            Some((_, c)) => *c += 1,
            None => out.push((n, 1)),
        }
    }
    out
}

/// Every `warn` line of this test binary, from every thread (the worker's tasks run on
/// the runtime's threads).
fn captured() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        logs.install_global("warn");
        logs
    })
}

const MIXED: usize = 240;
const DUPLICATES: usize = 20;

/// What message `i` of the mixed scenario does.
fn kind(i: usize) -> &'static str {
    match i % 6 {
        3 => "retry",
        4 => "poison",
        _ => "ok",
    }
}

/// Publishes messages `m-<i>` of [`kind`] `i`, `i` in `range`, confirmed.
async fn publish_mixed(publisher: &Publisher, topo: &Topology, range: std::ops::Range<usize>) {
    let mut msgs: Vec<Message> = range
        .map(|i| Message::new(kind(i)).with_message_id(format!("m-{i}")))
        .collect();
    publisher
        .publish_batch("", topo.queue(), &mut msgs)
        .await
        .unwrap();
}

#[derive(Clone)]
struct Mixed {
    applied: Arc<Mutex<HashMap<String, u32>>>,
    failed_once: Arc<Mutex<HashSet<String>>>,
    outage: Arc<AtomicBool>,
}

async fn mixed_handler(
    State(s): State<Mixed>,
    key: IdempotencyKey,
    Body(body): Body,
) -> Result<(), HandlerError> {
    let key = key.as_str().to_owned();
    let n: u64 = key
        .trim_start_matches("m-")
        .parse()
        .map_err(HandlerError::permanent)?;
    // Handlers finish out of order: settles arrive in any order.
    tokio::time::sleep(Duration::from_millis(n * 7919 % 5)).await;
    if s.outage.load(Ordering::SeqCst) {
        return Err(HandlerError::store_unavailable("test outage"));
    }
    match &body[..] {
        b"poison" => return Err(HandlerError::permanent("poison")),
        b"retry" if s.failed_once.lock().unwrap().insert(key.clone()) => {
            return Err(HandlerError::transient("fails once"));
        }
        _ => {}
    }
    *s.applied.lock().unwrap().entry(key).or_default() += 1;
    Ok(())
}

/// The mixed-outcome scenario, with coalesced acks on or off.
async fn mixed_outcomes(coalesce: bool) {
    let logs = captured();
    let (_conn, ch) = broker().await;
    let topo = Topology::new(unique("acks-mixed"))
        .tiers(DelayTiers::new([Duration::from_secs(1)]).unwrap());
    topo.declare_on(&ch).await.unwrap();
    let state = Mixed {
        applied: Arc::default(),
        failed_once: Arc::default(),
        outage: Arc::default(),
    };
    let consumer = Consumer::builder("acks-mixed")
        .store(MemoryStore::new())
        .backoff(idem_testkit::backoff(Duration::from_secs(1), 5))
        .circuit_breaker(
            BreakerConfig::new()
                .failure_threshold(3)
                .probe_backoff(Duration::from_millis(50), Duration::from_millis(200)),
        )
        .handler_with_state(mixed_handler, state.clone())
        .unwrap();
    let settled: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let log = settled.clone();
    let worker = Worker::builder(url(), topo.clone(), consumer.clone())
        .prefetch(20)
        .coalesce_acks(coalesce)
        .on_settle(move |s| log.lock().unwrap().push(s.disposition.name()))
        .build()
        .unwrap();
    let running = worker.spawn();

    let publisher = Publisher::connect(&url()).await.unwrap();
    publish_mixed(&publisher, &topo, 0..MIXED).await;

    // Mid-run, the "store" fails: the breaker opens, in-flight deliveries are handed
    // back (requeue nacks), the worker flushes its acks, pauses and reconnects on a new
    // channel (delivery tags restart).
    wait_for(
        "80 settled deliveries",
        Duration::from_secs(30),
        async || settled.lock().unwrap().len() >= 80,
    )
    .await;
    state.outage.store(true, Ordering::SeqCst);
    let breaker = consumer.breaker().unwrap().clone();
    wait_for("the breaker to open", Duration::from_secs(30), async || {
        breaker.is_open()
    })
    .await;
    state.outage.store(false, Ordering::SeqCst);

    // Duplicates of delivered messages, published while the rest is still flowing.
    publish_mixed(&publisher, &topo, 0..DUPLICATES).await;

    let expected: HashSet<String> = (0..MIXED)
        .filter(|i| kind(*i) != "poison")
        .map(|i| format!("m-{i}"))
        .collect();
    // A re-published poison message is dead-lettered again (its record is poisoned).
    let poison = (0..MIXED)
        .chain(0..DUPLICATES)
        .filter(|i| kind(*i) == "poison")
        .count() as u32;
    // Each non-poison duplicate ends as exactly one `duplicate` settle: either the copy
    // published second finds the key done, or (for a "retry" message whose first copy
    // waits in the delay queue) the copy runs first and the delayed original comes back
    // as the duplicate, up to one tier delay later.
    let dup_ok = (0..DUPLICATES).filter(|i| kind(*i) != "poison").count();
    let progress = Mutex::new(String::new());
    let done = wait_until(Duration::from_secs(90), async || {
        let applied = state.applied.lock().unwrap().len();
        let dead = ready(&ch, &topo.dlq()).await;
        let names = settled.lock().unwrap().clone();
        let dups = names.iter().filter(|n| **n == "duplicate").count();
        *progress.lock().unwrap() = format!(
            "applied {applied} of {}, dead-lettered {dead} of {poison}, duplicates {dups} of {dup_ok}, settled {:?}",
            expected.len(),
            summary(&names)
        );
        applied == expected.len() && dead == poison && dups == dup_ok
    })
    .await;
    if !done {
        let progress = progress.lock().unwrap().clone();
        let queue = broker_counts(topo.queue()).await;
        panic!("timed out waiting for every effect applied and every poison message dead-lettered: {progress}; work queue (ready, unacked) {queue:?}");
    }
    // Everything settled: nothing ready and nothing unacked on the work queue while the
    // worker still runs (acks flushed by the interval, not by a shutdown).
    drained(&ch, &topo).await;

    let stats = running.shutdown_and_join().await.unwrap();
    assert_eq!(
        ready(&ch, topo.queue()).await,
        0,
        "nothing handed back at close"
    );
    for t in topo.get_tiers().as_slice() {
        assert_eq!(ready(&ch, &topo.retry_queue(*t)).await, 0);
    }
    let applied = state.applied.lock().unwrap().clone();
    assert_eq!(
        applied.keys().cloned().collect::<HashSet<_>>(),
        expected,
        "every non-poison message applied"
    );
    assert!(
        applied.values().all(|n| *n == 1),
        "each effect applied once: {applied:?}"
    );
    let names = settled.lock().unwrap().clone();
    let count = |name: &str| names.iter().filter(|n| **n == name).count();
    assert!(
        count("release") >= 1,
        "the outage handed deliveries back: {names:?}"
    );
    assert!(count("retry") >= (MIXED / 6), "{names:?}");
    assert_eq!(count("dead_letter") as u32, poison, "{names:?}");
    assert_eq!(count("duplicate"), dup_ok, "{names:?}");
    assert_eq!(stats.duplicates as usize, count("duplicate"));
    // No channel was closed under the worker (a double ack or an ack naming an
    // unknown tag makes the broker close it with PRECONDITION_FAILED).
    for needle in [
        "consumer error",
        "consumer ended",
        "lost its channel",
        "PRECONDITION",
    ] {
        let lines: Vec<String> = logs
            .lines_with(needle)
            .into_iter()
            .filter(|l| l.contains(topo.queue()) || needle == "PRECONDITION")
            .collect();
        assert!(lines.is_empty(), "{lines:#?}");
    }
    topo.delete_on(&ch).await.unwrap();
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_acks_settle_mixed_outcomes_and_leave_nothing_unacked() {
    mixed_outcomes(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ack_per_delivery_when_coalescing_is_off() {
    mixed_outcomes(false).await;
}

// --- A crash between settle and flush -------------------------------------------

const CRASH_MESSAGES: usize = 200;
const RUN_ENV: &str = "IDEM_ACK_CRASH_RUN";

fn database_url() -> String {
    Service::PostgreSql.url()
}

async fn pg_pool(max: u32) -> PgPool {
    let url = database_url();
    Service::PostgreSql.expect_connected(
        &url,
        PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await,
    )
}

struct CrashNames(String);

impl CrashNames {
    fn queue(&self) -> String {
        format!("idem-test-ack-crash-{}", self.0)
    }
    fn applied(&self) -> String {
        format!("ack_crash_applied_{}", self.0)
    }
    fn inbox(&self) -> String {
        format!("ack_crash_inbox_{}", self.0)
    }
}

async fn crash_consumer(names: &CrashNames, pool: PgPool) -> Consumer {
    let inbox = PgInbox::new(pool.clone())
        .try_table(&names.inbox())
        .unwrap()
        .retention(Duration::from_secs(3600));
    Consumer::builder("ack-crash")
        .dedup(inbox)
        .handler_with_state(inbox_handler, Arc::<str>::from(names.applied()))
        .unwrap()
}

async fn inbox_handler(
    State(applied): State<Arc<str>>,
    key: IdempotencyKey,
    tx: Tx<Postgres>,
) -> Result<(), HandlerError> {
    let mut conn = tx.conn().await?;
    idem_sql::sqlx::query(&format!("INSERT INTO {applied} (msg_id) VALUES ($1)"))
        .bind(key.as_str())
        .execute(&mut *conn)
        .await
        .transient()?;
    Ok(())
}

/// Not a test by itself: the worker process `a_crash_between_settle_and_flush_loses_nothing`
/// starts with the `before-ack-flush` failpoint armed. It runs until it aborts.
#[test]
#[ignore = "the worker process started by the ack crash test"]
fn ack_crash_worker_process() {
    let names = CrashNames(std::env::var(RUN_ENV).expect("started by the ack crash test"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let consumer = crash_consumer(&names, pg_pool(24).await).await;
        let worker = Worker::builder(url(), Topology::new(names.queue()), consumer)
            .prefetch(20)
            .build()
            .unwrap();
        let _ = worker.run(std::future::pending::<()>()).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_settle_and_flush_loses_nothing() {
    let names = CrashNames(uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
    let (_conn, ch) = broker().await;
    let topo = Topology::new(names.queue());
    topo.declare_on(&ch).await.unwrap();
    let pool = pg_pool(24).await;
    idem_sql::sqlx::query(&format!(
        "CREATE TABLE {} (msg_id TEXT NOT NULL)",
        names.applied()
    ))
    .execute(&pool)
    .await
    .unwrap();
    PgInbox::new(pool.clone())
        .try_table(&names.inbox())
        .unwrap()
        .ensure_schema()
        .await
        .unwrap();
    let publisher = Publisher::connect(&url()).await.unwrap();
    let mut msgs: Vec<Message> = (0..CRASH_MESSAGES)
        .map(|i| Message::new(format!("{{\"n\":{i}}}")).with_message_id(format!("m-{i:03}")))
        .collect();
    publisher
        .publish_batch("", topo.queue(), &mut msgs)
        .await
        .unwrap();

    // The first worker dies at one of its coalesced acks: that run's deliveries are
    // settled (their inbox rows committed) and their ack is never sent.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "ack_crash_worker_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(RUN_ENV, &names.0)
        .env("IDEM_FAILPOINTS", "before-ack-flush")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the worker process did not hit its failpoint in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(
            status.signal(),
            Some(6),
            "the worker process must die by abort() at the failpoint: {status:?}"
        );
    }
    let applied_before: i64 =
        idem_sql::sqlx::query_scalar(&format!("SELECT count(*) FROM {}", names.applied()))
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(applied_before >= 1, "the crashed run had committed effects");

    // A restarted worker (no failpoint here) gets the unflushed run back.
    let duplicates: Arc<Mutex<Vec<String>>> = Arc::default();
    let dup_log = duplicates.clone();
    let consumer = crash_consumer(&names, pool.clone()).await;
    let worker = Worker::builder(url(), topo.clone(), consumer)
        .prefetch(20)
        .on_settle(move |s| {
            if matches!(
                s.disposition,
                idem_core::Disposition::Ack { duplicate: true }
            ) {
                dup_log
                    .lock()
                    .unwrap()
                    .push(s.message_id.unwrap_or_default().to_owned());
            }
        })
        .build()
        .unwrap();
    let running = worker.spawn();
    let count_applied = async || -> i64 {
        idem_sql::sqlx::query_scalar(&format!(
            "SELECT count(DISTINCT msg_id) FROM {}",
            names.applied()
        ))
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    wait_for(
        "every message applied after the restart",
        Duration::from_secs(60),
        async || count_applied().await == CRASH_MESSAGES as i64,
    )
    .await;
    drained(&ch, &topo).await;
    running.shutdown_and_join().await.unwrap();

    let total: i64 =
        idem_sql::sqlx::query_scalar(&format!("SELECT count(*) FROM {}", names.applied()))
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(total, CRASH_MESSAGES as i64, "every effect exactly once");
    let duplicates = duplicates.lock().unwrap().clone();
    assert!(
        !duplicates.is_empty(),
        "the settled but unacked run came back and was absorbed as duplicates"
    );
    assert_eq!(ready(&ch, topo.queue()).await, 0);
    assert_eq!(ready(&ch, &topo.dlq()).await, 0);

    topo.delete_on(&ch).await.unwrap();
    publisher.close().await;
    // The inbox also made its start counters' table, `<inbox>_starts`.
    let starts = format!("{}_starts", names.inbox());
    for table in [names.applied(), names.inbox(), starts] {
        idem_sql::sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
            .execute(&pool)
            .await
            .unwrap();
    }
}
