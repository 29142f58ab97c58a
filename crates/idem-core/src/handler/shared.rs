//! One service shared by every delivery of a consumer.

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Mutex;
use tower::{Service, ServiceExt};

use crate::__private::BoxFuture;
use crate::error::BoxError;
use crate::message::Message;

/// Shares one `tower::Service` between concurrent deliveries, for services that are
/// not `Clone` (tower's `RateLimit`, a `LoadShed` or `ConcurrencyLimit` over one, a
/// service with state of its own).
///
/// Each delivery waits for the service to be ready and calls it while holding a
/// fair (FIFO) lock, then releases the lock and awaits the response outside it. So
/// readiness is never claimed by one delivery and used by another (the contract of
/// `poll_ready`), deliveries take their turn in arrival order, and handlers still run
/// concurrently: the lock covers `poll_ready` + `call`, not the handler's work.
/// tower's `Buffer` does the same through a channel and a background task; this needs
/// neither.
/// The service is built on the first delivery, inside the runtime, so that layers that
/// need one at construction (tower's `RateLimit` creates a timer) can be given to a
/// builder that runs outside it.
pub(crate) struct SharedService<S> {
    inner: Arc<Mutex<Slot<S>>>,
}

enum Slot<S> {
    Unbuilt(Box<dyn FnOnce() -> S + Send>),
    Built(S),
    /// Only while the builder runs; a panicking builder leaves it here.
    Poisoned,
}

impl<S> SharedService<S> {
    /// Shares the service `build` returns, built on the first delivery.
    pub(crate) fn lazy(build: impl FnOnce() -> S + Send + 'static) -> Self {
        SharedService {
            inner: Arc::new(Mutex::new(Slot::Unbuilt(Box::new(build)))),
        }
    }
}

impl<S> Clone for SharedService<S> {
    fn clone(&self) -> Self {
        SharedService {
            inner: self.inner.clone(),
        }
    }
}

/// The shared service's builder panicked on an earlier delivery.
#[derive(Debug, thiserror::Error)]
#[error("the handler's tower layers could not be built (a layer panicked on an earlier delivery)")]
struct Unbuildable;

impl<S> Service<Message> for SharedService<S>
where
    S: Service<Message, Response = ()> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is waited for in the call, under the lock.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let response = {
                let mut slot = inner.lock().await;
                if let Slot::Unbuilt(_) = &*slot {
                    if let Slot::Unbuilt(build) = std::mem::replace(&mut *slot, Slot::Poisoned) {
                        *slot = Slot::Built(build());
                    }
                }
                let Slot::Built(service) = &mut *slot else {
                    return Err(Box::new(Unbuildable) as BoxError);
                };
                service.ready().await.map_err(Into::into)?;
                service.call(msg)
            };
            response.await.map_err(Into::into)
        })
    }
}
