//! The JSON form of a dead-lettered message, for `export`, `import` and the HTTP API:
//! lossless (every AMQP property, every header with its AMQP type, the body as
//! base64), so an export imported into an empty queue gives back byte-identical
//! bodies and the same headers.
//!
//! A header value is a JSON object with one member naming its AMQP type:
//! `{"longstr": "text"}` (a long string that is valid UTF-8), `{"longstr_b64": ".."}`
//! (one that is not), `{"shortstr": ".."}`, `{"bool": true}`, `{"i8": n}`, `{"u8": n}`,
//! `{"i16": n}`, `{"u16": n}`, `{"i32": n}`, `{"u32": n}`, `{"i64": n}`, `{"f32": x}`,
//! `{"f64": x}` (a value JSON cannot hold, such as NaN, as `{"f32_bits": n}` /
//! `{"f64_bits": n}`), `{"decimal": [scale, value]}`, `{"timestamp": secs}`,
//! `{"array": [..]}`, `{"table": {..}}`, `{"bytes_b64": ".."}` and `{"void": null}`.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::CliError;

/// One message as JSON: its AMQP properties, headers and body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireMessage {
    /// The AMQP basic properties other than the headers.
    #[serde(default)]
    pub properties: WireProperties,
    /// The headers, each with its AMQP type (module docs).
    #[serde(default)]
    pub headers: Map<String, Value>,
    /// The body, base64 (standard alphabet, padded).
    pub body: String,
}

/// The AMQP basic properties of a [`WireMessage`] (absent ones are left out).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct WireProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_mode: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    /// The AMQP `type` property.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
}

fn s(v: &Option<ShortString>) -> Option<String> {
    v.as_ref().map(|s| s.as_str().to_owned())
}

fn short(field: &str, v: &Option<String>) -> Result<Option<ShortString>, CliError> {
    v.as_deref()
        .map(|v| {
            ShortString::try_new(v).map_err(|_| {
                CliError::Usage(format!(
                    "property {field} is longer than 255 bytes: {:?}",
                    crate::render::cut(v, 60)
                ))
            })
        })
        .transpose()
}

impl WireMessage {
    /// The JSON form of a message with `properties` and `body`.
    pub fn from_amqp(properties: &BasicProperties, body: &[u8]) -> Self {
        let p = properties;
        WireMessage {
            properties: WireProperties {
                content_type: s(p.content_type()),
                content_encoding: s(p.content_encoding()),
                delivery_mode: *p.delivery_mode(),
                priority: *p.priority(),
                correlation_id: s(p.correlation_id()),
                reply_to: s(p.reply_to()),
                expiration: s(p.expiration()),
                message_id: s(p.message_id()),
                timestamp: *p.timestamp(),
                kind: s(p.kind()),
                user_id: s(p.user_id()),
                app_id: s(p.app_id()),
                cluster_id: s(p.cluster_id()),
            },
            headers: p.headers().as_ref().map(table_to_json).unwrap_or_default(),
            body: B64.encode(body),
        }
    }

    /// The AMQP properties and body; a malformed value is a usage error naming it.
    pub fn to_amqp(&self) -> Result<(BasicProperties, Vec<u8>), CliError> {
        let w = &self.properties;
        let mut p = BasicProperties::default();
        macro_rules! set {
            ($field:ident, $with:ident) => {
                if let Some(v) = short(stringify!($field), &w.$field)? {
                    p = p.$with(v);
                }
            };
        }
        set!(content_type, with_content_type);
        set!(content_encoding, with_content_encoding);
        set!(correlation_id, with_correlation_id);
        set!(reply_to, with_reply_to);
        set!(expiration, with_expiration);
        set!(message_id, with_message_id);
        set!(kind, with_type);
        set!(user_id, with_user_id);
        set!(app_id, with_app_id);
        set!(cluster_id, with_cluster_id);
        if let Some(m) = w.delivery_mode {
            p = p.with_delivery_mode(m);
        }
        if let Some(v) = w.priority {
            p = p.with_priority(v);
        }
        if let Some(t) = w.timestamp {
            p = p.with_timestamp(t);
        }
        if !self.headers.is_empty() {
            p = p.with_headers(table_from_json(&self.headers)?);
        }
        let body = B64
            .decode(self.body.as_bytes())
            .map_err(|e| CliError::Usage(format!("body is not valid base64: {e}")))?;
        Ok((p, body))
    }
}

/// The typed JSON form of a header table (module docs).
pub fn table_to_json(t: &FieldTable) -> Map<String, Value> {
    t.inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), value_to_json(v)))
        .collect()
}

fn float(name: &str, finite: bool, v: f64, bits: u64) -> Value {
    if finite {
        json!({ name: v })
    } else {
        json!({ format!("{name}_bits"): bits })
    }
}

/// The typed JSON form of one header value (module docs).
pub fn value_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!({ "bool": b }),
        AMQPValue::ShortShortInt(n) => json!({ "i8": n }),
        AMQPValue::ShortShortUInt(n) => json!({ "u8": n }),
        AMQPValue::ShortInt(n) => json!({ "i16": n }),
        AMQPValue::ShortUInt(n) => json!({ "u16": n }),
        AMQPValue::LongInt(n) => json!({ "i32": n }),
        AMQPValue::LongUInt(n) => json!({ "u32": n }),
        AMQPValue::LongLongInt(n) => json!({ "i64": n }),
        AMQPValue::Float(f) => float("f32", f.is_finite(), f64::from(*f), u64::from(f.to_bits())),
        AMQPValue::Double(f) => float("f64", f.is_finite(), *f, f.to_bits()),
        AMQPValue::DecimalValue(d) => json!({ "decimal": [d.scale, d.value] }),
        AMQPValue::ShortString(s) => json!({ "shortstr": s.as_str() }),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => json!({ "longstr": text }),
            Err(_) => json!({ "longstr_b64": B64.encode(s.as_bytes()) }),
        },
        AMQPValue::FieldArray(a) => {
            json!({ "array": a.as_slice().iter().map(value_to_json).collect::<Vec<_>>() })
        }
        AMQPValue::Timestamp(t) => json!({ "timestamp": t }),
        AMQPValue::FieldTable(t) => json!({ "table": table_to_json(t) }),
        AMQPValue::ByteArray(b) => json!({ "bytes_b64": B64.encode(b.as_slice()) }),
        AMQPValue::Void => json!({ "void": null }),
    }
}

/// A header table from its typed JSON form.
pub fn table_from_json(m: &Map<String, Value>) -> Result<FieldTable, CliError> {
    let mut t = BTreeMap::new();
    for (k, v) in m {
        let name = ShortString::try_new(k.as_str())
            .map_err(|_| CliError::Usage(format!("header name longer than 255 bytes: {k:?}")))?;
        let value =
            value_from_json(v).map_err(|e| CliError::Usage(format!("header {k:?}: {e}")))?;
        t.insert(name, value);
    }
    Ok(FieldTable::from(t))
}

fn bad(v: &Value) -> String {
    format!(
        "not a typed AMQP value (an object with one member such as {{\"longstr\": \"..\"}}): {}",
        crate::render::cut(&v.to_string(), 80)
    )
}

/// One header value from its typed JSON form.
pub fn value_from_json(v: &Value) -> Result<AMQPValue, String> {
    let Some((tag, x)) = v
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.iter().next())
    else {
        return Err(bad(v));
    };
    let int = |x: &Value| {
        x.as_i64()
            .ok_or_else(|| format!("{tag}: not an integer: {x}"))
    };
    let uint = |x: &Value| {
        x.as_u64()
            .ok_or_else(|| format!("{tag}: not an integer: {x}"))
    };
    let range = |n: i64| -> String { format!("{tag}: {n} out of range") };
    let text = |x: &Value| {
        x.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{tag}: not a string: {x}"))
    };
    let b64 = |x: &Value| {
        B64.decode(text(x)?.as_bytes())
            .map_err(|e| format!("{tag}: not base64: {e}"))
    };
    Ok(match tag.as_str() {
        "bool" => AMQPValue::Boolean(x.as_bool().ok_or_else(|| bad(v))?),
        "i8" => AMQPValue::ShortShortInt(int(x).and_then(|n| n.try_into().map_err(|_| range(n)))?),
        "u8" => AMQPValue::ShortShortUInt(int(x).and_then(|n| n.try_into().map_err(|_| range(n)))?),
        "i16" => AMQPValue::ShortInt(int(x).and_then(|n| n.try_into().map_err(|_| range(n)))?),
        "u16" => AMQPValue::ShortUInt(int(x).and_then(|n| n.try_into().map_err(|_| range(n)))?),
        "i32" => AMQPValue::LongInt(int(x).and_then(|n| n.try_into().map_err(|_| range(n)))?),
        "u32" => AMQPValue::LongUInt(int(x).and_then(|n| n.try_into().map_err(|_| range(n)))?),
        "i64" => AMQPValue::LongLongInt(int(x)?),
        // f64 -> f32 is exact for values written from an f32.
        #[allow(clippy::cast_possible_truncation)]
        "f32" => AMQPValue::Float(x.as_f64().ok_or_else(|| bad(v))? as f32),
        "f64" => AMQPValue::Double(x.as_f64().ok_or_else(|| bad(v))?),
        "f32_bits" => AMQPValue::Float(f32::from_bits(
            uint(x)?
                .try_into()
                .map_err(|_| format!("{tag}: out of range"))?,
        )),
        "f64_bits" => AMQPValue::Double(f64::from_bits(uint(x)?)),
        "decimal" => {
            let pair = x
                .as_array()
                .filter(|a| a.len() == 2)
                .ok_or_else(|| bad(v))?;
            let scale = int(&pair[0])?;
            let value = int(&pair[1])?;
            AMQPValue::DecimalValue(DecimalValue {
                scale: scale.try_into().map_err(|_| range(scale))?,
                value: value.try_into().map_err(|_| range(value))?,
            })
        }
        "shortstr" => AMQPValue::ShortString(
            ShortString::try_new(text(x)?).map_err(|_| format!("{tag}: longer than 255 bytes"))?,
        ),
        "longstr" => AMQPValue::LongString(LongString::from(text(x)?.into_bytes())),
        "longstr_b64" => AMQPValue::LongString(LongString::from(b64(x)?)),
        "array" => AMQPValue::FieldArray(FieldArray::from(
            x.as_array()
                .ok_or_else(|| bad(v))?
                .iter()
                .map(value_from_json)
                .collect::<Result<Vec<_>, _>>()?,
        )),
        "timestamp" => AMQPValue::Timestamp(uint(x)?),
        "table" => AMQPValue::FieldTable(
            table_from_json(x.as_object().ok_or_else(|| bad(v))?).map_err(|e| e.to_string())?,
        ),
        "bytes_b64" => AMQPValue::ByteArray(ByteArray::from(b64(x)?)),
        "void" => AMQPValue::Void,
        _ => return Err(bad(v)),
    })
}

/// A header value as plain text for people: strings as they are (invalid UTF-8
/// escaped), numbers and booleans as written, arrays and tables as JSON.
pub fn value_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        other => value_to_json(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_type_round_trips() {
        let mut inner = FieldTable::default();
        inner.insert("n".into(), AMQPValue::LongLongInt(-5));
        let values = vec![
            AMQPValue::Boolean(true),
            AMQPValue::ShortShortInt(-3),
            AMQPValue::ShortShortUInt(200),
            AMQPValue::ShortInt(-300),
            AMQPValue::ShortUInt(60000),
            AMQPValue::LongInt(-70000),
            AMQPValue::LongUInt(4_000_000_000),
            AMQPValue::LongLongInt(i64::MIN),
            AMQPValue::Float(1.5),
            AMQPValue::Double(f64::NAN),
            AMQPValue::Double(0.1),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
            AMQPValue::ShortString("short".into()),
            AMQPValue::LongString("héllo".into()),
            AMQPValue::LongString(LongString::from(vec![0xff, 0, 1])),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void])),
            AMQPValue::Timestamp(1_700_000_000),
            AMQPValue::FieldTable(inner),
            AMQPValue::ByteArray(ByteArray::from(vec![1, 2, 3])),
            AMQPValue::Void,
        ];
        for v in values {
            let j = value_to_json(&v);
            let back = value_from_json(&j).unwrap();
            // NaN != NaN: compare the bits.
            match (&v, &back) {
                (AMQPValue::Double(a), AMQPValue::Double(b)) => {
                    assert_eq!(a.to_bits(), b.to_bits())
                }
                _ => assert_eq!(v, back, "{j}"),
            }
        }
        assert!(value_from_json(&json!({"i8": 300})).is_err());
        assert!(value_from_json(&json!("plain")).is_err());
        assert!(value_from_json(&json!({"nope": 1})).is_err());
    }

    #[test]
    fn a_message_round_trips() {
        let mut h = FieldTable::default();
        h.insert("x-idem-error".into(), AMQPValue::LongString("boom".into()));
        let p = BasicProperties::default()
            .with_message_id("m1".into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(7)
            .with_headers(h);
        let w = WireMessage::from_amqp(&p, b"\x00\xffbody");
        let line = serde_json::to_string(&w).unwrap();
        let back: WireMessage = serde_json::from_str(&line).unwrap();
        let (p2, body) = back.to_amqp().unwrap();
        assert_eq!(p2, p);
        assert_eq!(body, b"\x00\xffbody");
        let mut broken = w.clone();
        broken.body = "%%%".into();
        assert!(broken.to_amqp().is_err());
    }
}
