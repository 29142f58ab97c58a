//! How idem reads its own `x-idem-*` headers back from a delivery.
//!
//! Anyone can publish a message with any header, so every `x-idem-*` value idem reads
//! back (the attempt count, the first-failure time, the original route, the replay
//! mark) goes through [`read_in`] (or [`read`] where only the headers are at hand),
//! which applies one rule:
//!
//! - **absent**: the header is not there; the reader uses its default (0 failed
//!   attempts, no first failure, the delivery's own route, no replay).
//! - **valid**: the value has the expected type and form ([`FromHeader`]); it is used.
//!   A count larger than `u32::MAX` (an AMQP `long-long`, or a longer digit string)
//!   **saturates** to `u32::MAX`: a larger count never means fewer failed attempts, so
//!   a message whose count is past the attempt budget is dead-lettered at its first
//!   failure, wherever the number came from.
//! - **malformed**: wrong type (a boolean, bytes or a non-UTF-8 string where a count is
//!   expected, an integer where text is expected), a negative count, text that is not
//!   plain decimal digits (`"abc"`, `"-1"`, `" 3"`, `"+3"`, `"3.0"`), a time that is not
//!   RFC 3339 UTC. It is **ignored as if absent**, with one `warn` log naming the
//!   header, the value and what was expected. Never an error: a delivery is not
//!   dead-lettered because of a header idem itself writes.
//!
//! The AMQP type counts, not only the flat form a transport gives it: a value whose
//! type no [`HeaderValue`] holds as such (an AMQP timestamp, decimal or float, which
//! the RabbitMQ transport passes on as an integer or text, or a table, array or void)
//! is malformed for every reader ([`parse_in`], from the [`UnmappedHeaders`] the
//! transport records). The RabbitMQ transport also writes floats as text that keeps a
//! decimal point or exponent (`3.0`, `1e20`), so even headers-only readers never take
//! a float for a count.

use std::fmt;
use std::time::SystemTime;

use crate::message::{HeaderValue, Headers, Message, UnmappedHeaders};
use crate::text::{parse_rfc3339, truncate};

/// A type idem reads from one of its headers; see the [module docs](self).
pub trait FromHeader: Sized {
    /// What a valid value looks like, for logs (`a non-negative integer`).
    const EXPECTED: &'static str;
    /// The value, or `None` if it is malformed.
    fn from_header(value: &HeaderValue) -> Option<Self>;
}

/// A count (`x-idem-attempts`): an integer >= 0, or a string of ASCII decimal digits.
/// Values above `u32::MAX` saturate to `u32::MAX`.
impl FromHeader for u32 {
    const EXPECTED: &'static str = "a non-negative integer";
    fn from_header(value: &HeaderValue) -> Option<Self> {
        match value {
            HeaderValue::Int(i) if *i < 0 => None,
            HeaderValue::Int(i) => Some(u32::try_from(*i).unwrap_or(u32::MAX)),
            HeaderValue::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                // Only digits: the parse can fail on overflow alone.
                Some(s.parse().unwrap_or(u32::MAX))
            }
            _ => None,
        }
    }
}

/// Text (`x-idem-original-exchange`, `x-idem-replay`, ...): a UTF-8 string.
impl FromHeader for String {
    const EXPECTED: &'static str = "a string";
    fn from_header(value: &HeaderValue) -> Option<Self> {
        value.as_str().map(str::to_owned)
    }
}

/// A time (`x-idem-first-failed-at`): an RFC 3339 UTC string as idem writes it
/// (`2026-01-31T12:00:00.000Z`), not before 1970.
impl FromHeader for SystemTime {
    const EXPECTED: &'static str = "an RFC 3339 UTC time";
    fn from_header(value: &HeaderValue) -> Option<Self> {
        value.as_str().and_then(parse_rfc3339)
    }
}

/// A header value that does not follow [`FromHeader`]'s rule for its type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("header {header} has value {value}, expected {expected}; ignored as if absent")]
pub struct MalformedHeader {
    /// The header name.
    pub header: String,
    /// The value and its type, e.g. `-1 (integer)` or `"abc" (string)`, strings cut
    /// to 64 bytes.
    pub value: String,
    /// What was expected.
    pub expected: &'static str,
}

/// The header `name`: `Ok(None)` if absent, `Err` if malformed. No log; see [`read`].
pub fn parse<T: FromHeader>(headers: &Headers, name: &str) -> Result<Option<T>, MalformedHeader> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    match T::from_header(value) {
        Some(v) => Ok(Some(v)),
        None => Err(MalformedHeader {
            header: name.to_owned(),
            value: describe(value),
            expected: T::EXPECTED,
        }),
    }
}

/// The header `name` under the [rule](self): the value if valid, `None` if absent or
/// malformed. A malformed value is logged once per call at `warn`.
pub fn read<T: FromHeader>(headers: &Headers, name: &str) -> Option<T> {
    parse(headers, name).unwrap_or_else(|m| {
        warn_malformed(&m);
        None
    })
}

/// The header `name` of `msg`, like [`parse`], also knowing the AMQP type the
/// transport recorded in [`UnmappedHeaders`]: a header whose type no [`HeaderValue`]
/// holds as such (an AMQP timestamp or decimal that arrived as an integer or digits, a
/// float, a table) is malformed whatever its flat form.
pub fn parse_in<T: FromHeader>(msg: &Message, name: &str) -> Result<Option<T>, MalformedHeader> {
    let unmapped = msg.extensions.get::<UnmappedHeaders>();
    if let Some(amqp_type) = unmapped.and_then(|u| u.0.get(name)) {
        let value = match msg.headers.get(name) {
            Some(v) => format!("{} ({amqp_type})", DisplayValue(v)),
            None => (*amqp_type).to_owned(),
        };
        return Err(MalformedHeader {
            header: name.to_owned(),
            value,
            expected: T::EXPECTED,
        });
    }
    parse(&msg.headers, name)
}

/// [`read`] for a message: the rule of [`parse_in`], one `warn` per malformed value.
/// Every reader of a delivery's `x-idem-*` headers in idem goes through this (or
/// [`read`] where only the headers are at hand).
pub fn read_in<T: FromHeader>(msg: &Message, name: &str) -> Option<T> {
    parse_in(msg, name).unwrap_or_else(|m| {
        warn_malformed(&m);
        None
    })
}

// In this module rather than beside `Message`, so that the message does not reach
// into the reading rule that itself depends on the message's types.
impl Message {
    /// Failed attempts recorded in [`ATTEMPTS`](crate::headers::ATTEMPTS), read under
    /// the [header rule](crate::read): 0 if absent or malformed (logged), saturated at
    /// `u32::MAX`.
    pub fn failed_attempts(&self) -> u32 {
        read_in(self, crate::headers::ATTEMPTS).unwrap_or(0)
    }
}

fn warn_malformed(m: &MalformedHeader) {
    tracing::warn!(header = %m.header, value = %m.value, expected = m.expected, "{m}");
}

/// Like [`read_in`] without the log, for a second read of a header already read (and
/// logged) for the same delivery.
pub fn read_quiet<T: FromHeader>(msg: &Message, name: &str) -> Option<T> {
    parse_in(msg, name).ok().flatten()
}

/// A value and its type, bounded, for logs and errors: `-1 (integer)`, `"abc" (string)`.
pub fn describe(value: &HeaderValue) -> String {
    let kind = match value {
        HeaderValue::String(_) => "string",
        HeaderValue::Int(_) => "integer",
        HeaderValue::Bool(_) => "boolean",
        HeaderValue::Bytes(_) => "binary, not UTF-8 text",
    };
    format!("{} ({kind})", DisplayValue(value))
}

/// The value alone, bounded: `5`, `"abc"`.
struct DisplayValue<'a>(&'a HeaderValue);

impl fmt::Display for DisplayValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            HeaderValue::String(s) => write!(f, "{:?}", truncate(s, 64)),
            HeaderValue::Int(i) => write!(f, "{i}"),
            HeaderValue::Bool(b) => write!(f, "{b}"),
            HeaderValue::Bytes(b) => write!(f, "{} bytes", b.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn headers(value: impl Into<HeaderValue>) -> Headers {
        let mut h = Headers::new();
        h.insert("x-idem-attempts".into(), value.into());
        h
    }

    fn count(value: impl Into<HeaderValue>) -> Result<Option<u32>, MalformedHeader> {
        parse::<u32>(&headers(value), "x-idem-attempts")
    }

    #[test]
    fn absent_is_none_without_error() {
        assert_eq!(parse::<u32>(&Headers::new(), "x-idem-attempts"), Ok(None));
        assert_eq!(read::<u32>(&Headers::new(), "x-idem-attempts"), None);
    }

    #[test]
    fn valid_counts_are_read() {
        assert_eq!(count(0i64), Ok(Some(0)));
        assert_eq!(count(3i64), Ok(Some(3)));
        assert_eq!(count("3"), Ok(Some(3)));
        assert_eq!(count("007"), Ok(Some(7)));
        assert_eq!(count(1_000_000_000i64), Ok(Some(1_000_000_000)));
        assert_eq!(count("1000000000"), Ok(Some(1_000_000_000)));
        assert_eq!(count(i64::from(u32::MAX)), Ok(Some(u32::MAX)));
    }

    #[test]
    fn huge_counts_saturate() {
        assert_eq!(count(1i64 << 40), Ok(Some(u32::MAX)));
        assert_eq!(count(i64::MAX), Ok(Some(u32::MAX)));
        assert_eq!(count((1u64 << 40).to_string()), Ok(Some(u32::MAX)));
        assert_eq!(count("4294967296"), Ok(Some(u32::MAX)));
        assert_eq!(count("9".repeat(100)), Ok(Some(u32::MAX)));
    }

    #[test]
    fn counts_are_monotonic() {
        // A larger valid count never reads as fewer attempts, across both types.
        let values: Vec<i64> = vec![
            0,
            1,
            2,
            999_999_999,
            1_000_000_000,
            i64::from(u32::MAX) - 1,
            i64::from(u32::MAX),
            i64::from(u32::MAX) + 1,
            1 << 40,
            i64::MAX,
        ];
        let mut last = 0;
        for v in values {
            let as_int = count(v).unwrap().unwrap();
            let as_text = count(v.to_string()).unwrap().unwrap();
            assert_eq!(as_int, as_text, "{v}");
            assert!(as_int >= last, "{v} read as {as_int}, below {last}");
            last = as_int;
        }
    }

    #[test]
    fn malformed_counts_name_header_value_and_expectation() {
        let cases: Vec<(HeaderValue, &str)> = vec![
            (HeaderValue::Int(-1), "-1 (integer)"),
            (HeaderValue::Int(i64::MIN), "-9223372036854775808 (integer)"),
            ("abc".into(), "\"abc\" (string)"),
            ("-1".into(), "\"-1\" (string)"),
            ("".into(), "\"\" (string)"),
            (" 3".into(), "\" 3\" (string)"),
            ("+3".into(), "\"+3\" (string)"),
            ("3.0".into(), "\"3.0\" (string)"),
            ("1e20".into(), "\"1e20\" (string)"),
            ("٣".into(), "\"٣\" (string)"),
            (true.into(), "true (boolean)"),
            (
                HeaderValue::Bytes(vec![0xff, 0]),
                "2 bytes (binary, not UTF-8 text)",
            ),
        ];
        for (value, shown) in cases {
            assert_eq!(
                count(value.clone()),
                Err(MalformedHeader {
                    header: "x-idem-attempts".into(),
                    value: shown.into(),
                    expected: "a non-negative integer",
                }),
                "{value:?}"
            );
            assert_eq!(read::<u32>(&headers(value), "x-idem-attempts"), None);
        }
        let err = count(-1i64).unwrap_err();
        assert_eq!(
            err.to_string(),
            "header x-idem-attempts has value -1 (integer), expected a non-negative integer; ignored as if absent"
        );
    }

    #[test]
    fn long_malformed_strings_are_cut_in_the_description() {
        let err = count("x".repeat(10_000)).unwrap_err();
        assert!(err.value.len() < 100, "{}", err.value);
        assert!(
            err.value.ends_with("bytes cut]\" (string)"),
            "{}",
            err.value
        );
    }

    #[test]
    fn unmapped_amqp_types_are_malformed_whatever_their_flat_form() {
        let mut m = Message::new("x")
            .with_header("x-idem-attempts", 5i64)
            .with_header("x-idem-replay", "1.5");
        let mut u = UnmappedHeaders::default();
        u.0.insert("x-idem-attempts".into(), "a timestamp");
        u.0.insert("x-idem-replay".into(), "a float");
        u.0.insert("x-idem-first-failed-at".into(), "a field table");
        m.extensions.insert(u);
        assert_eq!(
            parse_in::<u32>(&m, "x-idem-attempts").unwrap_err().value,
            "5 (a timestamp)"
        );
        assert_eq!(read_in::<u32>(&m, "x-idem-attempts"), None);
        assert_eq!(m.failed_attempts(), 0);
        assert_eq!(
            parse_in::<String>(&m, "x-idem-replay").unwrap_err().value,
            "\"1.5\" (a float)"
        );
        assert_eq!(
            parse_in::<SystemTime>(&m, "x-idem-first-failed-at")
                .unwrap_err()
                .to_string(),
            "header x-idem-first-failed-at has value a field table, expected an RFC 3339 UTC time; ignored as if absent"
        );
        // Without the extension, the same message reads by its flat form.
        let plain = Message::new("x").with_header("x-idem-attempts", 5i64);
        assert_eq!(read_in::<u32>(&plain, "x-idem-attempts"), Some(5));
    }

    #[test]
    fn text_and_time_follow_the_same_rule() {
        let mut h = Headers::new();
        h.insert("s".into(), "orders".into());
        h.insert("i".into(), 5i64.into());
        h.insert("t".into(), "2023-11-14T22:13:20.123Z".into());
        h.insert("bad-t".into(), "yesterday".into());
        h.insert("huge-t".into(), "99999999999999999-01-01T00:00:00Z".into());
        h.insert("int-t".into(), 1_700_000_000i64.into());
        assert_eq!(read::<String>(&h, "s").as_deref(), Some("orders"));
        assert_eq!(
            parse::<String>(&h, "i").unwrap_err().value,
            "5 (integer)".to_owned()
        );
        assert_eq!(read::<String>(&h, "i"), None);
        assert_eq!(
            read::<SystemTime>(&h, "t"),
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
        );
        for name in ["bad-t", "huge-t", "int-t"] {
            assert_eq!(
                parse::<SystemTime>(&h, name).unwrap_err().expected,
                "an RFC 3339 UTC time"
            );
            let m = Message {
                headers: h.clone(),
                ..Message::default()
            };
            assert_eq!(read_quiet::<SystemTime>(&m, name), None);
        }
    }
}
