//! The controller's command line: what a run publishes, which faults it injects.

use crate::common::Store;

/// A fault besides worker SIGKILLs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub(crate) enum Fault {
    /// `rabbitmqctl close_connection` on the workers' and the producer's connections.
    ConnClose,
    /// `pg_terminate_backend` on the workers' PostgreSQL connections.
    PgTerminate,
    /// `CLIENT KILL` of the workers' Redis connections (store=redis).
    RedisKill,
    /// Arm the workers' crash points (idem-amqp `failpoints`) on some workers.
    Failpoints,
    /// `rabbitmqctl stop_app && start_app`: disturbs every client of the broker.
    BrokerRestart,
    /// `SHUTDOWN NOSAVE` + restart of Redis: a durability fault for every client.
    RedisRestart,
    /// `--cluster` only: SIGKILL of a random RabbitMQ node's beam process, then the
    /// node is started again and rejoins the cluster.
    RabbitNodeKill,
    /// `--cluster` only: SIGKILL of a random Redis Cluster master; its replica takes
    /// over, the killed node is restarted and comes back as a replica.
    RedisMasterKill,
}

impl Fault {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::ConnClose => "conn-close",
            Fault::PgTerminate => "pg-terminate",
            Fault::RedisKill => "redis-kill",
            Fault::Failpoints => "failpoints",
            Fault::BrokerRestart => "broker-restart",
            Fault::RedisRestart => "redis-restart",
            Fault::RabbitNodeKill => "rabbit-node-kill",
            Fault::RedisMasterKill => "redis-master-kill",
        }
    }

    /// Whether the fault kills a cluster node (counted in `node_kills`).
    pub(crate) fn kills_a_node(self) -> bool {
        matches!(self, Fault::RabbitNodeKill | Fault::RedisMasterKill)
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// Messages to publish.
    #[arg(long, default_value_t = 2000)]
    pub(crate) messages: u64,
    /// SIGKILLs of random workers while messages flow (each replaced at once).
    #[arg(long, default_value_t = 3)]
    pub(crate) kills: u32,
    /// The dedup store of the workers.
    #[arg(long, value_enum, default_value_t = Store::Postgres)]
    pub(crate) store: Store,
    /// Faults besides kills, comma-separated. Default: conn-close,pg-terminate,failpoints
    /// (plus redis-kill with --store redis; with --cluster instead
    /// rabbit-node-kill,redis-master-kill). broker-restart and redis-restart disturb
    /// other users of those services: opt-in only (cargo test runs them only in the
    /// broker_restart and redis_restart test binaries).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) faults: Option<Vec<Fault>>,
    /// How many times each connection fault (and restart) is injected.
    #[arg(long, default_value_t = 2)]
    pub(crate) rounds: u32,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    pub(crate) workers: u32,
    #[command(flatten)]
    pub(crate) consume: ConsumeArgs,
    /// Share of poison messages (invalid payload), in percent.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) poison_percent: f64,
    /// Seconds to wait for the queues to drain after the last publish.
    #[arg(long, default_value_t = 120)]
    pub(crate) drain_timeout: u64,
    /// Random seed (poison choice, fault schedule, victims); printed for reruns.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Probability of the `after-commit-before-ack` crash point on its armed worker.
    #[arg(long, default_value_t = 0.01)]
    pub(crate) commit_failpoint_p: f64,
    /// Probability of the `after-retry-publish-before-ack` crash point on its armed worker.
    #[arg(long, default_value_t = 0.2)]
    pub(crate) retry_failpoint_p: f64,
    /// With `--batch`: probability of the `batch-between-savepoints` crash point (inside
    /// a batch's transaction, after one message's savepoint, before the next one's) on
    /// its armed worker.
    #[arg(long, default_value_t = 0.02)]
    pub(crate) savepoint_failpoint_p: f64,
    /// Keep the run's tables, queues, Redis keys and worker logs.
    #[arg(long)]
    pub(crate) keep: bool,
    /// Send every other batch through a transactional outbox (`chaos_outbox_<run>`,
    /// enqueued in the transaction that records the ids) and an `idem_outbox::Relay`
    /// running in the controller, instead of the publisher.
    #[arg(long)]
    pub(crate) outbox: bool,
    /// Publish at most this many messages per second (0: as fast as confirms allow),
    /// so the publisher and the relay are still at work when faults are injected.
    #[arg(long, default_value_t = 0)]
    pub(crate) publish_rate: u32,
    /// After each Redis restart, publish again (same id and body) this many messages
    /// that were applied and completed before it: what a publisher retry or a
    /// redelivery would do. Redis without persistence has forgotten their `done`
    /// records, so they run again (`reruns_after_durability_fault`).
    #[arg(long, default_value_t = 0)]
    pub(crate) replay_after_restart: u32,
    /// Run on the 3-node RabbitMQ cluster (quorum queues) and the Redis Cluster that
    /// `bash .ci/cluster up` starts (override with AMQP_CLUSTER_URL, IDEM_CLUSTER_NODES,
    /// REDIS_CLUSTER_URL), with node kills among the faults.
    #[arg(long)]
    pub(crate) cluster: bool,
    /// Give every message an ordering key (`x-chaos-key`, `n % keys`) and a per-key
    /// sequence number (`n / keys`); `--messages` becomes `keys x per-key`. The
    /// verifier then counts `reordered`: valid messages whose effect was applied after
    /// the effect of a later message of their key.
    #[arg(long, default_value_t = 0)]
    pub(crate) keys: u64,
    /// Messages per key (with `--keys`).
    #[arg(long, default_value_t = 50)]
    pub(crate) per_key: u64,
}

/// How every worker consumes: the controller parses these flags and hands them, the
/// same, to each worker process it starts ([`ConsumeArgs::worker_flags`]).
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct ConsumeArgs {
    /// Prefetch (and concurrency) of each worker.
    #[arg(long, default_value_t = 10)]
    pub(crate) prefetch: u16,
    /// Workers consume with a batch handler of this many messages (each message in its
    /// savepoint on the PostgreSQL inbox); raise `--prefetch` to at least this.
    #[arg(long)]
    pub(crate) batch: Option<usize>,
    /// store=postgres: the handler also enqueues one follow-up message per applied
    /// effect through the consumer outbox (`Outbox::enqueue_follow_up` on the inbox
    /// transaction, table `chaos_followups_<run>`); the verifier then checks that
    /// every effect has exactly its one follow-up, under its derived id, and no other.
    #[arg(long)]
    pub(crate) follow_ups: bool,
    /// The workers consume in per-key lanes (`WorkerBuilder::ordered`, header
    /// `x-chaos-key`) from a single-active-consumer queue; a run with `reordered>0`
    /// fails. Needs `--keys`.
    #[arg(long)]
    pub(crate) ordered: bool,
    /// Share of handler calls that fail transiently (before the effect), in percent.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) transient_percent: f64,
}

impl ConsumeArgs {
    /// These settings as the command-line flags of a worker process.
    pub(crate) fn worker_flags(&self) -> Vec<String> {
        let mut flags = vec![
            "--prefetch".to_owned(),
            self.prefetch.to_string(),
            "--transient-percent".to_owned(),
            self.transient_percent.to_string(),
        ];
        flags.extend(self.follow_ups.then(|| "--follow-ups".to_owned()));
        flags.extend(self.ordered.then(|| "--ordered".to_owned()));
        if let Some(n) = self.batch {
            flags.extend(["--batch".to_owned(), n.to_string()]);
        }
        flags
    }
}
