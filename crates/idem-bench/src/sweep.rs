//! `sweep`: throughput and peak memory of the idem worker over a grid of prefetch
//! values and message sizes, for the no-op handler (at-least-once) and for the Redis
//! dedup store (effectively-once), idem only.
//!
//! Each cell runs in a **child process** of its own (`idem-bench sweep-cell`, hidden),
//! so its peak RSS (`VmHWM`) is its own and not what an earlier cell left in the
//! allocator. The parent fills a fresh durable queue with the cell's messages
//! (persistent, confirmed), starts the child, which consumes them all and prints its
//! rate and peak RSS, then deletes the queue (and the cell's Redis keys).
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
//! smallest cell (smallest prefetch and size) plus 10 % (the same cell run twice
//! peaks about 1 MiB apart) and `M` the largest `(peak - F) / W` among the cells of
//! the smallest size, where bodies weigh nothing; those cells say `yes (fit)`. The
//! other cells (the larger bodies) then check the bound: the table says per cell
//! whether it holds, and how many deliveries were in handlers at most (the window is
//! only stressed where that reaches the prefetch).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_amqp::{Publisher, Topology, Worker};
use idem_core::{Consumer, DeliveryMode, Message};

use crate::amqp_noop::Clock;
use crate::chart::{self, Line, Panel};

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
    /// Where to write the Markdown table (default: target/idem-bench/sweep.md).
    #[arg(long)]
    pub(crate) table: Option<PathBuf>,
    /// Broker URL (default amqp://guest:***@127.0.0.1:5672/%2f; passwords are not printed).
    #[arg(long, env = "AMQP_URL", hide_env_values = true, default_value = idem_amqp::DEFAULT_AMQP_URL, hide_default_value = true)]
    url: String,
    /// Redis URL.
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
}

/// Arguments of the hidden `sweep-cell`: consume `messages` from `queue`.
#[derive(clap::Args)]
pub(crate) struct CellArgs {
    #[arg(long)]
    queue: String,
    #[arg(long)]
    messages: u64,
    #[arg(long)]
    prefetch: u16,
    #[arg(long, value_enum)]
    store: CellStore,
    /// Redis key prefix of the cell.
    #[arg(long, default_value = "")]
    prefix: String,
    #[arg(long, env = "AMQP_URL", hide_env_values = true, default_value = idem_amqp::DEFAULT_AMQP_URL, hide_default_value = true)]
    url: String,
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
}

/// Messages for a cell (see the module docs).
pub(crate) fn cell_messages(prefetch: u16, size: usize, max: u64, budget_mib: u64) -> u64 {
    let by_budget = (budget_mib << 20) / size.max(1) as u64;
    let at_least = u64::from(prefetch) * 3 / 2;
    max.min(by_budget).max(at_least).max(1)
}

/// One measured cell.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Cell {
    pub(crate) store: CellStore,
    pub(crate) size: usize,
    pub(crate) prefetch: u16,
    pub(crate) messages: u64,
    pub(crate) rate: f64,
    /// Peak RSS of the child process, KiB.
    pub(crate) peak_kib: u64,
    /// Most deliveries seen at once between handler start and settlement.
    pub(crate) max_in_flight: u64,
}

impl Cell {
    fn in_flight(&self) -> u64 {
        u64::from(self.prefetch).min(self.messages)
    }
}

/// The fitted bound of one store: `F` and `M` of the module docs, in KiB.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Bound {
    pub(crate) fixed_kib: f64,
    pub(crate) per_delivery_kib: f64,
}

impl Bound {
    /// Fits `F` and `M` on the cells of one store (see the module docs); `None` if
    /// there are none.
    pub(crate) fn fit(cells: &[&Cell]) -> Option<Bound> {
        let smallest_size = cells.iter().map(|c| c.size).min()?;
        let smallest = cells
            .iter()
            .filter(|c| c.size == smallest_size)
            .min_by_key(|c| c.prefetch)?;
        // 10 % on top of the one reading: the same cell run twice peaks about 1 MiB
        // apart (allocator and runtime start-up), and this is what the others inherit.
        let fixed = smallest.peak_kib as f64 * 1.1;
        let per_delivery = cells
            .iter()
            .filter(|c| c.size == smallest_size)
            .map(|c| (c.peak_kib as f64 - fixed).max(0.0) / c.in_flight().max(1) as f64)
            .fold(0.0, f64::max);
        Some(Bound {
            fixed_kib: fixed,
            per_delivery_kib: per_delivery,
        })
    }

    /// The bound for `cell`, KiB.
    pub(crate) fn kib(&self, cell: &Cell) -> f64 {
        self.fixed_kib
            + cell.in_flight() as f64 * (2.0 * cell.size as f64 / 1024.0 + self.per_delivery_kib)
    }
}

fn size_label(size: usize) -> String {
    match size {
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

/// The Markdown table of the sweep (and the fitted bound of each store).
pub(crate) fn table(cells: &[Cell]) -> String {
    let mut out = String::from(
        "| store | size | prefetch | messages | msgs/s | MiB/s | most in handlers | peak RSS MiB | bound MiB | holds |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    let mut notes = String::new();
    for store in [CellStore::Noop, CellStore::Redis] {
        let mine: Vec<&Cell> = cells.iter().filter(|c| c.store == store).collect();
        let Some(bound) = Bound::fit(&mine) else {
            continue;
        };
        notes.push_str(&format!(
            "\n{}: bound = F + min(prefetch, messages) x (2 x size + M), F = {:.1} MiB (measured: peak of the smallest cell + 10 %), M = {:.1} KiB per delivery (measured on the smallest size, whose cells say \"yes (fit)\": they set the bound, the others check it)\n",
            store.name(),
            bound.fixed_kib / 1024.0,
            bound.per_delivery_kib
        ));
        let smallest = mine.iter().map(|c| c.size).min().unwrap_or(0);
        for c in mine {
            let limit = bound.kib(c);
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.0} | {:.1} | {} | {:.1} | {:.1} | {} |\n",
                store.name(),
                size_label(c.size),
                c.prefetch,
                c.messages,
                c.rate,
                c.rate * c.size as f64 / f64::from(1 << 20),
                c.max_in_flight,
                c.peak_kib as f64 / 1024.0,
                limit / 1024.0,
                match (c.peak_kib as f64 <= limit, c.size == smallest) {
                    (true, false) => "yes",
                    (true, true) => "yes (fit)",
                    (false, _) => "**no**",
                }
            ));
        }
    }
    out + &notes
}

/// The chart: msgs/s (left) and peak RSS with its bound (right) over prefetch, one
/// colour per store and size.
pub(crate) fn chart_svg(cells: &[Cell]) -> Result<String, String> {
    let mut prefetches: Vec<u16> = cells.iter().map(|c| c.prefetch).collect();
    prefetches.sort_unstable();
    prefetches.dedup();
    let mut groups: Vec<(CellStore, usize)> = cells.iter().map(|c| (c.store, c.size)).collect();
    groups.sort_by_key(|(st, sz)| (st.name(), *sz));
    groups.dedup();
    let mut rate_lines = Vec::new();
    let mut memory_lines = Vec::new();
    for (colour, (store, size)) in groups.iter().enumerate() {
        let mine: Vec<&Cell> = cells.iter().filter(|c| c.store == *store).collect();
        let bound = Bound::fit(&mine);
        let at = |p: u16| {
            cells
                .iter()
                .find(|c| c.store == *store && c.size == *size && c.prefetch == p)
        };
        let label = format!("{} {}", store.name(), size_label(*size));
        rate_lines.push(Line {
            label: label.clone(),
            values: prefetches.iter().map(|p| at(*p).map(|c| c.rate)).collect(),
            limit: false,
            colour,
        });
        memory_lines.push(Line {
            label: format!("{label} peak"),
            values: prefetches
                .iter()
                .map(|p| at(*p).map(|c| c.peak_kib as f64 / 1024.0))
                .collect(),
            limit: false,
            colour,
        });
        if let Some(bound) = bound {
            memory_lines.push(Line {
                label: format!("{label} bound"),
                values: prefetches
                    .iter()
                    .map(|p| at(*p).map(|c| bound.kib(c) / 1024.0))
                    .collect(),
                limit: true,
                colour,
            });
        }
    }
    let categories: Vec<String> = prefetches.iter().map(u16::to_string).collect();
    chart::svg(
        "prefetch",
        &categories,
        &[
            Panel {
                title: "idem worker throughput".into(),
                y_desc: "msgs/s (log)".into(),
                log: true,
                legend_upper_left: false,
                lines: rate_lines,
            },
            Panel {
                title: "peak RSS and its bound".into(),
                y_desc: "MiB (log)".into(),
                log: true,
                legend_upper_left: true,
                lines: memory_lines,
            },
        ],
        (760, 520),
    )
}

pub(crate) async fn run(args: Args, chart_path: Option<PathBuf>) -> Result<(), BoxError> {
    let exe = std::env::current_exe()?;
    let admin = idem_amqp::connect(&args.url, "idem-bench-sweep-admin").await?;
    let ch = admin.create_channel().await?;
    let mut cells = Vec::new();
    for store in &args.stores {
        for size in &args.sizes {
            for prefetch in &args.prefetch {
                let messages = cell_messages(*prefetch, *size, args.max_messages, args.budget_mib);
                let run_id = uuid::Uuid::new_v4().simple().to_string();
                let topo = Topology::new(format!("idem-bench-sweep-{run_id}"));
                topo.declare_on(&ch).await?;
                let prefix = format!("idem-bench-sweep-{run_id}");
                let result = async {
                    fill(&args.url, topo.queue(), messages, *size).await?;
                    let mut child = std::process::Command::new(&exe);
                    child
                        .arg("sweep-cell")
                        .args(["--queue", topo.queue()])
                        .args(["--messages", &messages.to_string()])
                        .args(["--prefetch", &prefetch.to_string()])
                        .args(["--store", store.name()])
                        .args(["--prefix", &prefix])
                        .env("AMQP_URL", &args.url)
                        .env("REDIS_URL", &args.redis_url)
                        .stdin(Stdio::null())
                        .stderr(Stdio::inherit());
                    // The parent has nothing else to do meanwhile: wait on a blocking
                    // thread so the runtime's connections stay serviced.
                    let out = tokio::task::spawn_blocking(move || child.output()).await??;
                    let stdout = String::from_utf8_lossy(&out.stdout);
                    if !out.status.success() {
                        return Err(format!("sweep cell failed ({}): {stdout}", out.status).into());
                    }
                    parse_cell_line(&stdout).ok_or_else(|| -> BoxError {
                        format!("sweep cell printed no result: {stdout}").into()
                    })
                }
                .await;
                topo.delete_on(&ch).await?;
                if *store == CellStore::Redis {
                    crate::amqp_store::delete_keys(
                        &args.redis_url,
                        &idem_core::TlsConfig::default(),
                        &format!("{prefix}*"),
                    )
                    .await?;
                }
                let (rate, peak_kib, max_in_flight) = result?;
                let cell = Cell {
                    store: *store,
                    size: *size,
                    prefetch: *prefetch,
                    messages,
                    rate,
                    peak_kib,
                    max_in_flight,
                };
                eprintln!(
                    "sweep: {} {} prefetch {}: {} messages, {:.0} msg/s, peak RSS {:.1} MiB, at most {} in handlers",
                    store.name(),
                    size_label(*size),
                    prefetch,
                    messages,
                    rate,
                    peak_kib as f64 / 1024.0,
                    max_in_flight
                );
                cells.push(cell);
            }
        }
    }
    let _ = admin.close(200, "bye".into()).await;
    let table = table(&cells);
    println!("{table}");
    let table_path = args
        .table
        .unwrap_or_else(|| chart::default_path("sweep.md"));
    chart::write(&table_path, &table, "table")?;
    let chart_path = chart_path.unwrap_or_else(|| chart::default_path("sweep.svg"));
    chart::write(&chart_path, &chart_svg(&cells)?, "chart")?;
    Ok(())
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

/// `cell: <msgs/s> <peak KiB> <most in flight>` -> (rate, peak, most in flight).
fn parse_cell_line(stdout: &str) -> Option<(f64, u64, u64)> {
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

/// The child: consume the cell's queue with the idem worker, print rate and peak RSS.
pub(crate) async fn run_cell(args: CellArgs) -> Result<(), BoxError> {
    let clock = Clock::new(args.messages);
    // Deliveries between the handler's start and their settlement, and the most seen:
    // whether the prefetch window actually filled.
    let in_flight = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let (c, f) = (clock.clone(), in_flight.clone());
    let start = move || {
        c.started();
        let now = f.0.fetch_add(1, Ordering::Relaxed) + 1;
        f.1.fetch_max(now, Ordering::Relaxed);
    };
    let consumer = match args.store {
        CellStore::Noop => Consumer::builder("idem-bench-sweep")
            .mode(DeliveryMode::AtLeastOnce)
            .handler(move || {
                start();
                async {}
            })?,
        CellStore::Redis => {
            let store = idem_redis::RedisStore::builder(&args.redis_url)
                .prefix(args.prefix.clone())
                .connect()
                .await?;
            Consumer::builder("idem-bench-sweep")
                .store(store)
                .handler(move || {
                    start();
                    async {}
                })?
        }
    };
    let (c, f) = (clock.clone(), in_flight.clone());
    let worker = Worker::builder(&args.url, Topology::new(args.queue.clone()), consumer)
        .prefetch(args.prefetch)
        .connection_name("idem-bench-sweep-cell")
        .on_settle(move |_| {
            f.0.fetch_sub(1, Ordering::Relaxed);
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
        in_flight.1.load(Ordering::Relaxed)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
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

    fn cell(store: CellStore, size: usize, prefetch: u16, peak_mib: f64) -> Cell {
        Cell {
            store,
            size,
            prefetch,
            messages: 5000,
            rate: 1000.0,
            peak_kib: (peak_mib * 1024.0) as u64,
            max_in_flight: u64::from(prefetch),
        }
    }

    #[test]
    fn bound_is_fitted_on_the_small_cells_and_checks_the_big_ones() {
        let cells = [
            cell(CellStore::Noop, 256, 10, 20.0),
            cell(CellStore::Noop, 256, 1000, 30.0),
            // 100 x 1 MiB in flight: bound 20 + 100 x (2 MiB + 10 KiB) ~ 221 MiB.
            cell(CellStore::Noop, 1 << 20, 100, 150.0),
            cell(CellStore::Noop, 1 << 20, 200, 900.0),
        ];
        let refs: Vec<&Cell> = cells.iter().collect();
        let bound = Bound::fit(&refs).unwrap();
        assert_eq!(bound.fixed_kib, 22.0 * 1024.0);
        // (30 - 22) MiB over 1000 deliveries = 8.192 KiB each.
        assert!((bound.per_delivery_kib - 8.192).abs() < 1e-9, "{bound:?}");
        assert!(cells[2].peak_kib as f64 <= bound.kib(&cells[2]));
        assert!(cells[3].peak_kib as f64 > bound.kib(&cells[3]));
        let table = table(&cells);
        assert_eq!(table.matches("| yes (fit) |").count(), 2, "{table}");
        assert_eq!(table.matches("| yes |").count(), 1, "{table}");
        assert_eq!(table.matches("| **no** |").count(), 1, "{table}");
        assert!(table.contains("| noop | 1 MiB | 200 | 5000 |"), "{table}");
        assert!(table.contains("F = 22.0 MiB"), "{table}");
    }

    #[test]
    fn sweep_chart_has_both_panels_and_every_line() {
        let cells = [
            cell(CellStore::Noop, 256, 10, 20.0),
            cell(CellStore::Noop, 256, 200, 22.0),
            cell(CellStore::Redis, 1 << 20, 10, 40.0),
            cell(CellStore::Redis, 1 << 20, 200, 300.0),
        ];
        let svg = chart_svg(&cells).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let texts: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(str::trim))
            .collect();
        for want in [
            "idem worker throughput",
            "peak RSS and its bound",
            "noop 256 B",
            "redis 1 MiB",
            "redis 1 MiB peak",
            "redis 1 MiB bound",
            "200",
        ] {
            assert!(texts.contains(&want), "{want:?} not in {texts:?}");
        }
    }

    #[test]
    fn cell_line_round_trips() {
        assert_eq!(
            parse_cell_line("x\ncell: 1234.5 40960 200\n"),
            Some((1234.5, 40960, 200))
        );
        assert_eq!(parse_cell_line("cell: 1234.5 40960"), None);
        assert_eq!(parse_cell_line("nothing"), None);
    }
}
