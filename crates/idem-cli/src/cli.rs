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
  5  idem verify found something (lost, stuck, at risk or a hazard)
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
// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
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
    /// Check after the fact that what was published was applied once: every id of
    /// the window (outbox rows, or --ids) must be done in the consumer's dedup
    /// records, or still in the work queue, a delay queue or the DLQ (read without
    /// consuming). Reports lost, stuck and at-risk messages and configuration
    /// hazards; exit 5 if it found any. See docs/operations.md, "Checking
    /// exactly-once after the fact".
    #[command(after_help = EXIT_CODES)]
    Verify(VerifyArgs),
}

/// `idem verify ...`
#[derive(Debug, Args)]
#[command(mut_arg("database_url", |a| a.help(
    "PostgreSQL URL of the outbox, and of the dedup table unless --dedup-postgres or \
     --dedup-redis [env: DATABASE_URL; default: postgres://postgres@127.0.0.1:5432/postgres]"
)))]
pub struct VerifyArgs {
    /// Work queue Q (verify reads Q, Q.retry.<tier> and Q.dlq).
    pub queue: String,
    /// The consumer's name (its records' scope, x-idem-consumer).
    #[arg(long, value_name = "NAME")]
    pub consumer: String,
    /// The outbox's database, also the dedup table's unless --dedup-postgres or
    /// --dedup-redis (the help line says so).
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Outbox table whose rows of the window are what was published.
    #[arg(long, default_value = "idem_outbox", value_name = "TABLE")]
    pub outbox_table: String,
    /// A file of published message ids, one per line (`-` for stdin), instead of
    /// the outbox (the window and --grace do not apply).
    #[arg(long, value_name = "FILE")]
    pub ids: Option<String>,
    /// The dedup table: idem_inbox (inbox) or idem_dedup (lease store) unless the
    /// consumer configured another; schema.name allowed.
    #[arg(long, default_value = "idem_inbox", value_name = "TABLE")]
    pub dedup_table: String,
    /// PostgreSQL URL of the dedup table, when not the outbox's database.
    #[arg(long, value_name = "URL", conflicts_with = "dedup_redis")]
    pub dedup_postgres: Option<String>,
    /// MariaDB/MySQL URL of the dedup table (an idem_sql MySqlInbox or MySqlStore),
    /// instead of PostgreSQL.
    #[arg(long, value_name = "URL", conflicts_with_all = ["dedup_redis", "dedup_postgres"])]
    pub dedup_mysql: Option<String>,
    /// The consumer's Redis dedup store instead of a PostgreSQL table.
    #[arg(long, value_name = "URL")]
    pub dedup_redis: Option<String>,
    /// Key prefix of that Redis store.
    #[arg(long, default_value = "idem", value_name = "PREFIX")]
    pub dedup_prefix: String,
    /// Start of the window: outbox rows created at or after TIME (RFC 3339 or an
    /// age such as 2h).
    #[arg(long, default_value = "24h", value_name = "TIME")]
    pub since: String,
    /// End of the window (default: now).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Rows published less than this ago are not judged (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_name = "AGE")]
    pub grace: String,
    /// Outbox rows due and pending longer than this are stuck.
    #[arg(long, default_value = "5m", value_name = "AGE")]
    pub stuck_after: String,
    /// Wait before the second look for ids found nowhere (in-flight deliveries).
    #[arg(long, default_value = "3s", value_name = "AGE")]
    pub recheck_after: String,
    /// Delay tiers of the topology (default 1s,5s,30s,2m,10m,30m).
    #[arg(long, value_name = "LIST")]
    pub tiers: Option<String>,
    /// The consumer's dedup retention.
    #[arg(long, default_value = "7d", value_name = "AGE")]
    pub retention: String,
    /// The consumer's backoff attempts (for the retry horizon through the tiers).
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub max_attempts: u32,
    /// The retry horizon, instead of computing it from --tiers and --max-attempts.
    #[arg(long, value_name = "AGE")]
    pub horizon: Option<String>,
    /// The consumer's crash limit.
    #[arg(long, default_value_t = idem_core::crash::DEFAULT_CRASH_LIMIT, value_name = "N")]
    pub crash_limit: u32,
    /// The work queue's x-delivery-limit (quorum queue), to check it against the
    /// crash limit.
    #[arg(long, value_name = "N")]
    pub delivery_limit: Option<u32>,
    /// The consumer's SQL pool size, to check it against --concurrency.
    #[arg(long, value_name = "N", requires = "concurrency")]
    pub pool_size: Option<u32>,
    /// The worker's concurrency.
    #[arg(long, value_name = "N", requires = "pool_size")]
    pub concurrency: Option<u32>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
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
        /// Which messages (default: all).
        #[command(flatten)]
        filter: FilterArgs,
        /// Show at most N messages.
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Group dead-lettered messages by error kind and normalised error text
    /// (numbers, ids and quoted strings folded); broker dead letters by reason and
    /// queue. Each group has a stable id for --group. Every message stays.
    #[command(after_help = EXIT_CODES)]
    Stats {
        /// Work queue Q (the command reads Q.dlq), or the DLQ's own name.
        queue: String,
        /// Which messages (default: all).
        #[command(flatten)]
        filter: FilterArgs,
        /// Read at most N messages (default: all).
        #[arg(long)]
        limit: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the headers and body of dead-lettered messages: JSON pretty-printed,
    /// UTF-8 text as is, other bytes escaped. Every message stays.
    #[command(after_help = EXIT_CODES)]
    Show {
        /// Work queue Q (the command reads Q.dlq), or the DLQ's own name.
        queue: String,
        /// Which messages (e.g. --id ID).
        #[command(flatten)]
        filter: FilterArgs,
        /// Show at most N bytes of each body (the cut is marked).
        #[arg(long, default_value_t = crate::dlq::DEFAULT_MAX_BYTES)]
        max_bytes: usize,
        /// Show at most N messages.
        #[arg(long, default_value_t = 20)]
        limit: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write dead-lettered messages to stdout as JSON lines (properties, headers with
    /// their AMQP types, body as base64), for `import`. Every message stays.
    #[command(after_help = EXIT_CODES)]
    Export {
        /// Work queue Q (the command reads Q.dlq), or the DLQ's own name.
        queue: String,
        /// Which messages (default: all).
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Publish the messages of an `export` file to the DLQ of Q, in order, each with
    /// a publisher confirm. The whole file is checked before anything is sent.
    #[command(after_help = EXIT_CODES)]
    Import {
        /// Work queue Q (the messages go to Q.dlq), or the DLQ's own name.
        queue: String,
        /// The JSON lines file (`-` for stdin).
        file: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace the body of a dead letter: the edited copy is published to the tail of
    /// the DLQ with a confirm, then the original is removed. The copy is marked
    /// x-idem-edited (time) and keeps the original body's SHA-256 in
    /// x-idem-original-sha256.
    #[command(after_help = EXIT_CODES)]
    Edit {
        /// Work queue Q (the command edits in Q.dlq), or the DLQ's own name.
        queue: String,
        /// The message id.
        #[arg(long)]
        id: String,
        /// Set a member of a JSON body: /pointer=value (RFC 6901; the value is JSON,
        /// or a string if it does not parse). Repeatable.
        #[arg(
            long,
            value_name = "/POINTER=VALUE",
            required_unless_present = "body_file",
            conflicts_with = "body_file"
        )]
        json_set: Vec<String>,
        /// Replace the body with this file's bytes.
        #[arg(long, value_name = "FILE")]
        body_file: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send messages back to their original queue (x-idem-original-queue; for broker
    /// dead letters the queue of x-death; else Q) with every failure header cleared,
    /// the same message id and other headers (minus the broker's x-death headers), and
    /// `x-idem-replay` set. Each is removed from the DLQ only after the broker
    /// confirmed the copy.
    #[command(after_help = EXIT_CODES)]
    Replay {
        /// Work queue Q (the command reads Q.dlq), or the DLQ's own name.
        queue: String,
        /// Every message (else give at least one filter).
        #[arg(long)]
        all: bool,
        /// Which messages.
        #[command(flatten)]
        filter: FilterArgs,
        /// At most N messages per second, e.g. 200/s (sent in small batches; the whole
        /// replay takes at least count/N seconds).
        #[arg(long, value_name = "N/s")]
        rate: Option<String>,
        /// The dedup store to predict duplicates from.
        #[command(flatten)]
        dedup: DedupArgs,
        /// Change nothing; print what would move.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run redrive rules (a TOML file): replay or move the dead letters each rule
    /// matches, the first matching rule deciding; see docs/dead-letters.md.
    #[command(after_help = EXIT_CODES)]
    Redrive {
        /// The rules file.
        #[arg(long, value_name = "FILE")]
        rules: String,
        /// Change nothing; print what each rule would do.
        #[arg(long)]
        dry_run: bool,
        /// Run the rules again every --interval until SIGINT/SIGTERM.
        #[arg(long, conflicts_with = "dry_run")]
        watch: bool,
        /// With --watch: time between rounds (e.g. 30s, 5m).
        #[arg(long, default_value = "30s", value_name = "AGE")]
        interval: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve the dead-letter console (a page and a JSON API) until SIGINT/SIGTERM.
    /// Read-only unless --allow-writes; writes then need the bearer token of
    /// IDEM_DLQ_TOKEN.
    #[command(after_help = EXIT_CODES)]
    Serve {
        /// Address to listen on (loopback by default).
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
        listen: std::net::SocketAddr,
        /// A work queue to show (repeatable; named as for the other dlq commands).
        /// Without it, every queue named *.dlq, found through the RabbitMQ
        /// management API (which must then be reachable).
        #[arg(long = "queue", value_name = "Q")]
        queues: Vec<String>,
        /// The management API used without --queue: http://host:port[/prefix]
        /// (default: port 15672 of the broker's host, the broker URL's credentials).
        #[arg(long, value_name = "URL", conflicts_with = "queues")]
        management_url: Option<String>,
        /// Allow replay, purge and edit (each needs `Authorization: Bearer
        /// $IDEM_DLQ_TOKEN`).
        #[arg(long)]
        allow_writes: bool,
    },
    /// Delete dead-lettered messages. Needs --yes.
    #[command(after_help = EXIT_CODES)]
    Purge {
        /// Work queue Q (the command purges Q.dlq), or the DLQ's own name.
        queue: String,
        /// Every message (else give at least one filter).
        #[arg(long)]
        all: bool,
        /// Which messages.
        #[command(flatten)]
        filter: FilterArgs,
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

/// `dlq replay`'s dedup store, to predict which messages will be acked as
/// duplicates (see [`crate::dlq::lookup`]).
#[derive(Clone, Debug, Default, Args)]
pub struct DedupArgs {
    /// The consumers' Redis dedup store: report the messages whose key is already
    /// done ("will be acked as a duplicate") before replaying.
    #[arg(long, value_name = "URL", group = "dedup_store")]
    pub dedup_redis: Option<String>,
    /// Key prefix of that store.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "idem",
        requires = "dedup_redis"
    )]
    pub dedup_prefix: String,
    /// The consumers' PostgreSQL dedup store (an idem-sql lease store or inbox):
    /// report the messages whose key is already done before replaying. TLS as
    /// for the broker (--tls-*), sslmode in the URL.
    #[arg(long, value_name = "URL", group = "dedup_store")]
    pub dedup_postgres: Option<String>,
    /// Table of that store: idem_dedup (lease store) or idem_inbox (inbox) unless
    /// the consumers configured another; schema.name allowed.
    #[arg(
        long,
        value_name = "TABLE",
        default_value = "idem_dedup",
        requires = "dedup_postgres"
    )]
    pub dedup_table: String,
    /// Consumer name for messages without x-idem-consumer.
    #[arg(long, value_name = "NAME", requires = "dedup_store")]
    pub dedup_consumer: Option<String>,
}

impl DedupArgs {
    /// The lookup these options name, if any (connected).
    pub async fn lookup(
        &self,
        tls: &idem_core::TlsConfig,
    ) -> Result<Option<crate::dlq::lookup::DedupLookup>, crate::error::CliError> {
        use crate::dlq::lookup::DedupLookup;
        let consumer = self.dedup_consumer.clone();
        Ok(match (&self.dedup_redis, &self.dedup_postgres) {
            (Some(url), _) => Some(DedupLookup::redis(url, &self.dedup_prefix, consumer).await?),
            (None, Some(url)) => {
                Some(DedupLookup::postgres(url, tls, &self.dedup_table, consumer).await?)
            }
            (None, None) => None,
        })
    }
}

/// The filters every `dlq` command shares; a message must pass all those given.
#[derive(Clone, Debug, Default, Args)]
pub struct FilterArgs {
    /// Messages with these AMQP message ids (space- or comma-separated; put Q before
    /// --id).
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub id: Vec<String>,
    /// Messages of this group (the id `idem dlq stats` prints).
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Messages whose x-idem-error-type is exactly this.
    #[arg(long, value_name = "TYPE")]
    pub error_type: Option<String>,
    /// Messages whose x-idem-consumer is exactly this.
    #[arg(long, value_name = "NAME")]
    pub consumer: Option<String>,
    /// Dead-lettered at or after TIME (RFC 3339, or an age such as 10m, 2h, 7d).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Dead-lettered at or before TIME (RFC 3339, or an age such as 10m: longer ago
    /// than that).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Messages whose error matches this regular expression (unanchored, Rust
    /// `regex` syntax; e.g. 'timeout|connection refused').
    #[arg(long = "match", visible_alias = "error-matches", value_name = "REGEX")]
    pub pattern: Option<String>,
}

impl FilterArgs {
    /// The [`Filter`](crate::dlq::Filter) these options describe (ages counted from
    /// now).
    pub fn to_filter(&self) -> Result<crate::dlq::Filter, crate::error::CliError> {
        use crate::dlq::{pattern, time_arg};
        let now = std::time::SystemTime::now();
        Ok(crate::dlq::Filter {
            ids: self.id.iter().cloned().collect(),
            group: self.group.clone(),
            error_type: self.error_type.clone(),
            consumer: self.consumer.clone(),
            since: self
                .since
                .as_deref()
                .map(|t| time_arg("--since", t, now))
                .transpose()?,
            until: self
                .until
                .as_deref()
                .map(|t| time_arg("--until", t, now))
                .transpose()?,
            pattern: self
                .pattern
                .as_deref()
                .map(|p| pattern("--match", p))
                .transpose()?,
        })
    }
}

/// `idem topology ...`
#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Declare Q, Q.retry.<tier> and Q.dlq, the exchanges given and the bindings of Q
    /// (idempotent).
    #[command(after_help = EXIT_CODES)]
    Declare {
        /// Work queue Q.
        queue: String,
        /// Also declare exchange NAME of TYPE (direct, topic or fanout); repeatable.
        #[arg(long = "exchange", value_name = "NAME=TYPE")]
        exchanges: Vec<String>,
        /// Bind Q to EXCHANGE with ROUTING_KEY (none: ""); repeatable.
        #[arg(long = "bind", value_name = "EXCHANGE[=ROUTING_KEY]")]
        bindings: Vec<String>,
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
    /// Show the queues, their depth and consumers, the exchanges and the bindings given;
    /// missing queues and exchanges are shown as missing (exit 1 if any is missing).
    /// Bindings are listed as given: AMQP cannot list them.
    #[command(after_help = EXIT_CODES)]
    Show {
        /// Work queue Q.
        queue: String,
        /// Exchange NAME of TYPE to look for; repeatable.
        #[arg(long = "exchange", value_name = "NAME=TYPE")]
        exchanges: Vec<String>,
        /// A binding of Q to list; repeatable.
        #[arg(long = "bind", value_name = "EXCHANGE[=ROUTING_KEY]")]
        bindings: Vec<String>,
        /// Delay tiers to look for (default 1s,5s,30s,2m,10m,30m).
        #[arg(long, value_name = "LIST")]
        tiers: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The PostgreSQL database of the outbox: `--database-url`, env `DATABASE_URL`.
#[derive(Clone, Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL [env: DATABASE_URL; default: postgres://postgres@127.0.0.1:5432/postgres].
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        hide_env = true,
        default_value = crate::outbox::DEFAULT_DATABASE_URL,
        hide_default_value = true
    )]
    pub database_url: String,
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
        /// The outbox's database.
        #[command(flatten)]
        database: DatabaseArgs,
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
        /// The outbox's database.
        #[command(flatten)]
        database: DatabaseArgs,
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
