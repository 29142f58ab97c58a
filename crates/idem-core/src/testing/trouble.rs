//! The trouble layer: injects each key's planned transient failures and crashes
//! around the handler, and the task that runs one delivery and notices a crash.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::oneshot;
use tower::{Layer, Service};

use super::drive::Pending;
use super::schedule::{CrashPoint, Plan};
use super::InjectedFailure;
use crate::consumer::{Consumer, HandlerStack};
use crate::error::{BoxError, HandlerError};
use crate::message::Message;
use crate::outcome::Disposition;

pub(super) enum Outcome {
    Settled(Box<Disposition>),
    Crashed(CrashPoint),
}

pub(super) async fn deliver(
    consumer: Consumer,
    cell: Arc<KeyCell>,
    mut p: Pending,
    concurrent: bool,
) -> (Pending, Outcome) {
    let (tx, rx) = oneshot::channel();
    // The delivery's one reading of its attempt headers, as a transport does it.
    p.msg.context = crate::consumer::DeliveryContext::read(&p.msg);
    let mut msg = p.msg.clone();
    msg.extensions = Default::default();
    msg.extensions.insert(Ticket {
        cell,
        concurrent,
        crash: Arc::new(Mutex::new(Some(tx))),
    });
    let outcome = tokio::select! {
        biased;
        Ok(point) = rx => Outcome::Crashed(point),
        d = consumer.process(msg) => Outcome::Settled(Box::new(d)),
    };
    (p, outcome)
}

#[derive(Default)]
pub(super) struct KeyState {
    pub(super) transient_left: u32,
    pub(super) crash: Option<CrashPoint>,
    pub(super) window_crashes: u32,
    pub(super) events: Vec<String>,
}

pub(super) struct KeyCell {
    pub(super) key: String,
    pub(super) plan: Plan,
    pub(super) state: Mutex<KeyState>,
}

impl KeyCell {
    pub(super) fn lock(&self) -> MutexGuard<'_, KeyState> {
        // Every critical section is a few field updates: a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn log(&self, event: String) {
        self.lock().events.push(event);
    }

    /// Fires the planned crash if it is at `point` and has not fired yet.
    pub(super) fn fire(&self, point: CrashPoint) -> bool {
        let mut st = self.lock();
        if st.crash != Some(point) {
            return false;
        }
        st.crash = None;
        if point == CrashPoint::AfterEffect {
            st.window_crashes += 1;
        }
        true
    }
}

/// What the trouble layer finds in a delivery's extensions.
#[derive(Clone)]
struct Ticket {
    cell: Arc<KeyCell>,
    concurrent: bool,
    crash: Arc<Mutex<Option<oneshot::Sender<CrashPoint>>>>,
}

impl Ticket {
    /// Kills the delivery: tells the harness to drop it, then never completes.
    async fn crash(&self, point: CrashPoint) -> Result<(), BoxError> {
        let tx = self.crash.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(point);
        }
        std::future::pending().await
    }
}

/// The tower layer through which the harness injects transient failures and
/// crashes around your handler. Obtained from [`Harness::new`](super::Harness::new)'s factory argument;
/// add it with [`ConsumerBuilder::layer`](crate::ConsumerBuilder::layer), first (so it
/// wraps the handler and your other layers, under the dedup stage). Outside a harness
/// run it passes every message straight through.
#[derive(Clone, Debug)]
pub struct TroubleLayer {
    used: Arc<AtomicBool>,
}

impl TroubleLayer {
    pub(super) fn new() -> Self {
        TroubleLayer {
            used: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether a delivery of a harness run went through the layer.
    pub(super) fn was_used(&self) -> bool {
        self.used.load(Ordering::SeqCst)
    }
}

impl Layer<HandlerStack> for TroubleLayer {
    type Service = TroubleService;

    fn layer(&self, inner: HandlerStack) -> TroubleService {
        TroubleService {
            inner,
            used: self.used.clone(),
        }
    }
}

/// The service of a [`TroubleLayer`].
pub struct TroubleService {
    inner: HandlerStack,
    used: Arc<AtomicBool>,
}

impl std::fmt::Debug for TroubleService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TroubleService").finish_non_exhaustive()
    }
}

impl Service<Message> for TroubleService {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let Some(ticket) = msg.extensions.get::<Ticket>().cloned() else {
            return self.inner.call(msg);
        };
        self.used.store(true, Ordering::SeqCst);
        let inject = {
            let mut st = ticket.cell.lock();
            if st.transient_left > 0 {
                st.transient_left -= 1;
                true
            } else {
                false
            }
        };
        if inject {
            return Box::pin(async { Err(HandlerError::transient(InjectedFailure).into()) });
        }
        if ticket.cell.fire(CrashPoint::BeforeHandler) {
            return Box::pin(async move { ticket.crash(CrashPoint::BeforeHandler).await });
        }
        let concurrent = ticket.concurrent;
        let fut = self.inner.call(msg);
        Box::pin(async move {
            if concurrent {
                // Let the other copies of the message reach their dedup stage too.
                tokio::task::yield_now().await;
            }
            let result = fut.await;
            if result.is_ok() && ticket.cell.fire(CrashPoint::AfterEffect) {
                return ticket.crash(CrashPoint::AfterEffect).await;
            }
            result
        })
    }
}
