//! The services of the integration tests: URLs, and connecting or failing clearly.

use std::fmt::Display;

/// A service the integration tests need, on loopback by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    /// RabbitMQ: `AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    RabbitMq,
    /// Redis: `REDIS_URL`, default `redis://127.0.0.1:6379`.
    Redis,
    /// PostgreSQL: `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`.
    PostgreSql,
    /// MariaDB (or MySQL): `MYSQL_URL`, default `mysql://root@127.0.0.1:3306/test`.
    MariaDb,
}

impl Service {
    /// Every service, in the order the README lists them.
    pub const ALL: [Service; 4] = [
        Service::RabbitMq,
        Service::Redis,
        Service::PostgreSql,
        Service::MariaDb,
    ];

    /// The name people know it by ("RabbitMQ", "PostgreSQL", ...).
    pub fn name(self) -> &'static str {
        match self {
            Service::RabbitMq => "RabbitMQ",
            Service::Redis => "Redis",
            Service::PostgreSql => "PostgreSQL",
            Service::MariaDb => "MariaDB",
        }
    }

    /// The environment variable that overrides [`default_url`](Self::default_url).
    pub fn env_var(self) -> &'static str {
        match self {
            Service::RabbitMq => "AMQP_URL",
            Service::Redis => "REDIS_URL",
            Service::PostgreSql => "DATABASE_URL",
            Service::MariaDb => "MYSQL_URL",
        }
    }

    /// Where the service is when [`env_var`](Self::env_var) is not set: the loopback
    /// set-up the README describes.
    pub fn default_url(self) -> &'static str {
        match self {
            Service::RabbitMq => "amqp://guest:guest@127.0.0.1:5672/%2f",
            Service::Redis => "redis://127.0.0.1:6379",
            Service::PostgreSql => "postgres://postgres@127.0.0.1:5432/postgres",
            Service::MariaDb => "mysql://root@127.0.0.1:3306/test",
        }
    }

    /// The URL to use: [`env_var`](Self::env_var) if it is set (and not empty), else
    /// [`default_url`](Self::default_url).
    pub fn url(self) -> String {
        match std::env::var(self.env_var()) {
            Ok(url) if !url.is_empty() => url,
            _ => self.default_url().to_owned(),
        }
    }

    /// The failure message for "this service cannot be reached at `url`": which
    /// service, where (scheme, host, port and path of `url`, never its user name,
    /// password or query), the error, the variable that points elsewhere, and the
    /// README section that says how to run the services.
    pub fn unreachable_message(self, url: &str, error: impl Display) -> String {
        format!(
            "{name} is not reachable at {at}: {error}\n\
             This test needs a running {name}. Set {var} to use another one; the README \
             (section \"Running the tests\") lists the services the tests need and how to \
             start them.",
            name = self.name(),
            at = endpoint(url),
            var = self.env_var(),
        )
    }

    /// Unwraps a connection attempt to this service at `url`, or panics with
    /// [`unreachable_message`](Self::unreachable_message).
    ///
    /// Use it around any client's connect call, so that every test fails the same way
    /// when a service is missing:
    ///
    /// ```no_run
    /// # async fn connect(url: &str) -> Result<(), std::io::Error> { Ok(()) }
    /// # async fn demo() {
    /// use idem_testkit::Service;
    ///
    /// let url = Service::Redis.url();
    /// let conn = Service::Redis.expect_connected(&url, connect(&url).await);
    /// # }
    /// ```
    #[track_caller]
    pub fn expect_connected<T, E: Display>(self, url: &str, result: Result<T, E>) -> T {
        match result {
            Ok(t) => t,
            Err(e) => panic!("{}", self.unreachable_message(url, e)),
        }
    }
}

impl Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `url` without credentials or query: `scheme://host:port/path`.
fn endpoint(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority.rsplit('@').next().unwrap_or("");
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}"),
        None => format!("{host}{path}"),
    }
}

/// A connection named `connection_name` to the test RabbitMQ ([`Service::RabbitMq`]),
/// or a panic saying it is not reachable.
#[cfg(feature = "amqp")]
pub async fn rabbitmq(connection_name: &str) -> lapin::Connection {
    let url = Service::RabbitMq.url();
    let props = lapin::ConnectionProperties::default().with_connection_name(connection_name.into());
    Service::RabbitMq.expect_connected(&url, lapin::Connection::connect(&url, props).await)
}

/// A connection to the test Redis ([`Service::Redis`]), or a panic saying it is not
/// reachable.
#[cfg(feature = "redis")]
pub async fn redis() -> ::redis::aio::MultiplexedConnection {
    let url = Service::Redis.url();
    let conn = match ::redis::Client::open(url.as_str()) {
        Ok(client) => client.get_multiplexed_async_connection().await,
        Err(e) => Err(e),
    };
    Service::Redis.expect_connected(&url, conn)
}

/// Deletes the keys matching `pattern` (a `SCAN` pattern such as `prefix:*`) on the
/// node `conn` talks to, and returns how many went: a test's clean-up, through
/// [`unlink_matching`](crate::tools::unlink_matching). Panics if Redis refuses.
#[cfg(feature = "redis")]
pub async fn delete_redis_keys(
    conn: &mut (impl ::redis::aio::ConnectionLike + Send),
    pattern: &str,
) -> usize {
    match crate::tools::unlink_matching(conn, pattern).await {
        Ok(n) => usize::try_from(n).unwrap_or(usize::MAX),
        Err(e) => panic!("deleting the keys matching {pattern}: {e}"),
    }
}

/// A pool on the test PostgreSQL ([`Service::PostgreSql`]) built from `options`, its
/// connections named `application_name` (so a test can find and kill them in
/// `pg_stat_activity`), or a panic saying it is not reachable. Waits at most 5 s for
/// the first connection.
#[cfg(feature = "postgres")]
pub async fn postgres(
    options: sqlx::postgres::PgPoolOptions,
    application_name: &str,
) -> sqlx::PgPool {
    use std::str::FromStr as _;

    let url = Service::PostgreSql.url();
    let connect = match sqlx::postgres::PgConnectOptions::from_str(&url) {
        Ok(opts) => {
            options
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect_with(opts.application_name(application_name))
                .await
        }
        Err(e) => Err(e),
    };
    Service::PostgreSql.expect_connected(&url, connect)
}

/// Drops `table` from the database of `pool` if it is there: a test's clean-up.
/// Panics if PostgreSQL refuses.
#[cfg(feature = "postgres")]
pub async fn drop_pg_table(pool: &sqlx::PgPool, table: &str) {
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("dropping table {table}: {e}"));
}

/// A pool on the test MariaDB / MySQL ([`Service::MariaDb`]) built from `options`, or a
/// panic saying it is not reachable. Waits at most 5 s for the first connection.
#[cfg(feature = "mysql")]
pub async fn mariadb(options: sqlx::mysql::MySqlPoolOptions) -> sqlx::MySqlPool {
    let url = Service::MariaDb.url();
    let connect = options
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(&url)
        .await;
    Service::MariaDb.expect_connected(&url, connect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_drops_credentials_and_query() {
        assert_eq!(
            endpoint("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(
            endpoint("postgres://u:p%40ss@db:5432/app?sslmode=require&password=x"),
            "postgres://db:5432/app"
        );
        assert_eq!(endpoint("redis://lonely-user@h:6379"), "redis://h:6379");
        assert_eq!(endpoint("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(endpoint("u:p@host:1"), "host:1");
    }

    #[test]
    fn the_message_names_service_place_variable_and_readme_but_no_secret() {
        let text = Service::PostgreSql
            .unreachable_message("postgres://me:hunter2@10.0.0.9:5433/db", "refused");
        for part in [
            "PostgreSQL",
            "10.0.0.9:5433",
            "refused",
            "DATABASE_URL",
            "README",
        ] {
            assert!(text.contains(part), "{part} missing from: {text}");
        }
        assert!(!text.contains("hunter2") && !text.contains("me:"), "{text}");
    }

    #[test]
    #[should_panic(expected = "Redis is not reachable at redis://127.0.0.1:1")]
    fn expect_connected_panics_with_the_message() {
        let r: Result<(), &str> = Err("connection refused");
        Service::Redis.expect_connected("redis://127.0.0.1:1", r);
    }

    #[test]
    fn every_service_has_a_distinct_variable() {
        let vars: std::collections::HashSet<_> = Service::ALL.iter().map(|s| s.env_var()).collect();
        assert_eq!(vars.len(), Service::ALL.len());
    }
}
