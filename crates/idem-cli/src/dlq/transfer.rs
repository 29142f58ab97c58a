//! `idem dlq export` and `idem dlq import`: dead letters as JSON lines, one
//! [`WireMessage`] per line, lossless both ways.
//!
//! `export` reads like `list` (every message stays, in order). `import` checks the
//! whole file first (a bad line is an error naming it, and nothing is published),
//! then publishes the messages to the DLQ in file order with publisher confirms and
//! mandatory routing, in batches; it reports how many the broker confirmed. Messages
//! keep their properties and headers exactly (`x-idem-*` failure history included),
//! so an imported message is the dead letter it was.

use std::io::{BufRead, Write};

use idem_amqp::{Publisher, RawOutgoing};
use lapin::Connection;
use serde::Serialize;

use super::scan::visit;
use super::wire::WireMessage;
use super::{resolve, Selector, PIPELINE};
use crate::broker::open_channel;
use crate::error::CliError;

/// Writes the selected messages of the DLQ of `queue` to `out` as JSON lines; every
/// message stays, in order. Returns how many were written.
pub async fn export(
    conn: &Connection,
    queue: &str,
    selector: &Selector,
    out: &mut dyn Write,
) -> Result<u64, CliError> {
    let mut written = 0u64;
    let mut failed: Option<std::io::Error> = None;
    visit(conn, queue, |delivery, entry| {
        if failed.is_some() || !selector.matches(&entry) {
            return;
        }
        let w = WireMessage::from_amqp(&delivery.properties, &delivery.data);
        let line = serde_json::to_string(&w).map_err(std::io::Error::other);
        match line.and_then(|l| writeln!(out, "{l}")) {
            Ok(()) => written += 1,
            Err(e) => failed = Some(e),
        }
    })
    .await?;
    if let Some(e) = failed {
        return Err(CliError::Failed(format!("cannot write the export: {e}")));
    }
    Ok(written)
}

/// Reads JSON lines of [`WireMessage`]s; blank lines are skipped. A bad line is a
/// usage error naming its number.
pub fn read_lines(input: impl BufRead) -> Result<Vec<WireMessage>, CliError> {
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| CliError::Usage(format!("cannot read line {}: {e}", i + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let w: WireMessage = serde_json::from_str(&line).map_err(|e| {
            CliError::Usage(format!(
                "line {}: not an exported message ({e}); nothing was imported",
                i + 1
            ))
        })?;
        // Checked now, so that a bad value stops the import before anything is sent.
        w.to_amqp()
            .map_err(|e| CliError::Usage(format!("line {}: {e}; nothing was imported", i + 1)))?;
        out.push(w);
    }
    Ok(out)
}

/// What `import` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// The DLQ the messages went to.
    pub dlq: String,
    /// Messages in the file.
    pub read: u64,
    /// Messages the broker confirmed.
    pub imported: u64,
}

/// Publishes `messages` to the DLQ of `queue` (see [`resolve`]) in order, with
/// confirms. Stops at the first batch with a refused message: the report then says
/// how many went in (those are in the queue, in order; the rest are not).
pub async fn import(
    conn: &Connection,
    queue: &str,
    messages: &[WireMessage],
) -> Result<ImportReport, CliError> {
    let dlq = resolve(conn, queue).await?.dlq;
    let publisher = Publisher::on_channel(open_channel(conn).await?).await?;
    let mut report = ImportReport {
        dlq: dlq.clone(),
        read: messages.len() as u64,
        imported: 0,
    };
    let result = async {
        for chunk in messages.chunks(PIPELINE) {
            let decoded = chunk
                .iter()
                .map(WireMessage::to_amqp)
                .collect::<Result<Vec<_>, _>>()?;
            let batch: Vec<RawOutgoing<'_>> = decoded
                .iter()
                .map(|(properties, body)| RawOutgoing {
                    exchange: "",
                    routing_key: &dlq,
                    body,
                    properties: properties.clone(),
                })
                .collect();
            let results = publisher.publish_raw_each(&batch).await?;
            let mut refused = None;
            for r in results {
                match r {
                    Ok(()) => report.imported += 1,
                    Err(e) => refused = refused.or(Some(e)),
                }
            }
            if let Some(e) = refused {
                return Err(CliError::Partial(format!(
                    "{} of {} message(s) imported into {dlq}; the broker refused at least one ({e}), and the lines after that batch were not sent",
                    report.imported, report.read
                )));
            }
        }
        Ok(())
    }
    .await;
    publisher.close().await;
    result.map(|()| report)
}
