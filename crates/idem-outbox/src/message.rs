use std::time::{Duration, SystemTime};

use idem_core::{HeaderValue, Headers};

use crate::error::OutboxError;
use uuid::Uuid;

/// A message to publish through the outbox.
#[derive(Clone, Debug)]
pub struct OutboxMessage {
    pub(crate) id: Uuid,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) body: Vec<u8>,
    pub(crate) content_type: Option<String>,
    pub(crate) headers: Headers,
    pub(crate) ordering_key: Option<String>,
    pub(crate) not_before: Option<NotBefore>,
}

/// When a delayed row becomes due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotBefore {
    /// At this wall-clock time.
    At(SystemTime),
    /// This long after the enqueuing transaction began (the database's `now()`).
    After(Duration),
}

impl OutboxMessage {
    /// A message for `exchange` (`""` is the default exchange) and `routing_key`, with a
    /// fresh UUIDv7 idempotency key (its AMQP `message_id`).
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        body: impl Into<Vec<u8>>,
    ) -> Self {
        OutboxMessage {
            id: Uuid::now_v7(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: body.into(),
            content_type: None,
            headers: Headers::new(),
            ordering_key: None,
            not_before: None,
        }
    }

    /// A JSON message (`content_type: application/json`).
    pub fn json<T: serde::Serialize + ?Sized>(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        value: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::new(exchange, routing_key, serde_json::to_vec(value)?)
            .content_type("application/json"))
    }

    /// Sets the content type.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds a header. The outbox stores strings, integers and booleans; a byte-string
    /// value, or a name longer than AMQP allows (255 bytes, the rule of
    /// [`idem_amqp::headers`]), makes [`Outbox::enqueue`](crate::Outbox::enqueue) fail
    /// with [`OutboxError::InvalidMessage`](crate::OutboxError::InvalidMessage): a
    /// header is never dropped on the way.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Messages with the same ordering key are published in the order their enqueuing
    /// transactions committed: [`Outbox::enqueue`](crate::Outbox::enqueue) makes a
    /// transaction that enqueues a key wait for any other open transaction that already
    /// enqueued it.
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Replaces the idempotency key (by default a fresh UUIDv7). Use a key derived
    /// from your own data when the same logical message may be enqueued again by a
    /// re-run of the same work: the outbox table's unique `message_id` then refuses the
    /// second row, and a consumer's dedup absorbs a second publish. Follow-ups of an
    /// inbox handler get theirs from
    /// [`Outbox::enqueue_follow_up`](crate::Outbox::enqueue_follow_up).
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Publish no earlier than `time` (the row's `available_at`). The relay leaves the
    /// row alone until then and publishes it on its first round after that time (its
    /// poll interval bounds the lateness). A time in the past means "now". The row
    /// counts as pending meanwhile; the outbox lag counts from `time`, not from the
    /// enqueue. A delayed row with an [ordering key](Self::ordering_key) holds back the
    /// later rows of its key until it is published.
    pub fn not_before(mut self, time: SystemTime) -> Self {
        self.not_before = Some(NotBefore::At(time));
        self
    }

    /// Publish no earlier than `delay` after the enqueuing transaction began (the
    /// database clock, so worker clocks do not matter). Otherwise as
    /// [`not_before`](Self::not_before).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.not_before = Some(NotBefore::After(delay));
        self
    }

    /// The idempotency key (becomes the AMQP `message_id`).
    pub fn id(&self) -> Uuid {
        self.id
    }
}

/// Refuses what the relay could not publish as given: a header name or content type
/// over the AMQP limits ([`idem_amqp::headers`]), a byte-string header (not storable).
pub(crate) fn check_publishable(msg: &OutboxMessage) -> Result<(), OutboxError> {
    idem_amqp::headers::check(&msg.headers)
        .map_err(|e| OutboxError::InvalidMessage(e.to_string()))?;
    if let Some((name, _)) = msg
        .headers
        .iter()
        .find(|(_, v)| matches!(v, HeaderValue::Bytes(_)))
    {
        return Err(OutboxError::InvalidMessage(format!(
            "header {name:?} holds bytes: the outbox stores string, integer and boolean headers"
        )));
    }
    if msg.content_type.as_ref().is_some_and(|c| c.len() > 255) {
        return Err(OutboxError::InvalidMessage(
            "content type is limited to 255 bytes by AMQP".into(),
        ));
    }
    Ok(())
}

pub(crate) fn headers_to_json(headers: &Headers) -> String {
    let map: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .filter_map(|(k, v)| {
            let v = match v {
                HeaderValue::String(s) => serde_json::Value::from(s.clone()),
                HeaderValue::Int(i) => serde_json::Value::from(*i),
                HeaderValue::Bool(b) => serde_json::Value::from(*b),
                HeaderValue::Bytes(_) => return None,
            };
            Some((k.clone(), v))
        })
        .collect();
    serde_json::Value::Object(map).to_string()
}

pub(crate) fn headers_from_json(text: &str) -> Headers {
    let mut out = Headers::new();
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(text) {
        for (k, v) in map {
            let v = match v {
                serde_json::Value::String(s) => HeaderValue::String(s),
                serde_json::Value::Bool(b) => HeaderValue::Bool(b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => HeaderValue::Int(i),
                    None => HeaderValue::String(n.to_string()),
                },
                _ => continue,
            };
            out.insert(k, v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_ids_are_v7() {
        let m = OutboxMessage::new("", "q", b"x".to_vec())
            .header("a", "b")
            .header("n", 3i64)
            .header("t", true);
        assert_eq!(headers_from_json(&headers_to_json(&m.headers)), m.headers);
        assert_eq!(m.id().get_version_num(), 7);
        assert!(
            OutboxMessage::new("", "q", vec![]).id() > m.id(),
            "v7 ids grow"
        );
    }
}
