//! `idem dlq edit`: fix the body of a dead letter in place.
//!
//! The edited copy is published to the tail of the DLQ with a publisher confirm
//! (mandatory routing), and the original is acked only once the copy is confirmed: a
//! crash in between leaves both, never neither. Every other message stays, in order.
//! The copy keeps the original's properties and headers (its failure history too,
//! until a replay clears it) and gains:
//!
//! - [`EDITED_HEADER`] (`x-idem-edited`): the time of the edit (RFC 3339);
//! - [`ORIGINAL_FINGERPRINT_HEADER`] (`x-idem-original-sha256`): the hex SHA-256 of
//!   the body before the *first* edit (a later edit keeps it), for audit, and so that
//!   the dedup stages treat the edited body as a new version of the same message
//!   rather than "same key, different payload" (see
//!   [`idem_core::dedup`](idem_core::dedup#edited-messages)).
//!
//! `--json-set /pointer=value` sets a member of a JSON body (RFC 6901 pointer; the
//! value is JSON, or a string when it does not parse as JSON, so `/note=late` sets
//! `"late"`); a missing last member is added to its object, `-` appends to an array.
//! The edited JSON is written compactly. `--body-file F` replaces the body with the
//! bytes of `F`. Every message with the given id is edited (after a crash the DLQ may
//! hold two copies of one message).

use idem_core::__private::rfc3339;
use idem_core::dedup::{EDITED_HEADER, ORIGINAL_FINGERPRINT_HEADER};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::restored_properties;
use super::scan::Scan;
use crate::error::CliError;

/// How to change a body.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    /// Set JSON members: `(pointer, value)` pairs, in order.
    JsonSet(Vec<(String, Value)>),
    /// Replace the body.
    Body(Vec<u8>),
}

/// Parses one `--json-set` argument, `/pointer=value`.
pub fn parse_json_set(arg: &str) -> Result<(String, Value), CliError> {
    let Some((pointer, value)) = arg.split_once('=') else {
        return Err(CliError::Usage(format!(
            "--json-set {arg:?}: expected /pointer=value, e.g. /cents=500"
        )));
    };
    if !pointer.starts_with('/') {
        return Err(CliError::Usage(format!(
            "--json-set {arg:?}: the pointer must start with / (RFC 6901), e.g. /cents=500"
        )));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok((pointer.to_owned(), value))
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Sets `value` at `pointer` in `doc` (see the [module docs](self)).
fn set(doc: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
    let (parent, last) = pointer
        .rsplit_once('/')
        .ok_or_else(|| format!("{pointer:?} is not a JSON pointer"))?;
    let last = unescape(last);
    let target = doc
        .pointer_mut(parent)
        .ok_or_else(|| format!("{parent:?} does not exist in the body"))?;
    match target {
        Value::Object(map) => {
            map.insert(last, value);
            Ok(())
        }
        Value::Array(items) if last == "-" => {
            items.push(value);
            Ok(())
        }
        Value::Array(items) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("{last:?} is not an index of the array at {parent:?}"))?;
            let slot = items
                .get_mut(i)
                .ok_or_else(|| format!("index {i} is past the end of the array at {parent:?}"))?;
            *slot = value;
            Ok(())
        }
        _ => Err(format!("{parent:?} is neither an object nor an array")),
    }
}

/// The edited body.
pub fn apply(body: &[u8], edit: &Edit) -> Result<Vec<u8>, CliError> {
    match edit {
        Edit::Body(b) => Ok(b.clone()),
        Edit::JsonSet(sets) => {
            let mut doc: Value = serde_json::from_slice(body).map_err(|e| {
                CliError::Usage(format!(
                    "the body is not JSON ({e}); replace it with --body-file instead"
                ))
            })?;
            for (pointer, value) in sets {
                set(&mut doc, pointer, value.clone())
                    .map_err(|e| CliError::Usage(format!("--json-set {pointer}: {e}")))?;
            }
            serde_json::to_vec(&doc)
                .map_err(|e| CliError::Failed(format!("cannot write the edited JSON: {e}")))
        }
    }
}

/// Hex SHA-256 of a body, as the dedup stages fingerprint payloads.
pub fn sha256_hex(body: &[u8]) -> String {
    Sha256::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The properties of the edited copy (module docs).
pub fn edited_properties(props: &BasicProperties, original_body: &[u8]) -> BasicProperties {
    let kept = restored_properties(props);
    let mut table = kept
        .headers()
        .as_ref()
        .map(|t| t.inner().clone())
        .unwrap_or_default();
    let long = |s: String| AMQPValue::LongString(LongString::from(s.into_bytes()));
    table.insert(
        EDITED_HEADER.into(),
        long(rfc3339(std::time::SystemTime::now())),
    );
    table
        .entry(ORIGINAL_FINGERPRINT_HEADER.into())
        .or_insert_with(|| long(sha256_hex(original_body)));
    kept.with_headers(FieldTable::from(table))
}

/// What `edit` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EditReport {
    /// The DLQ.
    pub dlq: String,
    /// The message id edited.
    pub message_id: String,
    /// Copies edited (1, or more when the DLQ held duplicates).
    pub edited: u64,
    /// SHA-256 of the body before the first edit (`x-idem-original-sha256`).
    pub original_sha256: String,
    /// SHA-256 of the new body.
    pub edited_sha256: String,
}

/// Edits every message of the DLQ of `queue` whose message id is `id` (module docs).
/// A body the edit cannot apply to is a usage error, and nothing is changed.
pub async fn edit(
    conn: &Connection,
    queue: &str,
    id: &str,
    change: &Edit,
) -> Result<EditReport, CliError> {
    let mut scan = Scan::open(conn, queue).await?;
    let mut report = EditReport {
        dlq: scan.dlq.clone(),
        message_id: id.to_owned(),
        edited: 0,
        original_sha256: String::new(),
        edited_sha256: String::new(),
    };
    let mut refused: Option<CliError> = None;
    let result = async {
        while let Some((delivery, entry)) = scan.next().await? {
            let selected = refused.is_none() && entry.message_id.as_deref() == Some(id);
            let edited = if selected {
                apply(&delivery.data, change)
                    .map_err(|e| refused = Some(e))
                    .ok()
            } else {
                None
            };
            let Some(body) = edited else {
                scan.restore(&delivery, entry.position).await?;
                continue;
            };
            let properties = edited_properties(&delivery.properties, &delivery.data);
            report.original_sha256 = properties
                .headers()
                .as_ref()
                .and_then(|t| t.inner().get(ORIGINAL_FINGERPRINT_HEADER).cloned())
                .map(|v| super::wire::value_text(&v))
                .unwrap_or_default();
            report.edited_sha256 = sha256_hex(&body);
            scan.put_back(delivery.delivery_tag, entry.position, &body, properties)
                .await?;
            report.edited += 1;
        }
        Ok::<_, CliError>(())
    }
    .await;
    scan.finish(result).await?;
    if let Some(e) = refused {
        return Err(e);
    }
    if report.edited == 0 {
        return Err(CliError::NotFound(format!(
            "no message with id {id:?} in {}; nothing was changed",
            report.dlq
        )));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_set_edits_members_and_refuses_what_it_cannot() {
        let set = |args: &[&str]| {
            Edit::JsonSet(args.iter().map(|a| parse_json_set(a).unwrap()).collect())
        };
        let body = br#"{"cents":-5,"items":[1,2],"a/b":{"c":1}}"#;
        let out = apply(
            body,
            &set(&["/cents=500", "/note=late", "/items/-=3", "/a~1b/c=[]"]),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["cents"], 500);
        assert_eq!(v["note"], "late");
        assert_eq!(v["items"], serde_json::json!([1, 2, 3]));
        assert_eq!(v["a/b"]["c"], serde_json::json!([]));
        assert!(apply(body, &set(&["/missing/x=1"])).is_err());
        assert!(apply(body, &set(&["/items/9=1"])).is_err());
        assert!(apply(b"not json", &set(&["/x=1"])).is_err());
        assert!(parse_json_set("cents=5").is_err());
        assert!(parse_json_set("/cents").is_err());
    }

    #[test]
    fn the_first_fingerprint_is_kept_through_later_edits() {
        let first = edited_properties(&BasicProperties::default(), b"v1");
        let fp = |p: &BasicProperties| {
            p.headers()
                .as_ref()
                .and_then(|t| t.inner().get(ORIGINAL_FINGERPRINT_HEADER).cloned())
        };
        let second = edited_properties(&first, b"v2");
        assert_eq!(fp(&first), fp(&second));
        assert_eq!(
            fp(&first),
            Some(AMQPValue::LongString(sha256_hex(b"v1").into_bytes().into()))
        );
    }
}
