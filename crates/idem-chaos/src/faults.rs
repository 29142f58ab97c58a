//! The faults a run injects, each aimed only at this run's connections (found by the
//! run's name prefix), except the opt-in restarts.

use std::time::Duration;

use sqlx::PgPool;
use tokio::process::Command;

use crate::common::BoxError;

/// Runs `rabbitmqctl` with `args`; its stdout on success.
async fn rabbitmqctl(args: &[&str]) -> Result<String, BoxError> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run rabbitmqctl {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "rabbitmqctl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The client-provided connection name in a `client_properties` listing
/// (`{"connection_name","<name>"}`); `list_connections name` shows only the peer
/// address on RabbitMQ 3.x.
fn connection_name(client_properties: &str) -> Option<&str> {
    let marker = "{\"connection_name\",\"";
    let start = client_properties.find(marker)? + marker.len();
    let rest = &client_properties[start..];
    Some(&rest[..rest.find('"')?])
}

/// Forces the broker to close every connection whose client-provided name starts
/// with `prefix` (`rabbitmqctl close_connection`). Returns how many were closed.
pub(crate) async fn close_amqp_connections(prefix: &str) -> Result<usize, BoxError> {
    let listing = rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"]).await?;
    let pids: Vec<String> = listing
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, props)| connection_name(props).is_some_and(|n| n.starts_with(prefix)))
        .map(|(pid, _)| pid.trim().to_owned())
        .collect();
    let closes = pids.iter().map(|pid| async move {
        rabbitmqctl(&["-q", "close_connection", pid, "idem-chaos: forced close"]).await
    });
    let results = futures_util::future::join_all(closes).await;
    Ok(results.iter().filter(|r| r.is_ok()).count())
}

/// `pg_terminate_backend` on every backend whose application_name starts with
/// `prefix`. Returns how many were terminated.
pub(crate) async fn terminate_pg_backends(admin: &PgPool, prefix: &str) -> Result<i64, BoxError> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) AS t FROM pg_stat_activity \
         WHERE starts_with(application_name, $1) AND pid <> pg_backend_pid()) k WHERE t",
    )
    .bind(prefix)
    .fetch_one(admin)
    .await?;
    Ok(n)
}

/// `CLIENT KILL` of every Redis client whose name starts with `prefix`. Returns how
/// many were killed.
pub(crate) async fn kill_redis_clients(
    conn: &mut redis::aio::ConnectionManager,
    prefix: &str,
) -> Result<usize, BoxError> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(conn).await?;
    let ids: Vec<String> = list
        .lines()
        .filter(|line| {
            line.split(' ').any(|f| {
                f.strip_prefix("name=")
                    .is_some_and(|n| n.starts_with(prefix))
            })
        })
        .filter_map(|line| {
            line.split(' ')
                .find_map(|f| f.strip_prefix("id="))
                .map(str::to_owned)
        })
        .collect();
    let mut killed = 0;
    for id in ids {
        let n: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(&id)
            .query_async(conn)
            .await?;
        killed += usize::try_from(n).unwrap_or(0);
    }
    Ok(killed)
}

/// Restarts the RabbitMQ application (`stop_app`, `start_app`): every connection of
/// every client is dropped. Opt-in (`--faults broker-restart`), never in CI.
pub(crate) async fn restart_broker() -> Result<(), BoxError> {
    rabbitmqctl(&["-q", "stop_app"]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    rabbitmqctl(&["-q", "start_app"]).await?;
    Ok(())
}

/// Restarts the Redis server without saving (`SHUTDOWN NOSAVE`, then
/// `redis-server --port <port> --daemonize yes`): a durability fault, everything not
/// persisted is forgotten, for every client of that Redis. Opt-in
/// (`--faults redis-restart`), only on a Redis the run owns.
pub(crate) async fn restart_redis(
    conn: &mut redis::aio::ConnectionManager,
) -> Result<(), BoxError> {
    let port: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("port")
        .query_async(conn)
        .await?;
    let port = port
        .get(1)
        .cloned()
        .ok_or("CONFIG GET port returned nothing")?;
    // The connection drops while the server stops: an error here is expected.
    let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN").arg("NOSAVE").query_async(conn).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = Command::new("redis-server")
        .args(["--port", &port, "--daemonize", "yes"])
        .status()
        .await
        .map_err(|e| format!("cannot start redis-server: {e}"))?;
    if !status.success() {
        return Err(format!("redis-server --port {port} --daemonize yes failed: {status}").into());
    }
    for _ in 0..50 {
        let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(conn).await;
        if pong.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err("Redis did not come back within 10 s after the restart".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_client_provided_connection_name() {
        let props = r#"[{"capabilities",[{"basic.nack",true}]},{"connection_name","chaos-ab12-w0g1"},{"product","lapin"}]"#;
        assert_eq!(connection_name(props), Some("chaos-ab12-w0g1"));
        assert_eq!(connection_name(r#"[{"product","lapin"}]"#), None);
    }
}
