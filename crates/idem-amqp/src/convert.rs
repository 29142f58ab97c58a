//! Conversions between lapin deliveries and idem [`Message`]s.
//!
//! Incoming AMQP header values are mapped to [`HeaderValue`]: booleans become `Bool`,
//! every integer type (signed and unsigned, 8 to 64 bits) and timestamps become `Int`,
//! strings become `String` (or `Bytes` when not UTF-8), byte arrays become `Bytes`,
//! floats become text that always keeps a decimal point or exponent (`3.0`, `1.5`,
//! `1e20`, so a float never reads as a count), decimals their decimal text. Nested
//! tables, arrays (such as RabbitMQ's `x-death`) and void values are not mapped; they
//! stay in the original [`BasicProperties`], which the transport keeps and re-publishes
//! unchanged (plus the `x-idem-*` headers) on retry and dead-letter copies. Every header
//! whose AMQP type no `HeaderValue` holds as such (float, decimal, timestamp, table,
//! array, void) is named with its type in an [`UnmappedHeaders`] extension, so errors
//! about it (an idempotency key of the wrong type) say what it was. No header, however
//! large or odd, makes the conversion fail.
//!
//! The `x-idem-original-*` headers are read back under idem's
//! [header rule](idem_core::read): a value that is not an AMQP string is ignored (the
//! delivery's own exchange and routing key are used) with one `warn` log.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use idem_core::outcome::headers as idem_headers;
use idem_core::{
    DeliveryContext, DeliveryInfo, HeaderValue, Headers, Message, Properties, UnmappedHeaders,
};
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;

use crate::error::Error;

/// Converts a delivery consumed from `queue` into a [`Message`], copying the body.
///
/// The message's [`DeliveryContext`] is read here, once (its `x-idem-attempts` and
/// `x-idem-first-failed-at`, a malformed value logged once), and
/// [`DeliveryInfo::attempt`] set from it.
///
/// When the delivery carries `x-idem-original-exchange` / `x-idem-original-routing-key`
/// (a retry copy coming back from a delay queue), those name the original publish and
/// are used for [`DeliveryInfo::exchange`] and [`DeliveryInfo::routing_key`].
pub fn message_from_delivery(delivery: &Delivery, queue: &str) -> Message {
    to_message(
        &delivery.exchange,
        &delivery.routing_key,
        delivery.redelivered,
        &delivery.properties,
        Bytes::copy_from_slice(&delivery.data),
        queue,
    )
}

pub(crate) fn to_message(
    exchange: &ShortString,
    routing_key: &ShortString,
    redelivered: bool,
    props: &BasicProperties,
    body: Bytes,
    queue: &str,
) -> Message {
    let mut msg = with_headers_of(Message::new(body), props);
    msg.delivery = delivery_info(exchange, routing_key, redelivered, &msg, queue);
    msg.properties = Properties {
        message_id: props.message_id().as_ref().map(|s| s.as_str().to_owned()),
        content_type: props.content_type().as_ref().map(|s| s.as_str().to_owned()),
        correlation_id: props
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str().to_owned()),
        timestamp: props
            .timestamp()
            .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs))),
        kind: props.kind().as_ref().map(|s| s.as_str().to_owned()),
    };
    // The delivery's one reading of `x-idem-attempts` and `x-idem-first-failed-at`:
    // the worker and the consumer take the numbers from it.
    msg.context = DeliveryContext::read(&msg);
    msg.delivery.attempt = msg.context.attempt();
    msg
}

/// `msg` with the mapped headers of `props`, and the [`UnmappedHeaders`] extension
/// when some have a type of their own.
fn with_headers_of(mut msg: Message, props: &BasicProperties) -> Message {
    if let Some(table) = props.headers() {
        msg.headers = headers_from_table(table);
        let unmapped = unmapped_headers(table);
        if !unmapped.0.is_empty() {
            msg.extensions.insert(unmapped);
        }
    }
    msg
}

/// Where a delivery really comes from: the `x-idem-original-*` headers of `msg` win
/// over the delay queue's dead-lettering (exchange `""`, routing key = the work
/// queue). Malformed ones are ignored, with a `warn` log. Read once per delivery: the
/// consumer names this origin on the retry and dead-letter copies.
pub(crate) fn delivery_info(
    exchange: &ShortString,
    routing_key: &ShortString,
    redelivered: bool,
    msg: &Message,
    queue: &str,
) -> DeliveryInfo {
    let read = idem_core::read::read_in::<String>;
    let mut info = DeliveryInfo {
        exchange: read(msg, idem_headers::ORIGINAL_EXCHANGE)
            .unwrap_or_else(|| exchange.as_str().to_owned()),
        routing_key: read(msg, idem_headers::ORIGINAL_ROUTING_KEY)
            .unwrap_or_else(|| routing_key.as_str().to_owned()),
        queue: queue.to_owned(),
        redelivered,
        attempt: 1,
        ..DeliveryInfo::default()
    };
    // The broker's own count, under the header rule (quiet: a broker writes it, and a
    // malformed value counts as none).
    info.delivery_count =
        idem_core::read::read_quiet::<u32>(msg, idem_headers::BROKER_DELIVERY_COUNT).unwrap_or(0);
    info
}

/// Maps the header values idem can represent; see the [module docs](self).
pub fn headers_from_table(table: &FieldTable) -> Headers {
    table
        .inner()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), header_value(v)?)))
        .collect()
}

/// The headers of `table` whose AMQP type no [`HeaderValue`] holds as such, with
/// that type (`a float`, `a field table`); see the [module docs](self).
pub fn unmapped_headers(table: &FieldTable) -> UnmappedHeaders {
    UnmappedHeaders(
        table
            .inner()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), unmapped_type(v)?)))
            .collect(),
    )
}

fn unmapped_type(v: &AMQPValue) -> Option<&'static str> {
    Some(match v {
        AMQPValue::Float(_) | AMQPValue::Double(_) => "a float",
        AMQPValue::DecimalValue(_) => "a decimal",
        AMQPValue::Timestamp(_) => "a timestamp",
        AMQPValue::FieldArray(_) => "a field array",
        AMQPValue::FieldTable(_) => "a field table",
        AMQPValue::Void => "a void value",
        _ => return None,
    })
}

/// One AMQP value as a [`HeaderValue`], if it has a flat representation.
pub fn header_value(v: &AMQPValue) -> Option<HeaderValue> {
    Some(match v {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
        AMQPValue::Timestamp(t) => match i64::try_from(*t) {
            Ok(i) => HeaderValue::Int(i),
            Err(_) => HeaderValue::String(t.to_string()),
        },
        // Debug, not Display: 3.0 stays "3.0" (Display writes "3", a count).
        AMQPValue::Float(f) => HeaderValue::String(format!("{f:?}")),
        AMQPValue::Double(f) => HeaderValue::String(format!("{f:?}")),
        AMQPValue::DecimalValue(d) => HeaderValue::String(decimal_text(d.value, d.scale)),
        AMQPValue::ShortString(s) => HeaderValue::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => HeaderValue::String(text.to_owned()),
            Err(_) => HeaderValue::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) | AMQPValue::Void => return None,
    })
}

fn decimal_text(value: u32, scale: u8) -> String {
    let digits = value.to_string();
    let scale = usize::from(scale);
    if scale == 0 {
        return digits;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{int}.{frac}")
}

/// A [`HeaderValue`] as the AMQP value idem writes: [`crate::headers::value`].
pub fn amqp_value(v: &HeaderValue) -> AMQPValue {
    crate::headers::value(v)
}

/// Adds (or replaces) `extra` in a copy of `table` under the one header rule,
/// [`crate::headers::merge`]: names longer than 255 bytes are an error.
pub fn merge_headers(table: Option<&FieldTable>, extra: &Headers) -> Result<FieldTable, Error> {
    crate::headers::merge(table, extra)
}

/// The AMQP properties for publishing `msg`: its properties and headers, persistent
/// (delivery mode 2). A missing `message_id` is set to a new UUIDv7 *in `msg`*, so
/// publishing the same `Message` again reuses it and consumers dedup the repeat.
pub fn properties_for(msg: &mut Message) -> Result<BasicProperties, Error> {
    let id = msg
        .properties
        .message_id
        .get_or_insert_with(|| uuid::Uuid::now_v7().to_string())
        .clone();
    let short = |s: &str| ShortString::try_new(s).map_err(|_| Error::NameTooLong(s.to_owned()));
    let p = &msg.properties;
    let mut props = BasicProperties::default()
        .with_message_id(short(&id)?)
        .with_delivery_mode(2);
    if let Some(ct) = &p.content_type {
        props = props.with_content_type(short(ct)?);
    }
    if let Some(c) = &p.correlation_id {
        props = props.with_correlation_id(short(c)?);
    }
    if let Some(kind) = &p.kind {
        props = props.with_type(short(kind)?);
    }
    if let Some(ts) = p.timestamp {
        let secs = ts.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        props = props.with_timestamp(secs);
    }
    if !msg.headers.is_empty() {
        props = props.with_headers(merge_headers(None, &msg.headers)?);
    }
    Ok(props)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{ByteArray, DecimalValue, FieldArray};

    #[test]
    fn odd_and_oversized_headers_do_not_break_conversion() {
        let mut t = FieldTable::default();
        t.insert(
            "big".into(),
            AMQPValue::LongString(vec![b'a'; 4 << 20].into()),
        );
        t.insert("bin".into(), AMQPValue::LongString(vec![0xff, 0xfe].into()));
        t.insert("arr".into(), AMQPValue::FieldArray(FieldArray::default()));
        t.insert("tbl".into(), AMQPValue::FieldTable(FieldTable::default()));
        t.insert("void".into(), AMQPValue::Void);
        t.insert("u32".into(), AMQPValue::LongUInt(u32::MAX));
        t.insert("ts".into(), AMQPValue::Timestamp(u64::MAX));
        t.insert("f".into(), AMQPValue::Double(1.5));
        t.insert(
            "dec".into(),
            AMQPValue::DecimalValue(DecimalValue { scale: 3, value: 5 }),
        );
        t.insert(
            "ba".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2])),
        );
        t.insert("b".into(), AMQPValue::Boolean(true));
        let h = headers_from_table(&t);
        assert_eq!(h["big"].as_str().map(str::len), Some(4 << 20));
        assert_eq!(h["bin"], HeaderValue::Bytes(vec![0xff, 0xfe]));
        assert!(!h.contains_key("arr") && !h.contains_key("tbl") && !h.contains_key("void"));
        assert_eq!(h["u32"], HeaderValue::Int(i64::from(u32::MAX)));
        assert_eq!(h["ts"], HeaderValue::String(u64::MAX.to_string()));
        assert_eq!(h["f"].as_str(), Some("1.5"));
        let u = unmapped_headers(&t);
        let types: Vec<(&str, &str)> = u.0.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            types,
            vec![
                ("arr", "a field array"),
                ("dec", "a decimal"),
                ("f", "a float"),
                ("tbl", "a field table"),
                ("ts", "a timestamp"),
                ("void", "a void value"),
            ]
        );
        assert_eq!(h["dec"].as_str(), Some("0.005"));
        assert_eq!(h["ba"], HeaderValue::Bytes(vec![1, 2]));
        assert_eq!(h["b"], HeaderValue::Bool(true));
    }

    #[test]
    fn floats_never_read_as_counts() {
        for (v, text) in [
            (AMQPValue::Double(3.0), "3.0"),
            (AMQPValue::Float(3.0), "3.0"),
            (AMQPValue::Double(1e20), "1e20"),
            (AMQPValue::Double(-0.5), "-0.5"),
        ] {
            let hv = header_value(&v).unwrap();
            assert_eq!(hv.as_str(), Some(text));
            let mut h = Headers::new();
            h.insert("x-idem-attempts".into(), hv);
            assert!(idem_core::read::parse::<u32>(&h, "x-idem-attempts").is_err());
        }
    }

    fn msg_with(headers: Headers) -> Message {
        Message {
            headers,
            ..Message::default()
        }
    }

    #[test]
    fn malformed_original_route_headers_are_ignored() {
        let mut t = FieldTable::default();
        t.insert(
            idem_headers::ORIGINAL_EXCHANGE.into(),
            AMQPValue::LongLongInt(5),
        );
        t.insert(
            idem_headers::ORIGINAL_ROUTING_KEY.into(),
            AMQPValue::Double(1.5),
        );
        let m = with_headers_of(
            Message::default(),
            &BasicProperties::default().with_headers(t),
        );
        let info = delivery_info(&"ex".into(), &"rk".into(), false, &m, "q");
        assert_eq!(
            (info.exchange.as_str(), info.routing_key.as_str()),
            ("ex", "rk")
        );
    }

    #[test]
    fn original_route_headers_win() {
        let mut h = Headers::new();
        h.insert(idem_headers::ORIGINAL_EXCHANGE.into(), "orders".into());
        h.insert(
            idem_headers::ORIGINAL_ROUTING_KEY.into(),
            "orders.new".into(),
        );
        let info = delivery_info(&"".into(), &"q".into(), false, &msg_with(h), "q");
        assert_eq!(
            (info.exchange.as_str(), info.routing_key.as_str()),
            ("orders", "orders.new")
        );
        let info = delivery_info(&"ex".into(), &"rk".into(), true, &Message::default(), "q");
        assert_eq!(
            (info.exchange.as_str(), info.routing_key.as_str()),
            ("ex", "rk")
        );
        assert!(info.redelivered);
    }

    #[test]
    fn publishing_sets_a_stable_message_id() {
        let mut m = Message::new("x").with_header("n", 3i64);
        let p1 = properties_for(&mut m).unwrap();
        let p2 = properties_for(&mut m).unwrap();
        assert_eq!(p1.message_id(), p2.message_id());
        assert_eq!(p1.delivery_mode(), &Some(2));
        let back = headers_from_table(p1.headers().as_ref().unwrap());
        assert_eq!(back["n"], HeaderValue::Int(3));
        let mut long = Message::new("x").with_header("k".repeat(300), "v");
        assert!(matches!(
            properties_for(&mut long),
            Err(Error::NameTooLong(_))
        ));
    }
}
