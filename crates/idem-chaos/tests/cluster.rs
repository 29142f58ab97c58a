//! The CI-sized chaos run on clusters: the 3-node RabbitMQ cluster (quorum queues) and
//! the Redis Cluster that `bash .ci/cluster up` starts, with SIGKILLs of a RabbitMQ
//! node and of a Redis master among the faults. A binary of its own: cargo runs test
//! binaries one after another, so no other test of the workspace shares the cluster
//! while nodes are killed; the two runs below take turns for the same reason.
//!
//! The cluster is not one of the default services: the first run starts it with
//! `bash .ci/cluster up` (README, "Running on a cluster") and leaves it up; a cluster
//! that still does not answer fails the test with the ports that are down. Needs
//! PostgreSQL too.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use support::run_chaos;

/// One cluster run at a time: node kills of one run would be faults of the other.
static CLUSTER: Mutex<()> = Mutex::new(());

fn require_cluster() {
    idem_testkit::cluster::ensure_up();
    let down: Vec<u16> = [5701, 5702, 5703, 7001, 7002, 7003, 7004, 7005, 7006]
        .into_iter()
        .filter(|port| {
            let addr = SocketAddr::from(([127, 0, 0, 1], *port));
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
        })
        .collect();
    assert!(
        down.is_empty(),
        "the RabbitMQ/Redis test clusters are down (nothing on 127.0.0.1 ports {down:?}): start them with `bash .ci/cluster up` (README, \"Running on a cluster\")"
    );
}

fn cluster_run(store: &str) -> support::Run {
    let _turn = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    require_cluster();
    let run = run_chaos(&["--cluster", "--messages", "2000", "--store", store]);
    let report = &run.report;
    let last = run.lines.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("chaos: published="),
        "last line: {last}\n{report}"
    );
    // At least one RabbitMQ node and one Redis master were killed (and came back).
    let injected = |fault: &str| run.get("chaos: faults injected:", fault);
    assert!(injected("rabbit-node-kill") >= 1, "{report}");
    assert!(injected("redis-master-kill") >= 1, "{report}");
    assert!(run.total("node_kills") >= 2, "{report}");
    assert_eq!(run.total("confirmed"), 2000, "{report}");
    assert_eq!(run.total("lost"), 0, "{report}");
    assert_eq!(run.get("chaos: drained=", "dlq_foreign"), 0, "{report}");
    run
}

#[test]
fn postgres_inbox_on_clusters_loses_nothing_and_applies_nothing_twice() {
    let run = cluster_run("postgres");
    assert_eq!(run.total("duplicates"), 0, "{}", run.report);
    assert!(run.status.success(), "{}", run.report);
}

/// Redis Cluster replicates asynchronously: a failover can lose the last writes of
/// the killed master, so a message may run again (counted apart, as
/// `reruns_after_durability_fault`, when it falls in a failover window). What must
/// hold is that nothing is lost.
#[test]
fn redis_cluster_store_loses_nothing_under_node_kills() {
    let run = cluster_run("redis");
    println!(
        "chaos: redis cluster re-runs: duplicates={} reruns_after_crash={} reruns_after_durability_fault={}",
        run.total("duplicates"),
        run.get("chaos: drained=", "reruns_after_crash"),
        run.get("chaos: drained=", "reruns_after_durability_fault"),
    );
}
