//! The controller: sets up a run, starts the worker processes, publishes, injects
//! faults, waits for the queues to drain, then checks every message.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_amqp::failpoints::{AFTER_COMMIT_BEFORE_ACK, AFTER_RETRY_PUBLISH_BEFORE_ACK};
use idem_amqp::Publisher;
use idem_core::Message;
use idem_outbox::{Outbox, OutboxMessage, Relay};
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sqlx::PgPool;
use tokio::process::{Child, ChildStdin, Command};

use crate::common::{self, BoxError, Names, Store};
use crate::faults;

/// A fault besides worker SIGKILLs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub(crate) enum Fault {
    /// `rabbitmqctl close_connection` on the workers' and the producer's connections.
    ConnClose,
    /// `pg_terminate_backend` on the workers' PostgreSQL connections.
    PgTerminate,
    /// `CLIENT KILL` of the workers' Redis connections (store=redis).
    RedisKill,
    /// Arm the workers' crash points (idem-amqp `failpoints`) on some workers.
    Failpoints,
    /// `rabbitmqctl stop_app && start_app`: disturbs every client of the broker.
    BrokerRestart,
    /// `SHUTDOWN NOSAVE` + restart of Redis: a durability fault for every client.
    RedisRestart,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::ConnClose => "conn-close",
            Fault::PgTerminate => "pg-terminate",
            Fault::RedisKill => "redis-kill",
            Fault::Failpoints => "failpoints",
            Fault::BrokerRestart => "broker-restart",
            Fault::RedisRestart => "redis-restart",
        }
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// Messages to publish.
    #[arg(long, default_value_t = 2000)]
    messages: u64,
    /// SIGKILLs of random workers while messages flow (each replaced at once).
    #[arg(long, default_value_t = 3)]
    kills: u32,
    /// The dedup store of the workers.
    #[arg(long, value_enum, default_value_t = Store::Postgres)]
    store: Store,
    /// Faults besides kills, comma-separated. Default: conn-close,pg-terminate,failpoints
    /// (plus redis-kill with --store redis). broker-restart and redis-restart disturb
    /// other users of those services: opt-in only (cargo test runs them only in the
    /// broker_restart and redis_restart test binaries).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Option<Vec<Fault>>,
    /// How many times each connection fault (and restart) is injected.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    workers: u32,
    /// Prefetch (and concurrency) of each worker.
    #[arg(long, default_value_t = 10)]
    prefetch: u16,
    /// Share of poison messages (invalid payload), in percent.
    #[arg(long, default_value_t = 2.0)]
    poison_percent: f64,
    /// Seconds to wait for the queues to drain after the last publish.
    #[arg(long, default_value_t = 120)]
    drain_timeout: u64,
    /// Random seed (poison choice, fault schedule, victims); printed for reruns.
    #[arg(long)]
    seed: Option<u64>,
    /// Probability of the `after-commit-before-ack` crash point on its armed worker.
    #[arg(long, default_value_t = 0.01)]
    commit_failpoint_p: f64,
    /// Probability of the `after-retry-publish-before-ack` crash point on its armed worker.
    #[arg(long, default_value_t = 0.2)]
    retry_failpoint_p: f64,
    /// Keep the run's tables, queues, Redis keys and worker logs.
    #[arg(long)]
    keep: bool,
    /// Send every other batch through a transactional outbox (`chaos_outbox_<run>`,
    /// enqueued in the transaction that records the ids) and an `idem_outbox::Relay`
    /// running in the controller, instead of the publisher.
    #[arg(long)]
    outbox: bool,
    /// Publish at most this many messages per second (0: as fast as confirms allow),
    /// so the publisher and the relay are still at work when faults are injected.
    #[arg(long, default_value_t = 0)]
    publish_rate: u32,
    /// After each Redis restart, publish again (same id and body) this many messages
    /// that were applied and completed before it: what a publisher retry or a
    /// redelivery would do. Redis without persistence has forgotten their `done`
    /// records, so they run again (`reruns_after_durability_fault`).
    #[arg(long, default_value_t = 0)]
    replay_after_restart: u32,
}

/// The crash points armed on workers 0 and 1 (small probabilities, `--*-failpoint-p`),
/// each until it has fired `ABORTS_PER_FAILPOINT` times (a re-spawned worker is
/// re-armed until then).
const FAILPOINTS: [&str; 2] = [AFTER_COMMIT_BEFORE_ACK, AFTER_RETRY_PUBLISH_BEFORE_ACK];
const ABORTS_PER_FAILPOINT: u32 = 1;
const PUBLISH_BATCH: usize = 200;

/// What has been published so far, shared by the producer and the fault injector.
#[derive(Default)]
struct Published {
    /// Messages confirmed by the broker to the publisher.
    direct: AtomicU64,
    /// Messages committed into the outbox.
    outbox: AtomicU64,
}

impl Published {
    fn total(&self) -> u64 {
        self.direct.load(Ordering::Relaxed) + self.outbox.load(Ordering::Relaxed)
    }
}

struct WorkerProc {
    slot: usize,
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    armed: Option<&'static str>,
}

struct Fleet {
    exe: PathBuf,
    names: Names,
    store: Store,
    prefetch: u16,
    log_dir: PathBuf,
    procs: Vec<WorkerProc>,
    generation: u32,
    failpoints: bool,
    /// Probability of each of [`FAILPOINTS`].
    failpoint_p: [f64; 2],
    /// Names of workers that died (SIGKILL, crash point, anything else).
    dead: HashSet<String>,
    aborts: HashMap<&'static str, u32>,
    kills: u32,
    unexpected: Vec<String>,
}

impl Fleet {
    fn arm_for(&self, slot: usize) -> Option<(&'static str, String)> {
        if !self.failpoints {
            return None;
        }
        let point = *FAILPOINTS.get(slot)?;
        let fired = self.aborts.get(point).copied().unwrap_or(0);
        (fired < ABORTS_PER_FAILPOINT)
            .then(|| (point, format!("{point}={}", self.failpoint_p[slot])))
    }

    fn spawn(&mut self, slot: usize) -> Result<WorkerProc, BoxError> {
        self.generation += 1;
        let name = format!("{}{slot}g{}", self.names.worker_prefix(), self.generation);
        let log = std::fs::File::create(self.log_dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("worker")
            .args(["--run", &self.names.run, "--name", &name])
            .args(["--store", self.store.as_str()])
            .args(["--prefetch", &self.prefetch.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .env_remove(idem_amqp::failpoints::ENV)
            .kill_on_drop(true);
        let arm = self.arm_for(slot);
        if let Some((_, spec)) = &arm {
            cmd.env(idem_amqp::failpoints::ENV, spec);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start worker {}: {e}", self.exe.display()))?;
        Ok(WorkerProc {
            slot,
            name,
            stdin: child.stdin.take(),
            child,
            armed: arm.map(|(point, _)| point),
        })
    }

    /// SIGKILLs a random worker and starts its replacement.
    async fn kill_random(&mut self, rng: &mut fastrand::Rng) -> Result<String, BoxError> {
        if self.procs.is_empty() {
            return Err("no worker to kill".into());
        }
        let i = rng.usize(..self.procs.len());
        let mut victim = self.procs.swap_remove(i);
        victim.child.start_kill()?;
        let _ = victim.child.wait().await;
        self.kills += 1;
        self.dead.insert(victim.name.clone());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let replacement = self.spawn(victim.slot)?;
        self.procs.push(replacement);
        Ok(victim.name)
    }

    /// Notices workers that died on their own (crash points) and replaces them.
    fn reap(&mut self) -> Result<(), BoxError> {
        let mut i = 0;
        while i < self.procs.len() {
            let status = self.procs[i].child.try_wait()?;
            let Some(status) = status else {
                i += 1;
                continue;
            };
            let gone = self.procs.swap_remove(i);
            self.dead.insert(gone.name.clone());
            match (status.signal(), gone.armed) {
                (Some(6), Some(point)) => {
                    *self.aborts.entry(point).or_insert(0) += 1;
                    println!("chaos: worker {} aborted at crash point {point}", gone.name);
                }
                _ => {
                    let log = self.log_dir.join(format!("{}.log", gone.name));
                    let last = std::fs::read_to_string(&log)
                        .ok()
                        .and_then(|t| {
                            t.lines()
                                .rev()
                                .find(|l| !l.trim().is_empty())
                                .map(str::to_owned)
                        })
                        .unwrap_or_default();
                    println!(
                        "chaos: worker {} exited unexpectedly ({status}); log {}: {last}",
                        gone.name,
                        log.display()
                    );
                    self.unexpected.push(gone.name.clone());
                    if self.unexpected.len() > 10 {
                        return Err(
                            "more than 10 unexpected worker exits; see the worker logs".into()
                        );
                    }
                }
            }
            let replacement = self.spawn(gone.slot)?;
            self.procs.push(replacement);
        }
        Ok(())
    }

    /// Stops every worker gracefully (closes its stdin), SIGKILL after 20 s.
    async fn stop(&mut self) {
        for p in &mut self.procs {
            p.stdin = None;
        }
        for p in &mut self.procs {
            match tokio::time::timeout(Duration::from_secs(20), p.child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    println!("chaos: worker {} did not stop in 20 s; killing it", p.name);
                    let _ = p.child.kill().await;
                }
            }
        }
        self.procs.clear();
    }

    fn failpoint_aborts(&self) -> u32 {
        self.aborts.values().sum()
    }
}

/// What happens at a point of the run's progress.
#[derive(Clone, Copy, Debug)]
enum Event {
    Kill,
    Fault(Fault),
}

struct Admin {
    pg: PgPool,
    amqp: Option<lapin::Connection>,
    redis: Option<redis::aio::ConnectionManager>,
    name: String,
}

impl Admin {
    async fn channel(&mut self) -> Result<lapin::Channel, BoxError> {
        if let Some(conn) = &self.amqp {
            if conn.status().connected() {
                if let Ok(ch) = conn.create_channel().await {
                    return Ok(ch);
                }
            }
        }
        let conn = common::rabbit(&self.name).await?;
        let ch = conn.create_channel().await?;
        self.amqp = Some(conn);
        Ok(ch)
    }

    async fn count(&self, sql: &str) -> Result<i64, BoxError> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pg).await?)
    }
}

/// Messages (ready + unacked) in the run's work and retry queues, by `rabbitmqctl`.
async fn undrained(names: &Names, dlq: &str) -> Result<u64, BoxError> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "messages"])
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!(
            "rabbitmqctl list_queues failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    let queue = names.queue();
    let retry = format!("{queue}.retry.");
    let mut total = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((name, messages)) = line.split_once('\t') else {
            continue;
        };
        let name = name.trim();
        if name != dlq && (name == queue || name.starts_with(&retry)) {
            total += messages.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok(total)
}

fn body(id: &str, n: u64, poison: bool) -> Vec<u8> {
    if poison {
        format!("poison {id}: not JSON").into_bytes()
    } else {
        serde_json::json!({ "id": id, "n": n })
            .to_string()
            .into_bytes()
    }
}

/// Publishes every message with confirms, re-publishing a batch with the same ids
/// until it is confirmed, and records the confirmed ids. With `outbox`, every other
/// batch is instead enqueued into the outbox in the transaction that records its ids
/// (the outbox generates the ids; the body then carries `"outbox": true` instead of
/// the id). With a `rate`, batches are small and paced.
async fn produce(
    names: Names,
    pg: PgPool,
    poison: Arc<Vec<bool>>,
    published: Arc<Published>,
    outbox: Option<Outbox>,
    rate: u32,
) -> Result<(), BoxError> {
    let url = common::amqp_url();
    let publisher = Publisher::builder(&url)
        .connection_name(format!("{}producer", names.conn_prefix()))
        .connect()
        .await?;
    let queue = names.queue();
    let insert = format!(
        "INSERT INTO {} (msg_id, poison) SELECT * FROM UNNEST($1::text[], $2::bool[]) ON CONFLICT DO NOTHING",
        names.table("published")
    );
    let batch = if rate == 0 {
        PUBLISH_BATCH
    } else {
        (rate as usize / 10).clamp(1, PUBLISH_BATCH)
    };
    let started = Instant::now();
    let ids: Vec<u64> = (0..poison.len() as u64).collect();
    for (index, chunk) in ids.chunks(batch).enumerate() {
        if rate > 0 {
            let due = started + Duration::from_secs_f64((index * batch) as f64 / f64::from(rate));
            tokio::time::sleep_until(due.into()).await;
        }
        let flags: Vec<bool> = chunk
            .iter()
            .map(|&n| poison.get(n as usize).copied().unwrap_or(false))
            .collect();
        if let Some(outbox) = outbox.as_ref().filter(|_| index % 2 == 1) {
            let n = enqueue_batch(outbox, &pg, &insert, &queue, chunk, &flags).await?;
            published.outbox.fetch_add(n, Ordering::Relaxed);
            continue;
        }
        let mut msgs: Vec<Message> = chunk
            .iter()
            .zip(&flags)
            .map(|(&n, &bad)| {
                let id = format!("{}-{n}", names.run);
                Message::new(body(&id, n, bad)).with_message_id(id)
            })
            .collect();
        let mut ok = false;
        for attempt in 0..100 {
            match publisher.publish_batch("", &queue, &mut msgs).await {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "batch not confirmed; publishing it again with the same ids");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if !ok {
            println!(
                "chaos: producer gave up on a batch of {} messages",
                msgs.len()
            );
            continue;
        }
        let ids: Vec<String> = msgs
            .iter()
            .filter_map(|m| m.properties.message_id.clone())
            .collect();
        let mut recorded = false;
        for _ in 0..20 {
            match sqlx::query(&insert)
                .bind(&ids)
                .bind(&flags)
                .execute(&pg)
                .await
            {
                Ok(_) => {
                    recorded = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record confirmed ids; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if !recorded {
            return Err("cannot record the confirmed ids in PostgreSQL".into());
        }
        published
            .direct
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
    }
    publisher.close().await;
    Ok(())
}

/// Enqueues one batch into the outbox and records its ids, in one transaction
/// (retried on error: a failed transaction left nothing). Returns the batch size.
async fn enqueue_batch(
    outbox: &Outbox,
    pg: &PgPool,
    insert: &str,
    queue: &str,
    chunk: &[u64],
    flags: &[bool],
) -> Result<u64, BoxError> {
    let mut last = None;
    for _ in 0..20 {
        let attempt = async {
            let mut tx = pg.begin().await?;
            let mut ids = Vec::with_capacity(chunk.len());
            for (&n, &bad) in chunk.iter().zip(flags) {
                let body = if bad {
                    format!("poison {n} (outbox): not JSON").into_bytes()
                } else {
                    serde_json::json!({ "n": n, "outbox": true })
                        .to_string()
                        .into_bytes()
                };
                let id = outbox
                    .enqueue(&mut tx, OutboxMessage::new("", queue, body))
                    .await?;
                ids.push(id.to_string());
            }
            sqlx::query(insert)
                .bind(&ids)
                .bind(flags)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, BoxError>(ids.len() as u64)
        };
        match attempt.await {
            Ok(n) => return Ok(n),
            Err(e) => {
                tracing::warn!(error = %e, "cannot enqueue a batch into the outbox; retrying");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Err(format!(
        "cannot enqueue into the outbox: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )
    .into())
}

struct Totals {
    confirmed: i64,
    poison: i64,
    effects: i64,
    invocations: i64,
    lost: i64,
    poison_applied: i64,
    stray_effects: i64,
    duplicates: i64,
    reruns_after_crash: i64,
    reruns_after_durability_fault: i64,
    dlq_copies: usize,
    dead_lettered: i64,
    dlq_foreign: usize,
}

async fn create_tables(pg: &PgPool, names: &Names, outbox: bool) -> Result<(), BoxError> {
    let t = |k: &str| names.table(k);
    for sql in [
        format!("CREATE TABLE {} (msg_id TEXT PRIMARY KEY, poison BOOLEAN NOT NULL)", t("published")),
        format!(
            "CREATE TABLE {} (msg_id TEXT PRIMARY KEY, worker TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
            t("effects")
        ),
        format!(
            "CREATE TABLE {} (msg_id TEXT NOT NULL, worker TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
            t("invocations")
        ),
        format!(
            "CREATE TABLE {} (msg_id TEXT NOT NULL, worker TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
            t("dupes")
        ),
    ] {
        sqlx::query(&sql).execute(pg).await?;
    }
    let inbox = idem_sql::PgInbox::new(pg.clone()).try_table(&t("inbox"))?;
    inbox.ensure_schema().await?;
    if outbox {
        Outbox::new(&t("outbox"))?.ensure_schema(pg).await?;
    }
    Ok(())
}

async fn cleanup(admin: &mut Admin, names: &Names) -> Result<(), BoxError> {
    for kind in [
        "published",
        "effects",
        "invocations",
        "dupes",
        "inbox",
        "outbox",
    ] {
        sqlx::query(&format!("DROP TABLE IF EXISTS {}", names.table(kind)))
            .execute(&admin.pg)
            .await?;
    }
    // The inbox's start counters (crash counting).
    sqlx::query(&format!(
        "DROP TABLE IF EXISTS {}_starts",
        names.table("inbox")
    ))
    .execute(&admin.pg)
    .await?;
    let ch = admin.channel().await?;
    common::topology(&names.queue()).delete_on(&ch).await?;
    if let Some(conn) = admin.redis.as_mut() {
        let pattern = format!("{}:*", names.redis_prefix());
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await?;
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

/// Reads (and removes) every message of the DLQ: the message ids.
async fn read_dlq(admin: &mut Admin, dlq: &str) -> Result<Vec<Option<String>>, BoxError> {
    let ch = admin.channel().await?;
    let mut ids = Vec::new();
    while let Some(got) = ch
        .basic_get(dlq.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        ids.push(
            got.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
        );
    }
    Ok(ids)
}

async fn verify(
    admin: &mut Admin,
    names: &Names,
    fleet: &Fleet,
    store: Store,
    durability_windows: &[(String, String)],
) -> Result<Totals, BoxError> {
    let t = |k: &str| names.table(k);
    let (published, effects, invocations, dupes) =
        (t("published"), t("effects"), t("invocations"), t("dupes"));
    let confirmed = admin
        .count(&format!("SELECT count(*) FROM {published}"))
        .await?;
    let poison = admin
        .count(&format!("SELECT count(*) FROM {published} WHERE poison"))
        .await?;
    let effect_rows = admin
        .count(&format!("SELECT count(*) FROM {effects}"))
        .await?;
    let invocation_rows = admin
        .count(&format!("SELECT count(*) FROM {invocations}"))
        .await?;
    let lost = admin
        .count(&format!(
            "SELECT count(*) FROM {published} p WHERE NOT p.poison \
             AND NOT EXISTS (SELECT 1 FROM {effects} e WHERE e.msg_id = p.msg_id)"
        ))
        .await?;
    let poison_applied = admin
        .count(&format!(
            "SELECT count(*) FROM {effects} e JOIN {published} p USING (msg_id) WHERE p.poison"
        ))
        .await?;
    let stray_effects = admin
        .count(&format!(
            "SELECT count(*) FROM {effects} e WHERE NOT EXISTS (SELECT 1 FROM {published} p WHERE p.msg_id = e.msg_id)"
        ))
        .await?;

    // Every duplicate effect attempt, and who had run the message before.
    let dupe_ids: Vec<String> = sqlx::query_scalar(&format!("SELECT DISTINCT msg_id FROM {dupes}"))
        .fetch_all(&admin.pg)
        .await?;
    let runs: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT msg_id, worker FROM {invocations} WHERE msg_id = ANY($1)"
    ))
    .bind(&dupe_ids)
    .fetch_all(&admin.pg)
    .await?;
    // Re-runs a durability fault explains: the effect was applied before Redis came
    // back (its `done` record, if any, was forgotten) and re-attempted after it went down.
    let (starts, ends): (Vec<&str>, Vec<&str>) = durability_windows
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .unzip();
    let unexplained: HashSet<String> = sqlx::query_scalar::<_, String>(&format!(
        "SELECT DISTINCT d.msg_id FROM {dupes} d JOIN {effects} e USING (msg_id) \
         WHERE NOT EXISTS (SELECT 1 FROM unnest($1::text[], $2::text[]) AS w(t0, t1) \
         WHERE e.at < w.t1::timestamptz AND d.at > w.t0::timestamptz)"
    ))
    .bind(&starts)
    .bind(&ends)
    .fetch_all(&admin.pg)
    .await?
    .into_iter()
    .collect();
    let mut by_msg: HashMap<&str, Vec<&str>> = HashMap::new();
    for (msg, worker) in &runs {
        by_msg.entry(msg).or_default().push(worker);
    }
    let (mut duplicates, mut after_crash, mut after_durability) = (0, 0, 0);
    for id in &dupe_ids {
        let crashed = by_msg
            .get(id.as_str())
            .is_some_and(|ws| ws.iter().any(|w| fleet.dead.contains(*w)));
        match store {
            // The inbox promises no duplicate effect under every fault.
            Store::Postgres | Store::None => duplicates += 1,
            // A lease store re-runs a message whose worker died between the effect and
            // `complete` (its lease expires); a Redis that forgot writes re-runs what was
            // applied before it came back.
            Store::Redis if crashed => after_crash += 1,
            Store::Redis if !unexplained.contains(id) => after_durability += 1,
            Store::Redis => duplicates += 1,
        }
    }

    let dlq = read_dlq(admin, &common::topology(&names.queue()).dlq()).await?;
    let poison_ids: HashSet<String> =
        sqlx::query_scalar(&format!("SELECT msg_id FROM {published} WHERE poison"))
            .fetch_all(&admin.pg)
            .await?
            .into_iter()
            .collect();
    let mut seen = HashSet::new();
    let mut foreign = 0;
    for id in &dlq {
        match id {
            Some(id) if poison_ids.contains(id) => {
                seen.insert(id.clone());
            }
            _ => foreign += 1,
        }
    }
    Ok(Totals {
        confirmed,
        poison,
        effects: effect_rows,
        invocations: invocation_rows,
        lost,
        poison_applied,
        stray_effects,
        duplicates,
        reruns_after_crash: after_crash,
        reruns_after_durability_fault: after_durability,
        dlq_copies: dlq.len(),
        dead_lettered: seen.len() as i64,
        dlq_foreign: foreign,
    })
}

pub(crate) async fn run(args: RunArgs) -> Result<bool, BoxError> {
    let started = Instant::now();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let names = Names::new(&run_id);
    let faults: Vec<Fault> = args.faults.clone().unwrap_or_else(|| {
        let mut f = vec![Fault::ConnClose, Fault::PgTerminate, Fault::Failpoints];
        if args.store == Store::Redis {
            f.push(Fault::RedisKill);
        }
        f
    });
    let needs_redis = args.store == Store::Redis
        || faults.contains(&Fault::RedisKill)
        || faults.contains(&Fault::RedisRestart);
    let log_dir = std::env::temp_dir().join(format!("idem-chaos-{run_id}"));
    std::fs::create_dir_all(&log_dir)?;
    println!(
        "chaos: run={run_id} store={} messages={} workers={} kills={} faults={} seed={seed} logs={}",
        args.store.as_str(),
        args.messages,
        args.workers,
        args.kills,
        faults.iter().map(|f| f.name()).collect::<Vec<_>>().join(","),
        log_dir.display()
    );

    let db = common::database_url();
    let mut admin = Admin {
        pg: common::pg_pool(&db, &format!("idem-chaos-admin-{run_id}"), 4).await?,
        amqp: None,
        redis: None,
        name: format!("idem-chaos-admin-{run_id}"),
    };
    if needs_redis {
        admin.redis = Some(common::redis_conn(&common::redis_url()).await?);
    }
    create_tables(&admin.pg, &names, args.outbox).await?;
    let topology = common::topology(&names.queue());
    {
        let ch = admin.channel().await?;
        topology.declare_on(&ch).await?;
    }

    let outcome = drive(&args, &names, &faults, &mut admin, &mut rng, &log_dir).await;
    let (fleet, fired, drained, windows) = match outcome {
        Ok(v) => v,
        Err(e) => {
            if !args.keep {
                let _ = cleanup(&mut admin, &names).await;
            }
            return Err(e);
        }
    };
    let totals = verify(&mut admin, &names, &fleet, args.store, &windows).await;
    let totals = match totals {
        Ok(t) => t,
        Err(e) => {
            if !args.keep {
                let _ = cleanup(&mut admin, &names).await;
            }
            return Err(e);
        }
    };
    let fault_count: u32 = fired.values().sum::<u32>() + fleet.failpoint_aborts();
    let ok = drained
        && totals.lost == 0
        && totals.duplicates == 0
        && totals.dead_lettered == totals.poison
        && totals.dlq_foreign == 0
        && totals.poison_applied == 0;
    if args.keep {
        println!(
            "chaos: kept tables chaos_*_{run_id}, queues {}*, logs in {}",
            names.queue(),
            log_dir.display()
        );
    } else {
        cleanup(&mut admin, &names).await?;
        if ok {
            let _ = std::fs::remove_dir_all(&log_dir);
        }
    }
    let mut fired_list: Vec<String> = fired
        .iter()
        .map(|(f, n)| format!("{}={n}", f.name()))
        .collect();
    fired_list.sort();
    println!(
        "chaos: faults injected: {} failpoint-aborts={} (after-commit-before-ack={}, after-retry-publish-before-ack={}) unexpected-worker-exits={}",
        fired_list.join(" "),
        fleet.failpoint_aborts(),
        fleet.aborts.get(AFTER_COMMIT_BEFORE_ACK).copied().unwrap_or(0),
        fleet.aborts.get(AFTER_RETRY_PUBLISH_BEFORE_ACK).copied().unwrap_or(0),
        fleet.unexpected.len(),
    );
    println!(
        "chaos: drained={drained} dlq_copies={} dlq_foreign={} poison_applied={} unconfirmed_effects={} reruns_after_crash={} reruns_after_durability_fault={} elapsed={:.1}s",
        totals.dlq_copies,
        totals.dlq_foreign,
        totals.poison_applied,
        totals.stray_effects,
        totals.reruns_after_crash,
        totals.reruns_after_durability_fault,
        started.elapsed().as_secs_f64()
    );
    if !drained {
        println!(
            "chaos: FAILED: the queues did not drain within {} s",
            args.drain_timeout
        );
    }
    println!(
        "chaos: published={} confirmed={} effects={} invocations={} lost={} duplicates={} dead_lettered={} poison={} kills={} faults={fault_count}",
        args.messages,
        totals.confirmed,
        totals.effects,
        totals.invocations,
        totals.lost,
        totals.duplicates,
        totals.dead_lettered,
        totals.poison,
        fleet.kills,
    );
    Ok(ok)
}

/// The stopped fleet, the faults fired, whether the queues drained, and the
/// durability windows (database time before and after each Redis restart).
type Driven = (Fleet, HashMap<Fault, u32>, bool, Vec<(String, String)>);

/// Starts the workers and the producer, fires the scheduled faults as the effects
/// progress, and waits for the queues to drain. With `--outbox` a relay runs in this
/// process meanwhile.
async fn drive(
    args: &RunArgs,
    names: &Names,
    faults: &[Fault],
    admin: &mut Admin,
    rng: &mut fastrand::Rng,
    log_dir: &std::path::Path,
) -> Result<Driven, BoxError> {
    let poison: Vec<bool> = (0..args.messages)
        .map(|_| rng.f64() * 100.0 < args.poison_percent)
        .collect();
    let expected_effects = poison.iter().filter(|p| !**p).count().max(1) as f64;

    let mut schedule: Vec<(f64, Event)> = (0..args.kills)
        .map(|_| (0.05 + rng.f64() * 0.85, Event::Kill))
        .collect();
    for fault in faults.iter().filter(|f| **f != Fault::Failpoints) {
        for _ in 0..args.rounds {
            schedule.push((0.05 + rng.f64() * 0.85, Event::Fault(*fault)));
        }
    }
    schedule.sort_by(|a, b| a.0.total_cmp(&b.0));

    let mut fleet = Fleet {
        exe: std::env::current_exe()?,
        names: names.clone(),
        store: args.store,
        prefetch: args.prefetch,
        log_dir: log_dir.to_owned(),
        procs: Vec::new(),
        generation: 0,
        failpoints: faults.contains(&Fault::Failpoints),
        failpoint_p: [args.commit_failpoint_p, args.retry_failpoint_p],
        dead: HashSet::new(),
        aborts: HashMap::new(),
        kills: 0,
        unexpected: Vec::new(),
    };
    for slot in 0..args.workers.max(1) as usize {
        let p = fleet.spawn(slot)?;
        fleet.procs.push(p);
    }

    let outbox = if args.outbox {
        Some(Outbox::new(&names.table("outbox"))?)
    } else {
        None
    };
    let (relay, relay_stop, relay_task) = match &outbox {
        Some(outbox) => {
            let pool = common::pg_pool(
                &common::database_url(),
                &format!("{}relay", names.conn_prefix()),
                3,
            )
            .await?;
            let relay = Arc::new(
                Relay::builder(pool, outbox.clone(), common::amqp_url())
                    .poll_interval(Duration::from_millis(200))
                    .build(),
            );
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let running = relay.clone();
            let task = tokio::spawn(async move {
                running
                    .run(async move {
                        let _ = stopped.await;
                    })
                    .await
            });
            (Some(relay), Some(stop), Some(task))
        }
        None => (None, None, None),
    };
    let relayed = |relay: &Option<Arc<Relay>>| relay.as_ref().map_or(0, |r| r.stats().published);

    let published = Arc::new(Published::default());
    let mut producer = Some(tokio::spawn(produce(
        names.clone(),
        admin.pg.clone(),
        Arc::new(poison),
        published.clone(),
        outbox,
        args.publish_rate,
    )));
    let mut windows = Vec::new();

    let effects_sql = format!("SELECT count(*) FROM {}", names.table("effects"));
    let dlq = common::topology(&names.queue()).dlq();
    let mut fired: HashMap<Fault, u32> = HashMap::new();
    let mut next = 0;
    let mut deadline: Option<Instant> = None;
    let mut valid_confirmed: Option<i64> = None;
    let mut empty_checks = 0;
    let mut drained = false;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fleet.reap()?;
        if producer.as_ref().is_some_and(|p| p.is_finished()) {
            if let Some(p) = producer.take() {
                p.await??;
            }
            deadline = Some(Instant::now() + Duration::from_secs(args.drain_timeout));
            valid_confirmed = Some(
                admin
                    .count(&format!(
                        "SELECT count(*) FROM {} WHERE NOT poison",
                        names.table("published")
                    ))
                    .await?,
            );
        }
        let effects = match admin.count(&effects_sql).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count effects");
                continue;
            }
        };
        let progress = effects as f64 / expected_effects;
        while next < schedule.len() && progress >= schedule[next].0 {
            let (at, event) = schedule[next];
            next += 1;
            let what = match event {
                Event::Kill => fleet
                    .kill_random(rng)
                    .await
                    .map(|victim| format!("SIGKILL {victim}")),
                Event::Fault(fault) => {
                    let restart = matches!(fault, Fault::BrokerRestart | Fault::RedisRestart);
                    let before = if restart {
                        db_now(admin).await.ok()
                    } else {
                        None
                    };
                    let done = inject(fault, admin, names).await.inspect(|_| {
                        *fired.entry(fault).or_insert(0) += 1;
                    });
                    if restart {
                        let after = db_now(admin).await.ok();
                        if let (Fault::RedisRestart, Some(t0), Some(t1)) = (fault, before, after) {
                            windows.push((t0, t1));
                        }
                        if fault == Fault::RedisRestart && args.replay_after_restart > 0 {
                            match replay_completed(names, admin, args.replay_after_restart).await {
                                Ok(n) => println!(
                                    "chaos: replayed={n} messages completed before the redis-restart"
                                ),
                                Err(e) => println!("chaos: replay after redis-restart failed: {e}"),
                            }
                        }
                        // Where the run stood when the service was back: what is left
                        // was done by clients that reconnected on their own.
                        println!(
                            "chaos: back after {}: effects={} confirmed={} direct={} outbox={} relayed={}",
                            fault.name(),
                            admin.count(&effects_sql).await.unwrap_or(-1),
                            published.total(),
                            published.direct.load(Ordering::Relaxed),
                            published.outbox.load(Ordering::Relaxed),
                            relayed(&relay),
                        );
                    }
                    done
                }
            };
            match what {
                Ok(detail) => println!("chaos: at {:>3.0}% {detail}", at * 100.0),
                Err(e) => println!("chaos: at {:>3.0}% {event:?} failed: {e}", at * 100.0),
            }
        }
        let Some(deadline) = deadline else { continue };
        if Instant::now() > deadline {
            println!(
                "chaos: drain timeout: effects={effects} of {} confirmed valid messages",
                valid_confirmed.unwrap_or(0)
            );
            break;
        }
        if next < schedule.len() || valid_confirmed.is_some_and(|v| effects < v) {
            continue;
        }
        // Effects complete: wait until no message is ready or unacked in the work and
        // retry queues (redeliveries and retry copies settled), twice in a row.
        match undrained(names, &dlq).await {
            Ok(0) => {
                empty_checks += 1;
                if empty_checks >= 2 {
                    drained = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(_) => empty_checks = 0,
            Err(e) => {
                empty_checks = 0;
                tracing::warn!(error = %e, "cannot list queues");
            }
        }
    }
    if let Some(p) = producer.take() {
        p.abort();
    }
    fleet.stop().await;
    if let (Some(stop), Some(task)) = (relay_stop, relay_task) {
        let _ = stop.send(());
        match task.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => println!("chaos: the relay stopped with an error: {e}"),
            Err(e) => println!("chaos: the relay task failed: {e}"),
        }
    }
    println!(
        "chaos: publishing direct={} outbox={} relayed={}",
        published.direct.load(Ordering::Relaxed),
        published.outbox.load(Ordering::Relaxed),
        relayed(&relay),
    );
    // The queue depth of the DLQ, for the log.
    if let Ok(ch) = admin.channel().await {
        if let Ok(q) = ch
            .queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
        {
            println!(
                "chaos: drained={drained}; {} messages in {dlq}",
                q.message_count()
            );
        }
    }
    Ok((fleet, fired, drained, windows))
}

/// Publishes again the `count` valid messages whose effects were applied first (long
/// before the fault), with their ids and bodies. Returns how many were confirmed.
async fn replay_completed(names: &Names, admin: &Admin, count: u32) -> Result<usize, BoxError> {
    let ids: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT e.msg_id FROM {} e JOIN {} p USING (msg_id) WHERE NOT p.poison ORDER BY e.at LIMIT $1",
        names.table("effects"),
        names.table("published")
    ))
    .bind(i64::from(count))
    .fetch_all(&admin.pg)
    .await?;
    let mut msgs: Vec<Message> = ids
        .iter()
        .map(|id| {
            let n = id
                .rsplit('-')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Message::new(body(id, n, false)).with_message_id(id.clone())
        })
        .collect();
    let publisher = Publisher::builder(common::amqp_url())
        .connection_name(format!("{}replayer", names.conn_prefix()))
        .connect()
        .await?;
    let sent = publisher
        .publish_batch("", &names.queue(), &mut msgs)
        .await
        .map(|()| msgs.len());
    publisher.close().await;
    Ok(sent?)
}

/// The database clock, as text (the effects' and duplicates' timestamps use it).
async fn db_now(admin: &Admin) -> Result<String, BoxError> {
    Ok(sqlx::query_scalar("SELECT clock_timestamp()::text")
        .fetch_one(&admin.pg)
        .await?)
}

async fn inject(fault: Fault, admin: &mut Admin, names: &Names) -> Result<String, BoxError> {
    match fault {
        Fault::ConnClose => {
            let n = faults::close_amqp_connections(&names.conn_prefix()).await?;
            Ok(format!("closed {n} AMQP connections"))
        }
        Fault::PgTerminate => {
            let n = faults::terminate_pg_backends(&admin.pg, &names.worker_prefix()).await?;
            Ok(format!("terminated {n} PostgreSQL backends"))
        }
        Fault::RedisKill => {
            let conn = admin.redis.as_mut().ok_or("no Redis connection")?;
            let n = faults::kill_redis_clients(conn, &names.conn_prefix()).await?;
            Ok(format!("killed {n} Redis clients"))
        }
        Fault::BrokerRestart => {
            admin.amqp = None;
            let down = faults::restart_broker().await?;
            Ok(format!(
                "restarted the RabbitMQ app (down {:.1} s)",
                down.as_secs_f64()
            ))
        }
        Fault::RedisRestart => {
            let conn = admin.redis.as_mut().ok_or("no Redis connection")?;
            let down = faults::restart_redis(conn).await?;
            Ok(format!(
                "restarted Redis without saving (down {:.1} s)",
                down.as_secs_f64()
            ))
        }
        Fault::Failpoints => Ok("failpoints are armed at spawn".to_owned()),
    }
}
