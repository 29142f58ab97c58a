//! Handlers are plain async functions.
//!
//! Any `async fn` whose arguments all implement [`FromMessage`] and whose return value
//! implements [`IntoHandlerResult`] is a [`Handler`]. [`HandlerService`] turns one into
//! a `tower::Service<Message>`, so tower's own layers (timeout, concurrency limit, rate
//! limit, load shed) stack on it.
//!
//! ```
//! use idem_core::{Attempt, HandlerError, HandlerService, IdempotencyKey, Json, State};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: String, cents: u64 }
//!
//! #[derive(Clone)]
//! struct App { currency: &'static str }
//!
//! async fn handle(
//!     State(app): State<App>,
//!     key: IdempotencyKey,
//!     Attempt(attempt): Attempt,
//!     Json(order): Json<Order>, // the body-consuming extractor goes last
//! ) -> Result<(), HandlerError> {
//!     println!("{key} attempt {attempt}: {} {} {}", order.id, order.cents, app.currency);
//!     Ok(())
//! }
//!
//! let service = HandlerService::new(handle, App { currency: "EUR" });
//! # let _ = service;
//! ```

mod extract;

pub use extract::{
    Attempt, Body, FromMessage, IdempotencyKey, Json, JsonRejection, Metadata, State,
};

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::{HandlerError, IntoHandlerResult};
use crate::message::Message;

/// A boxed future, as returned by [`Handler::call`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An async function usable as a message handler.
///
/// Implemented for `async fn`s of up to eight arguments, each a [`FromMessage`]
/// extractor. `T` is a marker that keeps the implementations apart; `S` is the shared
/// state type given to [`State`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a valid idem handler",
    note = "a handler is an `async fn` whose arguments all implement `FromMessage` and that returns `()` or `Result<(), E>` with `E: Into<HandlerError>`"
)]
pub trait Handler<T, S>: Clone + Send + Sync + Sized + 'static {
    /// Runs the handler on a message.
    fn call(self, msg: Message, state: S) -> BoxFuture<Result<(), HandlerError>>;
}

macro_rules! impl_handler {
    ($($ty:ident),*) => {
        #[allow(non_snake_case, unused_mut, unused_variables)]
        impl<F, Fut, R, S, $($ty,)*> Handler<($($ty,)*), S> for F
        where
            F: FnOnce($($ty,)*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoHandlerResult,
            S: Send + Sync + 'static,
            $($ty: FromMessage<S> + Send + 'static,)*
        {
            fn call(self, mut msg: Message, state: S) -> BoxFuture<Result<(), HandlerError>> {
                $(
                    let $ty = match $ty::from_message(&mut msg, &state) {
                        Ok(v) => v,
                        Err(e) => return Box::pin(std::future::ready(Err(e))),
                    };
                )*
                let fut = self($($ty,)*);
                Box::pin(async move { fut.await.into_handler_result() })
            }
        }
    };
}

impl_handler!();
impl_handler!(T1);
impl_handler!(T1, T2);
impl_handler!(T1, T2, T3);
impl_handler!(T1, T2, T3, T4);
impl_handler!(T1, T2, T3, T4, T5);
impl_handler!(T1, T2, T3, T4, T5, T6);
impl_handler!(T1, T2, T3, T4, T5, T6, T7);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8);

/// A [`Handler`] with its state, as a `tower::Service<Message>`.
pub struct HandlerService<H, T, S> {
    handler: H,
    state: S,
    _marker: PhantomData<fn() -> T>,
}

impl<H, T, S> HandlerService<H, T, S>
where
    H: Handler<T, S>,
    S: Clone + Send + Sync + 'static,
{
    /// Wraps a handler and the state its [`State`] extractor reads.
    pub fn new(handler: H, state: S) -> Self {
        HandlerService {
            handler,
            state,
            _marker: PhantomData,
        }
    }
}

impl<H: Clone, T, S: Clone> Clone for HandlerService<H, T, S> {
    fn clone(&self) -> Self {
        HandlerService {
            handler: self.handler.clone(),
            state: self.state.clone(),
            _marker: PhantomData,
        }
    }
}

impl<H, T, S> tower::Service<Message> for HandlerService<H, T, S>
where
    H: Handler<T, S>,
    S: Clone + Send + Sync + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = BoxFuture<Result<(), HandlerError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        self.handler.clone().call(msg, self.state.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use tower::ServiceExt;

    async fn zero() {}
    async fn fails(Body(b): Body) -> Result<(), std::io::Error> {
        Err(std::io::Error::other(format!("{} bytes", b.len())))
    }
    async fn decode(Json(v): Json<serde_json::Value>) -> Result<(), HandlerError> {
        assert!(v.is_object());
        Ok(())
    }

    #[tokio::test]
    async fn async_fns_become_services() {
        HandlerService::new(zero, ())
            .oneshot(Message::new("x"))
            .await
            .unwrap();
        let err = HandlerService::new(fails, ())
            .oneshot(Message::new("abc"))
            .await
            .unwrap_err();
        assert_eq!(err.chain(), "3 bytes");
        assert_eq!(err.kind(), None, "left to the classifier");
    }

    #[tokio::test]
    async fn decode_failure_is_permanent() {
        let svc = HandlerService::new(decode, ());
        svc.clone().oneshot(Message::new("{}")).await.unwrap();
        let err = svc.oneshot(Message::new("{not json")).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Permanent));
    }
}
