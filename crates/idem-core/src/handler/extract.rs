//! Extractors: values a handler takes as arguments.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::HandlerError;
use crate::message::{DeliveryInfo, Headers, Message, Properties};

/// A value a handler can take as an argument, built from the message.
///
/// Extractors run in argument order and may take parts out of the message (the body,
/// an extension); put the one that consumes the body last. An extractor that fails
/// decides whether the failure is transient or permanent.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be extracted from a message",
    note = "handler arguments must implement `FromMessage`: Body, Json<T>, Metadata, IdempotencyKey, Attempt, State<S>, Message, ..."
)]
pub trait FromMessage<S>: Sized {
    /// Builds the value.
    fn from_message(msg: &mut Message, state: &S) -> Result<Self, HandlerError>;
}

impl<S> FromMessage<S> for Message {
    fn from_message(msg: &mut Message, _state: &S) -> Result<Self, HandlerError> {
        Ok(std::mem::take(msg))
    }
}

/// The raw body.
#[derive(Clone, Debug)]
pub struct Body(pub Bytes);

impl<S> FromMessage<S> for Body {
    fn from_message(msg: &mut Message, _state: &S) -> Result<Self, HandlerError> {
        // `Bytes` clones are reference-counted: no copy of the payload.
        Ok(Body(msg.body.clone()))
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
#[derive(Clone, Debug)]
pub struct Json<T>(pub T);

impl<S, T: DeserializeOwned> FromMessage<S> for Json<T> {
    fn from_message(msg: &mut Message, _state: &S) -> Result<Self, HandlerError> {
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
    fn from_message(msg: &mut Message, _state: &S) -> Result<Self, HandlerError> {
        Ok(Metadata {
            properties: msg.properties.clone(),
            headers: msg.headers.clone(),
            delivery: msg.delivery.clone(),
        })
    }
}

/// The message's idempotence key.
///
/// Under the dedup layer it is the key the layer claimed (from the configured
/// extractor); without one, the `message_id` property, else the `x-idempotency-key`
/// header. A message with neither is rejected as permanent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(pub String);

impl IdempotencyKey {
    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<S> FromMessage<S> for IdempotencyKey {
    fn from_message(msg: &mut Message, _state: &S) -> Result<Self, HandlerError> {
        if let Some(k) = msg.extensions.get::<IdempotencyKey>() {
            return Ok(k.clone());
        }
        crate::dedup::DefaultKey::key_of(msg)
            .map(IdempotencyKey)
            .ok_or_else(|| HandlerError::permanent(crate::dedup::MissingKeyError))
    }
}

/// The attempt number: 1 on a first delivery, `n + 1` after `n` failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt(pub u32);

impl<S> FromMessage<S> for Attempt {
    fn from_message(msg: &mut Message, _state: &S) -> Result<Self, HandlerError> {
        Ok(Attempt(msg.delivery.attempt.max(1)))
    }
}

/// Shared application state (a clone of what the handler service was built with).
#[derive(Clone, Debug, Default)]
pub struct State<S>(pub S);

impl<S: Clone> FromMessage<S> for State<S> {
    fn from_message(_msg: &mut Message, state: &S) -> Result<Self, HandlerError> {
        Ok(State(state.clone()))
    }
}

impl<S> Deref for State<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0
    }
}

/// `Option<T>`: the extractor's value, or `None` where it fails.
impl<S, T: FromMessage<S>> FromMessage<S> for Option<T> {
    fn from_message(msg: &mut Message, state: &S) -> Result<Self, HandlerError> {
        Ok(T::from_message(msg, state).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn json_rejects_other_content_types_permanently() {
        let mut m = Message::new("{}").with_content_type("text/plain");
        let err = Json::<serde_json::Value>::from_message(&mut m, &()).unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Permanent));
        assert!(err.chain().contains("text/plain"));
        let mut m = Message::new("{}").with_content_type("application/vnd.x+json; charset=utf-8");
        assert!(Json::<serde_json::Value>::from_message(&mut m, &()).is_ok());
    }

    #[test]
    fn key_falls_back_to_header() {
        let mut m = Message::new("x").with_header("x-idempotency-key", "k1");
        assert_eq!(IdempotencyKey::from_message(&mut m, &()).unwrap().0, "k1");
        let mut m = Message::new("x")
            .with_message_id("id")
            .with_header("x-idempotency-key", "k1");
        assert_eq!(IdempotencyKey::from_message(&mut m, &()).unwrap().0, "id");
        let mut m = Message::new("x");
        let err = IdempotencyKey::from_message(&mut m, &()).unwrap_err();
        assert_eq!(err.kind(), Some(ErrorKind::Permanent));
    }
}
