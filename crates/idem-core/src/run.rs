//! Running a worker in the background: [`WorkerHandle`].
//!
//! Every transport's worker has a `run(shutdown)` future that consumes until
//! `shutdown` completes, then lets in-flight deliveries settle and returns. To run
//! one next to other work (a web server, a test), `spawn` it instead: the worker runs
//! on its own tokio task and the handle stops it and collects its result.
//!
//! ```
//! use std::sync::Arc;
//! use idem_core::memory::MemoryBroker;
//! use idem_core::{Consumer, Message};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_core::ConfigError> {
//! let broker = MemoryBroker::new();
//! let consumer = Consumer::builder("orders").handler(|| async {})?;
//! let settled = Arc::new(tokio::sync::Notify::new());
//! let hook = settled.clone();
//! let handle = broker
//!     .worker("orders", consumer)
//!     .on_settle(move |_| hook.notify_one())
//!     .spawn();
//! broker.publish("orders", Message::new("{}").with_message_id("o-1"));
//! settled.notified().await; // the message was handled and acked
//! let stats = handle.shutdown_and_join().await;
//! assert_eq!(stats.processed, 1);
//! # Ok(()) }
//! ```

use std::future::Future;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A worker running on its own tokio task, returned by a transport's `spawn`
/// (`MemoryWorker::spawn`, the RabbitMQ `Worker::spawn`). `T` is what the worker's
/// `run` returns: [`Stats`](crate::Stats) for the in-memory broker, `Result<Stats,
/// Error>` for RabbitMQ.
///
/// - [`shutdown`](Self::shutdown) asks the worker to stop (the same graceful stop as
///   the future given to `run` completing); calling it again does nothing.
/// - [`join`](Self::join) waits for the worker to end and returns its result.
/// - **Dropping the handle stops the worker at once**: its task is aborted, which
///   drops its `run` future, as `tokio::task::JoinHandle` would not. A worker never
///   outlives the code that owns it, whether that code returned, panicked or was
///   cancelled. What the drop means for deliveries in flight is the transport's
///   rule (the RabbitMQ worker closes its connection, so the broker hands its
///   unacked deliveries to another consumer at once; the in-memory worker lets the
///   handlers already running finish). For a graceful stop, call
///   [`shutdown_and_join`](Self::shutdown_and_join). Keep the handle for as long as
///   the worker should run.
#[must_use = "dropping a WorkerHandle stops the worker at once"]
#[derive(Debug)]
pub struct WorkerHandle<T> {
    stop: watch::Sender<bool>,
    task: JoinHandle<T>,
}

impl<T: Send + 'static> WorkerHandle<T> {
    /// Spawns `run(shutdown)` on the current tokio runtime, where `shutdown`
    /// completes when the handle asks the worker to stop. For transports; users call
    /// their worker's `spawn`.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, as `tokio::spawn` does.
    pub fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(ShutdownSignal) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(run(ShutdownSignal(rx)));
        WorkerHandle { stop, task }
    }
}

impl<T> WorkerHandle<T> {
    /// Asks the worker to stop: it takes no new delivery, lets the ones in flight
    /// settle, and ends. Returns at once; [`join`](Self::join) waits for the end.
    /// Idempotent.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Whether the worker has ended (stopped, or failed at start).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until the worker ends and returns what its `run` returned. Does not ask
    /// it to stop: call [`shutdown`](Self::shutdown) first, or use
    /// [`shutdown_and_join`](Self::shutdown_and_join).
    ///
    /// # Panics
    ///
    /// If the worker's task panicked, the panic is resumed here. If its runtime shut
    /// down before the worker ended (the handle was joined from another runtime), this
    /// panics saying so.
    pub async fn join(mut self) -> T {
        // `self` (and so the sender) lives while waiting; its `Drop` then aborts a
        // task that has already ended, which does nothing.
        let result = (&mut self.task).await;
        match result {
            Ok(value) => value,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the worker's runtime shut down before the worker ended: {e}"),
        }
    }

    /// [`shutdown`](Self::shutdown), then [`join`](Self::join).
    pub async fn shutdown_and_join(self) -> T {
        self.shutdown();
        self.join().await
    }
}

impl<T> Drop for WorkerHandle<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The shutdown future a [`WorkerHandle`] gives its worker's `run`: completes when
/// the handle asks the worker to stop.
#[derive(Debug)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    /// Resolves when the worker should stop.
    pub async fn wait(mut self) {
        // An error means the handle is gone: stop as well.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn shutdown_is_idempotent_and_join_returns_the_result() {
        let handle = WorkerHandle::spawn(|signal| async move {
            signal.wait().await;
            7
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!handle.is_finished(), "runs until asked to stop");
        handle.shutdown();
        handle.shutdown();
        assert_eq!(handle.join().await, 7);
    }

    #[tokio::test]
    async fn dropping_the_handle_drops_the_run_future() {
        // The sender lives in the run future: the receiver sees it go when the task
        // drops that future, without the worker's own shutdown path running.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let handle = WorkerHandle::spawn(|_signal| async move {
            let _keep = tx;
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        });
        started.await.expect("the worker started");
        drop(handle);
        let gone = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("the run future was dropped within 5 s");
        assert!(
            gone.is_err(),
            "the run future ended by being dropped, not by sending"
        );
    }

    #[tokio::test]
    async fn join_waits_without_stopping() {
        let handle = WorkerHandle::spawn(|_signal| async { "done" });
        assert_eq!(handle.join().await, "done");
    }

    #[tokio::test]
    #[should_panic(expected = "boom")]
    async fn a_panic_in_the_worker_is_resumed_by_join() {
        let handle = WorkerHandle::spawn(|_signal| async {
            let fail = true;
            assert!(!fail, "boom");
            0u8
        });
        let _ = handle.join().await;
    }
}
