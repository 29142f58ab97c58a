//! `idem-bench`: throughput of idem against real services, each scenario next to a
//! hand-written baseline doing the same work, so the number that matters is the ratio.
//!
//! ```text
//! cargo run --release -p idem-bench -- amqp-noop --messages 20000 --prefetch 200
//! ```
//!
//! Each scenario prints one JSON line. Runs alternate idem and baseline (A B A B ...)
//! so drift in the machine or broker hits both alike; the report gives medians and the
//! median of the per-round ratios. New scenarios are new modules and subcommands.

mod amqp_noop;
mod report;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "idem-bench",
    about = "Throughput benchmarks for idem against real services"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// RabbitMQ, no-op handler, at-least-once: idem worker vs a plain lapin consumer.
    AmqpNoop(amqp_noop::Args),
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let report = match Cli::parse().scenario {
        Scenario::AmqpNoop(args) => amqp_noop::run(args).await?,
    };
    println!("{report}");
    Ok(())
}
