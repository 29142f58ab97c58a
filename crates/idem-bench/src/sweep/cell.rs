//! The child process of one sweep cell (`idem-bench sweep-cell`, hidden): consumes the
//! queue the parent filled with the idem worker and prints its rate, its peak RSS and
//! the most deliveries it saw in handlers at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_amqp::{Topology, Worker};
use idem_core::batch::Batch;
use idem_core::{Consumer, ConsumerBuilder, DeliveryMode, IdempotencyKey};

use super::CellStore;
use crate::amqp_noop::Clock;

type BoxError = Box<dyn std::error::Error>;

/// Arguments of the hidden `sweep-cell`: consume `messages` from `queue`.
#[derive(clap::Args)]
pub(crate) struct CellArgs {
    #[arg(long)]
    pub(crate) queue: String,
    #[arg(long)]
    pub(crate) messages: u64,
    #[arg(long)]
    pub(crate) prefetch: u16,
    #[arg(long, value_enum)]
    pub(crate) store: CellStore,
    /// A batch handler of this many messages (no-op per message) instead of the
    /// per-message no-op handler.
    #[arg(long)]
    pub(crate) batch: Option<usize>,
    /// Redis key prefix of the cell.
    #[arg(long, default_value = "")]
    pub(crate) prefix: String,
    #[command(flatten)]
    pub(crate) amqp: crate::urls::AmqpUrl,
    #[command(flatten)]
    pub(crate) redis: crate::urls::RedisUrl,
}

/// `cell: <msgs/s> <peak KiB> <most in flight>` -> (rate, peak, most in flight).
pub(crate) fn parse_cell_line(stdout: &str) -> Option<(f64, u64, u64)> {
    let line = stdout.lines().find_map(|l| l.strip_prefix("cell: "))?;
    let mut parts = line.split_whitespace();
    let rate = parts.next()?.parse().ok()?;
    let peak = parts.next()?.parse().ok()?;
    let in_flight = parts.next()?.parse().ok()?;
    Some((rate, peak, in_flight))
}

/// Peak RSS (`VmHWM`) of this process in KiB (Linux).
fn peak_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Deliveries between the handler's start and their settlement, and the most seen at
/// once: whether the prefetch window actually filled.
#[derive(Default)]
struct InFlight {
    now: AtomicU64,
    most: AtomicU64,
}

impl InFlight {
    fn started(&self, n: u64) {
        let now = self.now.fetch_add(n, Ordering::Relaxed) + n;
        self.most.fetch_max(now, Ordering::Relaxed);
    }
}

/// The cell's consumer: per-message or batch no-op handler, without a store
/// (at-least-once) or on the Redis store. `start(n)` is called as `n` messages enter
/// the handler (1 per message, or a batch's length).
async fn consumer(
    args: &CellArgs,
    start: impl Fn(u64) + Clone + Send + Sync + 'static,
) -> Result<Consumer, BoxError> {
    let builder: ConsumerBuilder = match args.store {
        CellStore::Noop => Consumer::builder("idem-bench-sweep").mode(DeliveryMode::AtLeastOnce),
        CellStore::Redis => {
            let store = idem_redis::RedisStore::builder(&args.redis.redis_url)
                .prefix(args.prefix.clone())
                .connect()
                .await?;
            Consumer::builder("idem-bench-sweep").store(store)
        }
    };
    let consumer = match args.batch {
        None => builder.handler(move || {
            start(1);
            async {}
        })?,
        Some(size) => {
            builder
                .batch_size(size)
                .batch_handler(move |batch: Batch<IdempotencyKey>| {
                    start(batch.len() as u64);
                    batch.each(|_| async {})
                })?
        }
    };
    Ok(consumer)
}

/// The child: consume the cell's queue with the idem worker, print rate and peak RSS.
pub(crate) async fn run_cell(args: CellArgs) -> Result<(), BoxError> {
    let clock = Clock::new(args.messages);
    let in_flight = Arc::new(InFlight::default());
    let (c, f) = (clock.clone(), in_flight.clone());
    let consumer = consumer(&args, move |n| {
        c.started();
        f.started(n);
    })
    .await?;
    let (c, f) = (clock.clone(), in_flight.clone());
    let worker = Worker::builder(&args.amqp.url, Topology::new(args.queue.clone()), consumer)
        .prefetch(args.prefetch)
        .connection_name("idem-bench-sweep-cell")
        .on_settle(move |_| {
            f.now.fetch_sub(1, Ordering::Relaxed);
            c.settled();
        })
        .build()?;
    let running = worker.spawn();
    let elapsed = clock.wait().await;
    running.shutdown_and_join().await?;
    let elapsed: Duration = elapsed?;
    let rate = args.messages as f64 / elapsed.as_secs_f64().max(1e-9);
    println!(
        "cell: {rate:.1} {} {}",
        peak_kib().unwrap_or(0),
        in_flight.most.load(Ordering::Relaxed)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_line_round_trips() {
        assert_eq!(
            parse_cell_line("x\ncell: 1234.5 40960 200\n"),
            Some((1234.5, 40960, 200))
        );
        assert_eq!(parse_cell_line("cell: 1234.5 40960"), None);
        assert_eq!(parse_cell_line("nothing"), None);
    }

    #[test]
    fn in_flight_keeps_the_most_seen_at_once() {
        let f = InFlight::default();
        f.started(1);
        f.started(50);
        f.now.fetch_sub(51, Ordering::Relaxed);
        f.started(10);
        assert_eq!(f.most.load(Ordering::Relaxed), 51);
        assert_eq!(f.now.load(Ordering::Relaxed), 10);
    }
}
