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

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .args(["--quiet", "--no-table-headers"])
        .output()
        .expect("rabbitmqctl must be on PATH for this test (it ships with RabbitMQ)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The counts of `queue` on the local node. Panics if the queue does not exist.
pub async fn queue_counts(queue: &str) -> QueueCounts {
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || {
        let text = rabbitmqctl(&[
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
        rabbitmqctl(&["list_connections", "client_properties"])
            .lines()
            .any(|line| line.contains(&format!("\"{name}\"")))
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
