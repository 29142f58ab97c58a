//! Dead-letter queue operations: list, stats, replay, purge.
//!
//! `idem dlq <Q>` works on `Q.dlq`; given the DLQ's own name (`orders.dlq` when
//! `orders.dlq.dlq` does not exist), it works on that queue (see [`resolve`]).
//!
//! # Reading never hands a message back
//!
//! Every operation takes the messages present when it starts (a snapshot of the queue
//! depth). A message the operation does not remove
//! (every message of `list` and `stats`, the unselected ones of `replay` and `purge`)
//! is *restored*: an exact copy (same body, properties and headers, minus the
//! broker's per-delivery `x-delivery-count` / `x-acquired-count`) is published back to
//! the DLQ with publisher confirms and mandatory routing, and the original is acked
//! only once the broker confirmed the copy. Nothing is ever requeued by a `nack` or
//! by closing the channel, because on RabbitMQ 4.x quorum queues every such return
//! can count as a failed delivery: quorum queues have a default `delivery-limit` of 20
//! since 4.0, and a message over the limit is dropped (or dead-lettered), and before
//! 4.3 every return counted, since 4.3 channel closes and `basic.reject` still do
//! (<https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling>,
//! "When is delivery count incremented?"). Twenty `idem dlq list` runs must not delete
//! a dead letter. Classic queues have no delivery limit, but use the same path.
//!
//! The commands that remove messages (`replay`, `purge`, `edit`) take them with
//! `basic.get`, one by one. The reads (`list`, `stats`, `show`, `export`, the
//! console's GETs, the look-ahead of a predicting replay) take them through a consumer
//! instead, so that the broker streams them rather than answering one `basic.get` at
//! a time (on a quorum queue each `basic.get` is a consensus round: a read of 1 000
//! dead letters took seconds, it now takes a fraction of one). The consumer's
//! prefetch is at most the snapshot (128 at most), and the last *prefetch* messages
//! of the snapshot are acked only after the consumer is cancelled: the broker never
//! has credit to send a message past the snapshot (a restored copy, or a message
//! dead-lettered meanwhile), so nothing is handed back. Acks go out in batches (one
//! `basic.ack` with `multiple`) and at most 16 copies await their confirm, which keeps
//! a quorum queue channel under the 32 pending commands past which it holds acks back.
//! If someone else empties the queue during a read, the read notices after a second
//! without deliveries (the queue has no ready message) and stops there. If its
//! consumer gets nothing for five seconds while the queue has ready messages (the
//! queue has a single active consumer and it is someone else's), the read cancels
//! its consumer and takes the rest with `basic.get`, which RabbitMQ refuses on a
//! quorum queue with single active consumer: then the read stops with that error,
//! having changed nothing.
//!
//! The whole snapshot is read even for `list --limit N` (only the first N are
//! shown), so the restored messages keep their relative order; messages dead-lettered
//! while a command runs land among them. A crash between the confirm of a copy and the
//! ack of its original leaves both in the DLQ (same `message_id`): a duplicate, never a
//! loss. A copy is a new message for the broker: a message TTL the DLQ may have (by
//! policy) starts again for it. If a copy is refused (e.g. the DLQ is full with `reject-publish`), the command
//! stops with an error and the broker returns the messages it still holds (the only
//! case where a message is handed back: for a read, up to the 128 it was sent ahead).
//!
//! - `list` and `stats` remove nothing.
//! - `replay` re-publishes a matching message to its original queue with publisher
//!   confirms (mandatory routing) and acks it in the DLQ only once the broker confirmed
//!   the copy. A crash in between leaves the message in both queues (the copy keeps
//!   its `message_id`, so consumers dedup it), never in neither.
//! - `purge` acks (deletes) the matching messages.
//!
//! # Dead letters made by RabbitMQ itself
//!
//! Messages the broker dead-lettered (TTL expiry, `basic.reject`/`nack` with
//! `requeue=false` by any client, a length limit, a quorum queue's delivery limit)
//! carry no `x-idem-*` failure headers, only the broker's `x-death` array (most recent
//! death first) and `x-first-death-*` (and, since RabbitMQ 3.13, `x-last-death-*`)
//! headers (<https://www.rabbitmq.com/docs/dlx#effects>). For those, the most recent
//! `x-death` entry (the death that brought the message to the DLQ) gives the reason,
//! the queue it was dead-lettered from, how many times, when, and the exchange and
//! routing key it was published with; see [`BrokerDeath`]. `list` shows the reason as
//! the kind, the count as the attempts; `stats` groups them by reason and queue;
//! `replay` sends them to that queue.
//!
//! A replayed copy loses the broker's death headers (`x-death`, `x-first-death-*`,
//! `x-last-death-*`, see [`BROKER_DEATH_HEADERS`]): `x-` headers belong to the broker
//! (RabbitMQ 4.x no longer interprets an `x-death` a client publishes,
//! <https://github.com/rabbitmq/rabbitmq-server/pull/11339>, while 3.x does and can
//! silently drop a message it then sees dying twice in the same queue without a
//! rejection, <https://www.rabbitmq.com/docs/dlx#dead-letter-cycle>), so a replay starts a
//! fresh history on every version. The exchange and routing key it was first published
//! with are kept as `x-idem-original-exchange` / `x-idem-original-routing-key`. The
//! copy goes straight to the queue through the default exchange, never through the
//! original exchange, which could also deliver it to every other queue bound there.
//! The per-message TTL the broker removed on an expiry is not restored (the copy
//! would only expire again).

//!
//! The commands live in their own modules: [`scan`](self#reading-never-hands-a-message-back)
//! (the walk over a DLQ that `list` is), `stats`, `replay` and `purge`; the replay
//! rules themselves (which headers a replayed copy loses) are in
//! [`idem_amqp::replay`], next to the transport that writes the dead-letter headers.

use std::collections::BTreeSet;
use std::time::{Duration, UNIX_EPOCH};

use idem_core::__private::rfc3339;
use idem_core::dedup::REPLAY_HEADER;
use idem_core::outcome::headers as h;
use idem_core::Message;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;
use regex::Regex;
use serde::Serialize;

use crate::broker::{probe, QueueCounts};
use crate::error::CliError;

mod edit;
mod filter;
pub mod lookup;
mod purge;
pub mod redrive;
mod replay;
mod scan;
mod show;
mod stats;
mod transfer;
pub mod wire;

pub use edit::{
    apply as apply_edit, edit, edited_properties, parse_json_set, sha256_hex, Edit, EditReport,
};
pub use filter::{parse_age, pattern, time_arg, Filter, GroupKey};
pub use idem_amqp::replay::{restored_properties, BROKER_DEATH_HEADERS, STRIPPED_ON_REPLAY};
pub use purge::purge;
pub use replay::{
    parse_rate, replay, replay_predicting, replay_properties, replay_with, ReplayOptions,
};
pub(crate) use scan::visit_queue;
pub use scan::{list, list_where};
pub use show::{render_body, show, write_shown, RenderedBody, ShownMessage, DEFAULT_MAX_BYTES};
pub use stats::{stats, stats_where, DlqStats, ErrorGroup};
pub use transfer::{export, import, read_lines, ImportReport};

/// Copies published (and confirms awaited) together during a replay, and restores in
/// flight at once.
const PIPELINE: usize = 128;

/// The most recent dead-lettering of a message by the broker: the first entry of its
/// `x-death` header (`x-last-death-*`, then `x-first-death-*` when `x-death` is
/// missing or unreadable).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BrokerDeath {
    /// `expired`, `rejected`, `maxlen` or `delivery_limit`.
    pub reason: Option<String>,
    /// The queue it was dead-lettered from.
    pub queue: Option<String>,
    /// How many times it was dead-lettered from that queue for that reason.
    pub count: Option<i64>,
    /// When it was first dead-lettered from that queue for that reason (RFC 3339).
    pub time: Option<String>,
    /// The exchange it had been published to.
    pub exchange: Option<String>,
    /// The first routing key it had been published with.
    pub routing_key: Option<String>,
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn integer(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

impl BrokerDeath {
    /// Reads the death headers of `headers`; `None` if the broker never dead-lettered
    /// the message. Malformed parts are left out (never an error: a DLQ must stay
    /// readable whatever its messages carry).
    pub fn from_headers(headers: &FieldTable) -> Option<Self> {
        let t = headers.inner();
        let get = |name: &str| t.get(name).and_then(text);
        let mut death = BrokerDeath::default();
        if let Some(AMQPValue::FieldArray(entries)) = t.get("x-death") {
            if let Some(AMQPValue::FieldTable(first)) = entries.as_slice().first() {
                let e = first.inner();
                death.reason = e.get("reason").and_then(text);
                death.queue = e.get("queue").and_then(text);
                death.count = e.get("count").and_then(integer);
                death.time = match e.get("time") {
                    Some(AMQPValue::Timestamp(secs)) => {
                        Some(rfc3339(UNIX_EPOCH + Duration::from_secs(*secs)))
                    }
                    _ => None,
                };
                death.exchange = e.get("exchange").and_then(text);
                death.routing_key = match e.get("routing-keys") {
                    Some(AMQPValue::FieldArray(keys)) => keys.as_slice().first().and_then(text),
                    _ => None,
                };
            }
        }
        death.reason = death
            .reason
            .or_else(|| get("x-last-death-reason"))
            .or_else(|| get("x-first-death-reason"));
        death.queue = death
            .queue
            .or_else(|| get("x-last-death-queue"))
            .or_else(|| get("x-first-death-queue"));
        death.exchange = death
            .exchange
            .or_else(|| get("x-last-death-exchange"))
            .or_else(|| get("x-first-death-exchange"));
        (death != BrokerDeath::default()).then_some(death)
    }
}

/// One dead-lettered message, as read from its headers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DlqEntry {
    /// 1-based position in the DLQ.
    pub position: u64,
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    /// Who dead-lettered it: `idem` (it carries `x-idem-error` or
    /// `x-idem-error-kind`), `broker` (only the broker's death headers) or `unknown`.
    pub source: String,
    /// `x-idem-key`: the idempotency key.
    pub key: Option<String>,
    /// `x-idem-error-kind`: `transient` or `permanent`.
    pub error_kind: Option<String>,
    /// `x-idem-attempts`.
    pub attempts: Option<i64>,
    /// `x-idem-first-failed-at` (RFC 3339).
    pub first_failed_at: Option<String>,
    /// `x-idem-last-failed-at` (RFC 3339).
    pub last_failed_at: Option<String>,
    /// `x-idem-error`: the error chain.
    pub error: Option<String>,
    /// `x-idem-original-queue`.
    pub original_queue: Option<String>,
    /// `x-idem-original-exchange`.
    pub original_exchange: Option<String>,
    /// `x-idem-original-routing-key`.
    pub original_routing_key: Option<String>,
    /// `x-idem-consumer`.
    pub consumer: Option<String>,
    /// `x-idem-error-type`: the error's Rust type name, when known.
    pub error_type: Option<String>,
    /// `x-idem-host`: the host of the worker that dead-lettered it.
    pub host: Option<String>,
    /// `x-idem-pid`: the process id of that worker.
    pub pid: Option<i64>,
    /// `x-idem-immediate-retries`: in-process retries spent on the last delivery.
    pub immediate_retries: Option<i64>,
    /// `x-idem-backtrace`, when the consumer writes them (opt-in).
    pub backtrace: Option<String>,
    /// `x-idem-replay`, if the message was replayed before.
    pub replay: Option<String>,
    /// The broker's most recent dead-lettering of the message, if any.
    pub broker_death: Option<BrokerDeath>,
    /// Body size in bytes.
    pub body_bytes: usize,
}

impl DlqEntry {
    fn from_delivery(msg: &Message, headers: Option<&FieldTable>, position: u64) -> Self {
        let s = |name: &str| msg.header_str(name).map(str::to_owned);
        let broker_death = headers.and_then(BrokerDeath::from_headers);
        let error = s(h::ERROR);
        let error_kind = s(h::ERROR_KIND);
        let source = if error.is_some() || error_kind.is_some() {
            "idem"
        } else if broker_death.is_some() {
            "broker"
        } else {
            "unknown"
        };
        DlqEntry {
            position,
            message_id: msg.properties.message_id.clone(),
            source: source.to_owned(),
            key: s(h::KEY),
            error_kind,
            attempts: idem_core::read::read_quiet::<u32>(msg, h::ATTEMPTS).map(i64::from),
            first_failed_at: s(h::FIRST_FAILED_AT),
            last_failed_at: s(h::LAST_FAILED_AT),
            error,
            original_queue: s(h::ORIGINAL_QUEUE),
            original_exchange: s(h::ORIGINAL_EXCHANGE),
            original_routing_key: s(h::ORIGINAL_ROUTING_KEY),
            consumer: s(h::CONSUMER),
            error_type: s(h::ERROR_TYPE),
            host: s(h::HOST),
            pid: idem_core::read::read_quiet::<u32>(msg, h::PID).map(i64::from),
            immediate_retries: idem_core::read::read_quiet::<u32>(msg, h::IMMEDIATE_RETRIES)
                .map(i64::from),
            backtrace: s(h::BACKTRACE),
            replay: s(REPLAY_HEADER),
            broker_death,
            body_bytes: msg.body.len(),
        }
    }

    fn broker_made(&self) -> Option<&BrokerDeath> {
        self.broker_death
            .as_ref()
            .filter(|_| self.source == "broker")
    }

    /// The kind shown and grouped on: `x-idem-error-kind`, else the broker's reason
    /// (`expired`, `rejected`, ...), else `unknown`.
    pub fn kind(&self) -> String {
        self.error_kind
            .clone()
            .or_else(|| self.broker_made().and_then(|d| d.reason.clone()))
            .unwrap_or_else(|| "unknown".to_owned())
    }

    /// The attempts shown: `x-idem-attempts`, else how many times the broker
    /// dead-lettered it from its queue for its reason.
    pub fn count(&self) -> Option<i64> {
        self.attempts
            .or_else(|| self.broker_made().and_then(|d| d.count))
    }

    /// The queue a replay sends it to: `x-idem-original-queue`, else the queue the
    /// broker dead-lettered it from.
    pub fn source_queue(&self) -> Option<&str> {
        self.original_queue
            .as_deref()
            .or_else(|| self.broker_made().and_then(|d| d.queue.as_deref()))
    }

    /// The error text shown and matched by `--error-matches`: `x-idem-error`, else a
    /// description of the broker's dead-lettering such as
    /// `dead-lettered by RabbitMQ (expired) from queue "orders", 1 time(s)`.
    pub fn error_text(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(e.clone());
        }
        let d = self.broker_made()?;
        let mut text = format!(
            "dead-lettered by RabbitMQ ({})",
            d.reason.as_deref().unwrap_or("unknown reason")
        );
        if let Some(q) = &d.queue {
            text.push_str(&format!(" from queue {q:?}"));
        }
        if let Some(n) = d.count {
            text.push_str(&format!(", {n} time(s)"));
        }
        Some(text)
    }

    /// When it failed first: `x-idem-first-failed-at`, else the broker's death time.
    pub fn first_time(&self) -> Option<String> {
        self.first_failed_at
            .clone()
            .or_else(|| self.broker_made().and_then(|d| d.time.clone()))
    }

    /// When it failed last: `x-idem-last-failed-at`, else the broker's death time.
    pub fn last_time(&self) -> Option<String> {
        self.last_failed_at
            .clone()
            .or_else(|| self.broker_made().and_then(|d| d.time.clone()))
    }
}

/// Which dead-lettered messages an operation acts on.
#[derive(Clone, Debug)]
pub enum Selector {
    /// Every message.
    All,
    /// Messages whose AMQP `message_id` is one of these.
    Ids(BTreeSet<String>),
    /// Messages whose `x-idem-error` (for broker dead letters: the text of
    /// [`DlqEntry::error_text`]) matches this regular expression (unanchored: `timeout`
    /// matches any error containing "timeout").
    ErrorMatches(Regex),
    /// Messages passing every filter of a [`Filter`] (the shared `--id`, `--group`,
    /// `--error-type`, `--consumer`, `--since`, `--until`, `--match` options).
    Filter(Box<Filter>),
}

impl Selector {
    /// A selector on `x-idem-error`; `pattern` is a regular expression (`regex` crate
    /// syntax).
    pub fn error_matches(pattern: &str) -> Result<Self, CliError> {
        Regex::new(pattern)
            .map(Selector::ErrorMatches)
            .map_err(|e| CliError::Usage(format!("invalid --error-matches pattern: {e}")))
    }

    /// A selector on message ids.
    pub fn ids<I: IntoIterator<Item = S>, S: Into<String>>(ids: I) -> Self {
        Selector::Ids(ids.into_iter().map(Into::into).collect())
    }

    /// Whether `entry` is selected.
    pub fn matches(&self, entry: &DlqEntry) -> bool {
        match self {
            Selector::All => true,
            Selector::Ids(ids) => entry.message_id.as_ref().is_some_and(|id| ids.contains(id)),
            Selector::ErrorMatches(re) => entry.error_text().is_some_and(|e| re.is_match(&e)),
            Selector::Filter(f) => f.matches(entry),
        }
    }
}

/// The queues an `idem dlq` command works on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The work queue (where `replay` sends messages without an original queue).
    pub queue: String,
    /// The dead-letter queue read.
    pub dlq: String,
    /// Its depth and consumers when resolved.
    pub counts: QueueCounts,
}

/// Finds the DLQ `name` designates: `name.dlq` (the work queue's DLQ), else `name`
/// itself when it ends with `.dlq` and exists (`idem dlq list orders.dlq`). When
/// neither exists, the error says what was looked for and suggests the likely name.
pub async fn resolve(conn: &Connection, name: &str) -> Result<Resolved, CliError> {
    let dlq = idem_amqp::Topology::new(name).dlq();
    if let Some(counts) = probe(conn, &dlq).await? {
        return Ok(Resolved {
            queue: name.to_owned(),
            dlq,
            counts,
        });
    }
    if let Some(stem) = name.strip_suffix(".dlq").filter(|s| !s.is_empty()) {
        if let Some(counts) = probe(conn, name).await? {
            return Ok(Resolved {
                queue: stem.to_owned(),
                dlq: name.to_owned(),
                counts,
            });
        }
        return Err(CliError::NotFound(format!(
            "neither {dlq:?} nor {name:?} exists; did you mean the work queue `{stem}` (its DLQ is {name:?})? Check the name and the vhost in --url, or declare the topology with `idem topology declare {stem}`"
        )));
    }
    let hint = if probe(conn, name).await?.is_some() {
        format!("the work queue {name:?} exists but has no DLQ: declare its topology with `idem topology declare {name}`")
    } else {
        format!("no queue {name:?} either: check the name and the vhost in --url, or declare the topology with `idem topology declare {name}`")
    };
    Err(CliError::NotFound(format!(
        "queue {dlq:?} does not exist (`idem dlq` takes the work queue Q and reads Q.dlq, or the DLQ's own name); {hint}"
    )))
}

/// What happened to one selected message.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MovedMessage {
    /// Position in the DLQ when the operation started (1-based).
    pub position: u64,
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    /// Where it was (or would be) replayed to; `None` for a purge.
    pub target: Option<String>,
    /// `moved`, `purged`, `would move`, `would purge`, or `failed: <reason>`.
    pub outcome: String,
}

/// The result of a replay or purge.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MoveReport {
    /// The dead-letter queue.
    pub dlq: String,
    /// The `x-idem-replay` value set on replayed messages (replays only).
    pub replay_id: Option<String>,
    /// Nothing was changed.
    pub dry_run: bool,
    /// Messages read.
    pub scanned: u64,
    /// Messages selected.
    pub matched: u64,
    /// With a dedup store lookup (`--dedup-redis` or `--dedup-postgres`): selected messages whose key is
    /// already done, which the consumer will ack as duplicates without running them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<u64>,
    /// Messages removed from the DLQ (replayed or purged).
    pub done: u64,
    /// Selected messages that could not be handled (they stay in the DLQ).
    pub failed: u64,
    /// Each selected message.
    pub messages: Vec<MovedMessage>,
}

impl MoveReport {
    fn new(dlq: String, replay_id: Option<String>, dry_run: bool) -> Self {
        MoveReport {
            dlq,
            replay_id,
            dry_run,
            scanned: 0,
            matched: 0,
            duplicates: None,
            done: 0,
            failed: 0,
            messages: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
