use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::message::{HeaderValue, Message, UnmappedHeaders, IDEMPOTENCY_KEY_HEADER};

/// The message's idempotency key.
///
/// Under a dedup stage it is the key the stage claimed (from its configured key
/// extractor and missing-key policy). Without one, it is read by the default rule: the
/// `message_id` property, else the `x-idempotency-key` header (see
/// [`DefaultKey`](crate::dedup::DefaultKey)).
///
/// As a required argument, a message without a key is rejected as permanent. As
/// `Option<IdempotencyKey>`, a message without a key gives `None`; a key header of a
/// type that cannot be a key, or a key longer than
/// [`MAX_KEY_LEN`](crate::dedup::MAX_KEY_LEN), is a permanent error either way.
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

/// Longest accepted idempotency key, in bytes. A longer key is a content error.
pub const MAX_KEY_LEN: usize = 512;

/// Where the idempotency key comes from.
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key, or `None` if the message has none.
    fn extract(&self, msg: &Message) -> Option<String>;

    /// Like [`extract`](KeyExtractor::extract), but says when the key's source is
    /// there with a value that cannot be a key, so the error names it instead of
    /// calling the key missing. The default calls `extract`.
    fn try_extract(&self, msg: &Message) -> Result<Option<String>, KeyTypeError> {
        Ok(self.extract(msg))
    }
}

impl<F> KeyExtractor for F
where
    F: Fn(&Message) -> Option<String> + Send + Sync + 'static,
{
    fn extract(&self, msg: &Message) -> Option<String> {
        self(msg)
    }
}

/// The default: the AMQP `message_id` property, else the `x-idempotency-key` header
/// (a string, or an integer as its decimal text; see
/// [`IDEMPOTENCY_KEY_HEADER`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultKey;

impl DefaultKey {
    /// The default key of a message (`None` also when the header has a wrong type;
    /// [`KeyExtractor::try_extract`] says which).
    pub fn key_of(msg: &Message) -> Option<String> {
        Self::try_key_of(msg).ok().flatten()
    }

    fn try_key_of(msg: &Message) -> Result<Option<String>, KeyTypeError> {
        match msg.properties.message_id.as_deref() {
            Some(id) if !id.is_empty() => Ok(Some(id.to_owned())),
            _ => header_key(msg, IDEMPOTENCY_KEY_HEADER),
        }
    }
}

impl KeyExtractor for DefaultKey {
    fn extract(&self, msg: &Message) -> Option<String> {
        DefaultKey::key_of(msg)
    }
    fn try_extract(&self, msg: &Message) -> Result<Option<String>, KeyTypeError> {
        DefaultKey::try_key_of(msg)
    }
}

/// The key from a named header: a non-empty string as is, an integer (any AMQP width,
/// signed or unsigned) as its decimal text. An empty string or no header is no key;
/// any other type is a [`KeyTypeError`].
#[derive(Clone, Debug)]
pub struct HeaderKey(pub Arc<str>);

impl HeaderKey {
    /// Reads header `name`.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        HeaderKey(name.into())
    }
}

impl KeyExtractor for HeaderKey {
    fn extract(&self, msg: &Message) -> Option<String> {
        header_key(msg, &self.0).ok().flatten()
    }
    fn try_extract(&self, msg: &Message) -> Result<Option<String>, KeyTypeError> {
        header_key(msg, &self.0)
    }
}

/// The key in header `name`, by the rule of [`HeaderKey`].
fn header_key(msg: &Message, name: &str) -> Result<Option<String>, KeyTypeError> {
    let wrong = |found: String| KeyTypeError {
        header: name.to_owned(),
        found,
    };
    // A type the transport could not carry as such (float, table...) wins over the
    // flat form it may have left in the headers.
    let unmapped = msg.extensions.get::<UnmappedHeaders>();
    if let Some(amqp_type) = unmapped.and_then(|u| u.0.get(name)) {
        return Err(wrong((*amqp_type).to_owned()));
    }
    match msg.headers.get(name) {
        None => Ok(None),
        Some(HeaderValue::String(s)) if s.is_empty() => Ok(None),
        Some(HeaderValue::String(s)) => Ok(Some(s.clone())),
        Some(HeaderValue::Int(i)) => Ok(Some(i.to_string())),
        Some(HeaderValue::Bool(b)) => Err(wrong(format!("a boolean ({b})"))),
        Some(HeaderValue::Bytes(b)) => Err(wrong(format!(
            "{} bytes of binary data, not UTF-8 text",
            b.len()
        ))),
    }
}

/// The idempotency-key header is there, but its value cannot be a key (a boolean,
/// binary data, a float, a table...). Permanent, whatever the [`MissingKey`] policy:
/// the producer meant to set a key, and hashing the body instead could merge messages
/// it meant to keep apart.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "idempotency-key header {header} holds {found}; a key must be a non-empty string or an integer"
)]
pub struct KeyTypeError {
    /// The header name.
    pub header: String,
    /// What it holds, e.g. `a boolean (true)` or `a field table`.
    pub found: String,
}

/// The key from a field of a JSON body, by JSON pointer (`/order/id`). Strings and
/// numbers are accepted.
#[derive(Clone, Debug)]
pub struct JsonFieldKey(pub Arc<str>);

impl JsonFieldKey {
    /// Reads the field at `pointer` (RFC 6901, e.g. `/order_id`).
    pub fn new(pointer: impl Into<Arc<str>>) -> Self {
        JsonFieldKey(pointer.into())
    }
}

impl KeyExtractor for JsonFieldKey {
    fn extract(&self, msg: &Message) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&msg.body).ok()?;
        match v.pointer(&self.0)? {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// What to do with a message that has no idempotency key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MissingKey {
    /// Dead-letter it at once (the default): without a key, dedup is impossible.
    #[default]
    Poison,
    /// Use `sha256:<hex>` of the body. Two different messages with equal bodies are
    /// then treated as duplicates: choose this only where that is right.
    ContentHash,
}

/// The message has no idempotency key. Permanent.
#[derive(Debug, thiserror::Error)]
#[error("message has no idempotency key (no message_id property, no x-idempotency-key header, and no custom key)")]
pub struct MissingKeyError;

/// The idempotency key is longer than [`MAX_KEY_LEN`]. Permanent.
#[derive(Debug, thiserror::Error)]
#[error("idempotency key is {0} bytes long, the limit is {MAX_KEY_LEN}")]
pub struct KeyTooLongError(pub usize);

/// The idempotency key of `msg`: from `extractor`, else per the `missing` policy.
/// Missing (under [`MissingKey::Poison`]), wrongly typed ([`KeyTypeError`]) and
/// oversized keys are permanent errors. Shared by every dedup stage so
/// they agree on what the key of a message is.
pub(crate) fn resolve_key(
    extractor: &dyn KeyExtractor,
    missing: MissingKey,
    msg: &Message,
) -> Result<String, crate::HandlerError> {
    let found = extractor
        .try_extract(msg)
        .map_err(crate::HandlerError::permanent)?;
    let key = match found {
        Some(k) => k,
        None => match missing {
            MissingKey::Poison => return Err(crate::HandlerError::permanent(MissingKeyError)),
            MissingKey::ContentHash => format!("sha256:{}", sha256_hex(&msg.body)),
        },
    };
    if key.len() > MAX_KEY_LEN {
        return Err(crate::HandlerError::permanent(KeyTooLongError(key.len())));
    }
    Ok(key)
}

/// Hex SHA-256 of a body.
pub(crate) fn sha256_hex(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let mut out = String::with_capacity(64);
    for b in digest {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extractors() {
        let m = Message::new(r#"{"order":{"id":42}}"#).with_header("k", "abc");
        assert_eq!(
            JsonFieldKey::new("/order/id").extract(&m).as_deref(),
            Some("42")
        );
        assert_eq!(JsonFieldKey::new("/nope").extract(&m), None);
        assert_eq!(HeaderKey::new("k").extract(&m).as_deref(), Some("abc"));
        assert_eq!(DefaultKey.extract(&m), None);
        let m = m.with_message_id("");
        assert_eq!(DefaultKey.extract(&m), None, "empty message_id is no key");
        let closure = |m: &Message| m.header_str("k").map(|s| s.to_uppercase());
        assert_eq!(closure.extract(&m).as_deref(), Some("ABC"));
    }

    #[test]
    fn integer_key_headers_are_keys_in_decimal_text() {
        for (value, want) in [
            (HeaderValue::Int(42), "42"),
            (HeaderValue::Int(-7), "-7"),
            (HeaderValue::Int(i64::MAX), "9223372036854775807"),
            (HeaderValue::Int(i64::from(u32::MAX)), "4294967295"),
            (HeaderValue::Int(0), "0"),
        ] {
            let m = Message::new("x").with_header(IDEMPOTENCY_KEY_HEADER, value.clone());
            assert_eq!(DefaultKey.try_extract(&m), Ok(Some(want.to_owned())));
            assert_eq!(DefaultKey::key_of(&m).as_deref(), Some(want));
            let r = resolve_key(&DefaultKey, MissingKey::Poison, &m);
            assert_eq!(r.ok().as_deref(), Some(want), "{value:?}");
            let m = Message::new("x").with_header("k", value);
            assert_eq!(
                HeaderKey::new("k").try_extract(&m),
                Ok(Some(want.to_owned()))
            );
        }
        // The integer and its text are one key.
        let int = Message::new("x").with_header(IDEMPOTENCY_KEY_HEADER, 42i64);
        let text = Message::new("x").with_header(IDEMPOTENCY_KEY_HEADER, "42");
        assert_eq!(DefaultKey::key_of(&int), DefaultKey::key_of(&text));
        // message_id still wins over the header.
        let both = int.with_message_id("m-1");
        assert_eq!(DefaultKey::key_of(&both).as_deref(), Some("m-1"));
    }

    #[test]
    fn wrong_type_key_headers_are_permanent_errors_naming_header_and_type() {
        let cases: Vec<(Message, &str)> = vec![
            (
                Message::new("x").with_header(IDEMPOTENCY_KEY_HEADER, true),
                "idempotency-key header x-idempotency-key holds a boolean (true); a key must be a non-empty string or an integer",
            ),
            (
                Message::new("x")
                    .with_header(IDEMPOTENCY_KEY_HEADER, HeaderValue::Bytes(vec![0xff, 0xfe])),
                "idempotency-key header x-idempotency-key holds 2 bytes of binary data, not UTF-8 text; a key must be a non-empty string or an integer",
            ),
            (
                {
                    // A float as the RabbitMQ transport delivers it: text plus its type.
                    let mut m = Message::new("x").with_header(IDEMPOTENCY_KEY_HEADER, "1.5");
                    let mut u = UnmappedHeaders::default();
                    u.0.insert(IDEMPOTENCY_KEY_HEADER.into(), "a float");
                    m.extensions.insert(u);
                    m
                },
                "idempotency-key header x-idempotency-key holds a float; a key must be a non-empty string or an integer",
            ),
            (
                {
                    let mut m = Message::new("x");
                    let mut u = UnmappedHeaders::default();
                    u.0.insert(IDEMPOTENCY_KEY_HEADER.into(), "a field table");
                    m.extensions.insert(u);
                    m
                },
                "idempotency-key header x-idempotency-key holds a field table; a key must be a non-empty string or an integer",
            ),
        ];
        for (m, want) in cases {
            let err = DefaultKey.try_extract(&m).unwrap_err();
            assert_eq!(err.to_string(), want);
            assert_eq!(DefaultKey::key_of(&m), None);
            // Permanent under both policies: a body hash would hide the producer's bug.
            for policy in [MissingKey::Poison, MissingKey::ContentHash] {
                let e = resolve_key(&DefaultKey, policy, &m).unwrap_err();
                assert_eq!(e.kind(), Some(crate::ErrorKind::Permanent));
                assert_eq!(e.chain(), want);
            }
        }
        let m = Message::new("x").with_header("k", false);
        assert_eq!(
            HeaderKey::new("k").try_extract(&m).unwrap_err(),
            KeyTypeError {
                header: "k".into(),
                found: "a boolean (false)".into()
            }
        );
        // An empty string and no header are still "missing", not a type error.
        for m in [
            Message::new("x").with_header(IDEMPOTENCY_KEY_HEADER, ""),
            Message::new("x"),
        ] {
            assert_eq!(DefaultKey.try_extract(&m), Ok(None));
            let e = resolve_key(&DefaultKey, MissingKey::Poison, &m).unwrap_err();
            assert!(e.chain().starts_with("message has no idempotency key"));
        }
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
