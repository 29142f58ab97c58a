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
/// neither, so a consumer can be built outside a runtime.
pub(crate) struct SharedService<S> {
    inner: Arc<Mutex<S>>,
}

impl<S> SharedService<S> {
    pub(crate) fn new(service: S) -> Self {
        SharedService {
            inner: Arc::new(Mutex::new(service)),
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
                let mut service = inner.lock().await;
                service.ready().await.map_err(Into::into)?;
                service.call(msg)
            };
            response.await.map_err(Into::into)
        })
    }
}
