//! [`Batcher`]: opportunistic batching of concurrent store operations.
//!
//! A store whose every operation is one network round trip pays that round trip once
//! per message per step (claim, complete). When many deliveries are handled at once
//! (a prefetch of 200), most of those round trips overlap; a [`Batcher`] turns the
//! overlapping ones into one call:
//!
//! - An operation submitted while no call is in flight goes out **at once**, alone: no
//!   timer, no waiting for company, so a lone message pays exactly what it paid
//!   before (plus a hand-over to a task).
//! - Operations submitted while a call is in flight queue up. When the call returns,
//!   everything queued (up to the batch bound) goes out together in the next call.
//!   The queue cannot grow without bound either: every queued operation has a caller
//!   waiting for its answer, so it holds at most one entry per concurrent caller (the
//!   consumer's prefetch).
//! - Each operation gets its own answer. A call that fails as a whole (connection lost,
//!   timeout) gives every operation in it a copy of the same [`StoreError`]; an
//!   executor may also fail single operations.
//! - The call runs in a task of its own, not in any caller's future: a caller that
//!   gives up (the dedup layer's `store_timeout`, or a dropped future) only loses its
//!   answer; the others still get theirs. An operation whose caller gave up before it
//!   was sent is skipped.
//!
//! Why hand-written: the crates that batch requests (for example `batched-fn`,
//! `tokio-batch`) collect for a fixed delay or until a size is reached; the point here
//! is to never delay a lone request, which a flush-when-idle queue does with a mutex
//! and a oneshot channel per operation.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::store::StoreError;

/// Default bound on the number of operations in one batched call.
pub const DEFAULT_MAX_BATCH: usize = 128;

/// Runs one batch of operations for a [`Batcher`].
#[async_trait]
pub trait BatchExecutor: Send + Sync + 'static {
    /// One operation.
    type Op: Send + 'static;
    /// The answer to one operation.
    type Output: Send + 'static;

    /// Applies `ops` (one or more) and returns one result per operation, in order.
    /// Each operation must keep the atomicity it has on its own; the batch as a whole
    /// need not be atomic. A result missing from the returned list is an error for its
    /// operation.
    async fn execute(&self, ops: Vec<Self::Op>) -> Vec<Result<Self::Output, StoreError>>;
}

/// Sends the operations of concurrent callers to a [`BatchExecutor`] together. See the
/// [module docs](self). Cheap to clone (clones share the queue).
pub struct Batcher<E: BatchExecutor> {
    shared: Arc<Shared<E>>,
}

impl<E: BatchExecutor> Clone for Batcher<E> {
    fn clone(&self) -> Self {
        Batcher {
            shared: self.shared.clone(),
        }
    }
}

impl<E: BatchExecutor> std::fmt::Debug for Batcher<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("max_batch", &self.shared.max_batch)
            .finish_non_exhaustive()
    }
}

type Reply<E> = oneshot::Sender<Result<<E as BatchExecutor>::Output, StoreError>>;

struct Shared<E: BatchExecutor> {
    exec: E,
    max_batch: usize,
    state: Mutex<State<E>>,
}

struct State<E: BatchExecutor> {
    queue: VecDeque<(E::Op, Reply<E>)>,
    /// Whether a flush task is running (it takes the queue until it is empty).
    flushing: bool,
}

impl<E: BatchExecutor> Shared<E> {
    fn lock(&self) -> MutexGuard<'_, State<E>> {
        // The lock is never held across a call that can panic halfway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<E: BatchExecutor> Batcher<E> {
    /// A batcher running at most `max_batch` operations per call (at least 1; 1 turns
    /// batching off: each operation waits for the one before it).
    pub fn new(exec: E, max_batch: usize) -> Self {
        Batcher {
            shared: Arc::new(Shared {
                exec,
                max_batch: max_batch.max(1),
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    flushing: false,
                }),
            }),
        }
    }

    /// The bound on operations per call.
    pub fn max_batch(&self) -> usize {
        self.shared.max_batch
    }

    /// The executor.
    pub fn executor(&self) -> &E {
        &self.shared.exec
    }

    /// Queues `op` and waits for its answer. It goes out at once if no call is in
    /// flight, else with the next call. Must be called within a Tokio runtime (the
    /// call runs in a task of its own).
    pub async fn submit(&self, op: E::Op) -> Result<E::Output, StoreError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut state = self.shared.lock();
            state.queue.push_back((op, tx));
            !std::mem::replace(&mut state.flushing, true)
        };
        if start {
            tokio::spawn(flush(self.shared.clone()));
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(StoreError::new(
                "the batched store call was dropped before it answered (its runtime shut down)",
            )),
        }
    }
}

/// Clears `flushing` if the flush task is dropped without finishing (its runtime shut
/// down), so that the next submission starts a new one.
struct FlushGuard<E: BatchExecutor>(Arc<Shared<E>>);

impl<E: BatchExecutor> Drop for FlushGuard<E> {
    fn drop(&mut self) {
        self.0.lock().flushing = false;
    }
}

async fn flush<E: BatchExecutor>(shared: Arc<Shared<E>>) {
    let guard = FlushGuard(shared);
    let shared = &guard.0;
    loop {
        let mut ops = Vec::new();
        let mut replies = Vec::new();
        {
            let mut state = shared.lock();
            while ops.len() < shared.max_batch {
                let Some((op, reply)) = state.queue.pop_front() else {
                    break;
                };
                // Its caller gave up (timeout): do not send it at all.
                if reply.is_closed() {
                    continue;
                }
                ops.push(op);
                replies.push(reply);
            }
            if ops.is_empty() {
                // Still under the lock: a submission after this point starts a new
                // flush task (the guard's drop sets the same value again; harmless).
                state.flushing = false;
                return;
            }
        }
        let mut results = shared.exec.execute(ops).await.into_iter();
        for reply in replies {
            let result = results.next().unwrap_or_else(|| {
                Err(StoreError::new(
                    "the batched store call returned fewer answers than operations",
                ))
            });
            // A caller that gave up meanwhile does not want it.
            let _ = reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    const UNLUCKY: u32 = 1_000_013;

    /// Doubles numbers; records every batch; fails batches holding [`UNLUCKY`]. With a gate,
    /// each call waits for a permit the test hands out.
    struct Doubler {
        batches: Mutex<Vec<Vec<u32>>>,
        started: AtomicUsize,
        gate: Option<Semaphore>,
    }

    #[async_trait]
    impl BatchExecutor for Doubler {
        type Op = u32;
        type Output = u32;
        async fn execute(&self, ops: Vec<u32>) -> Vec<Result<u32, StoreError>> {
            self.batches.lock().unwrap().push(ops.clone());
            self.started.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            if ops.contains(&UNLUCKY) {
                let e = StoreError::new("unlucky batch");
                return ops.iter().map(|_| Err(e.clone())).collect();
            }
            ops.into_iter().map(|n| Ok(n * 2)).collect()
        }
    }

    fn doubler(gated: bool) -> Doubler {
        Doubler {
            batches: Mutex::new(Vec::new()),
            started: AtomicUsize::new(0),
            gate: gated.then(|| Semaphore::new(0)),
        }
    }

    impl Batcher<Doubler> {
        /// The batches sent, each sorted (tasks submit in any order).
        fn batches(&self) -> Vec<Vec<u32>> {
            let mut batches = self.executor().batches.lock().unwrap().clone();
            batches.iter_mut().for_each(|b| b.sort_unstable());
            batches
        }
        /// Waits until `n` calls have started.
        async fn started(&self, n: usize) {
            while self.executor().started.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        fn open(&self, calls: usize) {
            self.executor().gate.as_ref().unwrap().add_permits(calls);
        }
        fn spawn(&self, n: u32) -> tokio::task::JoinHandle<Result<u32, StoreError>> {
            let b = self.clone();
            tokio::spawn(async move { b.submit(n).await })
        }
        /// Waits until `n` operations are queued.
        async fn queued(&self, n: usize) {
            while self.shared.lock().queue.len() < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    #[tokio::test]
    async fn lone_operation_goes_alone_and_at_once() {
        let b = Batcher::new(doubler(false), 8);
        for n in 0..3 {
            assert_eq!(b.submit(n).await.unwrap(), n * 2);
        }
        assert_eq!(b.batches(), vec![vec![0], vec![1], vec![2]]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_operations_share_the_next_call_within_the_bound() {
        let b = Batcher::new(doubler(true), 16);
        let first = b.spawn(1000);
        b.started(1).await;
        // 40 operations arrive while the first call is in flight.
        let tasks: Vec<_> = (0..40u32).map(|n| (n, b.spawn(n))).collect();
        b.queued(40).await;
        b.open(10);
        assert_eq!(first.await.unwrap().unwrap(), 2000);
        for (n, t) in tasks {
            assert_eq!(t.await.unwrap().unwrap(), n * 2, "operation {n}");
        }
        let sizes: Vec<usize> = b.batches().iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1, 16, 16, 8], "bounded batches, in order");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_callers_each_get_their_own_answer() {
        let b = Batcher::new(doubler(false), 32);
        let tasks: Vec<_> = (0..2000u32).map(|n| (n, b.spawn(n))).collect();
        for (n, t) in tasks {
            assert_eq!(t.await.unwrap().unwrap(), n * 2, "operation {n}");
        }
        let batches = b.batches();
        let mut seen: Vec<u32> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..2000).collect::<Vec<_>>(), "each sent once");
        assert!(batches.iter().all(|b| b.len() <= 32));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_call_fails_each_of_its_operations_only() {
        let b = Batcher::new(doubler(true), 64);
        let first = b.spawn(1);
        b.started(1).await;
        let tasks: Vec<_> = [12u32, UNLUCKY, 14]
            .into_iter()
            .map(|n| b.spawn(n))
            .collect();
        b.queued(3).await;
        b.open(2);
        assert_eq!(first.await.unwrap().unwrap(), 2);
        for t in tasks {
            let e = t.await.unwrap().unwrap_err();
            assert!(e.to_string().contains("unlucky batch"), "{e}");
        }
        assert_eq!(b.batches(), vec![vec![1], vec![12, 14, UNLUCKY]]);
        // The batcher still works afterwards.
        b.open(1);
        assert_eq!(b.submit(4).await.unwrap(), 8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_does_not_break_the_batch() {
        let b = Batcher::new(doubler(true), 64);
        let first = b.spawn(1);
        b.started(1).await;
        // Queued behind the call in flight: one caller gives up (its future is
        // dropped, as a timeout does) before its operation is sent.
        let gives_up = b.spawn(100);
        let waits = b.spawn(2);
        b.queued(2).await;
        gives_up.abort();
        assert!(gives_up.await.unwrap_err().is_cancelled());
        b.open(1);
        assert_eq!(first.await.unwrap().unwrap(), 2);
        b.started(2).await;
        // One gives up while its call is in flight; the other one in that call still
        // gets its answer.
        let in_flight_gives_up = b.spawn(3);
        let in_flight_waits = b.spawn(4);
        b.queued(2).await;
        b.open(1);
        assert_eq!(waits.await.unwrap().unwrap(), 4);
        b.started(3).await;
        in_flight_gives_up.abort();
        assert!(in_flight_gives_up.await.unwrap_err().is_cancelled());
        b.open(1);
        assert_eq!(in_flight_waits.await.unwrap().unwrap(), 8);
        assert_eq!(
            b.batches(),
            vec![vec![1], vec![2], vec![3, 4]],
            "the operation abandoned in the queue was never sent"
        );
        // And the batcher goes on.
        b.open(1);
        assert_eq!(b.submit(5).await.unwrap(), 10);
    }
}
