//! `idem-bench`: throughput of idem against real services, each scenario next to a
//! hand-written baseline doing the same work, so the number that matters is the ratio.
//!
//! ```text
//! cargo run --release -p idem-bench -- amqp-noop --messages 20000 --prefetch 200
//! cargo run --release -p idem-bench -- amqp-redis --messages 20000 --prefetch 200
//! cargo run --release -p idem-bench -- amqp-postgres --messages 20000 --prefetch 200
//! cargo run --release -p idem-bench -- outbox-relay --messages 20000
//! cargo run --release -p idem-bench -- soak --messages 1000000
//! ```
//!
//! Each scenario prints one JSON line. Runs alternate idem and baseline (A B A B ...)
//! so drift in the machine or broker hits both alike; the report gives medians and the
//! median of the per-round ratios. New scenarios are new modules and subcommands.

mod amqp_noop;
mod amqp_store;
mod outbox_relay;
mod report;
mod soak;

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
    AmqpNoop(amqp_noop::ConsumerArgs),
    /// RabbitMQ + Redis lease store, no-op handler: idem vs lapin + one SET NX PX per message.
    AmqpRedis(amqp_store::Args),
    /// RabbitMQ + PostgreSQL transactional inbox, one insert per message: idem vs lapin +
    /// one INSERT ... ON CONFLICT DO NOTHING and the insert in a transaction per message.
    AmqpPostgres(amqp_store::Args),
    /// Outbox relay from a pre-filled table vs a hand-written lease/publish/mark loop.
    OutboxRelay(outbox_relay::Args),
    /// One worker consumes many messages (Redis store) while its peak and current RSS
    /// are reported every 100k: memory must stay flat, bounded by prefetch.
    Soak(soak::SoakArgs),
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
        Scenario::AmqpRedis(args) => amqp_store::run(amqp_store::Store::Redis, args).await?,
        Scenario::AmqpPostgres(args) => amqp_store::run(amqp_store::Store::Postgres, args).await?,
        Scenario::OutboxRelay(args) => outbox_relay::run(args).await?,
        Scenario::Soak(args) => return soak::run(args).await.map_err(|e| e as _),
    };
    println!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
