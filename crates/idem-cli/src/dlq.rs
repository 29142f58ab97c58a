//! Dead-letter queue operations: list, stats, replay, purge.
//!
//! Every operation reads `Q.dlq` with `basic.get` on one channel *without acking*, so
//! the messages it looks at stay in the queue, held by the channel. What is not acked
//! goes back into the queue, in its original order, when the channel closes.
//! Only the messages present when the operation starts are read (a snapshot of the
//! queue depth): messages dead-lettered meanwhile, including replayed messages that
//! fail again, are left alone.
//!
//! - `list` and `stats` ack nothing: the queue is unchanged.
//! - `replay` re-publishes a matching message to its original queue with publisher
//!   confirms (mandatory routing) and acks it in the DLQ only once the broker confirmed
//!   the copy. A crash in between leaves the message in both queues (the copy keeps
//!   its `message_id`, so consumers dedup it), never in neither.
//! - `purge` acks (deletes) the matching messages.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use idem_core::dedup::REPLAY_HEADER;
use idem_core::outcome::{headers as h, parse_rfc3339};
use idem_core::{HeaderValue, Message};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use regex::Regex;
use serde::Serialize;

use crate::broker::{close_channel, missing, open_channel, passive_declare, queue_name};
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

/// Confirms awaited at once during a replay.
const PIPELINE: usize = 128;

/// One dead-lettered message, as read from its headers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DlqEntry {
    /// 1-based position in the DLQ.
    pub position: u64,
    /// AMQP `message_id`.
    pub message_id: Option<String>,
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
    /// Body size in bytes.
    pub body_bytes: usize,
}

impl DlqEntry {
    fn from_message(msg: &Message, position: u64) -> Self {
        let s = |name: &str| msg.header_str(name).map(str::to_owned);
        DlqEntry {
            position,
            message_id: msg.properties.message_id.clone(),
            key: s(h::KEY),
            error_kind: s(h::ERROR_KIND),
            attempts: msg.headers.get(h::ATTEMPTS).and_then(HeaderValue::as_i64),
            first_failed_at: s(h::FIRST_FAILED_AT),
            last_failed_at: s(h::LAST_FAILED_AT),
            error: s(h::ERROR),
            original_queue: s(h::ORIGINAL_QUEUE),
            original_exchange: s(h::ORIGINAL_EXCHANGE),
            original_routing_key: s(h::ORIGINAL_ROUTING_KEY),
            consumer: s(h::CONSUMER),
            replay: s(REPLAY_HEADER),
            body_bytes: msg.body.len(),
        }
    }
}

/// Which dead-lettered messages an operation acts on.
#[derive(Clone, Debug)]
pub enum Selector {
    /// Every message.
    All,
    /// Messages whose AMQP `message_id` is one of these.
    Ids(BTreeSet<String>),
    /// Messages whose `x-idem-error` matches this regular expression (unanchored:
    /// `timeout` matches any error containing "timeout").
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
            Selector::ErrorMatches(re) => entry.error.as_ref().is_some_and(|e| re.is_match(e)),
        }
    }
}

/// A non-destructive walk over the messages of a DLQ present when it was opened.
struct Scan {
    channel: Channel,
    dlq: String,
    remaining: u64,
    position: u64,
}

impl Scan {
    async fn open(conn: &Connection, queue: &str, limit: Option<u64>) -> Result<Self, CliError> {
        let dlq = idem_amqp::Topology::new(queue).dlq();
        let channel = open_channel(conn).await?;
        let Some(counts) = passive_declare(&channel, &dlq).await? else {
            return Err(missing(&dlq));
        };
        let depth = u64::from(counts.messages);
        Ok(Scan {
            channel,
            dlq,
            remaining: limit.map_or(depth, |l| l.min(depth)),
            position: 0,
        })
    }

    fn total(&self) -> u64 {
        self.remaining + self.position
    }

    /// The next message, left unacked.
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
        let entry = DlqEntry::from_message(&msg, self.position);
        Ok(Some((delivery, entry)))
    }

    async fn ack(&self, delivery_tag: u64) -> Result<(), CliError> {
        self.channel
            .basic_ack(delivery_tag, BasicAckOptions::default())
            .await
            .map_err(CliError::amqp("basic.ack"))
    }

    /// Closes the channel: every message not acked goes back, in order.
    async fn close(self) {
        close_channel(&self.channel).await;
    }
}

/// The first `limit` messages of `Q.dlq`, leaving the queue unchanged.
pub async fn list(conn: &Connection, queue: &str, limit: u64) -> Result<Vec<DlqEntry>, CliError> {
    let mut scan = Scan::open(conn, queue, Some(limit)).await?;
    let mut entries = Vec::new();
    let result = async {
        while let Some((_, entry)) = scan.next().await? {
            entries.push(entry);
        }
        Ok::<_, CliError>(())
    }
    .await;
    scan.close().await;
    result.map(|()| entries)
}

/// Messages of one error kind whose errors normalise to the same text.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorGroup {
    /// `x-idem-error-kind` (`unknown` when absent).
    pub error_kind: String,
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

/// Groups the messages of `Q.dlq` (the first `limit`, or all) by error kind and
/// normalised error text, leaving the queue unchanged.
pub async fn stats(
    conn: &Connection,
    queue: &str,
    limit: Option<u64>,
) -> Result<DlqStats, CliError> {
    let mut scan = Scan::open(conn, queue, limit).await?;
    let mut groups: BTreeMap<(String, String), ErrorGroup> = BTreeMap::new();
    let mut scanned = 0;
    let result = async {
        while let Some((_, e)) = scan.next().await? {
            scanned += 1;
            let kind = e.error_kind.clone().unwrap_or_else(|| "unknown".to_owned());
            let raw = e.error.clone().unwrap_or_default();
            let norm = normalize_error(&raw);
            let g = groups
                .entry((kind.clone(), norm.clone()))
                .or_insert_with(|| ErrorGroup {
                    error_kind: kind,
                    error: norm,
                    count: 0,
                    first_seen: None,
                    last_seen: None,
                    example: raw,
                    message_ids: Vec::new(),
                });
            g.count += 1;
            g.first_seen = earlier(&g.first_seen, &e.first_failed_at, false);
            g.last_seen = earlier(&g.last_seen, &e.last_failed_at, true);
            if let (Some(id), true) = (e.message_id, g.message_ids.len() < 3) {
                g.message_ids.push(id);
            }
        }
        Ok::<_, CliError>(())
    }
    .await;
    let dlq = scan.dlq.clone();
    scan.close().await;
    result?;
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
/// without the failure headers, plus `x-idem-replay`.
pub fn replay_properties(props: &BasicProperties, replay_id: &str) -> BasicProperties {
    let mut table = props
        .headers()
        .as_ref()
        .map(|t| t.inner().clone())
        .unwrap_or_default();
    table.retain(|name, _| !STRIPPED_ON_REPLAY.contains(&name.as_str()));
    table.insert(
        REPLAY_HEADER.into(),
        AMQPValue::LongString(LongString::from(replay_id.as_bytes())),
    );
    props.clone().with_headers(FieldTable::from(table))
}

struct InFlight {
    tag: u64,
    index: usize,
    confirm: Result<PublisherConfirm, lapin::Error>,
}

/// Re-publishes the selected messages of `Q.dlq` to their original queue (header
/// `x-idem-original-queue`, else `Q`), each acked in the DLQ only after the broker
/// confirmed its copy. See the [module docs](self). A message whose copy is not
/// confirmed stays in the DLQ and counts as failed.
pub async fn replay(
    conn: &Connection,
    queue: &str,
    selector: &Selector,
    dry_run: bool,
) -> Result<MoveReport, CliError> {
    let mut scan = Scan::open(conn, queue, None).await?;
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
            if selector.matches(&entry) {
                report.matched += 1;
                let target = entry
                    .original_queue
                    .clone()
                    .unwrap_or_else(|| queue.to_owned());
                let index = report.messages.len();
                report.messages.push(MovedMessage {
                    position: entry.position,
                    message_id: entry.message_id.clone(),
                    target: Some(target.clone()),
                    outcome: "would move".to_owned(),
                });
                if let Some(ch) = &publisher {
                    let props = replay_properties(&delivery.properties, &replay_id);
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
                        tag: delivery.delivery_tag,
                        index,
                        confirm,
                    });
                    if in_flight.len() >= PIPELINE {
                        settle_oldest(&scan, &mut in_flight, &mut report).await?;
                    }
                }
            }
            progress.update(
                report.scanned,
                report.done + if dry_run { report.matched } else { 0 },
            );
        }
        while !in_flight.is_empty() {
            settle_oldest(&scan, &mut in_flight, &mut report).await?;
        }
        Ok::<_, CliError>(())
    }
    .await;
    progress.update(report.scanned, report.done);
    progress.finish();
    // Anything still in flight after an error was not acked: it goes back to the DLQ.
    for f in in_flight {
        fail(&mut report, f.index, "interrupted");
    }
    if let Some(ch) = &publisher {
        close_channel(ch).await;
    }
    scan.close().await;
    result.map(|()| report)
}

fn fail(report: &mut MoveReport, index: usize, why: &str) {
    report.failed += 1;
    if let Some(m) = report.messages.get_mut(index) {
        m.outcome = format!("failed: {why}");
    }
}

async fn settle_oldest(
    scan: &Scan,
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
            scan.ack(f.tag).await?;
            report.done += 1;
            if let Some(m) = report.messages.get_mut(f.index) {
                m.outcome = "moved".to_owned();
            }
        }
        Some(why) => fail(report, f.index, &why),
    }
    Ok(())
}

/// Deletes the selected messages of `Q.dlq` (`--all` purges the whole queue, including
/// messages dead-lettered while the command runs). With `dry_run`, only reports what
/// would be deleted.
pub async fn purge(
    conn: &Connection,
    queue: &str,
    selector: &Selector,
    dry_run: bool,
) -> Result<MoveReport, CliError> {
    let mut scan = Scan::open(conn, queue, None).await?;
    let mut report = MoveReport::new(scan.dlq.clone(), None, dry_run);
    if matches!(selector, Selector::All) && !dry_run {
        let result = scan
            .channel
            .queue_purge(queue_name(&scan.dlq)?, QueuePurgeOptions::default())
            .await
            .map_err(CliError::amqp("queue.purge"));
        scan.close().await;
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
                continue;
            }
            report.matched += 1;
            let outcome = if dry_run {
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
    scan.close().await;
    result.map(|()| report)
}
