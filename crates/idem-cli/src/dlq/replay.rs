//! `idem dlq replay`: selected dead letters back to their queue, each removed from the
//! DLQ only once the broker confirmed its copy. The copies go through
//! [`idem_amqp::Publisher::publish_raw_each`] (the one publish-with-confirm path of
//! idem), on a channel of the command's connection, with the replay rules of
//! [`idem_amqp::replay`].

use idem_amqp::{Publisher, RawOutgoing};
use lapin::message::Delivery;
use lapin::{BasicProperties, Connection};

use super::scan::Scan;
use super::{BrokerDeath, DlqEntry, MoveReport, MovedMessage, Selector, PIPELINE};
use crate::broker::open_channel;
use crate::error::CliError;
use crate::render::Progress;

/// The properties of the replayed copy ([`idem_amqp::replay::replay_properties`]): the
/// originals (message id, headers, ...) without the failure headers and the broker's
/// death headers, plus `x-idem-replay`. For a message the broker dead-lettered
/// (`death`), the exchange and routing key it was published with are kept as
/// `x-idem-original-exchange` / `x-idem-original-routing-key` (unless already set).
pub fn replay_properties(
    props: &BasicProperties,
    replay_id: &str,
    death: Option<&BrokerDeath>,
) -> BasicProperties {
    let route = death.map_or((None, None), |d| {
        (d.exchange.as_deref(), d.routing_key.as_deref())
    });
    idem_amqp::replay::replay_properties(props, replay_id, route)
}

/// A selected message whose copy is not confirmed yet.
struct Pending {
    delivery: Delivery,
    position: u64,
    index: usize,
    target: String,
    properties: BasicProperties,
    outcome: &'static str,
}

/// Re-publishes the selected messages of the DLQ of `queue` (see [`resolve`](super::resolve)) to their
/// original queue (header `x-idem-original-queue`; for a message the broker
/// dead-lettered, the queue of its most recent `x-death` entry; else the work queue),
/// each acked in the DLQ only after the broker confirmed its copy. See the
/// [module docs](super). A message whose copy is not confirmed stays in the DLQ and
/// counts as failed.
pub async fn replay(
    conn: &Connection,
    queue: &str,
    selector: &Selector,
    dry_run: bool,
) -> Result<MoveReport, CliError> {
    let options = ReplayOptions {
        dry_run,
        rate: None,
    };
    replay_with(conn, queue, selector, &options).await
}

/// [`replay_with`], predicting from the consumer's dedup store (see
/// [`lookup`](super::lookup)) which selected messages will be acked as duplicates: a
/// first read of the DLQ (changing nothing) looks each one up, then the replay (or
/// dry run) runs and each predicted duplicate's outcome says `will be acked as a
/// duplicate` (a different payload: `will be dead-lettered: different payload`).
pub async fn replay_predicting(
    conn: &Connection,
    queue: &str,
    selector: &Selector,
    options: &ReplayOptions,
    lookup: &super::lookup::DedupLookup,
) -> Result<MoveReport, CliError> {
    use super::lookup::{Prediction, EDITED_FROM};
    let mut selected = Vec::new();
    super::scan::visit(conn, queue, |delivery, entry| {
        if selector.matches(&entry) {
            let edited_from = delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|t| t.inner().get(EDITED_FROM).map(super::wire::value_text));
            selected.push((entry, delivery.data.clone(), edited_from));
        }
    })
    .await?;
    let mut predicted = std::collections::BTreeMap::new();
    for (entry, body, edited_from) in &selected {
        let Some(id) = entry.message_id.clone() else {
            continue;
        };
        let key = entry.key.clone().unwrap_or_else(|| id.clone());
        let p = lookup
            .predict(
                entry.consumer.as_deref(),
                &key,
                body,
                edited_from.as_deref(),
            )
            .await?;
        predicted.insert(id, p);
    }
    let mut report = replay_with(conn, queue, selector, options).await?;
    let mut duplicates = 0;
    for m in &mut report.messages {
        let p = m.message_id.as_ref().and_then(|id| predicted.get(id));
        match p {
            Some(Prediction::Duplicate) => {
                duplicates += 1;
                m.outcome.push_str("; will be acked as a duplicate");
            }
            Some(Prediction::Mismatch) => {
                m.outcome
                    .push_str("; will be dead-lettered: different payload");
            }
            _ => {}
        }
    }
    report.duplicates = Some(duplicates);
    Ok(report)
}

/// How a replay runs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReplayOptions {
    /// Change nothing; report what would move.
    pub dry_run: bool,
    /// At most this many messages per second (`None`: as fast as the broker
    /// confirms). Copies go out in batches of a twentieth of a second's worth (at
    /// least 1), each batch no earlier than its last message's turn, so message `k`
    /// of the replay (counting from 1) is published no earlier than `k / rate`
    /// seconds after the start.
    pub rate: Option<f64>,
}

/// Parses a `--rate` value: `200/s` or `200` (messages per second, more than 0).
pub fn parse_rate(text: &str) -> Result<f64, CliError> {
    let n = text.trim().strip_suffix("/s").unwrap_or(text.trim());
    match n.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(CliError::Usage(format!(
            "--rate {text:?}: expected messages per second, e.g. 200/s"
        ))),
    }
}

/// Paces a replay (see [`ReplayOptions::rate`]).
struct Pace {
    start: tokio::time::Instant,
    rate: f64,
    sent: u64,
}

impl Pace {
    /// Waits until a batch of `n` more messages may go.
    async fn wait(pace: &mut Option<Pace>, n: usize) {
        if let Some(p) = pace {
            p.sent += n as u64;
            let due = p.start + std::time::Duration::from_secs_f64(p.sent as f64 / p.rate);
            tokio::time::sleep_until(due).await;
        }
    }
}

/// [`replay`] with [`ReplayOptions`] (a rate limit).
pub async fn replay_with(
    conn: &Connection,
    queue: &str,
    selector: &Selector,
    options: &ReplayOptions,
) -> Result<MoveReport, CliError> {
    let replay_id = format!("replay-{}", uuid::Uuid::now_v7());
    let id = replay_id.clone();
    transfer(
        conn,
        queue,
        Some(replay_id),
        options,
        |delivery, entry, work_queue| {
            selector.matches(entry).then(|| Plan {
                target: replay_target(entry, work_queue),
                properties: replay_properties(&delivery.properties, &id, entry.broker_made()),
                outcome: "moved",
            })
        },
    )
    .await
}

/// Where one selected message goes, decided by the caller of [`transfer`].
pub(super) struct Plan {
    /// The queue it is published to (through the default exchange).
    pub(super) target: String,
    /// The properties of the copy.
    pub(super) properties: BasicProperties,
    /// The outcome reported once done (`moved`, `parked`); a dry run reports
    /// `would <outcome>` minus the past tense (`would move`).
    pub(super) outcome: &'static str,
}

fn would(outcome: &str) -> String {
    match outcome {
        "moved" => "would move".to_owned(),
        other => format!("would be {other}"),
    }
}

/// The walk of every replay-like operation: `decide` picks, for each message of the
/// DLQ of `queue` (with the work queue's name), where it goes, or `None` to leave it;
/// the chosen ones are published with confirms (paced by `options.rate`) and each is
/// acked only once its copy is confirmed, the others restored in order.
pub(super) async fn transfer(
    conn: &Connection,
    queue: &str,
    replay_id: Option<String>,
    options: &ReplayOptions,
    mut decide: impl FnMut(&Delivery, &DlqEntry, &str) -> Option<Plan>,
) -> Result<MoveReport, CliError> {
    let dry_run = options.dry_run;
    let batch_max = options.rate.map_or(PIPELINE, |r| {
        // A twentieth of a second's worth, at least 1.
        ((r / 20.0) as usize).clamp(1, PIPELINE)
    });
    let mut pace = options.rate.map(|rate| Pace {
        start: tokio::time::Instant::now(),
        rate,
        sent: 0,
    });
    let mut scan = Scan::open(conn, queue).await?;
    let mut report = MoveReport::new(scan.dlq.clone(), replay_id, dry_run);
    let publisher = if dry_run {
        None
    } else {
        Some(Publisher::on_channel(open_channel(conn).await?).await?)
    };
    let mut progress = Progress::new(if dry_run { "would move" } else { "moved" }, scan.total());
    let mut pending: Vec<Pending> = Vec::new();
    let result = async {
        while let Some((delivery, entry)) = scan.next().await? {
            report.scanned += 1;
            let plan = decide(&delivery, &entry, &scan.queue);
            let Some(plan) = plan else {
                scan.restore(&delivery, entry.position).await?;
                progress.update(report.scanned, report.done);
                continue;
            };
            report.matched += 1;
            let index = report.messages.len();
            report.messages.push(MovedMessage {
                position: entry.position,
                message_id: entry.message_id.clone(),
                target: Some(plan.target.clone()),
                outcome: would(plan.outcome),
            });
            let Some(publisher) = publisher.as_ref() else {
                scan.restore(&delivery, entry.position).await?;
                progress.update(report.scanned, report.matched);
                continue;
            };
            pending.push(Pending {
                delivery,
                position: entry.position,
                index,
                target: plan.target,
                properties: plan.properties,
                outcome: plan.outcome,
            });
            if pending.len() >= batch_max {
                Pace::wait(&mut pace, pending.len()).await;
                settle(publisher, &mut scan, &mut pending, &mut report).await?;
            }
            progress.update(report.scanned, report.done);
        }
        if let Some(publisher) = &publisher {
            Pace::wait(&mut pace, pending.len()).await;
            settle(publisher, &mut scan, &mut pending, &mut report).await?;
        }
        Ok::<_, CliError>(())
    }
    .await;
    progress.update(report.scanned, report.done);
    progress.finish();
    // Anything still pending after an error was not acked: the broker hands it back.
    for p in pending {
        fail(&mut report, p.index, "interrupted");
    }
    if let Some(publisher) = publisher {
        publisher.close().await;
    }
    scan.finish(result).await.map(|()| report)
}

/// Publishes the pending copies together, then acks each confirmed original and
/// restores the others at the tail of the DLQ.
async fn settle(
    publisher: &Publisher,
    scan: &mut Scan,
    pending: &mut Vec<Pending>,
    report: &mut MoveReport,
) -> Result<(), CliError> {
    if pending.is_empty() {
        return Ok(());
    }
    let batch: Vec<RawOutgoing<'_>> = pending
        .iter()
        .map(|p| RawOutgoing {
            exchange: "",
            routing_key: &p.target,
            body: &p.delivery.data,
            properties: p.properties.clone(),
        })
        .collect();
    let results = publisher.publish_raw_each(&batch).await;
    drop(batch);
    let results = results?;
    for (p, result) in pending.drain(..).zip(results) {
        match result {
            Ok(()) => {
                scan.ack(p.delivery.delivery_tag);
                report.done += 1;
                if let Some(m) = report.messages.get_mut(p.index) {
                    m.outcome = p.outcome.to_owned();
                }
            }
            Err(e) => {
                let why = match e {
                    idem_amqp::Error::Returned { code, text, .. } => format!(
                        "returned by the broker ({code} {text}): does the target queue exist?"
                    ),
                    idem_amqp::Error::Nacked { .. } => "nacked by the broker".to_owned(),
                    idem_amqp::Error::NameTooLong(_) => e.to_string(),
                    other => format!("publish failed: {other}"),
                };
                // Stays in the DLQ: restored at its tail like any message not removed.
                scan.restore(&p.delivery, p.position).await?;
                fail(report, p.index, &why);
            }
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::super::tests::{death_entry, long, table};
    use super::*;
    use idem_amqp::replay::{
        restored_properties, BROKER_DEATH_HEADERS, DELIVERY_HEADERS, REPLAY_HEADER,
    };
    use idem_core::outcome::headers as h;
    use lapin::types::{AMQPValue, FieldArray};

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
