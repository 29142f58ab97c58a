use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::message::{Message, IDEMPOTENCY_KEY_HEADER};

/// Longest accepted idempotence key, in bytes. A longer key is a content error.
pub const MAX_KEY_LEN: usize = 512;

/// Where the idempotence key comes from.
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key, or `None` if the message has none.
    fn extract(&self, msg: &Message) -> Option<String>;
}

impl<F> KeyExtractor for F
where
    F: Fn(&Message) -> Option<String> + Send + Sync + 'static,
{
    fn extract(&self, msg: &Message) -> Option<String> {
        self(msg)
    }
}

/// The default: the AMQP `message_id` property, else the `x-idempotency-key` header.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultKey;

impl DefaultKey {
    /// The default key of a message.
    pub fn key_of(msg: &Message) -> Option<String> {
        msg.properties
            .message_id
            .as_deref()
            .filter(|s| !s.is_empty())
            .or_else(|| {
                msg.header_str(IDEMPOTENCY_KEY_HEADER)
                    .filter(|s| !s.is_empty())
            })
            .map(str::to_owned)
    }
}

impl KeyExtractor for DefaultKey {
    fn extract(&self, msg: &Message) -> Option<String> {
        DefaultKey::key_of(msg)
    }
}

/// The key from a named header (string or integer value).
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
        let v = msg.headers.get(&*self.0)?;
        let s = v.to_string();
        (!s.is_empty() && !matches!(v, crate::HeaderValue::Bytes(_))).then_some(s)
    }
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

/// What to do with a message that has no idempotence key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MissingKey {
    /// Dead-letter it at once (the default): without a key, dedup is impossible.
    #[default]
    Poison,
    /// Use `sha256:<hex>` of the body. Two different messages with equal bodies are
    /// then treated as duplicates: choose this only where that is right.
    ContentHash,
}

/// The message has no idempotence key. Permanent.
#[derive(Debug, thiserror::Error)]
#[error("message has no idempotence key (no message_id property, no x-idempotency-key header, and no custom key)")]
pub struct MissingKeyError;

/// The idempotence key is longer than [`MAX_KEY_LEN`]. Permanent.
#[derive(Debug, thiserror::Error)]
#[error("idempotence key is {0} bytes long, the limit is {MAX_KEY_LEN}")]
pub struct KeyTooLongError(pub usize);

/// The idempotence key of `msg`: from `extractor`, else per the `missing` policy.
/// Missing and oversized keys are permanent errors. Shared by every dedup stage so
/// they agree on what the key of a message is.
pub fn resolve_key(
    extractor: &dyn KeyExtractor,
    missing: MissingKey,
    msg: &Message,
) -> Result<String, crate::HandlerError> {
    let key = match extractor.extract(msg) {
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
pub fn sha256_hex(body: &[u8]) -> String {
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
    fn hash_is_stable() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
