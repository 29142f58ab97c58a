//! Extractors: values a handler takes as arguments (documented in the parent module).

use std::ops::Deref;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::dedup::{DefaultKey, KeyExtractor, KeyTooLongError, MissingKeyError, MAX_KEY_LEN};
use crate::error::HandlerError;
use crate::message::{DeliveryInfo, Headers, Message, Properties};

/// A value a handler can take as an argument, built from the message.
///
/// Extractors read the message and never change it, so their order does not matter.
/// An extractor that fails decides whether the failure is transient or permanent.
///
/// A handler argument that is not an extractor is refused at compile time:
///
/// ```compile_fail,E0277
/// use idem_core::Consumer;
///
/// struct NotAnExtractor;
///
/// async fn handle(_x: NotAnExtractor) {}
///
/// let _ = Consumer::builder("c").handler(handle);
/// ```
///
/// Implementing the trait makes it one:
///
/// ```
/// use idem_core::{Consumer, FromMessage, HandlerError, Message};
///
/// struct Tenant(String);
///
/// impl<S> FromMessage<S> for Tenant {
///     fn from_message(msg: &Message, _state: &S) -> Result<Self, HandlerError> {
///         msg.header_str("tenant")
///             .map(|t| Tenant(t.to_owned()))
///             .ok_or_else(|| HandlerError::permanent("no tenant header"))
///     }
/// }
///
/// async fn handle(_x: Tenant) {}
///
/// let _ = Consumer::builder("c").handler(handle);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be extracted from a message",
    label = "not an idem extractor",
    note = "handler arguments must implement `FromMessage`: Message, Body, Json<T>, Metadata, IdempotencyKey, Attempt, State<S>, Option<T> of an optional extractor, Result<T, HandlerError>, or your own type"
)]
pub trait FromMessage<S>: Sized {
    /// Builds the value.
    fn from_message(msg: &Message, state: &S) -> Result<Self, HandlerError>;
}

/// An extractor whose value may be absent from a message, so that `Option<Self>` is an
/// extractor too.
///
/// `Ok(None)` means "absent" (no body, no key); a value that is there but broken is
/// still an `Err`. See the [module docs](crate::handler#required-and-optional-arguments) for
/// what each extractor counts as absent.
#[diagnostic::on_unimplemented(
    message = "`Option<{Self}>` is not an extractor: `{Self}` has no optional form",
    label = "`{Self}` is either always present or cannot be told absent from broken",
    note = "`Option<T>` needs `T: OptionalFromMessage` (Body, Json<T>, IdempotencyKey); to handle an extractor's failure yourself, take `Result<T, HandlerError>`"
)]
///
/// `Option` of an extractor that is always there, or that cannot tell "absent" from
/// "broken", does not compile:
///
/// ```compile_fail,E0277
/// use idem_core::{Attempt, Consumer};
///
/// async fn handle(_attempt: Option<Attempt>) {}
///
/// let _ = Consumer::builder("c").handler(handle);
/// ```
///
/// ```
/// use idem_core::{Attempt, Consumer, IdempotencyKey};
///
/// async fn handle(_attempt: Attempt, _key: Option<IdempotencyKey>) {}
///
/// let _ = Consumer::builder("c").handler(handle);
/// ```
pub trait OptionalFromMessage<S>: Sized {
    /// Builds the value, or `None` if the message does not carry one.
    fn from_message_optional(msg: &Message, state: &S) -> Result<Option<Self>, HandlerError>;
}

/// `Option<T>`: `None` where the value is absent; an error where it is broken.
impl<S, T: OptionalFromMessage<S>> FromMessage<S> for Option<T> {
    fn from_message(msg: &Message, state: &S) -> Result<Self, HandlerError> {
        T::from_message_optional(msg, state)
    }
}

/// `Result<T, HandlerError>`: the extractor's value or its error; the handler runs
/// either way and decides.
impl<S, T: FromMessage<S>> FromMessage<S> for Result<T, HandlerError> {
    fn from_message(msg: &Message, state: &S) -> Result<Self, HandlerError> {
        Ok(T::from_message(msg, state))
    }
}

/// The whole message (a clone: the body is shared, not copied). Other extractors can
/// come before or after it.
impl<S> FromMessage<S> for Message {
    fn from_message(msg: &Message, _state: &S) -> Result<Self, HandlerError> {
        Ok(msg.clone())
    }
}

/// The raw body.
///
/// `Option<Body>` is `None` for an empty body.
#[derive(Clone, Debug)]
pub struct Body(pub Bytes);

impl<S> FromMessage<S> for Body {
    fn from_message(msg: &Message, _state: &S) -> Result<Self, HandlerError> {
        // `Bytes` clones are reference-counted: no copy of the payload.
        Ok(Body(msg.body.clone()))
    }
}

impl<S> OptionalFromMessage<S> for Body {
    fn from_message_optional(msg: &Message, _state: &S) -> Result<Option<Self>, HandlerError> {
        Ok((!msg.body.is_empty()).then(|| Body(msg.body.clone())))
    }
}

/// Errors of the [`Json`] extractor. Always permanent: the payload will not change.
#[derive(Debug, thiserror::Error)]
pub enum JsonRejection {
    /// The content type is set and is not JSON.
    #[error("unsupported content type {0:?}, expected application/json")]
    ContentType(String),
    /// The body is not valid JSON for the target type.
    #[error("invalid JSON payload: {0}")]
    Decode(#[from] serde_json::Error),
}

/// A JSON body decoded with serde.
///
/// A message without a content type is accepted; one whose content type is set to
/// something other than `application/json` (or `*/*+json`) is rejected. Rejections are
/// permanent: the message goes to the dead-letter queue with the decode error.
///
/// `Option<Json<T>>` is `None` for an empty body (0 bytes); a body that is there and
/// does not decode is still a permanent error, as is a non-JSON content type.
#[derive(Clone, Debug)]
pub struct Json<T>(pub T);

impl<S, T: DeserializeOwned> FromMessage<S> for Json<T> {
    fn from_message(msg: &Message, _state: &S) -> Result<Self, HandlerError> {
        if let Some(ct) = msg.properties.content_type.as_deref() {
            let essence = ct.split(';').next().unwrap_or("").trim();
            if !(essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json")) {
                return Err(HandlerError::permanent(JsonRejection::ContentType(
                    ct.to_owned(),
                )));
            }
        }
        serde_json::from_slice(&msg.body)
            .map(Json)
            .map_err(|e| HandlerError::permanent(JsonRejection::Decode(e)))
    }
}

impl<S, T: DeserializeOwned> OptionalFromMessage<S> for Json<T> {
    fn from_message_optional(msg: &Message, state: &S) -> Result<Option<Self>, HandlerError> {
        if msg.body.is_empty() {
            return Ok(None);
        }
        <Self as FromMessage<S>>::from_message(msg, state).map(Some)
    }
}

impl<T> Deref for Json<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Properties, headers and delivery information of the message.
#[derive(Clone, Debug)]
pub struct Metadata {
    /// Basic properties.
    pub properties: Properties,
    /// Application headers.
    pub headers: Headers,
    /// Exchange, routing key, queue, attempt.
    pub delivery: DeliveryInfo,
}

impl<S> FromMessage<S> for Metadata {
    fn from_message(msg: &Message, _state: &S) -> Result<Self, HandlerError> {
        Ok(Metadata {
            properties: msg.properties.clone(),
            headers: msg.headers.clone(),
            delivery: msg.delivery.clone(),
        })
    }
}

pub use crate::dedup::key::IdempotencyKey;

impl<S> FromMessage<S> for IdempotencyKey {
    fn from_message(msg: &Message, state: &S) -> Result<Self, HandlerError> {
        <Self as OptionalFromMessage<S>>::from_message_optional(msg, state)?
            .ok_or_else(|| HandlerError::permanent(MissingKeyError))
    }
}

impl<S> OptionalFromMessage<S> for IdempotencyKey {
    fn from_message_optional(msg: &Message, _state: &S) -> Result<Option<Self>, HandlerError> {
        if let Some(k) = msg.extensions.get::<IdempotencyKey>() {
            return Ok(Some(k.clone()));
        }
        let Some(key) = DefaultKey
            .try_extract(msg)
            .map_err(HandlerError::permanent)?
        else {
            return Ok(None);
        };
        if key.len() > MAX_KEY_LEN {
            return Err(HandlerError::permanent(KeyTooLongError(key.len())));
        }
        Ok(Some(IdempotencyKey(key)))
    }
}

/// The attempt number: 1 on a first delivery, `n + 1` after `n` failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt(pub u32);

impl<S> FromMessage<S> for Attempt {
    fn from_message(msg: &Message, _state: &S) -> Result<Self, HandlerError> {
        Ok(Attempt(msg.delivery.attempt.max(1)))
    }
}

/// Shared application state (a clone of what the handler service was built with).
#[derive(Clone, Debug, Default)]
pub struct State<S>(pub S);

impl<S: Clone> FromMessage<S> for State<S> {
    fn from_message(_msg: &Message, state: &S) -> Result<Self, HandlerError> {
        Ok(State(state.clone()))
    }
}

impl<S> Deref for State<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn json(m: &Message) -> Result<Json<serde_json::Value>, HandlerError> {
        FromMessage::<()>::from_message(m, &())
    }

    fn opt<T: OptionalFromMessage<()>>(m: &Message) -> Result<Option<T>, HandlerError> {
        <Option<T> as FromMessage<()>>::from_message(m, &())
    }

    #[test]
    fn json_rejects_other_content_types_permanently() {
        let m = Message::new("{}").with_content_type("text/plain");
        let err = json(&m).unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Permanent));
        assert!(err.chain().contains("text/plain"));
        let m = Message::new("{}").with_content_type("application/vnd.x+json; charset=utf-8");
        assert!(json(&m).is_ok());
    }

    #[test]
    fn key_falls_back_to_header() {
        let key = |m: &Message| <IdempotencyKey as FromMessage<()>>::from_message(m, &());
        let m = Message::new("x").with_header("x-idempotency-key", "k1");
        assert_eq!(key(&m).unwrap().0, "k1");
        let m = Message::new("x")
            .with_message_id("id")
            .with_header("x-idempotency-key", "k1");
        assert_eq!(key(&m).unwrap().0, "id");
        let m = Message::new("x");
        let err = key(&m).unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Permanent));
    }

    #[test]
    fn optional_json_is_none_only_when_the_body_is_absent() {
        assert!(opt::<Json<serde_json::Value>>(&Message::new(""))
            .unwrap()
            .is_none());
        let some = opt::<Json<serde_json::Value>>(&Message::new("{\"a\":1}")).unwrap();
        assert_eq!(some.map(|j| j.0["a"].clone()), Some(serde_json::json!(1)));
        // A bad payload is broken, not absent: permanent, as without the Option.
        let err = opt::<Json<serde_json::Value>>(&Message::new("{not json")).unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Permanent));
        assert!(err.chain().contains("invalid JSON payload"), "{err}");
        let m = Message::new("{}").with_content_type("text/plain");
        let err = opt::<Json<serde_json::Value>>(&m).unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Permanent));
    }

    #[test]
    fn optional_key_is_none_without_a_key_and_an_error_when_broken() {
        assert_eq!(opt::<IdempotencyKey>(&Message::new("x")).unwrap(), None);
        // An empty header is no key.
        let m = Message::new("x").with_header("x-idempotency-key", "");
        assert_eq!(opt::<IdempotencyKey>(&m).unwrap(), None);
        let m = Message::new("x").with_message_id("id-1");
        assert_eq!(
            opt::<IdempotencyKey>(&m).unwrap(),
            Some(IdempotencyKey("id-1".into()))
        );
        // A key header of a wrong type is broken: permanent, naming the header.
        let m = Message::new("x").with_header("x-idempotency-key", true);
        let err = opt::<IdempotencyKey>(&m).unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Permanent));
        assert!(err.chain().contains("x-idempotency-key"), "{err}");
        // Too long: permanent too.
        let m = Message::new("x").with_message_id("k".repeat(MAX_KEY_LEN + 1));
        let err = opt::<IdempotencyKey>(&m).unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Permanent));
        // The key a dedup stage claimed wins.
        let mut m = Message::new("x");
        m.extensions.insert(IdempotencyKey("claimed".into()));
        assert_eq!(opt::<IdempotencyKey>(&m).unwrap().unwrap().0, "claimed");
    }

    #[test]
    fn optional_body_is_none_when_empty() {
        assert!(opt::<Body>(&Message::new("")).unwrap().is_none());
        assert_eq!(opt::<Body>(&Message::new("ab")).unwrap().unwrap().0, "ab");
    }

    #[test]
    fn result_hands_the_error_to_the_handler() {
        let m = Message::new("{not json");
        let r = <Result<Json<serde_json::Value>, HandlerError> as FromMessage<()>>::from_message(
            &m,
            &(),
        )
        .unwrap();
        assert_eq!(r.unwrap_err().kind(), Some(ErrorKind::Permanent));
    }

    #[test]
    fn extractors_leave_the_message_as_it_was() {
        let mut m = Message::new("{\"n\":1}")
            .with_message_id("m-1")
            .with_header("h", "v");
        m.extensions.insert(7u32);
        let before = format!("{m:?}");
        let whole = <Message as FromMessage<()>>::from_message(&m, &()).unwrap();
        assert_eq!(whole.body, m.body);
        assert_eq!(whole.extensions.get::<u32>(), Some(&7));
        let _ = json(&m).unwrap();
        let _ = <Metadata as FromMessage<()>>::from_message(&m, &()).unwrap();
        assert_eq!(format!("{m:?}"), before);
    }
}
