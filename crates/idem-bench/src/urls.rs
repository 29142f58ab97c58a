//! The service URL options the scenarios share, each flattened into their arguments
//! (`#[command(flatten)]`): one spelling of each flag, its variable and its default.

/// `--url`: the broker.
#[derive(clap::Args)]
pub(crate) struct AmqpUrl {
    /// Broker URL (default amqp://guest:***@127.0.0.1:5672/%2f; passwords are not printed).
    #[arg(long, env = "AMQP_URL", hide_env_values = true, default_value = idem_amqp::DEFAULT_AMQP_URL, hide_default_value = true)]
    pub(crate) url: String,
}

/// `--redis-url`: the Redis server.
#[derive(clap::Args)]
pub(crate) struct RedisUrl {
    /// Redis URL.
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub(crate) redis_url: String,
}

/// `--database-url`: the PostgreSQL server (the scenarios that use one).
#[derive(clap::Args)]
pub(crate) struct PostgresUrl {
    /// PostgreSQL URL (amqp-postgres, outbox-relay).
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub(crate) database_url: String,
}
