//! `idem dlq show`: the headers and body of dead-lettered messages, read without
//! changing the queue (see the [module docs](super#reading-never-hands-a-message-back)).
//!
//! A body is shown as JSON pretty-printed when it parses as JSON, as text when it is
//! UTF-8, and otherwise escaped byte by byte (`\xff`, `\n`, printable ASCII as is).
//! At most `max_bytes` bytes of the rendering are shown, cut on a character boundary;
//! a cut body says so and gives the full size.

use std::collections::BTreeMap;

use lapin::Connection;
use serde::Serialize;

use super::scan::visit;
use super::wire::{value_text, WireProperties};
use super::{DlqEntry, Selector};
use crate::error::CliError;

/// The default `--max-bytes` of `show`.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024;

/// A body rendered for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RenderedBody {
    /// `json` (pretty-printed), `text` (UTF-8 as is) or `binary` (escaped).
    pub format: String,
    /// The rendering, at most `max_bytes` bytes of it.
    pub text: String,
    /// The body's size in bytes.
    pub bytes: usize,
    /// The rendering was cut at `max_bytes`.
    pub truncated: bool,
}

/// Renders `body` (module docs).
pub fn render_body(body: &[u8], max_bytes: usize) -> RenderedBody {
    let (format, full) = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => (
            "json",
            serde_json::to_string_pretty(&v)
                .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned()),
        ),
        Err(_) => match std::str::from_utf8(body) {
            Ok(text) => ("text", text.to_owned()),
            Err(_) => ("binary", escape(body)),
        },
    };
    let truncated = full.len() > max_bytes;
    let text = if truncated {
        let mut end = max_bytes;
        while !full.is_char_boundary(end) {
            end -= 1;
        }
        full[..end].to_owned()
    } else {
        full
    };
    RenderedBody {
        format: format.to_owned(),
        text,
        bytes: body.len(),
        truncated,
    }
}

fn escape(body: &[u8]) -> String {
    body.iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

/// One message as `show` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShownMessage {
    /// What `list` shows of it.
    pub entry: DlqEntry,
    /// The AMQP properties.
    pub properties: WireProperties,
    /// Every header, its value as text.
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: RenderedBody,
}

impl ShownMessage {
    pub(super) fn of(delivery: &lapin::message::Delivery, entry: DlqEntry, max: usize) -> Self {
        let wire = super::wire::WireMessage::from_amqp(&delivery.properties, &[]);
        ShownMessage {
            entry,
            properties: wire.properties,
            headers: delivery
                .properties
                .headers()
                .as_ref()
                .map(|t| {
                    t.inner()
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), value_text(v)))
                        .collect()
                })
                .unwrap_or_default(),
            body: render_body(&delivery.data, max),
        }
    }
}

/// The selected messages of the DLQ of `queue` (at most `limit`), with headers and
/// body; every message stays, in order.
pub async fn show(
    conn: &Connection,
    queue: &str,
    selector: &Selector,
    max_bytes: usize,
    limit: u64,
) -> Result<Vec<ShownMessage>, CliError> {
    let mut shown = Vec::new();
    visit(conn, queue, |delivery, entry| {
        if (shown.len() as u64) < limit && selector.matches(&entry) {
            shown.push(ShownMessage::of(delivery, entry, max_bytes));
        }
    })
    .await?;
    Ok(shown)
}

/// Writes `m` for a terminal: a summary, the headers, then the body.
pub fn write_shown(out: &mut dyn std::io::Write, m: &ShownMessage) -> std::io::Result<()> {
    let e = &m.entry;
    writeln!(
        out,
        "message #{} {}",
        e.position,
        e.message_id.as_deref().unwrap_or("(no message id)")
    )?;
    if let Some(ct) = &m.properties.content_type {
        writeln!(out, "content-type: {ct}")?;
    }
    writeln!(out, "headers:")?;
    for (k, v) in &m.headers {
        writeln!(out, "  {k}: {}", crate::render::cut(v, 200))?;
    }
    let b = &m.body;
    writeln!(out, "body ({}, {} bytes):", b.format, b.bytes)?;
    writeln!(out, "{}", b.text)?;
    if b.truncated {
        writeln!(
            out,
            "… [truncated: the first {} bytes of the {} rendering of a {}-byte body; see more with --max-bytes]",
            b.text.len(),
            b.format,
            b.bytes
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_rendered_by_kind_and_cut_on_a_char_boundary() {
        let j = render_body(br#"{"cents":500,"to":"acme"}"#, 1000);
        assert_eq!(j.format, "json");
        assert!(j.text.contains("\n  \"cents\": 500"), "{}", j.text);
        let t = render_body("héllo <script>".as_bytes(), 1000);
        assert_eq!(
            (t.format.as_str(), t.text.as_str()),
            ("text", "héllo <script>")
        );
        let b = render_body(&[0xff, b'a', b'\n'], 1000);
        assert_eq!(
            (b.format.as_str(), b.text.as_str()),
            ("binary", "\\xffa\\n")
        );
        let cut = render_body("ééé".as_bytes(), 3);
        assert!(cut.truncated);
        assert_eq!(cut.text, "é");
        assert_eq!(cut.bytes, 6);
    }
}
