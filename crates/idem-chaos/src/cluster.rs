//! `--cluster`: the node faults (SIGKILL of a RabbitMQ node, SIGKILL of a Redis Cluster
//! master) and the Redis Cluster housekeeping. Nodes are restarted through the
//! `.ci/cluster` script, which knows each node's configuration.

use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::common::{BoxError, Cluster};
use crate::faults::{announce, announce_restart, rabbitmqctl};

/// Runs `bash .ci/cluster <args>`; its stdout on success.
async fn script(cluster: &Cluster, args: &[&str]) -> Result<String, BoxError> {
    let out = Command::new("bash")
        .arg(&cluster.script)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", cluster.script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed ({}): {}{}",
            cluster.script.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn sigkill(pid: &str) -> Result<(), BoxError> {
    let status = Command::new("kill").args(["-9", pid]).status().await?;
    if !status.success() {
        return Err(format!("kill -9 {pid} failed: {status}").into());
    }
    Ok(())
}

/// Polls `check` every 200 ms until it holds, for at most `limit`.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<(), BoxError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("{what} did not happen within {} s", limit.as_secs()).into())
}

/// The running members of the RabbitMQ cluster, as any live node reports them.
async fn running_rabbit_nodes(cluster: &Cluster) -> usize {
    let Ok(status) = rabbitmqctl(&["-q", "cluster_status", "--formatter", "json"]).await else {
        return 0;
    };
    let Some(start) = status.find("\"running_nodes\":[") else {
        return 0;
    };
    let rest = &status[start..];
    let list = &rest[..rest.find(']').unwrap_or(rest.len())];
    cluster
        .nodes
        .iter()
        .filter(|n| list.contains(&format!("\"{n}\"")))
        .count()
}

/// SIGKILLs the beam process of a random RabbitMQ node, waits a moment (clients
/// notice, quorum queues elect new leaders), starts the node again and waits until
/// it has rejoined the cluster. Returns what happened.
pub(crate) async fn kill_rabbit_node(
    cluster: &Cluster,
    rng: &mut fastrand::Rng,
) -> Result<String, BoxError> {
    let n = rng.usize(..cluster.nodes.len()) + 1;
    let node = &cluster.nodes[n - 1];
    let pid = script(cluster, &["rabbit-pid", &n.to_string()]).await?;
    announce_restart(&format!("rabbitmq cluster node {node} (SIGKILL)")).await;
    let started = Instant::now();
    sigkill(&pid).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    script(cluster, &["rabbit-start", &n.to_string()]).await?;
    let all = cluster.nodes.len();
    wait_until(
        &format!("{node} rejoining the cluster"),
        Duration::from_secs(90),
        || async { running_rabbit_nodes(cluster).await == all },
    )
    .await?;
    announce("back up").await;
    Ok(format!(
        "SIGKILL RabbitMQ node {node} (pid {pid}); restarted, rejoined after {:.1} s",
        started.elapsed().as_secs_f64()
    ))
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisNode {
    /// The node id.
    pub(crate) id: String,
    /// `host:port`.
    pub(crate) addr: String,
    pub(crate) flags: Vec<String>,
    /// A replica's master id (`-` for a master).
    pub(crate) master: String,
}

impl RedisNode {
    pub(crate) fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    pub(crate) fn failed(&self) -> bool {
        self.flags.iter().any(|f| f == "fail" || f == "fail?")
    }
}

/// Parses `CLUSTER NODES` output (`<id> <ip:port@cport> <flags> ...`).
pub(crate) fn parse_cluster_nodes(text: &str) -> Vec<RedisNode> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let id = fields.next()?.to_owned();
            let addr = fields.next()?.split('@').next()?.to_owned();
            let flags = fields
                .next()?
                .split(',')
                .filter(|f| *f != "myself")
                .map(str::to_owned)
                .collect();
            let master = fields.next()?.to_owned();
            Some(RedisNode {
                id,
                addr,
                flags,
                master,
            })
        })
        .collect()
}

async fn redis_node(addr: &str) -> Result<redis::aio::MultiplexedConnection, BoxError> {
    let client = redis::Client::open(format!("redis://{addr}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// `CLUSTER NODES` from the first seed (or known node) that answers, skipping `avoid`.
async fn cluster_view(cluster: &Cluster, avoid: Option<&str>) -> Result<Vec<RedisNode>, BoxError> {
    let seeds: Vec<String> = cluster
        .redis_url
        .split(',')
        .filter_map(|u| {
            u.trim()
                .rsplit('/')
                .find(|p| p.contains(':'))
                .map(str::to_owned)
        })
        .map(|hostport| hostport.rsplit('@').next().unwrap_or(&hostport).to_owned())
        .collect();
    let mut last = None;
    for addr in seeds.iter().filter(|a| Some(a.as_str()) != avoid) {
        let answer = async {
            let mut conn = redis_node(addr).await?;
            let text: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut conn)
                .await?;
            Ok::<_, BoxError>(text)
        };
        match answer.await {
            Ok(text) => return Ok(parse_cluster_nodes(&text)),
            Err(e) => last = Some(e),
        }
    }
    Err(format!(
        "no Redis Cluster seed answered ({}): start the cluster with `bash .ci/cluster up` (see README)",
        last.map(|e| e.to_string()).unwrap_or_default()
    )
    .into())
}

async fn cluster_ok(addr: &str) -> bool {
    let Ok(mut conn) = redis_node(addr).await else {
        return false;
    };
    let info: redis::RedisResult<String> = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut conn)
        .await;
    info.is_ok_and(|i| i.contains("cluster_state:ok"))
}

/// SIGKILLs a random Redis Cluster master, waits until its replica has taken over
/// (the cluster serves every slot again), restarts the killed node and waits until
/// it is back as a replica of its successor. Returns what happened.
pub(crate) async fn kill_redis_master(
    cluster: &Cluster,
    rng: &mut fastrand::Rng,
) -> Result<String, BoxError> {
    let masters: Vec<RedisNode> = cluster_view(cluster, None)
        .await?
        .into_iter()
        .filter(|n| n.is_master() && !n.failed())
        .collect();
    if masters.is_empty() {
        return Err("the Redis Cluster reports no healthy master".into());
    }
    let victim_node = masters[rng.usize(..masters.len())].clone();
    let victim = victim_node.addr.clone();
    let replicas: Vec<String> = cluster_view(cluster, None)
        .await?
        .into_iter()
        .filter(|n| n.master == victim_node.id && !n.failed())
        .map(|n| n.id)
        .collect();
    if replicas.is_empty() {
        // Killing a master without a replica would lose its slots' data outright.
        return Err(format!("master {victim} has no healthy replica: not killing it").into());
    }
    let port = victim.rsplit(':').next().unwrap_or_default().to_owned();
    let pid = {
        let mut conn = redis_node(&victim).await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await?;
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .map(|p| p.trim().to_owned())
            .ok_or("INFO server has no process_id")?
    };
    announce_restart(&format!("redis cluster master {victim} (SIGKILL)")).await;
    let started = Instant::now();
    sigkill(&pid).await?;
    // A surviving node sees one of the victim's replicas promoted and every slot
    // served again. Only then may the victim come back: restarted before the failover,
    // it would return as the (empty) master and its replica would copy that.
    wait_until(
        &format!("failover of {victim}"),
        Duration::from_secs(60),
        || async {
            let Ok(view) = cluster_view(cluster, Some(&victim)).await else {
                return false;
            };
            let promoted = view
                .iter()
                .find(|n| replicas.contains(&n.id) && n.is_master() && !n.failed());
            match promoted {
                Some(p) => cluster_ok(&p.addr).await,
                None => false,
            }
        },
    )
    .await?;
    let failover = started.elapsed();
    script(cluster, &["redis-start", &port]).await?;
    wait_until(
        &format!("{victim} rejoining as a replica"),
        Duration::from_secs(60),
        || async {
            let Ok(mut conn) = redis_node(&victim).await else {
                return false;
            };
            let info: redis::RedisResult<String> = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await;
            info.is_ok_and(|i| i.contains("role:slave") && i.contains("master_link_status:up"))
        },
    )
    .await?;
    announce("back up").await;
    Ok(format!(
        "SIGKILL Redis master {victim} (pid {pid}); replica took over after {:.1} s, old master back as a replica after {:.1} s",
        failover.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ))
}

/// Deletes every key under `prefix` on every master (SCAN is per node on a cluster;
/// keys of different slots are deleted one by one).
pub(crate) async fn delete_redis_keys(cluster: &Cluster, prefix: &str) -> Result<u64, BoxError> {
    let pattern = format!("{prefix}:*");
    let mut deleted = 0;
    for node in cluster_view(cluster, None).await? {
        if !node.is_master() || node.failed() {
            continue;
        }
        let mut conn = redis_node(&node.addr).await?;
        deleted += idem_testkit::tools::unlink_matching(&mut conn, &pattern).await?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cluster_nodes() {
        let text = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7004@17004 slave a1 0 1 1 connected
c3 127.0.0.1:7002@17002 master,fail - 1 1 2 disconnected
";
        let nodes = parse_cluster_nodes(text);
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[0].addr, "127.0.0.1:7001");
        assert_eq!(
            (nodes[0].id.as_str(), nodes[1].master.as_str()),
            ("a1", "a1")
        );
        assert!(nodes[0].is_master() && !nodes[0].failed());
        assert!(!nodes[1].is_master());
        assert!(nodes[2].is_master() && nodes[2].failed());
    }
}
