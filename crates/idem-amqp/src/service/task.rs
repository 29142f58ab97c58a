//! Hosted tasks: work other than a consumer that a [`Service`](crate::Service) runs
//! beside its consumers and stops with them.
//!
//! A [`HostedTask`] is anything that runs until it is told to stop: the outbox relay
//! of `idem-outbox` (which implements this trait: `idem-outbox` builds on this crate,
//! so the service cannot name the relay itself), a cache warmer, a scheduler. The
//! service gives each task a [`TaskContext`]: the shutdown signal, shared with every
//! consumer, and the readiness registry its listener serves at `/ready`. A task
//! registers there if it has something to say about readiness (see
//! [`crate::readiness`]). The consumers are sources before the listener serves its
//! first answer; a task registers when it starts running, just after. A check that
//! must hold `/ready` at 503 from the very first probe is registered by the
//! application before the service runs.
//!
//! What the service does with a task:
//!
//! - **Start**: with the consumers, each task on its own tokio task.
//! - **Stop**: the task's [`TaskContext::shutdown`] completes at the moment the
//!   consumers are told to stop. From then on the task has the service's
//!   [`shutdown_timeout`](crate::ServiceBuilder::shutdown_timeout) to return; a task
//!   still running then is dropped (its future is not polled again) and the service
//!   logs it.
//! - **Failure**: a task returning an error stops the whole service gracefully, which
//!   then returns [`Error::Task`](crate::Error::Task) naming it (as a consumer that
//!   fails does).
//! - **Early end**: a task that returns `Ok` before the stop has finished its work;
//!   the service logs it and the consumers carry on.
//! - **Panic**: the others are stopped gracefully, then the panic is resumed.
//!
//! ```
//! use futures_util::future::BoxFuture;
//! use idem_amqp::readiness::SourceKind;
//! use idem_amqp::service::{HostedTask, TaskContext, TaskError};
//!
//! /// Refreshes a cache every minute; not ready until the first refresh is done.
//! struct CacheWarmer;
//!
//! impl HostedTask for CacheWarmer {
//!     fn name(&self) -> String {
//!         "cache-warmer".into()
//!     }
//!
//!     fn run(self: Box<Self>, ctx: TaskContext) -> BoxFuture<'static, Result<(), TaskError>> {
//!         Box::pin(async move {
//!             let warm = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
//!             let flag = warm.clone();
//!             let _ready = ctx.readiness().register(SourceKind::Other, "cache-warmer", move || {
//!                 match flag.load(std::sync::atomic::Ordering::SeqCst) {
//!                     true => Vec::new(),
//!                     false => vec!["cache not warmed up yet".into()],
//!                 }
//!             });
//!             let mut shutdown = std::pin::pin!(ctx.shutdown());
//!             loop {
//!                 // ... refresh the cache ...
//!                 warm.store(true, std::sync::atomic::Ordering::SeqCst);
//!                 tokio::select! {
//!                     _ = &mut shutdown => return Ok(()),
//!                     _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
//!                 }
//!             }
//!         })
//!     }
//! }
//! ```

use std::future::Future;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::readiness::Readiness;

/// Why a [`HostedTask`] failed: any error type.
pub type TaskError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Long-running work a [`Service`](crate::Service) runs beside its consumers and stops
/// with them. See the [module docs](self).
pub trait HostedTask: Send + 'static {
    /// The task's name: in the service's logs and in the
    /// [`Error::Task`](crate::Error::Task) that names it. Several tasks may share a name
    /// (two relays of one outbox table).
    fn name(&self) -> String;

    /// Runs the task until [`TaskContext::shutdown`] completes, then finishes the work
    /// under way and returns. An error stops the whole service.
    fn run(self: Box<Self>, ctx: TaskContext) -> BoxFuture<'static, Result<(), TaskError>>;
}

/// What a [`Service`](crate::Service) gives each of its tasks. Cloning gives another
/// handle on the same signal.
#[derive(Clone, Debug)]
pub struct TaskContext {
    stop: watch::Receiver<bool>,
    readiness: Readiness,
}

impl TaskContext {
    pub(crate) fn new(stop: watch::Receiver<bool>, readiness: Readiness) -> Self {
        TaskContext { stop, readiness }
    }

    /// Completes when the service stops (SIGTERM, its handle's shutdown, a consumer or
    /// task that failed); at once if it already has.
    pub fn shutdown(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stop = self.stop.clone();
        async move {
            // An error means the service itself is gone: stop as well.
            let _ = stop.wait_for(|s| *s).await;
        }
    }

    /// Whether the service has been asked to stop.
    pub fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// The readiness registry the service's listener serves at `/ready`
    /// ([`Readiness::global`]): where a task registers a readiness source.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }
}
