//! `soak`: one in-process worker consumes many messages through the full stack
//! (RabbitMQ, idem consumer, Redis dedup store) while a producer keeps a bounded
//! backlog filled in confirmed batches. Every `--report-every` settled messages a line
//! gives the throughput of that interval beside memory (`VmHWM`, `VmRSS`: with a
//! bounded prefetch it must stay flat) and what could explain a change of pace: this
//! process's CPU use, the machine's load, the queue's backlog, and Redis (keys,
//! memory, keys expired and its CPU use in the interval, slow log length).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_amqp::{Publisher, Worker};
use idem_core::{Backoff, Consumer, DedupLayer, IdempotencyKey, Message};
use idem_redis::RedisStore;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Helpers of the soak run (service connections that explain how to start a
/// missing service, memory readings).
mod common {
    use std::time::Duration;

    use idem_amqp::DelayTiers;
    use idem_amqp::Topology;

    use super::BoxError;

    pub(super) fn amqp_url() -> String {
        idem_amqp::amqp_url_from_env()
    }

    pub(super) fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    pub(super) fn topology(queue: &str) -> Topology {
        let topology = Topology::new(queue);
        match DelayTiers::new([Duration::from_secs(1), Duration::from_secs(5)]) {
            Some(t) => topology.tiers(t),
            None => topology,
        }
    }

    pub(super) async fn rabbit(name: &str) -> Result<lapin::Connection, BoxError> {
        idem_amqp::connect(&amqp_url(), name).await.map_err(|e| {
            format!("RabbitMQ not reachable ({e}): is RabbitMQ running? see the README section \"Running the tests\", or set AMQP_URL").into()
        })
    }

    pub(super) async fn redis_conn(url: &str) -> Result<redis::aio::ConnectionManager, BoxError> {
        let client = redis::Client::open(url).map_err(|e| {
            format!(
                "invalid REDIS_URL {}: {e}",
                idem_core::redact::redact_url(url)
            )
        })?;
        redis::aio::ConnectionManager::new(client).await.map_err(|e| {
            format!(
                "Redis not reachable at {} ({e}): is Redis running? see the README section \"Running the tests\", or set REDIS_URL",
                idem_core::redact::redact_url(url)
            )
            .into()
        })
    }

    /// `(VmHWM, VmRSS)` of this process in KiB, from `/proc/self/status` (Linux).
    pub(super) fn memory_kib() -> Option<(u64, u64)> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        Some((field("VmHWM:")?, field("VmRSS:")?))
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct SoakArgs {
    /// Messages to consume.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// The worker's prefetch (and concurrency).
    #[arg(long, default_value_t = 200)]
    prefetch: u16,
    /// Report memory every this many settled messages.
    #[arg(long, default_value_t = 100_000)]
    report_every: u64,
    /// Most published-but-unsettled messages (the producer waits above it).
    #[arg(long, default_value_t = 20_000)]
    backlog: u64,
    /// Messages per confirmed publish batch.
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// How long Redis keeps a completed message's record, in seconds.
    #[arg(long, default_value_t = 60)]
    retention_secs: u64,
}

use crate::cpu::{cpu_secs, process_cpu_secs};

async fn noop(_key: IdempotencyKey) {}

/// A number from the Linux file `path`: `pick` finds it in the file's text. `None`
/// where the file or the number is missing (not Linux, an older kernel).
fn proc_number(path: &str, pick: impl FnOnce(&str) -> Option<&str>) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    pick(&text)?.parse().ok()
}

/// The share of the last 10 s in which some task waited for a CPU (Linux PSI).
fn cpu_pressure() -> Option<f64> {
    proc_number("/proc/pressure/cpu", |text| {
        text.lines()
            .next()?
            .split_whitespace()
            .find_map(|f| f.strip_prefix("avg10="))
    })
}

/// The 1-minute load average.
fn load1() -> Option<f64> {
    proc_number("/proc/loadavg", |text| text.split_whitespace().next())
}

/// A reading of Redis `INFO` (whole server: other users of it count too).
#[derive(Clone, Copy, Default)]
struct RedisReading {
    keys: u64,
    used_memory: u64,
    expired_keys: u64,
    cpu_secs: f64,
    slowlog_len: u64,
}

async fn redis_reading(conn: &mut redis::aio::ConnectionManager) -> Option<RedisReading> {
    let info: String = redis::cmd("INFO").query_async(conn).await.ok()?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let num = |name: &str| field(name).and_then(|v| v.parse::<f64>().ok());
    let keys = info
        .lines()
        .filter(|l| l.starts_with("db"))
        .filter_map(|l| {
            l.split_once("keys=")?
                .1
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    let slowlog_len: u64 = redis::cmd("SLOWLOG")
        .arg("LEN")
        .query_async(conn)
        .await
        .unwrap_or(0);
    Some(RedisReading {
        keys,
        used_memory: num("used_memory")? as u64,
        expired_keys: num("expired_keys")? as u64,
        cpu_secs: num("used_cpu_user")? + num("used_cpu_sys")?,
        slowlog_len,
    })
}

/// The previous report line's readings, to give rates per interval.
struct Probe {
    redis: redis::aio::ConnectionManager,
    channel: lapin::Channel,
    queue: String,
    started: Instant,
    last: (u64, Instant, f64, RedisReading),
    /// CPU seconds of a local RabbitMQ (`beam.smp`) at the last line, if there is one.
    broker_cpu: Option<f64>,
}

impl Probe {
    async fn line(&mut self, settled: u64) -> String {
        let now = Instant::now();
        let (hwm, rss) = common::memory_kib().unwrap_or((0, 0));
        let cpu = cpu_secs().unwrap_or(0.0);
        let redis = redis_reading(&mut self.redis).await.unwrap_or_default();
        let ready = self
            .channel
            .queue_declare(
                self.queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .map(|q| i64::from(q.message_count()))
            .unwrap_or(-1);
        let (last_settled, last_at, last_cpu, last_redis) = self.last;
        let broker_cpu = process_cpu_secs("beam.smp");
        let secs = now.duration_since(last_at).as_secs_f64().max(0.001);
        let total = now.duration_since(self.started).as_secs_f64().max(0.001);
        self.last = (settled, now, cpu, redis);
        let broker = match (broker_cpu, self.broker_cpu) {
            (Some(now), Some(before)) => format!("{:.0}%", 100.0 * (now - before) / secs),
            _ => "?".to_owned(),
        };
        self.broker_cpu = broker_cpu;
        format!(
            "soak: settled={settled} interval_rate={:.0} msg/s VmHWM={hwm} kB VmRSS={rss} kB \
             cpu={:.0}% broker_cpu={broker} cpu_pressure={:.0}% load1={:.2} queue_ready={ready} redis_keys={} redis_used_memory={:.1} MiB \
             redis_expired=+{} redis_cpu={:.0}% redis_slowlog={} elapsed={total:.1}s rate={:.0} msg/s",
            (settled - last_settled) as f64 / secs,
            100.0 * (cpu - last_cpu) / secs,
            cpu_pressure().unwrap_or(-1.0),
            load1().unwrap_or(-1.0),
            redis.keys,
            redis.used_memory as f64 / f64::from(1 << 20),
            redis.expired_keys.saturating_sub(last_redis.expired_keys),
            100.0 * (redis.cpu_secs - last_redis.cpu_secs) / secs,
            redis.slowlog_len,
            settled as f64 / total
        )
    }
}

pub(crate) async fn run(args: SoakArgs) -> Result<(), BoxError> {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let queue = format!("soak-{run_id}");
    let prefix = format!("soak-{run_id}");
    let url = common::amqp_url();
    let redis_url = common::redis_url();
    // Fail early, saying how to start Redis, rather than deep inside the worker.
    let mut redis_probe = common::redis_conn(&redis_url).await?;
    let admin = common::rabbit(&format!("idem-soak-admin-{run_id}")).await?;
    let topology = common::topology(&queue);
    let ch = admin.create_channel().await?;
    topology.declare_on(&ch).await?;

    let store = RedisStore::builder(&redis_url)
        .prefix(prefix.clone())
        .connect()
        .await?;
    // Short retention (the backoff horizon is short too) so Redis holds about a minute
    // of keys, not a million.
    let layer = DedupLayer::new(store).retention(Duration::from_secs(args.retention_secs.max(1)));
    let consumer = Consumer::builder("soak")
        .dedup(layer)
        .backoff(Backoff::exponential(Duration::from_millis(100)).max_attempts(3))
        .handler(noop)?;
    let settled = Arc::new(AtomicU64::new(0));
    let counter = settled.clone();
    let worker = Worker::builder(&url, topology.clone(), consumer)
        .prefetch(args.prefetch)
        .connection_name(format!("idem-soak-{run_id}"))
        .on_settle(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        })
        .build()?;
    let running = worker.spawn();

    println!(
        "soak: run={run_id} messages={} prefetch={} backlog<={} batch={} retention={}s",
        args.messages, args.prefetch, args.backlog, args.batch, args.retention_secs
    );
    let started = Instant::now();
    let first = redis_reading(&mut redis_probe).await.unwrap_or_default();
    let mut probe = Probe {
        redis: redis_probe,
        channel: admin.create_channel().await?,
        queue: queue.clone(),
        started,
        last: (0, started, cpu_secs().unwrap_or(0.0), first),
        broker_cpu: process_cpu_secs("beam.smp"),
    };
    println!("{}", probe.line(0).await);
    let publisher = Publisher::builder(&url)
        .connection_name(format!("idem-soak-producer-{run_id}"))
        .connect()
        .await?;
    let mut published = 0_u64;
    let mut next_report = args.report_every;
    let mut last_progress = (0_u64, Instant::now());
    loop {
        let done = settled.load(Ordering::Relaxed);
        if done >= next_report {
            println!("{}", probe.line(done).await);
            while next_report <= done {
                next_report += args.report_every.max(1);
            }
        }
        if done >= args.messages {
            break;
        }
        if done != last_progress.0 {
            last_progress = (done, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(60) {
            running.shutdown();
            return Err(format!("no progress for 60 s at {done} settled messages").into());
        }
        if published < args.messages && published - done < args.backlog {
            let n = args.batch.min(args.messages - published);
            let mut msgs: Vec<Message> = (published..published + n)
                .map(|i| {
                    Message::new(format!("{{\"n\":{i}}}")).with_message_id(format!("{run_id}-{i}"))
                })
                .collect();
            loop {
                match publisher.publish_batch("", &queue, &mut msgs).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "soak batch not confirmed; publishing it again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            published += n;
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let elapsed = started.elapsed();
    let stats = running.shutdown_and_join().await?;
    publisher.close().await;
    println!("soak: worker stats: {stats}");
    topology.delete_on(&ch).await?;
    let _ = admin.close(200, "bye".into()).await;
    crate::amqp_store::delete_keys(
        &redis_url,
        &idem_core::TlsConfig::default(),
        &format!("{prefix}:*"),
    )
    .await
    .map_err(|e| e.to_string())?;
    println!(
        "soak: done messages={} elapsed={:.1}s rate={:.0} msg/s",
        args.messages,
        elapsed.as_secs_f64(),
        args.messages as f64 / elapsed.as_secs_f64().max(0.001)
    );
    Ok(())
}
