//! Handlers are plain async functions.
//!
//! Any `async fn` whose arguments all implement [`FromMessage`] and whose return value
//! implements [`IntoHandlerResult`] is a [`Handler`]. [`HandlerService`] turns one into
//! a `tower::Service<Message>`. To put tower's own middleware (concurrency limit, rate
//! limit, load shed) under a handler, give the layers to
//! [`ConsumerBuilder::layer`](crate::ConsumerBuilder::layer); see
//! [Tower layers under the handler](crate::consumer#tower-layers-under-the-handler).
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
//!     Json(order): Json<Order>,
//!     Attempt(attempt): Attempt, // extractors only read the message: any order works
//! ) -> Result<(), HandlerError> {
//!     println!("{key} attempt {attempt}: {} {} {}", order.id, order.cents, app.currency);
//!     Ok(())
//! }
//!
//! let service = HandlerService::new(handle, App { currency: "EUR" });
//! # let _ = service;
//! ```
//!
//! # Extractors
//!
//! Every extractor reads the message through a shared reference: none of them takes
//! anything out of it, so arguments can come in any order and several extractors can
//! read the same part (a [`Message`] and a [`Json`] of its body, a [`Message`] and the
//! SQL inbox's transaction). The body is [`Bytes`](bytes::Bytes), so the copies extractors make are
//! reference-counted, not copies of the payload. Your own types become extractors by
//! implementing [`FromMessage`] (the SQL inbox's `Tx` is one).
//!
//! ## Required and optional arguments
//!
//! A plain argument is required: if the extractor fails, the handler does not run and
//! the extractor's error decides the outcome (a JSON payload that does not decode is
//! permanent, for example).
//!
//! `Option<T>` is for a value that may legitimately be *absent*; it is not a way to
//! ignore a *broken* one. It is available only for the extractors that implement
//! [`OptionalFromMessage`], and each of them says what "absent" means:
//!
//! | argument | `None` when | still an error when |
//! |---|---|---|
//! | `Option<Body>` | the body is empty (0 bytes) | never |
//! | `Option<Json<T>>` | the body is empty (0 bytes) | the body is there and does not decode, or the content type is not JSON (permanent) |
//! | `Option<IdempotencyKey>` | the message carries no key | the key header has a type that cannot be a key, or the key is longer than [`MAX_KEY_LEN`](crate::dedup::MAX_KEY_LEN) (permanent) |
//!
//! [`Message`], [`Metadata`], [`Attempt`] and [`State`] are always there, so they have
//! no optional form (`Option<Attempt>` does not compile). To see a failure instead of
//! having it decide the outcome, take `Result<T, HandlerError>`: the handler then runs
//! with the extractor's error in hand.

mod extract;
mod shared;

pub use extract::{
    Attempt, Body, FromMessage, IdempotencyKey, Json, JsonRejection, Metadata, OptionalFromMessage,
    State,
};

use std::future::Future;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use crate::error::{HandlerError, IntoHandlerResult};
use crate::message::Message;

pub(crate) use crate::__private::BoxFuture;
pub(crate) use shared::SharedService;

/// An async function usable as a message handler.
///
/// Implemented for `async fn`s of up to eight arguments, each a [`FromMessage`]
/// extractor, returning `()` or `Result<(), E>` with `E: Into<HandlerError>` (see
/// [`IntoHandlerResult`]). `T` is a marker that keeps the implementations apart; `S` is
/// the shared state type given to [`State`].
///
/// When a function is not a handler, the compiler says so at the call that takes it
/// (`handler`, `handler_with_state`, [`HandlerService::new`]), but not which argument
/// or return type is at fault. Check each argument against [`FromMessage`] (an
/// `Option<T>` needs [`OptionalFromMessage`]) and the return type against
/// [`IntoHandlerResult`]. A function returning something else is refused:
///
/// ```compile_fail,E0277
/// use idem_core::Consumer;
///
/// async fn handle() -> u32 { 7 } // not a handler result
///
/// let _ = Consumer::builder("c").handler(handle);
/// ```
///
/// and so is an error type that is not a `std::error::Error` (`String` is not):
///
/// ```compile_fail,E0277
/// use idem_core::Consumer;
///
/// async fn handle() -> Result<(), String> { Err("no".into()) }
///
/// let _ = Consumer::builder("c").handler(handle);
/// ```
///
/// while the same function with a handler result is accepted:
///
/// ```
/// use idem_core::{Consumer, HandlerError};
///
/// async fn handle() -> Result<(), HandlerError> { Err(HandlerError::permanent("no")) }
///
/// let _ = Consumer::builder("c").handler(handle);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a valid idem handler",
    label = "not an idem handler",
    note = "a handler is an `async fn` (Clone + Send + Sync, with a Send future) of up to 8 arguments, each implementing `FromMessage` (`Option<T>` needs `T: OptionalFromMessage`), returning `()` or `Result<(), E>` with `E: Into<HandlerError>` (any `std::error::Error + Send + Sync + 'static`; a `String` is not one)"
)]
pub trait Handler<T, S>: Clone + Send + Sync + Sized + 'static {
    /// Runs the handler on a message.
    fn call(self, msg: Message, state: S) -> BoxFuture<Result<(), HandlerError>>;
}

/// What a handler's shared state must be: `Clone + Send + Sync + 'static`, since every
/// delivery gets a clone of it. Implemented for every such type; put a state that is
/// not `Clone` (a pool without cheap clones, a cache) in an `Arc`.
///
/// ```compile_fail,E0277
/// use idem_core::Consumer;
///
/// struct App { db: String } // not Clone
///
/// async fn handle() {}
///
/// let _ = Consumer::builder("c").handler_with_state(handle, App { db: "x".into() });
/// ```
///
/// ```
/// use idem_core::Consumer;
///
/// struct App { db: String }
///
/// async fn handle() {}
///
/// let _ = Consumer::builder("c").handler_with_state(handle, std::sync::Arc::new(App { db: "x".into() }));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler's state: it must be Clone + Send + Sync + 'static",
    label = "every delivery gets a clone of the state",
    note = "derive or implement `Clone`, or wrap the state in an `Arc`"
)]
pub trait HandlerState: Clone + Send + Sync + 'static {}

impl<S: Clone + Send + Sync + 'static> HandlerState for S {}

/// Implements a handler trait (`Handler`, or `BatchHandler` for batches) for the async
/// functions of the listed argument types: each argument is extracted from the input
/// with `$from::$extract` (a failure is the call's error), then the function runs.
macro_rules! impl_fn_handler {
    ($trait:ident, $input:ty, $from:ident :: $extract:ident; $($ty:ident),*) => {
        #[allow(non_snake_case, unused_mut, unused_variables)]
        impl<F, Fut, R, S, $($ty,)*> $trait<($($ty,)*), S> for F
        where
            F: FnOnce($($ty,)*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoHandlerResult,
            S: Send + Sync + 'static,
            $($ty: $from<S> + Send + 'static,)*
        {
            fn call(self, input: $input, state: S) -> BoxFuture<Result<(), HandlerError>> {
                $(
                    let $ty = match $ty::$extract(&input, &state) {
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
pub(crate) use impl_fn_handler;

macro_rules! impl_handler {
    ($($ty:ident),*) => {
        impl_fn_handler!(Handler, Message, FromMessage::from_message; $($ty),*);
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

impl<H, T, S> std::fmt::Debug for HandlerService<H, T, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerService")
            .field("handler", &std::any::type_name::<H>())
            .finish_non_exhaustive()
    }
}

impl<H, T, S> HandlerService<H, T, S>
where
    H: Handler<T, S>,
    S: HandlerState,
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
    S: HandlerState,
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
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

    #[derive(serde::Deserialize)]
    struct Order {
        cents: u64,
    }

    async fn whole_then_json(m: Message, Json(o): Json<Order>) -> Result<(), HandlerError> {
        assert_eq!(
            m.body, r#"{"cents":500}"#,
            "the Message extractor saw the body"
        );
        assert_eq!(o.cents, 500, "Json after Message still sees the body");
        Ok(())
    }

    async fn json_then_whole(Json(o): Json<Order>, m: Message) -> Result<(), HandlerError> {
        assert_eq!((o.cents, m.body.len()), (500, 13));
        Ok(())
    }

    async fn whole_then_key(m: Message, key: IdempotencyKey) -> Result<(), HandlerError> {
        assert_eq!(m.properties.message_id.as_deref(), Some("m-1"));
        assert_eq!(key.as_str(), "m-1", "the key after Message is still there");
        Ok(())
    }

    /// Stands for the SQL inbox's `Tx`: an extractor that reads a value a dedup stage
    /// put in the extensions, and fails if it is missing.
    #[derive(Clone)]
    struct Slot(Arc<AtomicUsize>);
    struct SlotArg(Arc<AtomicUsize>);
    impl<S> FromMessage<S> for SlotArg {
        fn from_message(msg: &Message, _state: &S) -> Result<Self, HandlerError> {
            msg.extensions
                .get::<Slot>()
                .map(|s| SlotArg(s.0.clone()))
                .ok_or_else(|| HandlerError::permanent("no slot"))
        }
    }

    async fn whole_then_slot(m: Message, SlotArg(n): SlotArg) -> Result<(), HandlerError> {
        assert!(
            m.extensions.get::<Slot>().is_some(),
            "Message keeps extensions"
        );
        n.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    #[tokio::test]
    async fn the_message_extractor_takes_nothing_from_the_others() {
        let msg = || {
            Message::new(r#"{"cents":500}"#)
                .with_content_type("application/json")
                .with_message_id("m-1")
        };
        HandlerService::new(whole_then_json, ())
            .oneshot(msg())
            .await
            .unwrap();
        HandlerService::new(json_then_whole, ())
            .oneshot(msg())
            .await
            .unwrap();
        HandlerService::new(whole_then_key, ())
            .oneshot(msg())
            .await
            .unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let mut m = msg();
        m.extensions.insert(Slot(n.clone()));
        HandlerService::new(whole_then_slot, ())
            .oneshot(m)
            .await
            .unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1, "the handler ran with its slot");
    }

    #[tokio::test]
    async fn message_before_json_through_a_consumer_is_processed_not_dead_lettered() {
        let consumer = crate::Consumer::builder("c")
            .store(crate::MemoryStore::new())
            .handler(whole_then_json)
            .unwrap();
        let m = Message::new(r#"{"cents":500}"#).with_message_id("m-1");
        assert_eq!(
            consumer.process(m).await,
            crate::Disposition::Ack { duplicate: false }
        );
        let consumer = crate::Consumer::builder("c2")
            .store(crate::MemoryStore::new())
            .handler(whole_then_key)
            .unwrap();
        let m = Message::new("x").with_message_id("m-1");
        assert_eq!(
            consumer.process(m).await,
            crate::Disposition::Ack { duplicate: false }
        );
    }

    #[tokio::test]
    async fn decode_failure_is_permanent() {
        let svc = HandlerService::new(decode, ());
        svc.clone().oneshot(Message::new("{}")).await.unwrap();
        let err = svc.oneshot(Message::new("{not json")).await.unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Permanent));
    }
}
