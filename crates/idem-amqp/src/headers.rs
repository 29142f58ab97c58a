//! The one rule for writing idem [`Headers`] as AMQP headers, used by every publisher
//! of idem: [`Publisher`](crate::Publisher), the worker's retry and dead-letter copies,
//! the outbox relay (whose `Outbox::enqueue` checks messages with [`check`] before
//! storing them) and `idem dlq replay`.
//!
//! - **Names**: at most 255 bytes (an AMQP short string). A longer name is an error,
//!   [`Error::NameTooLong`], never silently dropped or cut: a header a consumer relies
//!   on must not vanish on the way.
//! - **Values**: [`HeaderValue::String`] and [`HeaderValue::Bytes`] become AMQP long
//!   strings (RabbitMQ refuses short strings inside header tables),
//!   [`HeaderValue::Int`] a signed 64-bit integer (`l`), [`HeaderValue::Bool`] a
//!   boolean. Values have no size limit of their own (a frame may be split), though
//!   brokers cap the total header size (RabbitMQ: `frame_max`, 128 KiB by default).
//! - Encoding into an existing table replaces a header of the same name.
//!
//! Reading goes the other way in [`crate::convert`].
//!
//! ```
//! use idem_amqp::headers;
//! use idem_core::Headers;
//!
//! let mut h = Headers::new();
//! h.insert("x-tenant".into(), "acme".into());
//! assert!(headers::encode(&h).is_ok());
//! h.insert("x".repeat(256), "too long a name".into());
//! assert!(headers::check(&h).is_err());
//! ```

use idem_core::{HeaderValue, Headers};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::error::Error;

/// The longest header name AMQP allows, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// `name` as an AMQP header name; over [`MAX_NAME_LEN`] bytes is
/// [`Error::NameTooLong`].
pub fn name(name: &str) -> Result<ShortString, Error> {
    ShortString::try_new(name).map_err(|_| Error::NameTooLong(name.to_owned()))
}

/// `value` as the AMQP value idem writes (see the [module docs](self)).
pub fn value(value: &HeaderValue) -> AMQPValue {
    match value {
        HeaderValue::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::Bytes(b) => AMQPValue::LongString(LongString::from(b.clone())),
    }
}

/// Checks that every header of `headers` can be encoded, without encoding it.
pub fn check(headers: &Headers) -> Result<(), Error> {
    match headers.keys().find(|k| k.len() > MAX_NAME_LEN) {
        Some(k) => Err(Error::NameTooLong(k.clone())),
        None => Ok(()),
    }
}

/// `headers` as an AMQP header table.
pub fn encode(headers: &Headers) -> Result<FieldTable, Error> {
    merge(None, headers)
}

/// A copy of `table` (or an empty table) with `extra` added; a header of the same
/// name is replaced, and the failure record of `table` is dropped (`extra` brings
/// the new one).
pub fn merge(table: Option<&FieldTable>, extra: &Headers) -> Result<FieldTable, Error> {
    // A copy's failure record replaces the original's whole (see
    // `idem_core::outcome::copy_onto`): no field of an earlier failure survives.
    let record = idem_core::outcome::headers::FAILURE_RECORD;
    let mut out = match table {
        Some(t) if record.iter().any(|name| t.contains_key(name)) => {
            let mut kept = t.inner().clone();
            kept.retain(|name, _| !record.contains(&name.as_str()));
            FieldTable::from(kept)
        }
        Some(t) => t.clone(),
        None => FieldTable::default(),
    };
    for (k, v) in extra {
        out.insert(name(k)?, value(v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_names_and_values() {
        let mut h = Headers::new();
        h.insert("s".into(), "text".into());
        h.insert("i".into(), HeaderValue::Int(-3));
        h.insert("b".into(), HeaderValue::Bool(true));
        h.insert("raw".into(), HeaderValue::Bytes(vec![0xff, 0]));
        h.insert("n".repeat(MAX_NAME_LEN), "longest name allowed".into());
        let t = encode(&h).unwrap();
        let t = t.inner();
        assert_eq!(t.get("s"), Some(&AMQPValue::LongString("text".into())));
        assert_eq!(t.get("i"), Some(&AMQPValue::LongLongInt(-3)));
        assert_eq!(t.get("b"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(
            t.get("raw"),
            Some(&AMQPValue::LongString(vec![0xff, 0].into()))
        );
        assert_eq!(t.len(), 5);

        let long = "n".repeat(MAX_NAME_LEN + 1);
        h.insert(long.clone(), "x".into());
        assert!(matches!(check(&h), Err(Error::NameTooLong(n)) if n == long));
        assert!(matches!(encode(&h), Err(Error::NameTooLong(n)) if n == long));
    }

    #[test]
    fn merging_replaces_a_header_of_the_same_name() {
        let mut base = FieldTable::default();
        base.insert("k".into(), AMQPValue::LongLongInt(1));
        base.insert("keep".into(), AMQPValue::Boolean(false));
        let mut extra = Headers::new();
        extra.insert("k".into(), HeaderValue::Int(2));
        let t = merge(Some(&base), &extra).unwrap();
        assert_eq!(t.inner().get("k"), Some(&AMQPValue::LongLongInt(2)));
        assert_eq!(t.inner().get("keep"), Some(&AMQPValue::Boolean(false)));
    }
}
