//! The `idem` operator CLI, as a library: work with dead-letter queues (read, fix,
//! replay, purge, redrive by rule, a web console), declare and show the RabbitMQ
//! topology of a work queue, check and run the outbox.
//!
//! Install the binary with `cargo install --path crates/idem-cli`, then run
//! `idem --help`. Every command takes `--url` (env `AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; the password is never printed) and most take
//! `--json` for scripts. The guide is `docs/dead-letters.md`.
//!
//! | command | what it does |
//! |---------|--------------|
//! | `idem dlq list Q [FILTERS] [--limit N] [--json]` | table of `Q.dlq` messages; every message stays |
//! | `idem dlq stats Q [FILTERS] [--json]` | messages grouped by error kind and normalised error text (broker dead letters: by reason and queue), each group with a stable id |
//! | `idem dlq show Q [FILTERS] [--max-bytes N] [--limit N] [--json]` | headers and body (JSON pretty-printed, UTF-8 as is, other bytes escaped; cuts marked) |
//! | `idem dlq export Q [FILTERS] > F.jsonl` | JSON lines: properties, typed headers, body as base64; every message stays |
//! | `idem dlq import Q F.jsonl` | publishes an export to `Q.dlq`, in order, confirmed (the whole file checked first) |
//! | `idem dlq edit Q --id ID (--json-set /ptr=value... \| --body-file F)` | replaces a body: edited copy confirmed first, then the original removed; `x-idem-edited`, `x-idem-original-sha256` |
//! | `idem dlq replay Q (--all \| FILTERS) [--rate N/s] [--dry-run] [--dedup-redis URL \| --dedup-postgres URL [--dedup-table T]]` | back to the original queue, every failure header cleared, `x-idem-replay` set; with a store, predicted duplicates reported (see [`dlq::lookup`]) |
//! | `idem dlq purge Q (--all \| FILTERS) --yes [--dry-run]` | delete messages |
//! | `idem dlq redrive --rules F [--dry-run] [--watch [--interval 30s]]` | run redrive rules (see [`dlq::redrive`]) |
//! | `idem dlq serve [--queue Q... \| --management-url URL] [--listen 127.0.0.1:8080] [--allow-writes]` | the console and its JSON API (see [`serve`]); without `--queue`, every `*.dlq` queue the RabbitMQ management API lists (see [`serve::discover`]), exit 2 asking for `--queue` when that API cannot be reached |
//! | `idem topology declare Q [--quorum] [--delivery-limit N] [--tiers 1s,5s,30s] [--exchange NAME=TYPE...] [--bind EXCHANGE[=KEY]...]` | declare `Q`, `Q.retry.<tier>`, `Q.dlq`, the exchanges and the bindings of `Q` |
//! | `idem topology show Q [--tiers ..] [--exchange NAME=TYPE...] [--bind EXCHANGE[=KEY]...]` | depth and consumers of each queue, whether each exchange exists, the bindings as given; missing ones marked |
//! | `idem outbox status [--table idem_outbox]` | pending rows and the oldest one's age (`DATABASE_URL`) |
//! | `idem outbox relay [--table idem_outbox] [--batch N] [--poll-ms MS] [--create-table]` | run an outbox relay until SIGINT/SIGTERM (`DATABASE_URL`, `--url`) |
//! | `idem verify Q --consumer NAME [--since 24h] [--grace 60s] [--ids FILE] [--dedup-table T] [--dedup-postgres URL \| --dedup-mysql URL \| --dedup-redis URL] [--json]` | lost, stuck and at-risk messages of a window and configuration hazards, exit 5 if any (see [`verify`]) |
//!
//! `FILTERS` (a message must pass all given; see [`dlq::Filter`]): `--id ID...`,
//! `--group G` (an id `stats` prints), `--error-type T`, `--consumer NAME`,
//! `--since TIME`, `--until TIME` (RFC 3339 or an age such as `10m`; the time the
//! message was dead-lettered) and `--match REGEX` (Rust `regex` syntax, unanchored,
//! on the error text; `--error-matches` is its old name).
//!
//! `Q` is the work queue (the commands read `Q.dlq`) or the DLQ's own name
//! (`idem dlq list orders.dlq` reads `orders.dlq` when `orders.dlq.dlq` does not exist).
//! Messages RabbitMQ dead-lettered itself (TTL, `basic.reject`, length limit, delivery
//! limit; no `x-idem-*` headers) show the broker's reason as their kind, the queue they
//! died in and how many times (see [`dlq`]).
//!
//! Exit codes (see [`error`]):
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | usage error, refused operation (`purge` without `--yes`), queue or table not found, invalid pattern or file |
//! | 2 | the broker or the database cannot be reached |
//! | 3 | partial failure: some messages were handled, the others stay where they were |
//! | 4 | the broker or the database refused an operation or the login |
//! | 5 | `idem verify` found lost, stuck or at-risk messages, or a configuration hazard |
//! | 6 | TLS failure: a certificate refused either way, or an unusable TLS file |
//!
//! The same operations are available to programs:
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), idem_cli::error::CliError> {
//! let conn = idem_cli::broker::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! for entry in idem_cli::dlq::list(&conn, "charges", 20).await? {
//!     println!("{:?}: {:?}", entry.message_id, entry.error);
//! }
//! let stats = idem_cli::dlq::stats(&conn, "charges", None).await?;
//! println!("{} messages in {} groups", stats.scanned, stats.groups.len());
//! # Ok(()) }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings), allow(dead_code, unused_variables))))]
#![deny(missing_docs)]

pub mod broker;
pub mod cli;
pub mod dlq;
mod dlq_cmd;
pub mod error;
pub mod normalize;
pub mod outbox;
pub mod render;
pub mod serve;
pub mod tls;
pub mod topology;
pub mod verify;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use crate::cli::{Cli, Command, DatabaseArgs, OutboxCommand, TopologyCommand};
use crate::error::{CliError, EXIT_USAGE};
use crate::render::terminal_width;

/// Parses `args` (the program name first), runs the command on a new tokio runtime,
/// prints errors on stderr and returns the exit code.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; real usage errors exit 1.
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(error::EXIT_FAILED);
        }
    };
    let mut stdout = std::io::stdout().lock();
    match runtime.block_on(run(cli, &mut stdout)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = stdout.flush();
            eprintln!("error: {e}");
            e.to_exit_code()
        }
    }
}

pub(crate) fn write_err(e: std::io::Error) -> CliError {
    CliError::Failed(format!("cannot write the output: {e}"))
}

pub(crate) fn json(out: &mut dyn Write, value: &impl Serialize) -> Result<(), CliError> {
    serde_json::to_writer_pretty(&mut *out, value)
        .map_err(|e| CliError::Failed(format!("cannot write JSON: {e}")))?;
    writeln!(out).map_err(write_err)
}

/// `value` as JSON when `as_json`, else what `text` writes.
pub(crate) fn json_or(
    out: &mut dyn Write,
    as_json: bool,
    value: &impl Serialize,
    text: impl FnOnce(&mut dyn Write) -> Result<(), CliError>,
) -> Result<(), CliError> {
    if as_json {
        json(out, value)
    } else {
        text(out)
    }
}

/// `2023-11-14T22:13:20.123Z` -> `2023-11-14 22:13:20`.
pub(crate) fn short_time(t: Option<&str>) -> String {
    match t {
        Some(t) if t.len() >= 19 && t.is_char_boundary(19) => t[..19].replacen('T', " ", 1),
        Some(t) => t.to_owned(),
        None => "-".to_owned(),
    }
}

pub(crate) fn or_dash(s: Option<&str>) -> String {
    s.unwrap_or("-").to_owned()
}

/// Runs a parsed command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    let tls = cli.tls.config()?;
    let target = broker::Target {
        url: &cli.url,
        name: cli
            .connection_name
            .as_deref()
            .unwrap_or(broker::DEFAULT_CONNECTION_NAME),
        tls: &tls,
    };
    match cli.command {
        Command::Dlq(cmd) => dlq_cmd::run_dlq(target, cmd, out).await,
        Command::Topology(cmd) => run_topology(target, cmd, out).await,
        Command::Verify(args) => verify::cmd::run_verify(target, args, out).await,
        Command::Outbox(OutboxCommand::Status {
            table,
            database: DatabaseArgs { database_url },
            json: as_json,
        }) => {
            let report = outbox::status_tls(&database_url, &tls, &table).await?;
            json_or(out, as_json, &report, |out| {
                let age = report
                    .oldest_pending_age_secs
                    .map_or_else(|| "-".to_owned(), |s| format!("{s:.1}s"));
                writeln!(
                    out,
                    "outbox {}: {} pending (oldest {age}), {} published awaiting cleanup",
                    report.table, report.pending, report.published
                )
                .map_err(write_err)
            })
        }
        Command::Outbox(OutboxCommand::Relay {
            table,
            database: DatabaseArgs { database_url },
            batch,
            poll_ms,
            create_table,
        }) => {
            writeln!(
                out,
                "relay {table}: publishing to {} until SIGINT/SIGTERM",
                idem_core::redact::redact_url(&cli.url)
            )
            .map_err(write_err)?;
            out.flush().map_err(write_err)?;
            let stats = outbox::relay_tls(
                &database_url,
                &cli.url,
                cli.connection_name.as_deref(),
                &tls,
                &table,
                batch,
                std::time::Duration::from_millis(poll_ms),
                create_table,
            )
            .await?;
            writeln!(
                out,
                "relay stopped: published={} refused={}",
                stats.published, stats.refused
            )
            .map_err(write_err)
        }
    }
}

async fn run_topology(
    target: broker::Target<'_>,
    cmd: TopologyCommand,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        TopologyCommand::Declare {
            queue,
            exchanges,
            bindings,
            quorum,
            delivery_limit,
            tiers,
        } => {
            let t = topology::topology_for(&queue, tiers.as_deref(), quorum, delivery_limit)?;
            let t = topology::with_routing(t, &exchanges, &bindings)?;
            target
                .with_connection(async |conn| topology::declare(conn, &t).await)
                .await?;
            writeln!(out, "declared: {}", t.queue_names().join(", ")).map_err(write_err)?;
            for x in t.exchanges() {
                writeln!(out, "declared exchange {:?} ({})", x.name(), x.kind())
                    .map_err(write_err)?;
            }
            for b in t.bindings() {
                writeln!(
                    out,
                    "bound {queue:?} to exchange {:?} with routing key {:?}",
                    b.exchange(),
                    b.routing_key()
                )
                .map_err(write_err)?;
            }
            Ok(())
        }
        TopologyCommand::Show {
            queue,
            exchanges,
            bindings,
            tiers,
            json: as_json,
        } => {
            let t = topology::topology_for(&queue, tiers.as_deref(), false, None)?;
            let t = topology::with_routing(t, &exchanges, &bindings)?;
            let states = target
                .with_connection(async |conn| topology::show(conn, &t).await)
                .await?;
            json_or(out, as_json, &states, |out| {
                topology::write_table(&states, out, terminal_width()).map_err(write_err)
            })?;
            let missing: Vec<&str> = states
                .iter()
                .filter(|s| s.exists == Some(false))
                .map(|s| s.name.as_str())
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(CliError::NotFound(format!(
                    "missing: {} (declare them with `idem topology declare {queue}`, with the same --exchange options)",
                    missing.join(", ")
                )))
            }
        }
    }
}
