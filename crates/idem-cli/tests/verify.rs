//! `idem verify` against the real RabbitMQ and PostgreSQL: after a real run through an
//! outbox, its relay and a worker with the PostgreSQL inbox it exits 0; it names a
//! deleted inbox record and purged messages as lost, reports stuck records and outbox
//! rows, and configuration hazards. Each test has its own queues and tables and
//! removes them at the end (see the README, "Running the tests", for the services).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{assert_says, depth, exit_json, exit_starting, record_done, text, wait_for};
use idem_amqp::{DelayTiers, Topology, Worker};
use idem_core::dedup::{Claim, ClaimRequest, Completion, DedupStore, OwnerToken, ScopedKey};
use idem_core::{Consumer, HandlerError, Stats, WorkerHandle};
use idem_outbox::{Outbox, OutboxMessage, Relay};
use idem_redis::RedisStore;
use idem_sql::{MySqlStore, PgInbox, PgStore, Tx};
use idem_testkit::Service;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use sqlx::{PgPool, Postgres};

const CONSUMER: &str = "verify-test";

/// A unique topology (one 1 s delay tier), outbox table and inbox table.
struct Fixture {
    tiers: &'static str,
    pool: PgPool,
    conn: Connection,
    topology: Topology,
    outbox: Outbox,
    inbox: String,
    extra_tables: Vec<String>,
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture::with_tiers("1s", Duration::from_secs(1)).await
    }

    /// A fixture whose topology has the one delay tier `tier` (`name` as for --tiers).
    async fn with_tiers(name: &'static str, tier: Duration) -> Fixture {
        let pool = idem_testkit::postgres(
            sqlx::postgres::PgPoolOptions::new().max_connections(7),
            "idem-verify-test",
        )
        .await;
        let amqp = Service::RabbitMq.url();
        let conn = Service::RabbitMq
            .expect_connected(&amqp, idem_amqp::connect(&amqp, "idem-verify-test").await);
        let id = idem_testkit::unique("verify");
        let topology = Topology::new(id.as_str()).tiers(DelayTiers::new([tier]).unwrap());
        let outbox = Outbox::new(&format!("{id}_outbox")).unwrap();
        // Built before anything is created, so that its Drop removes whatever the
        // steps below created, also when one of them fails.
        let f = Fixture {
            tiers: name,
            pool,
            conn,
            topology,
            outbox,
            inbox: format!("{id}_inbox"),
            extra_tables: Vec::new(),
        };
        let ch = f.conn.create_channel().await.unwrap();
        f.topology.declare_on(&ch).await.unwrap();
        let _ = ch.close(200, "bye".into()).await;
        f.outbox.ensure_schema(&f.pool).await.unwrap();
        PgInbox::new(f.pool.clone())
            .try_table(&f.inbox)
            .unwrap()
            .ensure_schema()
            .await
            .unwrap();
        f
    }

    fn queue(&self) -> &str {
        self.topology.queue()
    }

    /// A lease store with a table of this fixture's (removed with it), and the
    /// table's name.
    async fn lease_store(&mut self) -> (PgStore, String) {
        let table = format!("{}_dedup", self.inbox.trim_end_matches("_inbox"));
        let store = PgStore::new(self.pool.clone()).try_table(&table).unwrap();
        store.ensure_schema().await.unwrap();
        self.extra_tables.push(table.clone());
        (store, table)
    }

    /// Enqueues `n` messages through the outbox in one transaction; their ids.
    async fn enqueue(&self, n: usize) -> Vec<String> {
        let mut tx = self.pool.begin().await.unwrap();
        let mut ids = Vec::new();
        for i in 0..n {
            let msg = OutboxMessage::new("", self.queue(), format!("transfer {i}").into_bytes());
            ids.push(self.outbox.enqueue(&mut tx, msg).await.unwrap().to_string());
        }
        tx.commit().await.unwrap();
        ids
    }

    /// Publishes every pending row (the relay, with publisher confirms).
    async fn relay(&self) {
        let relay = Relay::builder(
            self.pool.clone(),
            self.outbox.clone(),
            Service::RabbitMq.url(),
        )
        .build();
        relay.drain().await.unwrap();
    }

    async fn inbox_rows(&self) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", self.inbox))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Starts a worker with the PostgreSQL inbox (prefetch 5) whose handler takes
    /// `pause`.
    fn worker(&self, pause: Duration) -> WorkerHandle<Result<Stats, idem_amqp::Error>> {
        let inbox = PgInbox::new(self.pool.clone())
            .try_table(&self.inbox)
            .unwrap();
        let consumer = Consumer::builder(CONSUMER)
            .dedup(inbox)
            .handler(move |_tx: Tx<Postgres>| async move {
                tokio::time::sleep(pause).await;
                Ok::<(), HandlerError>(())
            })
            .unwrap();
        Worker::builder(Service::RabbitMq.url(), self.topology.clone(), consumer)
            .connection_name("idem-verify-test-worker")
            .prefetch(5)
            .build()
            .unwrap()
            .spawn()
    }

    /// Waits until the inbox holds `total` records.
    async fn await_records(&self, total: i64) {
        let what = format!("the worker records {total} messages");
        wait_for(&what, async || self.inbox_rows().await >= total).await;
    }

    /// Runs a worker until the inbox holds `total` records, then stops it gracefully.
    async fn consume_until(&self, total: i64) {
        let handle = self.worker(Duration::ZERO);
        self.await_records(total).await;
        handle.shutdown_and_join().await.unwrap();
    }

    /// Takes `n` messages all the way into an empty inbox: enqueued through the
    /// outbox, relayed, and consumed by a worker until the inbox records them all;
    /// their ids.
    async fn deliver(&self, n: usize) -> Vec<String> {
        let ids = self.enqueue(n).await;
        self.relay().await;
        self.consume_until(i64::try_from(n).unwrap()).await;
        ids
    }

    /// Waits until the work queue has `n` consumers.
    async fn await_consumers(&self, n: u32) {
        let what = format!("{} has {n} consumer(s)", self.queue());
        wait_for(&what, async || {
            let q = idem_cli::broker::probe(&self.conn, self.queue()).await;
            q.unwrap().is_some_and(|q| q.consumers == n)
        })
        .await;
    }

    /// Waits until the work queue holds `n` ready messages.
    async fn await_depth(&self, n: u32) {
        self.await_depth_of(self.queue(), n).await;
    }

    /// Waits until `queue` holds `n` ready messages.
    async fn await_depth_of(&self, queue: &str, n: u32) {
        let what = format!("{queue} holds {n} messages");
        wait_for(&what, async || depth(&self.conn, queue).await == n).await;
    }

    /// Publishes a message with id `id` and `headers` straight into `queue`,
    /// confirmed.
    async fn put(&self, queue: &str, id: &str, headers: FieldTable) {
        let ch = self.conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let props = BasicProperties::default()
            .with_message_id(id.into())
            .with_headers(headers);
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"{}",
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "{confirm:?}");
        let _ = ch.close(200, "bye".into()).await;
    }

    /// Runs `idem verify` on this fixture's queue, outbox and inbox with `extra`
    /// options.
    fn verify(&self, extra: &[&str]) -> Output {
        self.verify_records(&self.inbox, extra)
    }

    /// [`Fixture::verify`] reading the records from `table`.
    fn verify_records(&self, table: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "verify",
            self.queue(),
            "--consumer",
            CONSUMER,
            "--outbox-table",
            self.outbox.table_name(),
            "--dedup-table",
            table,
            "--tiers",
            self.tiers,
            "--since",
            "1h",
            "--grace",
            "0s",
        ];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(&args)
            .env("AMQP_URL", Service::RabbitMq.url())
            .env("DATABASE_URL", Service::PostgreSql.url())
            .output()
            .expect("run the idem binary")
    }
}

impl Fixture {
    /// Runs `idem verify` on this fixture's queue with the message ids listed in the
    /// file `ids`, reading the dedup records with the options `store`.
    fn verify_ids(&self, ids: &Path, store: &[&str]) -> Output {
        let ids = ids.to_str().unwrap();
        let mut args = vec!["verify", self.queue(), "--consumer", CONSUMER, "--ids", ids];
        args.extend_from_slice(store);
        args.extend(["--tiers", self.tiers, "--recheck-after", "0s"]);
        Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(&args)
            .env("AMQP_URL", Service::RabbitMq.url())
            .output()
            .expect("run the idem binary")
    }
}

/// Removes the fixture's queues and tables when it goes out of scope, also when the
/// test failed (on a thread of its own: a test's runtime may be the current thread).
impl Drop for Fixture {
    fn drop(&mut self) {
        let queues = self.topology.queue_names();
        let mut tables = vec![
            self.outbox.table_name().to_owned(),
            self.inbox.clone(),
            format!("{}_starts", self.inbox),
        ];
        tables.extend(self.extra_tables.iter().cloned());
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(remove(queues, tables));
        });
        let _ = cleanup.join();
    }
}

async fn remove(queues: Vec<String>, tables: Vec<String>) {
    let amqp = Service::RabbitMq.url();
    if let Ok(conn) = idem_amqp::connect(&amqp, "idem-verify-test-cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            for q in &queues {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "bye".into()).await;
    }
    if let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&Service::PostgreSql.url())
        .await
    {
        for t in tables {
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {t}"))
                .execute(&pool)
                .await;
        }
        pool.close().await;
    }
}

/// Records `key` of the test consumer as done in `store`, kept for `retention`.
async fn record(store: &impl DedupStore, key: &str, completion: Completion, retention: Duration) {
    let key = ScopedKey::new(CONSUMER, key);
    record_done(store, &key, None, completion, retention).await;
}

/// Claims `key` of the test consumer in `store` for `lease` (kept a day) and never
/// completes it: a record in processing, stuck once the lease has passed. What the
/// store answered.
async fn claim(store: &impl DedupStore, key: &str, lease: Duration) -> Claim {
    let key = ScopedKey::new(CONSUMER, key);
    let terms = idem_core::dedup::Terms::new(lease, Duration::from_secs(86_400));
    store
        .claim(&ClaimRequest::new(key, OwnerToken::generate(), None), terms)
        .await
        .unwrap()
}

/// The ids of the findings of class `class` in a `--json` report.
fn finding_ids(report: &serde_json::Value, class: &str) -> BTreeSet<String> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["class"] == class)
        .map(|f| f["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn verify_after_a_real_outbox_run_exits_0() {
    let f = Fixture::new().await;
    let ids = f.deliver(40).await;
    let stdout = exit_starting(
        &f.verify(&[]),
        0,
        "verify: lost=0 stuck=0 at_risk=0 hazards=0",
    );
    assert_says(&stdout, &["(40 published", "done=40 "]);
    // The JSON document says the same.
    let report = exit_json(&f.verify(&["--json"]), 0);
    assert_eq!(report["counts"]["published"], ids.len());
    assert_eq!(report["counts"]["done"], 40);
    assert_eq!(report["findings"].as_array().unwrap().len(), 0);
}

// Two runtime threads: the test blocks one while `idem verify` runs, the worker
// keeps the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_while_a_worker_runs_counts_held_deliveries_in_flight_not_lost() {
    let f = Fixture::new().await;
    // 40 messages of 400 ms each, 5 at a time: about 3 s of work, during which the
    // worker always holds unacked deliveries that no queue read and no record shows.
    let handle = f.worker(Duration::from_millis(400));
    f.await_consumers(1).await;
    f.enqueue(40).await;
    f.relay().await;
    f.await_records(1).await;
    let out = f.verify(&["--recheck-after", "6s", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    let c = &report["counts"];
    println!("counts during the run: {c}");
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(
        (c["lost"].as_u64(), c["stuck"].as_u64()),
        (Some(0), Some(0))
    );
    let accounted = ["done", "queued", "in_flight"]
        .iter()
        .map(|k| c[*k].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(accounted, 40, "{c}");
    // Usually the deliveries the worker holds during the first look are found by the
    // second (in_flight 5); when the first look is slower than a handler (a loaded
    // database), they are done by then and in_flight is 0. Lost is 0 either way.
    assert!(
        report["notes"].to_string().contains("1 consumer(s)"),
        "the live consumer is noted: {report:#}"
    );
    f.await_records(40).await;
    handle.shutdown_and_join().await.unwrap();
}

#[tokio::test]
async fn verify_names_a_deleted_inbox_record_and_purged_messages() {
    let f = Fixture::new().await;
    let done = f.deliver(20).await;
    let waiting = f.enqueue(20).await;
    f.relay().await;
    f.await_depth(20).await;

    // Delete one inbox record ...
    let deleted = done[7].clone();
    let n = sqlx::query(&format!(
        "DELETE FROM {} WHERE consumer = $1 AND idem_key = $2",
        f.inbox
    ))
    .bind(CONSUMER)
    .bind(&deleted)
    .execute(&f.pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(n, 1, "the inbox recorded {deleted} under the message id");
    // ... and purge 10 queued messages.
    let ch = f.conn.create_channel().await.unwrap();
    let mut purged = BTreeSet::new();
    for _ in 0..10 {
        let got = ch
            .basic_get(f.queue().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a queued message");
        purged.insert(
            got.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .to_string(),
        );
        got.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let _ = ch.close(200, "bye".into()).await;
    assert!(purged.iter().all(|id| waiting.contains(id)));

    // The lost ids are looked for twice; nothing is in flight here.
    let out = f.verify(&["--recheck-after", "0s"]);
    let stdout = exit_starting(&out, 5, "verify: lost=11 stuck=0 at_risk=0 hazards=0");
    println!("{stdout}");
    assert_says(&stdout, &["done=19 ", "queued=10 "]);
    let mut lost = purged.clone();
    lost.insert(deleted.clone());
    for id in &lost {
        assert_says(&stdout, &[&format!("\nlost {id}: ")]);
    }
    assert_eq!(stdout.matches("\nlost ").count(), 11, "{stdout}");
    assert!(
        text(&out.stderr).contains("lost=11"),
        "{}",
        text(&out.stderr)
    );

    let report = exit_json(&f.verify(&["--recheck-after", "0s", "--json"]), 5);
    assert_eq!(finding_ids(&report, "lost"), lost);
    assert_eq!(
        report["counts"]["queued"], 10,
        "the reads put every message back"
    );
    f.await_depth(10).await;
}

#[tokio::test]
async fn verify_reports_a_record_past_its_lease_and_a_stuck_outbox_row() {
    let mut f = Fixture::new().await;
    // A lease store's table, with a key claimed for 1 s and never completed.
    let (store, store_table) = f.lease_store().await;
    assert_eq!(
        claim(&store, "crashed-while-processing", Duration::from_secs(1)).await,
        Claim::Acquired
    );
    // An outbox row no relay publishes.
    let pending = f.enqueue(1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let stdout = exit_starting(
        &f.verify_records(&store_table, &["--stuck-after", "1s"]),
        5,
        "verify: lost=0 stuck=2 ",
    );
    assert_says(
        &stdout,
        &[
            "\nstuck crashed-while-processing: record processing",
            &format!("\nstuck {}: outbox row pending", pending[0]),
            "pending=1 ",
        ],
    );

    // Within the lease and the threshold, neither is stuck.
    claim(&store, "processing-now", Duration::from_secs(300)).await;
    let out = f.verify_records(&store_table, &["--stuck-after", "1h", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        finding_ids(&report, "stuck"),
        BTreeSet::from(["crashed-while-processing".to_owned()])
    );
}

#[tokio::test]
async fn verify_reports_config_hazards() {
    let f = Fixture::new().await;
    let out = f.verify(&["--delivery-limit", "20", "--crash-limit", "3"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "nothing published, safe limits: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = f.verify(&[
        "--delivery-limit",
        "3",
        "--crash-limit",
        "3",
        "--retention",
        "1s",
        "--pool-size",
        "5",
        "--concurrency",
        "20",
    ]);
    let stdout = exit_starting(&out, 5, "verify: lost=0 stuck=0 at_risk=0 hazards=3");
    assert_says(
        &stdout,
        &[
            "\nhazard delivery_limit: the queue's delivery_limit 3 is not above the crash limit 3",
            "\nhazard retention: dedup retention 1s is shorter than the retry horizon",
            "\nhazard pool_size: pool size 5 is smaller than the concurrency 20",
        ],
    );
}

#[tokio::test]
async fn verify_reports_old_dead_letters_and_copies_outliving_their_record() {
    let mut f = Fixture::with_tiers("30s", Duration::from_secs(30)).await;
    let (store, store_table) = f.lease_store().await;
    // A copy waits 30 s in the delay queue while its done record expires in 10 s.
    record(
        &store,
        "late-copy",
        Completion::Succeeded,
        Duration::from_secs(10),
    )
    .await;
    let retry = f.topology.retry_queue(Duration::from_secs(30));
    f.put(&retry, "late-copy", FieldTable::default()).await;
    // Two dead letters: one from 2023 (older than the 7 d retention), one from now.
    let dead = |at: String| {
        let mut t = FieldTable::default();
        t.insert("x-idem-error".into(), AMQPValue::LongString("boom".into()));
        t.insert(
            "x-idem-last-failed-at".into(),
            AMQPValue::LongString(at.as_str().into()),
        );
        t
    };
    let dlq = f.topology.dlq();
    f.put(&dlq, "old-dead", dead("2023-11-14T22:13:20Z".to_owned()))
        .await;
    let now = idem_core::__private::rfc3339(std::time::SystemTime::now());
    f.put(&dlq, "young-dead", dead(now)).await;

    let stdout = exit_starting(
        &f.verify_records(&store_table, &["--retention", "7d"]),
        5,
        "verify: lost=0 stuck=0 at_risk=2 hazards=0",
    );
    assert_says(
        &stdout,
        &[
            &format!("\nat-risk late-copy: a copy waits in {retry} (up to 30s) while its done record expires in "),
            &format!("\nat-risk old-dead: in {dlq} for "),
        ],
    );
    assert!(!stdout.contains("young-dead"), "{stdout}");
    // Reading moved nothing out of either queue.
    f.await_depth_of(&retry, 1).await;
    f.await_depth_of(&dlq, 2).await;
}

#[tokio::test]
async fn verify_reads_a_redis_store_and_an_id_list() {
    let f = Fixture::new().await;
    let url = Service::Redis.url();
    let prefix = idem_testkit::unique("verify");
    let store = Service::Redis.expect_connected(
        &url,
        RedisStore::builder(&url).prefix(&prefix).connect().await,
    );
    let day = Duration::from_secs(86_400);
    record(&store, "a", Completion::Succeeded, day).await;
    record(&store, "b", Completion::Succeeded, day).await;
    record(&store, "c", Completion::Poisoned, day).await;
    f.put(f.queue(), "d", FieldTable::default()).await;
    let ids = std::env::temp_dir().join(format!("{prefix}.ids"));
    std::fs::write(&ids, "a\nb\nc\n# a comment\nd\ne\n").unwrap();

    let out = f.verify_ids(&ids, &["--dedup-redis", &url, "--dedup-prefix", &prefix]);
    let _ = std::fs::remove_file(&ids);
    idem_testkit::delete_redis_keys(&mut store.connection(), &format!("{prefix}*")).await;
    let stdout = exit_starting(&out, 5, "verify: lost=1 stuck=0 at_risk=0 hazards=0");
    assert_says(
        &stdout,
        &[
            "  ids (5 published) against redis",
            "done=2 poisoned=1 queued=1 ",
            "\nlost e: given in the id list; ",
        ],
    );
    f.await_depth(1).await;
}

#[tokio::test]
async fn verify_reads_a_mysql_lease_store_table() {
    let f = Fixture::new().await;
    let url = Service::MariaDb.url();
    let pool = idem_testkit::mariadb(sqlx::mysql::MySqlPoolOptions::new().max_connections(2)).await;
    let table = format!("{}_dedup", f.inbox.trim_end_matches("_inbox"));
    let store = MySqlStore::new(pool.clone()).try_table(&table).unwrap();
    store.ensure_schema().await.unwrap();
    let day = Duration::from_secs(86_400);
    record(&store, "a", Completion::Succeeded, day).await;
    record(&store, "p", Completion::Poisoned, day).await;
    assert_eq!(
        claim(&store, "stuck-key", Duration::from_secs(1)).await,
        Claim::Acquired
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ids = std::env::temp_dir().join(format!("{table}.ids"));
    std::fs::write(&ids, "a\np\nb\n").unwrap();

    let out = f.verify_ids(&ids, &["--dedup-mysql", &url, "--dedup-table", &table]);
    let _ = std::fs::remove_file(&ids);
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(&pool)
        .await
        .unwrap();
    let stdout = exit_starting(&out, 5, "verify: lost=1 stuck=1 at_risk=0 hazards=0");
    assert_says(
        &stdout,
        &[
            &format!("  ids (3 published) against mysql {table}"),
            "done=1 poisoned=1 ",
            "\nlost b: given in the id list; ",
            "\nstuck stuck-key: record processing, its lease ended ",
        ],
    );
}
