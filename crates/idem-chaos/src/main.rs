//! `idem-chaos`: a fault-injection suite that checks idem's promises against the real
//! RabbitMQ, PostgreSQL and Redis, in the style of RabbitMQ's Jepsen tests.
//!
//! ```text
//! cargo run --release -p idem-chaos -- --messages 3000 --kills 3 [--store postgres|redis] [--faults conn-close,pg-terminate,failpoints]
//! ```
//!
//! A run starts several real worker processes (this binary re-executed with the
//! hidden `worker` subcommand, built with idem-amqp's `failpoints` feature), publishes
//! N messages with confirms (every message has a unique id; a few are poison) and
//! injects faults while they flow: SIGKILLs of workers, forced aborts at the worker's
//! crash points, forced closes of the workers' AMQP connections,
//! `pg_terminate_backend` of their PostgreSQL connections, `CLIENT KILL` of their
//! Redis connections and, only when asked, broker and Redis restarts. Each handler
//! invocation is logged on its own autocommit connection before the work, and the
//! effect is written under a unique constraint, so "ran twice" (invocations) and
//! "applied twice" (duplicates) are told apart. When the queues have drained it checks
//! every confirmed message against the effects and the dead-letter queue and prints
//!
//! ```text
//! chaos: published=N confirmed=C effects=E invocations=I lost=0 duplicates=0 dead_lettered=P poison=P kills=K faults=F node_kills=0
//! ```
//!
//! as its last line, exiting non-zero if anything was lost, applied twice or
//! dead-lettered wrongly. See `README.md` of this crate for what each store promises.
//!
//! With `--cluster` the run uses the 3-node RabbitMQ cluster (quorum queues) and the
//! Redis Cluster of `bash .ci/cluster up`, and the faults include SIGKILLs of a
//! RabbitMQ node and of a Redis master (`node_kills`).

mod args;
mod cluster;
mod common;
mod control;
mod faults;
mod fleet;
mod produce;
mod setup;
mod verify;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "idem-chaos",
    about = "Fault-injection suite for idem against real RabbitMQ, PostgreSQL and Redis",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: args::RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// A chaos worker process (started by the controller).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

fn main() -> ExitCode {
    idem_testkit::tools::log_to_stderr();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("idem-chaos: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Some(Command::Worker(args)) => worker::run(args).await.map(|()| true),
            None => control::run(cli.run).await,
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("idem-chaos: {e}");
            ExitCode::from(2)
        }
    }
}
