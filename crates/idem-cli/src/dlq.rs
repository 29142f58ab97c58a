//! Dead-letter queue operations: list, stats, replay, purge.
//!
//! `idem dlq <Q>` works on `Q.dlq`; given the DLQ's own name (`orders.dlq` when
//! `orders.dlq.dlq` does not exist), it works on that queue (see [`resolve`]).
//!
//! # Reading never hands a message back
//!
//! Every operation takes the messages present when it starts (a snapshot of the queue
//! depth) with `basic.get`, one by one. A message the operation does not remove
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
//! The whole snapshot is read even for `list --limit N` (only the first N are
//! shown), so the restored messages keep their relative order; messages dead-lettered
//! while a command runs land among them. A crash between the confirm of a copy and the
//! ack of its original leaves both in the DLQ (same `message_id`): a duplicate, never a
//! loss. A copy is a new message for the broker: a message TTL the DLQ may have (by
//! policy) starts again for it. If a copy is refused (e.g. the DLQ is full with `reject-publish`), the command
//! stops with an error and the broker returns the messages it still holds (the only
//! case where a message is handed back).
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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, UNIX_EPOCH};

use idem_core::dedup::REPLAY_HEADER;
use idem_core::outcome::{headers as h, parse_rfc3339, rfc3339};
use idem_core::Message;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use regex::Regex;
use serde::Serialize;

use crate::broker::{close_channel, open_channel, passive_declare, probe, queue_name, QueueCounts};
use crate::error::CliError;
use crate::normalize::normalize_error;
use crate::render::Progress;

/// Failure headers removed from a replayed message: its attempts start again from 0.
/// `x-idem-original-exchange` and `x-idem-original-routing-key` are kept (they tell the
/// consumer where the message was first published).
pub const STRIPPED_ON_REPLAY: [&str; 8] = [
    h::ATTEMPTS,
    h::ERROR,
    h::ERROR_KIND,
    h::FIRST_FAILED_AT,
    h::LAST_FAILED_AT,
    h::ORIGINAL_QUEUE,
    h::CONSUMER,
    h::KEY,
];

/// The broker's dead-lettering headers, removed from a replayed message (see the
/// [module docs](self#dead-letters-made-by-rabbitmq-itself)).
pub const BROKER_DEATH_HEADERS: [&str; 7] = [
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
];

/// Headers the broker adds to each delivery of a quorum queue message; a restored copy
/// goes without them (they describe a delivery, not the message).
const DELIVERY_HEADERS: [&str; 2] = ["x-delivery-count", "x-acquired-count"];

/// Confirms awaited at once during a replay.
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
    /// `x-idem-key`: the idempotence key.
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

/// A copy on its way back to the DLQ; the original is acked once it is confirmed.
struct Restoring {
    tag: u64,
    position: u64,
    confirm: Result<PublisherConfirm, lapin::Error>,
}

/// A walk over the messages of a DLQ present when it was opened that never hands a
/// message back to the broker: what is not removed is restored (module docs).
struct Scan {
    channel: Channel,
    queue: String,
    dlq: String,
    remaining: u64,
    position: u64,
    restoring: VecDeque<Restoring>,
}

impl Scan {
    async fn open(conn: &Connection, name: &str) -> Result<Self, CliError> {
        let resolved = resolve(conn, name).await?;
        let channel = open_channel(conn).await?;
        // Count again on the reading channel: the snapshot is what this channel sees.
        let Some(counts) = passive_declare(&channel, &resolved.dlq).await? else {
            return Err(CliError::NotFound(format!(
                "queue {:?} was deleted while the command started",
                resolved.dlq
            )));
        };
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(CliError::amqp("confirm.select"))?;
        Ok(Scan {
            channel,
            queue: resolved.queue,
            dlq: resolved.dlq,
            remaining: u64::from(counts.messages),
            position: 0,
            restoring: VecDeque::new(),
        })
    }

    fn total(&self) -> u64 {
        self.remaining + self.position
    }

    /// The next message of the snapshot, not yet acked: the caller removes it (ack) or
    /// restores it ([`Scan::restore`]).
    async fn next(&mut self) -> Result<Option<(Delivery, DlqEntry)>, CliError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let got = self
            .channel
            .basic_get(queue_name(&self.dlq)?, BasicGetOptions { no_ack: false })
            .await
            .map_err(CliError::amqp("basic.get"))?;
        let Some(got) = got else {
            self.remaining = 0;
            return Ok(None);
        };
        self.remaining -= 1;
        self.position += 1;
        let delivery = got.delivery;
        let msg = idem_amqp::convert::message_from_delivery(&delivery, &self.dlq);
        let entry =
            DlqEntry::from_delivery(&msg, delivery.properties.headers().as_ref(), self.position);
        Ok(Some((delivery, entry)))
    }

    async fn ack(&self, delivery_tag: u64) -> Result<(), CliError> {
        self.channel
            .basic_ack(delivery_tag, BasicAckOptions::default())
            .await
            .map_err(CliError::amqp("basic.ack"))
    }

    /// Publishes an exact copy of `delivery` to the tail of the DLQ; the original is
    /// acked once the copy is confirmed.
    async fn restore(&mut self, delivery: &Delivery, position: u64) -> Result<(), CliError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue_name(&self.dlq)?,
                options,
                &delivery.data,
                restored_properties(&delivery.properties),
            )
            .await;
        self.restoring.push_back(Restoring {
            tag: delivery.delivery_tag,
            position,
            confirm,
        });
        if self.restoring.len() >= PIPELINE {
            self.settle_oldest_restore().await?;
        }
        Ok(())
    }

    async fn settle_oldest_restore(&mut self) -> Result<(), CliError> {
        let Some(r) = self.restoring.pop_front() else {
            return Ok(());
        };
        let confirmation = match r.confirm {
            Ok(confirm) => confirm.await,
            Err(e) => Err(e),
        };
        let why = match confirmation {
            Ok(Confirmation::Ack(None)) => return self.ack(r.tag).await,
            Ok(Confirmation::Ack(Some(returned))) => {
                format!("returned ({} {})", returned.reply_code, returned.reply_text)
            }
            Ok(Confirmation::Nack(_)) => "nacked (is the DLQ full?)".to_owned(),
            Ok(Confirmation::NotRequested) => "not confirmed".to_owned(),
            Err(e) => format!("failed: {e}"),
        };
        Err(CliError::Failed(format!(
            "could not put message #{} back at the tail of {}: the copy was {why}; the message stays in the queue (handed back by the broker), nothing was lost",
            r.position, self.dlq
        )))
    }

    /// Waits for every restored copy and acks the originals.
    async fn settle_restores(&mut self) -> Result<(), CliError> {
        while !self.restoring.is_empty() {
            self.settle_oldest_restore().await?;
        }
        Ok(())
    }

    /// Settles the restores, then closes the channel. On an error, whatever is still
    /// unacked is handed back by the broker.
    async fn finish(mut self, result: Result<(), CliError>) -> Result<(), CliError> {
        let settled = match result {
            Ok(()) => self.settle_restores().await,
            Err(e) => Err(e),
        };
        close_channel(&self.channel).await;
        settled
    }
}

/// The properties of a restored copy: the original's, minus the broker's
/// per-delivery headers.
pub fn restored_properties(props: &BasicProperties) -> BasicProperties {
    match props.headers() {
        Some(t) if DELIVERY_HEADERS.iter().any(|d| t.inner().contains_key(*d)) => {
            let mut table = t.inner().clone();
            table.retain(|name, _| !DELIVERY_HEADERS.contains(&name.as_str()));
            props.clone().with_headers(FieldTable::from(table))
        }
        _ => props.clone(),
    }
}

/// The first `limit` messages of the DLQ of `queue` (see [`resolve`]); every message
/// stays, in order (module docs).
pub async fn list(conn: &Connection, queue: &str, limit: u64) -> Result<Vec<DlqEntry>, CliError> {
    let mut scan = Scan::open(conn, queue).await?;
    let mut entries = Vec::new();
    let result = async {
        while let Some((delivery, entry)) = scan.next().await? {
            scan.restore(&delivery, entry.position).await?;
            if (entries.len() as u64) < limit {
                entries.push(entry);
            }
        }
        Ok::<_, CliError>(())
    }
    .await;
    scan.finish(result).await.map(|()| entries)
}

/// Messages of one error kind whose errors normalise to the same text; for messages
/// the broker dead-lettered, of one reason and one queue.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorGroup {
    /// `x-idem-error-kind`; for broker dead letters the reason (`expired`,
    /// `rejected`, ...); `unknown` when absent.
    pub error_kind: String,
    /// For broker dead letters: the queue they were dead-lettered from.
    pub queue: Option<String>,
    /// The normalised error text (see [`normalize_error`]).
    pub error: String,
    /// Messages in the group.
    pub count: u64,
    /// Earliest `x-idem-first-failed-at` of the group.
    pub first_seen: Option<String>,
    /// Latest `x-idem-last-failed-at` of the group.
    pub last_seen: Option<String>,
    /// One original error text.
    pub example: String,
    /// Up to 3 message ids of the group.
    pub message_ids: Vec<String>,
}

/// The "common problems" view of a DLQ.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DlqStats {
    /// The dead-letter queue.
    pub dlq: String,
    /// Messages read.
    pub scanned: u64,
    /// Groups, largest first.
    pub groups: Vec<ErrorGroup>,
}

fn earlier(a: &Option<String>, b: &Option<String>, later: bool) -> Option<String> {
    let time = |s: &Option<String>| s.as_deref().and_then(parse_rfc3339);
    match (time(a), time(b)) {
        (Some(x), Some(y)) => {
            let pick_a: bool = if later { x >= y } else { x <= y };
            if pick_a {
                a.clone()
            } else {
                b.clone()
            }
        }
        (Some(_), None) => a.clone(),
        (None, _) => b.clone().or_else(|| a.clone()),
    }
}

/// Groups the messages of the DLQ of `queue` (the first `limit`, or all) by error kind
/// and normalised error text (broker dead letters: by reason and queue); every message
/// stays, in order.
pub async fn stats(
    conn: &Connection,
    queue: &str,
    limit: Option<u64>,
) -> Result<DlqStats, CliError> {
    let mut scan = Scan::open(conn, queue).await?;
    let mut groups: BTreeMap<(String, String), ErrorGroup> = BTreeMap::new();
    let mut scanned = 0;
    let result = async {
        while let Some((delivery, e)) = scan.next().await? {
            scan.restore(&delivery, e.position).await?;
            if limit.is_some_and(|l| scanned >= l) {
                continue;
            }
            scanned += 1;
            let kind = e.kind();
            let raw = e.error_text().unwrap_or_default();
            // Broker texts carry the count: group on reason and queue only.
            let (norm, group_queue) = match e.broker_made() {
                Some(d) => (
                    format!(
                        "dead-lettered by RabbitMQ from queue {:?}",
                        d.queue.as_deref().unwrap_or("?")
                    ),
                    d.queue.clone(),
                ),
                None => (normalize_error(&raw), None),
            };
            let g = groups
                .entry((kind.clone(), norm.clone()))
                .or_insert_with(|| ErrorGroup {
                    error_kind: kind,
                    queue: group_queue,
                    error: norm,
                    count: 0,
                    first_seen: None,
                    last_seen: None,
                    example: raw,
                    message_ids: Vec::new(),
                });
            g.count += 1;
            g.first_seen = earlier(&g.first_seen, &e.first_time(), false);
            g.last_seen = earlier(&g.last_seen, &e.last_time(), true);
            if let (Some(id), true) = (e.message_id, g.message_ids.len() < 3) {
                g.message_ids.push(id);
            }
        }
        Ok::<_, CliError>(())
    }
    .await;
    let dlq = scan.dlq.clone();
    scan.finish(result).await?;
    let mut groups: Vec<ErrorGroup> = groups.into_values().collect();
    groups.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.error.cmp(&b.error)));
    Ok(DlqStats {
        dlq,
        scanned,
        groups,
    })
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
            done: 0,
            failed: 0,
            messages: Vec::new(),
        }
    }
}

/// The properties of the replayed copy: the originals (message id, headers, ...)
/// without the failure headers and the broker's death headers, plus `x-idem-replay`.
/// For a message the broker dead-lettered (`death`), the exchange and routing key it
/// was published with are kept as `x-idem-original-exchange` /
/// `x-idem-original-routing-key` (unless already set).
pub fn replay_properties(
    props: &BasicProperties,
    replay_id: &str,
    death: Option<&BrokerDeath>,
) -> BasicProperties {
    let mut table = props
        .headers()
        .as_ref()
        .map(|t| t.inner().clone())
        .unwrap_or_default();
    table.retain(|name, _| {
        let name = name.as_str();
        !STRIPPED_ON_REPLAY.contains(&name)
            && !BROKER_DEATH_HEADERS.contains(&name)
            && !DELIVERY_HEADERS.contains(&name)
    });
    let long = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
    if let Some(d) = death {
        for (name, value) in [
            (h::ORIGINAL_EXCHANGE, &d.exchange),
            (h::ORIGINAL_ROUTING_KEY, &d.routing_key),
        ] {
            if let Some(v) = value {
                table.entry(name.into()).or_insert_with(|| long(v));
            }
        }
    }
    table.insert(REPLAY_HEADER.into(), long(replay_id));
    props.clone().with_headers(FieldTable::from(table))
}

struct InFlight {
    delivery: Delivery,
    position: u64,
    index: usize,
    confirm: Result<PublisherConfirm, lapin::Error>,
}

/// Re-publishes the selected messages of the DLQ of `queue` (see [`resolve`]) to their
/// original queue (header `x-idem-original-queue`; for a message the broker
/// dead-lettered, the queue of its most recent `x-death` entry; else the work queue),
/// each acked in the DLQ only after the broker confirmed its copy. See the
/// [module docs](self). A message whose copy is not confirmed stays in the DLQ and
/// counts as failed.
pub async fn replay(
    conn: &Connection,
    queue: &str,
    selector: &Selector,
    dry_run: bool,
) -> Result<MoveReport, CliError> {
    let mut scan = Scan::open(conn, queue).await?;
    let replay_id = format!("replay-{}", uuid::Uuid::now_v7());
    let mut report = MoveReport::new(scan.dlq.clone(), Some(replay_id.clone()), dry_run);
    let publisher = if dry_run {
        None
    } else {
        let ch = open_channel(conn).await?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(CliError::amqp("confirm.select"))?;
        Some(ch)
    };
    let mut progress = Progress::new(if dry_run { "would move" } else { "moved" }, scan.total());
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let result = async {
        while let Some((delivery, entry)) = scan.next().await? {
            report.scanned += 1;
            let Some(ch) = publisher.as_ref().filter(|_| selector.matches(&entry)) else {
                if selector.matches(&entry) {
                    report.matched += 1;
                    report.messages.push(MovedMessage {
                        position: entry.position,
                        message_id: entry.message_id.clone(),
                        target: Some(replay_target(&entry, &scan.queue)),
                        outcome: "would move".to_owned(),
                    });
                }
                scan.restore(&delivery, entry.position).await?;
                progress.update(report.scanned, report.done + report.matched);
                continue;
            };
            report.matched += 1;
            let target = replay_target(&entry, &scan.queue);
            let index = report.messages.len();
            report.messages.push(MovedMessage {
                position: entry.position,
                message_id: entry.message_id.clone(),
                target: Some(target.clone()),
                outcome: "would move".to_owned(),
            });
            let props = replay_properties(&delivery.properties, &replay_id, entry.broker_made());
            let options = BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            };
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue_name(&target)?,
                    options,
                    &delivery.data,
                    props,
                )
                .await;
            in_flight.push_back(InFlight {
                delivery,
                position: entry.position,
                index,
                confirm,
            });
            if in_flight.len() >= PIPELINE {
                settle_oldest(&mut scan, &mut in_flight, &mut report).await?;
            }
            progress.update(report.scanned, report.done);
        }
        while !in_flight.is_empty() {
            settle_oldest(&mut scan, &mut in_flight, &mut report).await?;
        }
        Ok::<_, CliError>(())
    }
    .await;
    progress.update(report.scanned, report.done);
    progress.finish();
    // Anything still in flight after an error was not acked: the broker hands it back.
    for f in in_flight {
        fail(&mut report, f.index, "interrupted");
    }
    if let Some(ch) = &publisher {
        close_channel(ch).await;
    }
    scan.finish(result).await.map(|()| report)
}

fn replay_target(entry: &DlqEntry, work_queue: &str) -> String {
    entry
        .source_queue()
        .map_or_else(|| work_queue.to_owned(), str::to_owned)
}

fn fail(report: &mut MoveReport, index: usize, why: &str) {
    report.failed += 1;
    if let Some(m) = report.messages.get_mut(index) {
        m.outcome = format!("failed: {why}");
    }
}

async fn settle_oldest(
    scan: &mut Scan,
    in_flight: &mut VecDeque<InFlight>,
    report: &mut MoveReport,
) -> Result<(), CliError> {
    let Some(f) = in_flight.pop_front() else {
        return Ok(());
    };
    let confirmation = match f.confirm {
        Ok(confirm) => confirm.await,
        Err(e) => Err(e),
    };
    let why = match confirmation {
        Ok(Confirmation::Ack(None)) => None,
        Ok(Confirmation::Ack(Some(returned))) => Some(format!(
            "returned by the broker ({} {}): does the target queue exist?",
            returned.reply_code, returned.reply_text
        )),
        Ok(Confirmation::Nack(_)) => Some("nacked by the broker".to_owned()),
        Ok(Confirmation::NotRequested) => Some("publish not confirmed".to_owned()),
        Err(e) => Some(format!("publish failed: {e}")),
    };
    match why {
        None => {
            scan.ack(f.delivery.delivery_tag).await?;
            report.done += 1;
            if let Some(m) = report.messages.get_mut(f.index) {
                m.outcome = "moved".to_owned();
            }
        }
        Some(why) => {
            // Stays in the DLQ: restored at its tail like any message not removed.
            scan.restore(&f.delivery, f.position).await?;
            fail(report, f.index, &why);
        }
    }
    Ok(())
}

/// Deletes the selected messages of the DLQ of `queue` (see [`resolve`]; `--all`
/// purges the whole queue, including messages dead-lettered while the command runs).
/// With `dry_run`, only reports what would be deleted.
pub async fn purge(
    conn: &Connection,
    queue: &str,
    selector: &Selector,
    dry_run: bool,
) -> Result<MoveReport, CliError> {
    let mut scan = Scan::open(conn, queue).await?;
    let mut report = MoveReport::new(scan.dlq.clone(), None, dry_run);
    if matches!(selector, Selector::All) && !dry_run {
        let result = scan
            .channel
            .queue_purge(queue_name(&scan.dlq)?, QueuePurgeOptions::default())
            .await
            .map_err(CliError::amqp("queue.purge"));
        scan.finish(Ok(())).await?;
        let purged = u64::from(result?);
        report.scanned = purged;
        report.matched = purged;
        report.done = purged;
        return Ok(report);
    }
    let result = async {
        while let Some((delivery, entry)) = scan.next().await? {
            report.scanned += 1;
            if !selector.matches(&entry) {
                scan.restore(&delivery, entry.position).await?;
                continue;
            }
            report.matched += 1;
            let outcome = if dry_run {
                scan.restore(&delivery, entry.position).await?;
                "would purge"
            } else {
                scan.ack(delivery.delivery_tag).await?;
                report.done += 1;
                "purged"
            };
            report.messages.push(MovedMessage {
                position: entry.position,
                message_id: entry.message_id,
                target: None,
                outcome: outcome.to_owned(),
            });
        }
        Ok::<_, CliError>(())
    }
    .await;
    scan.finish(result).await.map(|()| report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn death_entry(reason: &str, queue: &str, count: AMQPValue) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("reason".into(), long(reason));
        t.insert("queue".into(), long(queue));
        t.insert("count".into(), count);
        t.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        t.insert("exchange".into(), long("amq.direct"));
        t.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![long("rk.1"), long("rk.2")])),
        );
        AMQPValue::FieldTable(t)
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes()))
    }

    fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(k.into(), v);
        }
        t
    }

    #[test]
    fn the_most_recent_death_is_read_and_bad_values_are_left_out() {
        let headers = table(vec![
            (
                "x-death",
                AMQPValue::FieldArray(FieldArray::from(vec![
                    death_entry("delivery_limit", "orders", AMQPValue::LongLongInt(2)),
                    death_entry("expired", "orders.retry.1s", AMQPValue::LongLongInt(5)),
                ])),
            ),
            ("x-first-death-reason", long("expired")),
            ("x-first-death-queue", long("orders.retry.1s")),
        ]);
        let d = BrokerDeath::from_headers(&headers).unwrap();
        assert_eq!(d.reason.as_deref(), Some("delivery_limit"));
        assert_eq!(d.queue.as_deref(), Some("orders"));
        assert_eq!(d.count, Some(2));
        assert_eq!(d.time.as_deref(), Some("2023-11-14T22:13:20.000Z"));
        assert_eq!(d.exchange.as_deref(), Some("amq.direct"));
        assert_eq!(d.routing_key.as_deref(), Some("rk.1"));

        // Only x-first-death-* (e.g. x-death stripped by some tool), or a malformed
        // x-death: what can be read is, the rest is None.
        let headers = table(vec![
            ("x-death", long("not an array")),
            ("x-first-death-reason", long("rejected")),
            ("x-first-death-queue", long("orders")),
        ]);
        let d = BrokerDeath::from_headers(&headers).unwrap();
        assert_eq!(
            (d.reason.as_deref(), d.queue.as_deref(), d.count),
            (Some("rejected"), Some("orders"), None)
        );
        let headers = table(vec![(
            "x-death",
            AMQPValue::FieldArray(FieldArray::from(vec![death_entry(
                "rejected",
                "orders",
                long("three"),
            )])),
        )]);
        assert_eq!(BrokerDeath::from_headers(&headers).unwrap().count, None);
        assert_eq!(BrokerDeath::from_headers(&FieldTable::default()), None);
    }

    #[test]
    fn idem_headers_win_over_the_broker_death_of_a_retry_hop() {
        // A message idem retried through a delay queue (x-death: expired there) and then
        // dead-lettered itself: shown with idem's failure, replayed to its original queue.
        let headers = table(vec![(
            "x-death",
            AMQPValue::FieldArray(FieldArray::from(vec![death_entry(
                "expired",
                "orders.retry.1s",
                AMQPValue::LongLongInt(2),
            )])),
        )]);
        let msg = Message::new("x")
            .with_header(h::ERROR, "card declined")
            .with_header(h::ERROR_KIND, "permanent")
            .with_header(h::ORIGINAL_QUEUE, "orders");
        let e = DlqEntry::from_delivery(&msg, Some(&headers), 1);
        assert_eq!(e.source, "idem");
        assert_eq!(e.kind(), "permanent");
        assert_eq!(e.source_queue(), Some("orders"));
        assert_eq!(e.error_text().as_deref(), Some("card declined"));

        let bare = Message::new("x");
        let e = DlqEntry::from_delivery(&bare, Some(&headers), 1);
        assert_eq!(e.source, "broker");
        assert_eq!(
            (e.kind().as_str(), e.count(), e.source_queue()),
            ("expired", Some(2), Some("orders.retry.1s"))
        );
        let e = DlqEntry::from_delivery(&bare, None, 1);
        assert_eq!(
            (e.source.as_str(), e.kind().as_str()),
            ("unknown", "unknown")
        );
    }

    #[test]
    fn replayed_copies_lose_the_death_and_delivery_headers_and_keep_the_route() {
        let headers = table(vec![
            (
                "x-death",
                AMQPValue::FieldArray(FieldArray::from(vec![death_entry(
                    "rejected",
                    "orders",
                    AMQPValue::LongLongInt(1),
                )])),
            ),
            ("x-first-death-reason", long("rejected")),
            ("x-delivery-count", AMQPValue::LongLongInt(3)),
            ("x-tenant", long("acme")),
        ]);
        let props = BasicProperties::default()
            .with_message_id("m1".into())
            .with_headers(headers.clone());
        let death = BrokerDeath::from_headers(&headers);
        let copy = replay_properties(&props, "replay-1", death.as_ref());
        let t = copy.headers().clone().unwrap();
        let t = t.inner();
        for gone in BROKER_DEATH_HEADERS.iter().chain(&DELIVERY_HEADERS) {
            assert!(!t.contains_key(*gone), "{gone}");
        }
        assert_eq!(t.get("x-tenant"), Some(&long("acme")));
        assert_eq!(t.get(h::ORIGINAL_EXCHANGE), Some(&long("amq.direct")));
        assert_eq!(t.get(h::ORIGINAL_ROUTING_KEY), Some(&long("rk.1")));
        assert_eq!(t.get(REPLAY_HEADER), Some(&long("replay-1")));
        assert_eq!(copy.message_id(), props.message_id());

        let kept = restored_properties(&props);
        let t = kept.headers().clone().unwrap();
        assert!(!t.inner().contains_key("x-delivery-count"));
        assert!(t.inner().contains_key("x-death"));
    }
}
