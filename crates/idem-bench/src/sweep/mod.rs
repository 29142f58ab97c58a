//! `sweep`: throughput and peak memory of the idem worker over a grid of prefetch
//! values and message sizes, for the no-op handler (at-least-once) and for the Redis
//! dedup store (effectively-once), idem only; then the same with a batch handler for
//! each `--batches` size, at one message size (`--batch-message-size`).
//!
//! Each cell runs in a **child process** of its own (`idem-bench sweep-cell`, hidden,
//! in [`cell`]), so its peak RSS (`VmHWM`) is its own and not what an earlier cell
//! left in the allocator. The parent fills a fresh durable queue with the cell's
//! messages (persistent, confirmed), starts the child, which consumes them all and
//! prints its rate and peak RSS, then deletes the queue (and the cell's Redis keys).
//! [`results`] turns the cells into the table and the chart.
//!
//! Messages per cell: `min(--max-messages, --budget-mib / size)`, but at least
//! 1.5 x prefetch so that the prefetch window fills (a 1 MiB x 1000 cell moves
//! 1.5 GiB through the broker; RabbitMQ pages persistent messages to disk, and its
//! memory alarm is checked in `docs/benchmarks.md`).
//!
//! **Memory bound.** Per store, the model is `peak RSS <= F + W x (2 x size + M)`,
//! with `W = min(prefetch, messages)` the deliveries in flight, `2 x size` because a
//! body can exist twice while a delivery is handed over (lapin's frame buffer and the
//! delivery), `F` the fixed overhead and `M` a per-delivery overhead (task, headers,
//! bookkeeping). `F` and `M` are measured, not assumed: `F` is the peak of the
//! smallest per-message cell (smallest prefetch and size) plus 10 % (the same cell run
//! twice peaks about 1 MiB apart) and `M` the largest `(peak - F) / W` among the
//! per-message cells of the smallest size, where bodies weigh nothing; those cells say
//! `yes (fit)`. The other cells (the larger bodies, and every batch cell) then check
//! the bound: the table says per cell whether it holds, and how many deliveries were
//! in handlers at most (the window is only stressed where that reaches the prefetch).
//! A batch handler holds no more deliveries than the prefetch lets in, so its cells
//! are checked against the same bound, with no allowance for the batch size.

mod cell;
mod results;

use std::path::PathBuf;
use std::process::Stdio;

use idem_amqp::{Publisher, Topology};
use idem_core::Message;

use crate::chart;
pub(crate) use cell::{run_cell, CellArgs};
use results::{size_label, Cell};

type BoxError = Box<dyn std::error::Error>;

/// The handler's store in a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CellStore {
    /// No store, no-op handler, at-least-once.
    Noop,
    /// Redis dedup store (claim, no-op handler, complete), effectively-once.
    Redis,
}

impl CellStore {
    fn name(self) -> &'static str {
        match self {
            CellStore::Noop => "noop",
            CellStore::Redis => "redis",
        }
    }
}

/// A size such as `256`, `64KiB` or `1MiB` (also `k`/`KB`/`M`/`MB`, all powers of 2).
fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 256, 64KiB or 1MiB"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return Err(format!("{s:?}: unknown unit (use B, KiB or MiB)")),
    };
    match n.checked_mul(factor) {
        Some(0) | None => Err(format!("{s:?}: a size must be between 1 B and 1 GiB")),
        Some(v) if v > 1 << 30 => Err(format!("{s:?}: a size must be between 1 B and 1 GiB")),
        Some(v) => Ok(v),
    }
}

/// Arguments of `sweep`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Prefetch values (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10u16, 50, 200, 1000])]
    pub(crate) prefetch: Vec<u16>,
    /// Message sizes (comma-separated, e.g. 256,64KiB,1MiB).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_values_t = [256usize, 65_536, 1_048_576])]
    pub(crate) sizes: Vec<usize>,
    /// Stores (comma-separated).
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [CellStore::Noop, CellStore::Redis])]
    pub(crate) stores: Vec<CellStore>,
    /// Most messages per cell.
    #[arg(long, default_value_t = 5000)]
    pub(crate) max_messages: u64,
    /// Most bytes of bodies per cell, in MiB (at least 1.5 x prefetch messages).
    #[arg(long, default_value_t = 256)]
    pub(crate) budget_mib: u64,
    /// Batch sizes of the batch-handler cells (comma-separated), each run at every
    /// prefetch and store, at --batch-message-size. `--batches` with no value: none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = [1usize, 10, 50])]
    pub(crate) batches: Vec<usize>,
    /// Message size of the batch-handler cells.
    #[arg(long, value_parser = parse_size, default_value = "64KiB")]
    pub(crate) batch_message_size: usize,
    /// Where to write the Markdown table (default: target/idem-bench/sweep.md).
    #[arg(long)]
    pub(crate) table: Option<PathBuf>,
    #[command(flatten)]
    amqp: crate::urls::AmqpUrl,
    #[command(flatten)]
    redis: crate::urls::RedisUrl,
}

/// Messages for a cell (see the module docs).
pub(crate) fn cell_messages(prefetch: u16, size: usize, max: u64, budget_mib: u64) -> u64 {
    let by_budget = (budget_mib << 20) / size.max(1) as u64;
    let at_least = u64::from(prefetch) * 3 / 2;
    max.min(by_budget).max(at_least).max(1)
}

/// What one cell runs: store, message size, prefetch and batch size (`None`: the
/// per-message handler).
type Plan = (CellStore, usize, u16, Option<usize>);

/// The cells of a sweep, in the order they run: per store, the per-message grid (size
/// by prefetch), then the batch cells (batch size by prefetch, at one message size).
fn plan(args: &Args) -> Vec<Plan> {
    let mut cells = Vec::new();
    for &store in &args.stores {
        for &size in &args.sizes {
            for &prefetch in &args.prefetch {
                cells.push((store, size, prefetch, None));
            }
        }
        for &batch in &args.batches {
            for &prefetch in &args.prefetch {
                cells.push((store, args.batch_message_size, prefetch, Some(batch)));
            }
        }
    }
    cells
}

pub(crate) async fn run(args: Args, chart_path: Option<PathBuf>) -> Result<(), BoxError> {
    let exe = std::env::current_exe()?;
    let admin = idem_amqp::connect(&args.amqp.url, "idem-bench-sweep-admin").await?;
    let ch = admin.create_channel().await?;
    let mut cells = Vec::new();
    for plan in plan(&args) {
        let cell = measure(&args, &exe, &ch, plan).await?;
        eprintln!(
            "sweep: {} {} prefetch {}{}: {} messages, {:.0} msg/s, peak RSS {:.1} MiB, at most {} in handlers",
            cell.store.name(),
            size_label(cell.size),
            cell.prefetch,
            cell.batch.map(|n| format!(" batch {n}")).unwrap_or_default(),
            cell.messages,
            cell.rate,
            cell.peak_kib as f64 / 1024.0,
            cell.max_in_flight
        );
        cells.push(cell);
    }
    let _ = admin.close(200, "bye".into()).await;
    let table = results::table(&cells);
    println!("{table}");
    let table_path = args
        .table
        .unwrap_or_else(|| chart::default_path("sweep.md"));
    chart::write(&table_path, &table, "table")?;
    let chart_path = chart_path.unwrap_or_else(|| chart::default_path("sweep.svg"));
    chart::write(&chart_path, &results::chart_svg(&cells)?, "chart")?;
    Ok(())
}

/// Runs one cell: fills a fresh queue, runs the child on it, then deletes the queue
/// and the cell's Redis keys (also when the child failed).
async fn measure(
    args: &Args,
    exe: &std::path::Path,
    ch: &lapin::Channel,
    (store, size, prefetch, batch): Plan,
) -> Result<Cell, BoxError> {
    let messages = cell_messages(prefetch, size, args.max_messages, args.budget_mib);
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let topo = Topology::new(format!("idem-bench-sweep-{run_id}"));
    topo.declare_on(ch).await?;
    let prefix = format!("idem-bench-sweep-{run_id}");
    let result = async {
        fill(&args.amqp.url, topo.queue(), messages, size).await?;
        let mut child = std::process::Command::new(exe);
        child
            .arg("sweep-cell")
            .args(["--queue", topo.queue()])
            .args(["--messages", &messages.to_string()])
            .args(["--prefetch", &prefetch.to_string()])
            .args(["--store", store.name()])
            .args(["--prefix", &prefix])
            .env("AMQP_URL", &args.amqp.url)
            .env("REDIS_URL", &args.redis.redis_url)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(n) = batch {
            child.args(["--batch", &n.to_string()]);
        }
        // The parent has nothing else to do meanwhile: wait on a blocking thread so
        // the runtime's connections stay serviced.
        let out = tokio::task::spawn_blocking(move || child.output()).await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!("sweep cell failed ({}): {stdout}", out.status).into());
        }
        cell::parse_cell_line(&stdout)
            .ok_or_else(|| -> BoxError { format!("sweep cell printed no result: {stdout}").into() })
    }
    .await;
    topo.delete_on(ch).await?;
    if store == CellStore::Redis {
        crate::amqp_store::delete_keys(
            &args.redis.redis_url,
            &idem_core::TlsConfig::default(),
            &format!("{prefix}*"),
        )
        .await?;
    }
    let (rate, peak_kib, max_in_flight) = result?;
    Ok(Cell {
        store,
        size,
        prefetch,
        batch,
        messages,
        rate,
        peak_kib,
        max_in_flight,
    })
}

/// Fills `queue` with `n` persistent confirmed messages of `size` bytes, at most
/// 64 MiB of them in flight.
async fn fill(url: &str, queue: &str, n: u64, size: usize) -> Result<(), BoxError> {
    let window = ((64 << 20) / size.max(1)).clamp(1, 1000);
    let publisher = Publisher::builder(url)
        .connection_name("idem-bench-sweep-fill")
        .max_in_flight(window)
        .connect()
        .await?;
    let body = bytes::Bytes::from(vec![b'x'; size]);
    let mut sent = 0;
    while sent < n {
        let batch = (n - sent).min(window as u64);
        let mut msgs: Vec<Message> = (0..batch).map(|_| Message::new(body.clone())).collect();
        publisher.publish_batch("", queue, &mut msgs).await?;
        sent += batch;
    }
    publisher.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_size("256"), Ok(256));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("1MiB"), Ok(1_048_576));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("2048MiB").is_err());
    }

    #[test]
    fn cells_stay_within_budget_but_fill_the_prefetch_window() {
        // 256 B: the message cap.
        assert_eq!(cell_messages(10, 256, 5000, 256), 5000);
        // 1 MiB: the byte budget (256 MiB), unless prefetch needs more.
        assert_eq!(cell_messages(10, 1 << 20, 5000, 256), 256);
        assert_eq!(cell_messages(1000, 1 << 20, 5000, 256), 1500);
    }

    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Args {
        Wrap::try_parse_from(std::iter::once("sweep").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn plan_runs_the_grid_then_the_batch_cells_at_one_size() {
        let args = parse(&[]);
        assert_eq!(args.batches, [1, 10, 50]);
        assert_eq!(args.batch_message_size, 64 << 10);
        let all = plan(&args);
        // 2 stores x (3 sizes x 4 prefetch + 3 batch sizes x 4 prefetch).
        assert_eq!(all.len(), 48);
        assert_eq!(all[0], (CellStore::Noop, 256, 10, None));
        assert_eq!(all[12], (CellStore::Noop, 64 << 10, 10, Some(1)));
        assert_eq!(all[23], (CellStore::Noop, 64 << 10, 1000, Some(50)));
        assert_eq!(all[24], (CellStore::Redis, 256, 10, None));

        let args = parse(&[
            "--stores",
            "redis",
            "--prefetch",
            "200",
            "--sizes",
            "256",
            "--batches",
            "10,50",
            "--batch-message-size",
            "1MiB",
        ]);
        assert_eq!(
            plan(&args),
            [
                (CellStore::Redis, 256, 200, None),
                (CellStore::Redis, 1 << 20, 200, Some(10)),
                (CellStore::Redis, 1 << 20, 200, Some(50)),
            ]
        );
        // `--batches` alone: no batch cells.
        let args = parse(&["--stores", "noop", "--prefetch", "10", "--batches"]);
        assert!(plan(&args).iter().all(|(_, _, _, b)| b.is_none()));
        assert_eq!(plan(&args).len(), 3);
    }
}
