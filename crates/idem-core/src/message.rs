//! The transport-neutral message a handler sees.
//!
//! Every transport (the in-memory broker, RabbitMQ) turns its deliveries into a
//! [`Message`]: body, AMQP-style properties, headers, where it came from and which
//! attempt this is. Middleware passes per-delivery values to handlers through
//! [`Extensions`] (the dedup layer puts the [`IdempotencyKey`](crate::IdempotencyKey)
//! there, the SQL inbox its transaction); the consumer and its dedup stage share the
//! delivery's [`DeliveryContext`](crate::consumer::DeliveryContext).

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

pub use crate::headers::ATTEMPTS as ATTEMPTS_HEADER;
pub use crate::headers::IDEMPOTENCY_KEY as IDEMPOTENCY_KEY_HEADER;

/// A header value. AMQP field tables hold more types; transports map the ones idem
/// reads to these and keep the original frame for re-publishing, so nothing is lost.
#[derive(Clone, Debug, PartialEq)]
pub enum HeaderValue {
    /// A UTF-8 string.
    String(String),
    /// A signed integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// Raw bytes (also used for strings that are not UTF-8).
    Bytes(Vec<u8>),
}

impl HeaderValue {
    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an integer, if it is one (or a string holding one).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            HeaderValue::Int(i) => Some(*i),
            HeaderValue::String(s) => s.parse().ok(),
            _ => None,
        }
    }
}

impl fmt::Display for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderValue::String(s) => f.write_str(s),
            HeaderValue::Int(i) => write!(f, "{i}"),
            HeaderValue::Bool(b) => write!(f, "{b}"),
            HeaderValue::Bytes(b) => write!(f, "<{} bytes>", b.len()),
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(v: &str) -> Self {
        HeaderValue::String(v.to_owned())
    }
}
impl From<String> for HeaderValue {
    fn from(v: String) -> Self {
        HeaderValue::String(v)
    }
}
impl From<i64> for HeaderValue {
    fn from(v: i64) -> Self {
        HeaderValue::Int(v)
    }
}
impl From<u32> for HeaderValue {
    fn from(v: u32) -> Self {
        HeaderValue::Int(i64::from(v))
    }
}
impl From<bool> for HeaderValue {
    fn from(v: bool) -> Self {
        HeaderValue::Bool(v)
    }
}

/// Message headers, ordered by name so that their encoding is deterministic.
pub type Headers = BTreeMap<String, HeaderValue>;

/// Headers a transport received with a type that no [`HeaderValue`] variant holds as
/// such (an AMQP float, decimal, timestamp, field table, array or void), by name, with
/// a description of that type (`a float`, `a field table`). Those with a flat form are
/// also in [`Message::headers`] as text or integer; the others are only named here.
/// The RabbitMQ transport puts this in [`Message::extensions`] when there are any, so
/// that an error about such a header (an idempotency key of the wrong type) names its
/// real type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnmappedHeaders(pub BTreeMap<String, &'static str>);

/// AMQP basic properties idem reads or sets. Transports keep the rest untouched.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Properties {
    /// The producer's message id; idem's default idempotency key.
    pub message_id: Option<String>,
    /// MIME type of the body, e.g. `application/json`.
    pub content_type: Option<String>,
    /// Correlation id, passed through untouched.
    pub correlation_id: Option<String>,
    /// Producer timestamp.
    pub timestamp: Option<SystemTime>,
    /// Application-defined message type, passed through untouched.
    pub kind: Option<String>,
}

/// Where a delivery came from and which attempt it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeliveryInfo {
    /// Exchange the message was published to (`""` for the default exchange).
    pub exchange: String,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Queue it was consumed from.
    pub queue: String,
    /// Whether the broker flagged it as redelivered.
    pub redelivered: bool,
    /// 1 for a first delivery, `n + 1` after `n` failed attempts (from [`ATTEMPTS_HEADER`],
    /// as the delivery's [context](crate::consumer::DeliveryContext::attempt) read it;
    /// set by the transport and by [`Consumer::process`](crate::Consumer::process)).
    pub attempt: u32,
    /// How many times the broker delivered this very message before, when the broker
    /// counts (RabbitMQ quorum queues: `x-delivery-count`, mapped by the transport);
    /// 0 when it does not, and for a first delivery. The crash guard reads it
    /// ([`crash::prior_deliveries`](crate::crash::prior_deliveries)); without a count,
    /// [`redelivered`](Self::redelivered) stands for one earlier delivery.
    pub delivery_count: u32,
}

/// A message as a handler and the middleware see it.
#[derive(Clone, Debug, Default)]
pub struct Message {
    /// The payload.
    pub body: Bytes,
    /// Basic properties.
    pub properties: Properties,
    /// Application headers.
    pub headers: Headers,
    /// Delivery information filled in by the transport.
    pub delivery: DeliveryInfo,
    /// Per-delivery values set by middleware (not transmitted).
    pub extensions: Extensions,
    /// What the delivery carries through the consumer (not transmitted): its attempt
    /// numbers, read once, the consumer's crash guard, the key the dedup stage
    /// resolved. Set by the transport and the consumer; see
    /// [`DeliveryContext`](crate::consumer::DeliveryContext).
    pub context: crate::consumer::DeliveryContext,
}

impl Message {
    /// A message with this body, attempt 1 and nothing else set.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Message {
            body: body.into(),
            delivery: DeliveryInfo {
                attempt: 1,
                ..DeliveryInfo::default()
            },
            ..Message::default()
        }
    }

    /// Sets the AMQP `message_id` (idem's default idempotency key).
    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.properties.message_id = Some(id.into());
        self
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.properties.content_type = Some(content_type.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// A header value as a string, if present and a string.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(HeaderValue::as_str)
    }
}

/// A type map for per-delivery values, like `http::Extensions`.
#[derive(Clone, Default)]
pub struct Extensions {
    map: Option<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl Extensions {
    /// Stores a value, replacing any previous value of the same type.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        self.map
            .get_or_insert_with(HashMap::new)
            .insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The value of type `T`, if one was stored.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.map
            .as_ref()?
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
    }

    /// Removes and returns the value of type `T`, if one was stored and is not shared.
    pub fn remove<T: Any + Send + Sync>(&mut self) -> Option<T> {
        let value = self.map.as_mut()?.remove(&TypeId::of::<T>())?;
        Arc::downcast::<T>(value)
            .ok()
            .and_then(|arc| Arc::try_unwrap(arc).ok())
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("len", &self.map.as_ref().map_or(0, HashMap::len))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_round_trip() {
        let mut ext = Extensions::default();
        assert!(ext.get::<u32>().is_none());
        ext.insert(7u32);
        ext.insert(String::from("x"));
        assert_eq!(ext.get::<u32>(), Some(&7));
        assert_eq!(ext.remove::<String>().as_deref(), Some("x"));
        assert!(ext.get::<String>().is_none());
    }

    #[test]
    fn failed_attempts_reads_header() {
        let m = Message::new("x");
        assert_eq!(m.failed_attempts(), 0);
        let m = m.with_header(ATTEMPTS_HEADER, 3u32);
        assert_eq!(m.failed_attempts(), 3);
        let m = Message::new("x").with_header(ATTEMPTS_HEADER, "garbage");
        assert_eq!(m.failed_attempts(), 0);
        // The cases of issue 11: a huge count saturates instead of reading as 0.
        for (value, want) in [
            (HeaderValue::Int(1_000_000_000), 1_000_000_000),
            ("1000000000".into(), 1_000_000_000),
            (HeaderValue::Int(1 << 40), u32::MAX),
            (HeaderValue::Int(-1), 0),
            ("abc".into(), 0),
        ] {
            let m = Message::new("x").with_header(ATTEMPTS_HEADER, value.clone());
            assert_eq!(m.failed_attempts(), want, "{value:?}");
        }
    }
}
