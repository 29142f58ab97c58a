//! What the local RabbitMQ node itself reports, read with `rabbitmqctl` (it ships
//! with the server): a queue's ready and unacked counts and consumers, and the names
//! clients gave their connections. Tests use it to see what a client left behind
//! (unacked deliveries, open connections) where the AMQP protocol cannot tell.

use std::process::Command;
use std::time::{Duration, Instant};

/// A queue's counts as the broker keeps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready for delivery.
    pub ready: u64,
    /// Messages delivered and not yet acked.
    pub unacked: u64,
    /// Consumers subscribed.
    pub consumers: u64,
}

/// Runs `rabbitmqctl` with `args` on the local node and returns what it printed.
/// Panics if it is not on the PATH or the command fails. It blocks: an async test
/// calls it in `tokio::task::spawn_blocking` where it must not stall its runtime.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be on PATH for this test (it ships with RabbitMQ)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `rabbitmqctl` with `args` and the options of a listing read by a program: no
/// banner, no table headers.
fn list(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend(["--quiet", "--no-table-headers"]);
    rabbitmqctl(&all)
}

/// The counts of `queue` on the local node. Panics if the queue does not exist.
pub async fn queue_counts(queue: &str) -> QueueCounts {
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || {
        let text = list(&[
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ]);
        text.lines()
            .find_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                (f.len() == 4 && f[0] == queue).then(|| QueueCounts {
                    ready: f[1].parse().unwrap(),
                    unacked: f[2].parse().unwrap(),
                    consumers: f[3].parse().unwrap(),
                })
            })
            .unwrap_or_else(|| panic!("queue {queue} not listed by rabbitmqctl:\n{text}"))
    })
    .await
    .unwrap()
}

/// Whether a client connection named `name` (the `connection_name` client property)
/// is open on the local node.
pub async fn connection_open(name: &str) -> bool {
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        list(&["list_connections", "client_properties"])
            .lines()
            .any(|line| line.contains(&format!("\"{name}\"")))
    })
    .await
    .unwrap()
}

/// Waits up to `limit` until no client connection named `name` is open on the local
/// node; whether it closed in time.
pub async fn connection_closes(name: &str, limit: Duration) -> bool {
    wait_until(limit, async || !connection_open(name).await).await
}

/// The broker's ids of the client connections named `name` (the `connection_name`
/// client property), read with `rabbitmqctl` (blocking).
fn connection_pids(name: &str) -> Vec<String> {
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    list(&["list_connections", "pid", "client_properties"])
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, props)| props.contains(&needle))
        .map(|(pid, _)| pid.trim().to_owned())
        .collect()
}

/// How many client connections named `name` are open on the local node.
pub async fn connections_named(name: &str) -> usize {
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || connection_pids(&name).len())
        .await
        .unwrap()
}

/// Closes every client connection named `name` on the local node, as an operator
/// would (`rabbitmqctl close_connection`, with `reason`); returns how many it closed.
pub async fn close_connections_named(name: &str, reason: &str) -> usize {
    let (name, reason) = (name.to_owned(), reason.to_owned());
    tokio::task::spawn_blocking(move || {
        let pids = connection_pids(&name);
        for pid in &pids {
            rabbitmqctl(&["close_connection", pid, &reason]);
        }
        pids.len()
    })
    .await
    .unwrap()
}

/// Polls `cond` every 50 ms until it holds (true) or `limit` has passed (false).
pub async fn wait_until(limit: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond().await {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits up to `limit` until `queue` has no unacknowledged message and no consumer
/// (what a graceful stop leaves behind); panics with its counts if it does not.
pub async fn assert_settled(queue: &str, limit: Duration) {
    let settled = wait_until(limit, async || {
        let c = queue_counts(queue).await;
        c.unacked == 0 && c.consumers == 0
    })
    .await;
    assert!(
        settled,
        "{queue} after the stop: {:?}",
        queue_counts(queue).await
    );
}

/// Declares `queue` on `ch` with the default options (a classic queue, not durable,
/// not exclusive): the queue most tests publish to. Panics if the broker refuses.
#[cfg(feature = "amqp")]
pub async fn declare_queue(ch: &lapin::Channel, queue: &str) {
    use lapin::{options::QueueDeclareOptions, types::FieldTable};
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("declaring queue {queue}: {e}"));
}

/// A passive declare of `queue` on `ch`: the queue's message and consumer counts, or
/// the broker's error when it does not exist (which also closes `ch`).
#[cfg(feature = "amqp")]
pub async fn inspect_queue(ch: &lapin::Channel, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    use lapin::{options::QueueDeclareOptions, types::FieldTable};
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default().passive(),
        FieldTable::default(),
    )
    .await
}

/// The number of ready messages in `queue` (a passive declare on `ch`). Panics if
/// the queue does not exist.
#[cfg(feature = "amqp")]
pub async fn ready_count(ch: &lapin::Channel, queue: &str) -> u32 {
    inspect_queue(ch, queue)
        .await
        .unwrap_or_else(|e| panic!("queue {queue}: {e}"))
        .message_count()
}
