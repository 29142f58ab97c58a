//! `soak`: one in-process worker consumes many messages through the full stack
//! (RabbitMQ, idem consumer, Redis dedup store) while a producer keeps a bounded
//! backlog filled in confirmed batches. Memory (`VmHWM`, `VmRSS`) is reported every
//! `--report-every` settled messages: with a bounded prefetch it must stay flat.

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
}

async fn noop(_key: IdempotencyKey) {}

fn memory_line(settled: u64, started: Instant) -> String {
    let (hwm, rss) = common::memory_kib().unwrap_or((0, 0));
    let secs = started.elapsed().as_secs_f64();
    format!(
        "soak: settled={settled} VmHWM={hwm} kB VmRSS={rss} kB elapsed={secs:.1}s rate={:.0} msg/s",
        settled as f64 / secs.max(0.001)
    )
}

pub(crate) async fn run(args: SoakArgs) -> Result<(), BoxError> {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let queue = format!("soak-{run_id}");
    let prefix = format!("soak-{run_id}");
    let url = common::amqp_url();
    let redis_url = common::redis_url();
    // Fail early, saying how to start Redis, rather than deep inside the worker.
    common::redis_conn(&redis_url).await?;
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
    let layer = DedupLayer::new(store).retention(Duration::from_secs(60));
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
        "soak: run={run_id} messages={} prefetch={} backlog<={} batch={}",
        args.messages, args.prefetch, args.backlog, args.batch
    );
    let started = Instant::now();
    println!("{}", memory_line(0, started));
    let publisher = Publisher::builder(&url)
        .connection_name(format!("idem-soak-producer-{run_id}"))
        .connect()
        .await?;
    let mut published = 0_u64;
    let mut next_report = args.report_every;
    let mut last_progress = (0_u64, Instant::now());
    loop {
        let done = settled.load(Ordering::Relaxed);
        while done >= next_report {
            println!("{}", memory_line(next_report, started));
            next_report += args.report_every;
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
