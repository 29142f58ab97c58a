//! Helpers shared by the runnable examples (`cargo run --example NAME`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem::{Disposition, Settled};
use tokio::sync::Notify;

/// The value after `--name` on the command line, if any.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Waits until every message has a final outcome (or `limit` passes), then shuts
/// `running` (a spawned worker or service) down gracefully and returns what it
/// returned: a worker's stats, or a service's stats per consumer.
pub async fn run_until_finished<T>(
    running: idem::WorkerHandle<Result<T, idem::amqp::Error>>,
    finished: &Finished,
    limit: Duration,
) -> Result<T, Box<dyn std::error::Error>> {
    let waited = finished.wait(limit).await;
    let stats = running.shutdown_and_join().await?;
    waited?;
    Ok(stats)
}

/// The broker URL: `AMQP_URL` or the local default.
pub fn amqp_url() -> String {
    idem::amqp::amqp_url_from_env()
}

/// Connects to RabbitMQ, or says it is not reachable and where to read how to run it.
pub async fn rabbit() -> Result<lapin::Connection, String> {
    let url = amqp_url();
    idem::amqp::connect(&url, "idem-example-admin")
        .await
        .map_err(|e| {
            format!(
                "RabbitMQ is not reachable at {} ({e}); see \"Running the tests\" in the README",
                idem::redact::redact_url(&url)
            )
        })
}

/// Counts deliveries that reached a final outcome (acked or dead-lettered) and wakes
/// a waiter once `target` of them have.
#[derive(Clone, Debug)]
pub struct Finished {
    done: Arc<AtomicU64>,
    target: u64,
    notify: Arc<Notify>,
}

impl Finished {
    /// Waits for `target` final outcomes.
    pub fn new(target: u64) -> Self {
        Finished {
            done: Arc::new(AtomicU64::new(0)),
            target,
            notify: Arc::new(Notify::new()),
        }
    }

    /// Records a settled delivery; retries are not final.
    pub fn record(&self, settled: &Settled<'_>) {
        if !matches!(
            settled.disposition,
            Disposition::Retry { .. } | Disposition::Release { .. }
        ) && self.done.fetch_add(1, Ordering::SeqCst) + 1 >= self.target
        {
            self.notify.notify_one();
        }
    }

    /// Resolves when every message has a final outcome, or after `limit`.
    pub async fn wait(&self, limit: Duration) -> Result<(), String> {
        let wait = async {
            while self.done.load(Ordering::SeqCst) < self.target {
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), self.notify.notified()).await;
            }
        };
        tokio::time::timeout(limit, wait).await.map_err(|_| {
            format!(
                "only {} of {} messages finished within {limit:?}",
                self.done.load(Ordering::SeqCst),
                self.target
            )
        })
    }
}

/// One line describing a settled delivery: its message id, the attempt, and the
/// disposition's `Display` line.
pub fn describe(settled: &Settled<'_>) -> String {
    format!(
        "{} (attempt {}): {}",
        settled.message_id.unwrap_or("?"),
        settled.attempt,
        settled.disposition
    )
}
