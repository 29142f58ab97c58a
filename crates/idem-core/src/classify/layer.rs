use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use tower::{Layer, Service};

use super::{resolve, Classify, DefaultClassifier};
use crate::error::{BoxError, HandlerError};
use crate::handler::BoxFuture;
use crate::message::Message;

/// A handler panicked. Transient: the panic may come from a passing condition.
#[derive(Debug, thiserror::Error)]
#[error("handler panicked: {0}")]
pub struct PanicError(pub String);

/// Layer that gives every handler error a definite kind and turns panics into
/// transient errors. See the [module docs](super).
#[derive(Clone)]
pub struct ClassifyLayer {
    policy: Arc<dyn Classify>,
}

impl std::fmt::Debug for ClassifyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The policy is a trait object with no `Debug` of its own.
        f.debug_struct("ClassifyLayer").finish_non_exhaustive()
    }
}

impl Default for ClassifyLayer {
    fn default() -> Self {
        ClassifyLayer::new(DefaultClassifier)
    }
}

impl ClassifyLayer {
    /// A layer with a custom policy; errors it returns `None` for use the default.
    pub fn new(policy: impl Classify) -> Self {
        ClassifyLayer {
            policy: Arc::new(policy),
        }
    }

    /// The policy, for the batch runner (which classifies per message).
    pub(crate) fn policy(&self) -> Arc<dyn Classify> {
        self.policy.clone()
    }
}

impl<S> Layer<S> for ClassifyLayer {
    type Service = ClassifyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ClassifyService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Service produced by [`ClassifyLayer`].
#[derive(Clone)]
pub struct ClassifyService<S> {
    inner: S,
    policy: Arc<dyn Classify>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for ClassifyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassifyService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Service<Message> for ClassifyService<S>
where
    S: Service<Message, Response = ()>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = BoxFuture<Result<(), HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| self.classify(HandlerError::unclassified(e.into())))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        // A panic while *building* the future (inside an extractor) is caught too.
        let fut = std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(msg)));
        let policy = self.policy.clone();
        Box::pin(async move {
            let result = match fut {
                Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
                Err(panic) => Err(panic),
            };
            let err = match result {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => HandlerError::unclassified(e.into()),
                Err(panic) => HandlerError::transient(PanicError(panic_message(&*panic))),
            };
            Err(err.classify_with(|e| resolve(policy.as_ref(), e)))
        })
    }
}

impl<S> ClassifyService<S> {
    fn classify(&self, err: HandlerError) -> HandlerError {
        err.classify_with(|e| resolve(self.policy.as_ref(), e))
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::handler::{Handler, HandlerService};
    use std::time::Duration;
    use tower::{ServiceBuilder, ServiceExt};

    async fn panics() {
        panic!("boom");
    }
    async fn slow() {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    async fn io_err() -> Result<(), std::io::Error> {
        Err(std::io::Error::other("db down"))
    }

    /// The error one message fails with when `handler` runs under the default layer.
    async fn default_failure<H: Handler<T, ()>, T>(handler: H) -> HandlerError {
        let svc = ClassifyLayer::default().layer(HandlerService::new(handler, ()));
        svc.oneshot(Message::new("")).await.unwrap_err()
    }

    #[tokio::test]
    async fn panic_is_transient_with_message() {
        let err = default_failure(panics).await;
        assert_eq!(err.kind(), Some(ErrorKind::Transient));
        assert_eq!(err.chain(), "handler panicked: boom");
    }

    #[tokio::test(start_paused = true)]
    async fn tower_timeout_below_is_transient() {
        let svc = ServiceBuilder::new()
            .layer(ClassifyLayer::default())
            .timeout(Duration::from_millis(10))
            .service(HandlerService::new(slow, ()));
        let err = svc.oneshot(Message::new("")).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Transient));
    }

    #[tokio::test]
    async fn unknown_errors_default_to_transient() {
        let err = default_failure(io_err).await;
        assert_eq!(err.kind(), Some(ErrorKind::Transient));
        assert_eq!(err.chain(), "db down");
    }
}
