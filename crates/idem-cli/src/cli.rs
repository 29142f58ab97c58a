//! Command-line arguments (clap derive).
// The doc comments below are the `--help` text clap prints, written for a terminal
// (`[env: ...]`, `Q.retry.<tier>`), not rustdoc markup.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use clap::{Args, Parser, Subcommand};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  usage error, refused operation (purge without --yes), queue or table not found
  2  RabbitMQ or the database cannot be reached
  3  partial failure: some messages were handled, the others stay where they were
  4  the broker or the database refused an operation, or the login
     (wrong user name, password or vhost)
  6  TLS failure: unknown CA, wrong host name, expired certificate, client certificate refused";

/// idem operator tool: dead-letter queues, topology and outbox.
#[derive(Debug, Parser)]
#[command(name = "idem", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// RabbitMQ URL, or several separated by commas (the first that answers is used)
    /// [env: AMQP_URL; default: amqp://guest:***@127.0.0.1:5672/%2f]. The password is
    /// never printed.
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        hide_env_values = true,
        hide_env = true,
        default_value = idem_amqp::DEFAULT_AMQP_URL,
        hide_default_value = true
    )]
    pub url: String,

    /// Connection name shown by the broker (management UI, `rabbitmqctl
    /// list_connections name`) [env: IDEM_CONNECTION_NAME; default: idem-cli, and
    /// idem-outbox-relay for `outbox relay`].
    #[arg(
        long,
        global = true,
        env = "IDEM_CONNECTION_NAME",
        hide_env = true,
        value_name = "NAME"
    )]
    pub connection_name: Option<String>,

    /// TLS options for amqps:// and PostgreSQL URLs.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect, replay and purge the dead-letter queue `Q.dlq` of a work queue `Q`.
    #[command(subcommand, after_help = EXIT_CODES)]
    Dlq(DlqCommand),
    /// Declare or show the queues of a work queue (`Q`, `Q.retry.<tier>`, `Q.dlq`).
    #[command(subcommand, after_help = EXIT_CODES)]
    Topology(TopologyCommand),
    /// The transactional outbox table.
    #[command(subcommand, after_help = EXIT_CODES)]
    Outbox(OutboxCommand),
}

/// `idem dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead-lettered messages (every message stays, in order: each one read is
    /// copied back with a confirm before it is acked, never handed back to the broker).
    /// Messages RabbitMQ dead-lettered itself show its reason, their queue and count.
    #[command(after_help = EXIT_CODES)]
    List {
        /// Work queue Q (the command reads Q.dlq), or the DLQ's own name.
        queue: String,
        /// Show at most N messages.
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Group dead-lettered messages by error kind and normalised error text
    /// (numbers, ids and quoted strings folded); broker dead letters by reason and
    /// queue. Every message stays.
    #[command(after_help = EXIT_CODES)]
    Stats {
        /// Work queue Q (the command reads Q.dlq), or the DLQ's own name.
        queue: String,
        /// Read at most N messages (default: all).
        #[arg(long)]
        limit: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send messages back to their original queue (x-idem-original-queue; for broker
    /// dead letters the queue of x-death; else Q) with attempts reset, the same message
    /// id and headers (minus the broker's x-death headers), and `x-idem-replay` set.
    /// Each is removed from the DLQ only after the broker confirmed the copy.
    #[command(after_help = EXIT_CODES)]
    Replay {
        /// Work queue Q (the command reads Q.dlq), or the DLQ's own name.
        queue: String,
        /// Which messages.
        #[command(flatten)]
        select: ReplaySelect,
        /// Change nothing; print what would move.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead-lettered messages. Needs --yes.
    #[command(after_help = EXIT_CODES)]
    Purge {
        /// Work queue Q (the command purges Q.dlq), or the DLQ's own name.
        queue: String,
        /// Which messages.
        #[command(flatten)]
        select: PurgeSelect,
        /// Really delete.
        #[arg(long)]
        yes: bool,
        /// Change nothing; print what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which messages a replay moves.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ReplaySelect {
    /// Every message.
    #[arg(long)]
    pub all: bool,
    /// Messages with these AMQP message ids (space- or comma-separated; put Q before
    /// --id).
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub id: Vec<String>,
    /// Messages whose x-idem-error matches this regular expression (unanchored,
    /// Rust `regex` syntax; e.g. 'timeout|connection refused').
    #[arg(long, value_name = "REGEX")]
    pub error_matches: Option<String>,
}

/// Which messages a purge deletes.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PurgeSelect {
    /// Every message.
    #[arg(long)]
    pub all: bool,
    /// Messages whose x-idem-error matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    pub error_matches: Option<String>,
}

/// `idem topology ...`
#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Declare Q, Q.retry.<tier> and Q.dlq (idempotent).
    #[command(after_help = EXIT_CODES)]
    Declare {
        /// Work queue Q.
        queue: String,
        /// Quorum queues instead of classic ones.
        #[arg(long)]
        quorum: bool,
        /// Quorum only: x-delivery-limit on Q.
        #[arg(long)]
        delivery_limit: Option<u32>,
        /// Delay tiers (default 1s,5s,30s,2m,10m,30m).
        #[arg(long, value_name = "LIST")]
        tiers: Option<String>,
    },
    /// Show the queues, their depth and consumers; missing queues are shown as missing
    /// (exit 1 if any is missing).
    #[command(after_help = EXIT_CODES)]
    Show {
        /// Work queue Q.
        queue: String,
        /// Delay tiers to look for (default 1s,5s,30s,2m,10m,30m).
        #[arg(long, value_name = "LIST")]
        tiers: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `idem outbox ...`
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Pending rows and the age of the oldest one (PostgreSQL).
    #[command(after_help = EXIT_CODES)]
    Status {
        /// Outbox table.
        #[arg(long, default_value = "idem_outbox")]
        table: String,
        /// PostgreSQL URL [env: DATABASE_URL; default: postgres://postgres@127.0.0.1:5432/postgres].
        #[arg(
            long,
            env = "DATABASE_URL",
            hide_env_values = true,
            hide_env = true,
            default_value = crate::outbox::DEFAULT_DATABASE_URL,
            hide_default_value = true
        )]
        database_url: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run an outbox relay until SIGINT/SIGTERM: publish committed rows to the broker
    /// (`--url`) with publisher confirms, then mark them (PostgreSQL).
    #[command(after_help = EXIT_CODES)]
    Relay {
        /// Outbox table.
        #[arg(long, default_value = "idem_outbox")]
        table: String,
        /// PostgreSQL URL [env: DATABASE_URL; default: postgres://postgres@127.0.0.1:5432/postgres].
        #[arg(
            long,
            env = "DATABASE_URL",
            hide_env_values = true,
            hide_env = true,
            default_value = crate::outbox::DEFAULT_DATABASE_URL,
            hide_default_value = true
        )]
        database_url: String,
        /// Rows per relay round.
        #[arg(long, default_value_t = 500)]
        batch: i64,
        /// Polling fallback when no NOTIFY arrives, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        poll_ms: u64,
        /// Create the outbox table if it does not exist.
        #[arg(long)]
        create_table: bool,
    },
}
