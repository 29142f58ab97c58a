//! The faults a run injects, each aimed only at this run's connections (found by the
//! run's name prefix), except the opt-in restarts.

use std::time::Duration;

use sqlx::PgPool;
use tokio::process::Command;

use crate::common::BoxError;

/// Runs `rabbitmqctl` with `args`; its stdout on success. On a cluster (`--cluster`)
/// it asks the cluster's nodes in turn (`-n <node>`) until one answers, so a killed
/// node does not blind the controller.
pub(crate) async fn rabbitmqctl(args: &[&str]) -> Result<String, BoxError> {
    let Some(cluster) = crate::common::cluster() else {
        return rabbitmqctl_on(None, args).await;
    };
    let mut last = None;
    for node in &cluster.nodes {
        match rabbitmqctl_on(Some(node), args).await {
            Ok(out) => return Ok(out),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| "no cluster node configured".into()))
}

async fn rabbitmqctl_on(node: Option<&str>, args: &[&str]) -> Result<String, BoxError> {
    let mut cmd = Command::new("rabbitmqctl");
    if let Some(node) = node {
        cmd.args(["-n", node]);
    }
    let out = cmd
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run rabbitmqctl {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "rabbitmqctl {}{} failed ({}): {}",
            node.map(|n| format!("-n {n} ")).unwrap_or_default(),
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

/// Where restarts are announced: the file named by `IDEM_RESTART_LOG`, if set. Other
/// users of the same RabbitMQ or Redis (tests run concurrently on a shared machine) can
/// then tell a restart from a bug of their own. Each line is
/// `<UTC time> restarting <service> (<tag>)`, then `<UTC time> back up`; the tag is
/// `IDEM_RESTART_TAG` or `idem-chaos`.
pub(crate) const RESTART_LOG_ENV: &str = "IDEM_RESTART_LOG";

async fn utc_now() -> String {
    match Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .await
    {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        _ => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("unix:{secs}")
        }
    }
}

/// Appends `line` (prefixed with the UTC time) to the restart log, if one is set.
/// A log that cannot be written is reported on stderr and does not stop the run.
pub(crate) async fn announce(line: &str) {
    let Some(path) = std::env::var_os(RESTART_LOG_ENV) else {
        return;
    };
    let text = format!("{} {line}\n", utc_now().await);
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
    if let Err(e) = written {
        eprintln!(
            "idem-chaos: cannot append to the restart log {}: {e}",
            std::path::Path::new(&path).display()
        );
    }
}

pub(crate) async fn announce_restart(service: &str) {
    let tag = std::env::var("IDEM_RESTART_TAG").unwrap_or_else(|_| "idem-chaos".to_owned());
    announce(&format!("restarting {service} ({tag})")).await;
}

/// Restarts the RabbitMQ application (`stop_app`, `start_app`): every connection of
/// every client is dropped; durable queues and persistent messages stay. Opt-in
/// (`--faults broker-restart`). `start_app` is run even if `stop_app` failed, so the
/// broker is never left stopped by this function. Returns how long it was down.
pub(crate) async fn restart_broker() -> Result<Duration, BoxError> {
    announce_restart("rabbitmq").await;
    let started = std::time::Instant::now();
    let stopped = rabbitmqctl(&["-q", "stop_app"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = rabbitmqctl(&["-q", "start_app"]).await;
    let down = started.elapsed();
    if restarted.is_ok() {
        announce("back up").await;
    }
    stopped?;
    restarted?;
    Ok(down)
}

/// Restarts the local Redis server without saving: `redis-cli -p <port> shutdown
/// nosave`, then `redis-server --daemonize yes` with the configuration it had (`bind`,
/// `port`, `save`, `appendonly`, `dir`, `logfile`, read with `CONFIG GET` before the
/// shutdown). On the CI machine that is exactly the start command of `.ci/services`.
/// A durability fault: whatever was not persisted is forgotten, for every client of
/// that Redis. Opt-in (`--faults redis-restart`). Returns how long it was down.
pub(crate) async fn restart_redis(
    conn: &mut redis::aio::ConnectionManager,
) -> Result<Duration, BoxError> {
    let mut config = Vec::new();
    for key in ["bind", "port", "save", "appendonly", "dir", "logfile"] {
        let pair: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(key)
            .query_async(conn)
            .await?;
        let value = pair
            .get(1)
            .cloned()
            .ok_or_else(|| format!("CONFIG GET {key} returned nothing"))?;
        config.push((key, value));
    }
    let port = config
        .iter()
        .find(|(k, _)| *k == "port")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut args = vec!["--daemonize".to_owned(), "yes".to_owned()];
    for (key, value) in &config {
        args.push(format!("--{key}"));
        if *key == "bind" {
            // Several addresses are separate arguments, as typed on the command line.
            args.extend(value.split_whitespace().map(str::to_owned));
        } else {
            args.push(value.clone());
        }
    }
    announce_restart("redis").await;
    let started = std::time::Instant::now();
    // The server closes every connection while it stops: redis-cli may report that.
    let _ = Command::new("redis-cli")
        .args(["-p", &port, "shutdown", "nosave"])
        .output()
        .await
        .map_err(|e| format!("cannot run redis-cli: {e}"))?;
    let status = Command::new("redis-server")
        .args(&args)
        .status()
        .await
        .map_err(|e| format!("cannot start redis-server: {e}"))?;
    if !status.success() {
        return Err(format!("redis-server {} failed: {status}", args.join(" ")).into());
    }
    for _ in 0..50 {
        let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(conn).await;
        if pong.is_ok() {
            let down = started.elapsed();
            announce("back up").await;
            return Ok(down);
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
