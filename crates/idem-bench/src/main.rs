//! `idem-bench`: throughput of idem against real services, each scenario next to a
//! hand-written baseline doing the same work with the same guarantees, so the number
//! that matters is the ratio.
//!
//! ```text
//! cargo run --release -p idem-bench -- amqp-noop --messages 20000 --prefetch 200
//! cargo run --release -p idem-bench -- amqp-redis --messages 20000 --prefetch 200
//! cargo run --release -p idem-bench -- amqp-redis --messages 20000 --prefetch 200 --batch 50
//! cargo run --release -p idem-bench -- amqp-postgres --messages 20000 --prefetch 200
//! cargo run --release -p idem-bench -- outbox-relay --messages 20000
//! cargo run --release -p idem-bench -- publish --messages 20000
//! cargo run --release -p idem-bench -- sweep
//! cargo run --release -p idem-bench -- soak --messages 1000000
//! ```
//!
//! Each comparing scenario prints one JSON line on stdout and writes an SVG chart of
//! its rounds (`--chart PATH`, default `target/idem-bench/<scenario>.svg`, or under
//! `$CARGO_TARGET_DIR`). A round runs idem, then the baseline (then, in `amqp-noop`,
//! the best-case baseline), each on a fresh queue: drift in the machine or broker hits
//! every side of a round alike. The JSON line gives the median rates and the median,
//! min and max of the per-round ratios (`ratio` = idem / baseline). `sweep` prints a
//! Markdown table (and writes it next to its chart); `soak` prints a line per
//! `--report-every` messages. `docs/benchmarks.md` says what each baseline does and how
//! to read the output.

mod amqp_noop;
mod amqp_ordered;
mod amqp_store;
mod chart;
mod cpu;
mod outbox_relay;
mod publish;
mod report;
mod soak;
mod sweep;
mod urls;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "idem-bench",
    about = "Throughput benchmarks for idem against real services"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Where to write the SVG chart (default: target/idem-bench/SCENARIO.svg, where
    /// SCENARIO is the subcommand's name, or under $CARGO_TARGET_DIR).
    #[arg(long, global = true)]
    chart: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Scenario {
    /// RabbitMQ, no-op handler, at-least-once: idem worker vs a plain lapin consumer
    /// acking each delivery, and vs a best-case lapin loop acking with multiple=true.
    /// With --ordered: unordered vs ordered by key for each --keys value.
    AmqpNoop(amqp_noop::NoopArgs),
    /// RabbitMQ + Redis lease store, no-op handler: idem vs lapin + one SET NX PX per message.
    /// With --batch N: also idem with a batch handler of N messages (no-op per message).
    AmqpRedis(amqp_store::Args),
    /// RabbitMQ + PostgreSQL transactional inbox, one insert per message: idem vs lapin +
    /// one INSERT ... ON CONFLICT DO NOTHING and the insert in a transaction per message.
    AmqpPostgres(amqp_store::Args),
    /// Outbox relay from a pre-filled table vs a hand-written lease/publish/mark loop.
    OutboxRelay(outbox_relay::Args),
    /// Publisher::publish_batch with confirms vs a hand-written lapin confirm loop.
    Publish(publish::Args),
    /// Throughput and peak RSS of the idem worker for prefetch x message size, no-op
    /// and Redis store: a Markdown table and an SVG chart.
    Sweep(sweep::Args),
    /// Internal: one cell of `sweep`, run in a child process of its own so that its
    /// peak RSS is its own.
    #[command(hide = true)]
    SweepCell(sweep::CellArgs),
    /// One worker consumes many messages (Redis store) while its peak and current RSS
    /// are reported every 100k: memory must stay flat, bounded by prefetch.
    Soak(soak::SoakArgs),
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    idem_testkit::tools::log_to_stderr();
    let cli = Cli::parse();
    let report = match cli.scenario {
        Scenario::AmqpNoop(args) if args.ordered => return amqp_ordered::run(args).await,
        Scenario::AmqpNoop(args) => amqp_noop::run(args.base).await?,
        Scenario::AmqpRedis(args) => amqp_store::run(amqp_store::Store::Redis, args).await?,
        Scenario::AmqpPostgres(args) => amqp_store::run(amqp_store::Store::Postgres, args).await?,
        Scenario::OutboxRelay(args) => outbox_relay::run(args).await?,
        Scenario::Publish(args) => publish::run(args).await?,
        Scenario::Sweep(args) => return sweep::run(args, cli.chart).await,
        Scenario::SweepCell(args) => return sweep::run_cell(args).await,
        Scenario::Soak(args) => return soak::run(args).await.map_err(|e| e as _),
    };
    println!("{report}");
    let path = cli
        .chart
        .unwrap_or_else(|| chart::default_path(&format!("{}.svg", report.scenario)));
    let title = format!(
        "{}: msgs/s per round ({} messages{})",
        report.scenario,
        report.messages,
        match report.prefetch {
            0 => String::new(),
            p => format!(", prefetch {p}"),
        }
    );
    let svg = chart::rounds_svg(&title, &report.series())?;
    chart::write(&path, &svg, "chart")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Scenario};

    #[test]
    fn command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn rounds_default_to_five_in_every_comparing_scenario() {
        let rounds = |args: &[&str]| match Cli::try_parse_from(args).unwrap().scenario {
            Scenario::AmqpNoop(a) => a.base.rounds,
            Scenario::AmqpRedis(a) | Scenario::AmqpPostgres(a) => a.base.rounds,
            Scenario::OutboxRelay(a) => a.rounds,
            Scenario::Publish(a) => a.rounds,
            _ => unreachable!(),
        };
        for scenario in [
            "amqp-noop",
            "amqp-redis",
            "amqp-postgres",
            "outbox-relay",
            "publish",
        ] {
            assert_eq!(rounds(&["idem-bench", scenario]), 5, "{scenario}");
        }
        assert_eq!(rounds(&["idem-bench", "amqp-noop", "--rounds", "7"]), 7);
    }

    #[tokio::test]
    async fn amqp_redis_refuses_a_bulk_batch_before_connecting() {
        // The per-message Redis handler writes nothing, so a bulk batch would not be
        // the same work: refused, before any service is reached (the URL is unusable).
        let cli = Cli::try_parse_from([
            "idem-bench",
            "amqp-redis",
            "--batch",
            "50",
            "--batch-bulk",
            "--url",
            "amqp://nowhere.invalid:1/%2f",
        ])
        .unwrap();
        let Scenario::AmqpRedis(a) = cli.scenario else {
            panic!("not amqp-redis")
        };
        let err = crate::amqp_store::run(crate::amqp_store::Store::Redis, a)
            .await
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("--batch-bulk is for amqp-postgres only")
        );
    }

    #[test]
    fn chart_path_is_accepted_before_or_after_the_scenario() {
        let after =
            Cli::try_parse_from(["idem-bench", "publish", "--chart", "/tmp/p.svg"]).unwrap();
        assert_eq!(after.chart.unwrap().to_str(), Some("/tmp/p.svg"));
        let before = Cli::try_parse_from(["idem-bench", "--chart", "x.svg", "amqp-noop"]).unwrap();
        assert_eq!(before.chart.unwrap().to_str(), Some("x.svg"));
        assert!(Cli::try_parse_from(["idem-bench", "amqp-noop"])
            .unwrap()
            .chart
            .is_none());
    }

    #[test]
    fn publish_takes_messages_and_the_in_flight_window() {
        let cli = Cli::try_parse_from([
            "idem-bench",
            "publish",
            "--messages",
            "20000",
            "--max-in-flight",
            "500",
        ])
        .unwrap();
        let Scenario::Publish(a) = cli.scenario else {
            panic!("not publish")
        };
        assert_eq!((a.messages, a.max_in_flight, a.size), (20_000, 500, 256));
    }

    #[test]
    fn sweep_defaults_to_the_issue_grid_and_parses_lists() {
        let Scenario::Sweep(a) = Cli::try_parse_from(["idem-bench", "sweep"])
            .unwrap()
            .scenario
        else {
            panic!("not sweep")
        };
        assert_eq!(a.prefetch, [10, 50, 200, 1000]);
        assert_eq!(a.sizes, [256, 65_536, 1_048_576]);
        let Scenario::Sweep(a) = Cli::try_parse_from([
            "idem-bench",
            "sweep",
            "--prefetch",
            "10,200",
            "--sizes",
            "256,64KiB,1MiB",
            "--stores",
            "noop",
        ])
        .unwrap()
        .scenario
        else {
            panic!("not sweep")
        };
        assert_eq!(a.prefetch, [10, 200]);
        assert_eq!(a.sizes, [256, 65_536, 1_048_576]);
        assert_eq!(a.stores, [super::sweep::CellStore::Noop]);
        assert!(Cli::try_parse_from(["idem-bench", "sweep", "--sizes", "12XB"]).is_err());
        assert!(Cli::try_parse_from(["idem-bench", "publish", "--messages", "-3"]).is_err());
    }
}
