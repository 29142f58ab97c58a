//! One delivery from the wire to its outcome and back: run it through the consumer,
//! publish its copy when it has one, then ack, hand back or drop it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idem_core::{DeliveryMode, Disposition, Headers, Settled};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::ShortString;
use lapin::{Acker, BasicProperties, Channel};
use tokio::sync::OwnedSemaphorePermit;

use super::Shared;
use crate::acks::{AckSettler, Settle};
use crate::convert::{merge_headers, to_message};
use crate::crash;
use crate::publisher::publish_confirmed;

/// Delays between tries of an unconfirmed retry or dead-letter copy.
const COPY_RETRY_DELAYS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
];

/// What the settle hook needs, kept until the delivery's ack is sent (`None` without
/// a hook: nothing to keep).
pub(super) type Record = Option<Done>;

/// A settled delivery, for the settle hook.
pub(super) struct Done {
    message_id: Option<ShortString>,
    failed_before: u32,
    disposition: Disposition,
    /// Its dead-letter copy was confirmed: the consumer's dead-letter hook is told.
    dead_lettered: bool,
}

/// Runs the settle hook for `done` (the one call site of `on_settle`).
/// Also tells the consumer's dead-letter hook about a confirmed dead-letter copy.
pub(super) fn report(shared: &Shared, done: Record) {
    let Some(done) = done else { return };
    let settled = Settled::new(
        done.message_id.as_ref().map(ShortString::as_str),
        done.failed_before,
        shared.topology.queue(),
        &done.disposition,
    );
    if let Some(hook) = &shared.on_settle {
        hook(settled);
    }
    if done.dead_lettered {
        shared.consumer.notify_dead_lettered(&settled, &shared.dlq);
    }
}

/// What the wire needs once a delivery's outcome is carried out.
enum Wire {
    /// Its ack is due (handled, duplicate, or its copy confirmed).
    Ack,
    /// Hand it back at once (`basic.nack requeue=true`).
    Requeue,
}

/// A delivery converted for the consumer, with what settling it needs.
pub(super) struct Prepared {
    delivery_tag: u64,
    properties: BasicProperties,
    body: Bytes,
    acker: Acker,
    pub(super) msg: idem_core::Message,
}

/// Converts `delivery` once: the ordered path reads its key from the message before
/// the handler runs.
pub(super) fn prepare(shared: &Shared, delivery: Delivery) -> Prepared {
    let Delivery {
        delivery_tag,
        exchange,
        routing_key,
        redelivered,
        properties,
        data,
        acker,
        ..
    } = delivery;
    let body = Bytes::from(data);
    let msg = to_message(
        &exchange,
        &routing_key,
        redelivered,
        &properties,
        body.clone(),
        shared.topology.queue(),
    );
    Prepared {
        delivery_tag,
        properties,
        body,
        acker,
        msg,
    }
}

/// Runs one delivery and settles it. Holds its permit until settled.
pub(super) async fn handle(
    shared: Arc<Shared>,
    publish: Arc<Channel>,
    delivery: Delivery,
    settler: Option<AckSettler<Record>>,
    _permit: OwnedSemaphorePermit,
) {
    let prepared = prepare(&shared, delivery);
    run_prepared(&shared, &publish, prepared, settler, None).await;
}

/// Runs a prepared delivery (in its key's lane when `lane` is set) and settles it.
pub(super) async fn run_prepared(
    shared: &Arc<Shared>,
    publish: &Arc<Channel>,
    prepared: Prepared,
    settler: Option<AckSettler<Record>>,
    lane: Option<&super::lane::LaneRun<'_>>,
) {
    let Prepared {
        delivery_tag,
        properties,
        body,
        acker,
        msg,
    } = prepared;
    let consumer = &shared.consumer;
    let at_most_once = consumer.mode() == DeliveryMode::AtMostOnce;
    if at_most_once {
        ack(&acker).await;
    }
    // Read once, when the delivery was converted.
    let failed_before = msg.context.failed_before();
    let over = crash::over_limit(
        &msg,
        consumer.name(),
        shared.topology.effective_delivery_limit(),
    );
    let disposition = match (over, lane) {
        (Some(over), _) if !at_most_once => over,
        (_, Some(lane)) => lane.process(consumer, msg).await,
        _ => consumer.process(msg).await,
    };
    let wire = if at_most_once {
        None
    } else {
        Some(match &disposition {
            Disposition::Release { .. } => Wire::Requeue,
            // Dropped on purpose by the handler: acked, no copy.
            Disposition::Discard { .. } => Wire::Ack,
            Disposition::Ack { .. } => {
                #[cfg(feature = "_failpoints")]
                if matches!(disposition, Disposition::Ack { duplicate: false }) {
                    crate::failpoints::hit(crate::failpoints::AFTER_COMMIT_BEFORE_ACK);
                }
                Wire::Ack
            }
            Disposition::Retry {
                delay,
                delay_kind,
                headers,
                ..
            } => {
                let tier = shared.topology.get_tiers().tier_for(*delay, *delay_kind);
                let target = shared
                    .retry_queues
                    .iter()
                    .find(|(t, _)| *t == tier)
                    .map_or(shared.dlq.as_str(), |(_, q)| q.as_str());
                forward(publish, target, &body, &properties, headers, "retry").await
            }
            Disposition::DeadLetter { headers, .. } => {
                let dlq = shared.dlq.as_str();
                forward(publish, dlq, &body, &properties, headers, "dead-letter").await
            }
            // A disposition added to idem-core after this transport was written: hand
            // the delivery back untouched, which loses nothing.
            _ => Wire::Requeue,
        })
    };
    // The dead-letter hook is told only once the dead-letter copy is confirmed.
    let dead_lettered =
        matches!(wire, Some(Wire::Ack)) && matches!(disposition, Disposition::DeadLetter { .. });
    if let (Some(lane), true) = (lane, dead_lettered) {
        lane.dead_lettered();
    }
    if dead_lettered {
        shared.health.dead_lettered();
        #[cfg(feature = "prometheus")]
        crate::health::count_crash_loop(&shared.consumer, Some(&disposition));
    }
    let done = (shared.on_settle.is_some() || dead_lettered).then(|| Done {
        message_id: properties.message_id().clone(),
        failed_before,
        disposition,
        dead_lettered,
    });
    match wire {
        None => report(shared, done),
        Some(Wire::Ack) => match settler {
            // Reported by the flusher once the ack covering it is sent.
            Some(settler) => {
                if let Err(done) = settler.settle(delivery_tag, Settle::Ack(done)) {
                    // The session ended: the ack is dropped, the broker redelivers.
                    report(shared, done.flatten());
                }
            }
            None => {
                ack(&acker).await;
                report(shared, done);
            }
        },
        Some(Wire::Requeue) => {
            // Sent before the tag is settled: a later coalesced ack never covers it
            // while it is still outstanding.
            requeue(&acker).await;
            if let Some(settler) = settler {
                let _ = settler.settle(delivery_tag, Settle::Requeued);
            }
            report(shared, done);
        }
    }
}

async fn ack(acker: &Acker) {
    match acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "ack not sent: the channel is gone; the broker redelivers the message and dedup absorbs it"
        ),
        Err(e) => tracing::warn!(error = %e, "ack failed; the broker redelivers the message"),
    }
}

/// Publishes the copy with confirm; `Wire::Ack` once confirmed, see the module docs
/// for failures.
async fn forward(
    channel: &Channel,
    target: &str,
    body: &Bytes,
    properties: &BasicProperties,
    extra: &Headers,
    what: &'static str,
) -> Wire {
    let headers = match merge_headers(properties.headers().as_ref(), extra) {
        Ok(h) => h,
        Err(e) => {
            // Only idem's own header names are added, all short: cannot happen.
            tracing::error!(error = %e, "cannot build the {what} copy");
            return Wire::Requeue;
        }
    };
    let props = properties.clone().with_headers(headers);
    let mut delays = COPY_RETRY_DELAYS.iter();
    loop {
        match publish_confirmed(channel, "", target, body, props.clone()).await {
            Ok(()) => {
                #[cfg(feature = "_failpoints")]
                crate::failpoints::hit(crate::failpoints::AFTER_RETRY_PUBLISH_BEFORE_ACK);
                return Wire::Ack;
            }
            Err(e) => {
                if !channel.status().connected() {
                    // If the consuming channel died too, the nack is not sent and the
                    // broker redelivers anyway; if it lives, the nack hands the
                    // original back instead of holding it (and, with coalesced acks,
                    // every later ack) until the channel closes.
                    tracing::warn!(error = %e, queue = target, "{what} copy not published and the publishing channel is gone; handing the original back");
                    return Wire::Requeue;
                }
                match delays.next() {
                    Some(delay) => {
                        tracing::warn!(error = %e, queue = target, retry_in = ?delay, "{what} copy not confirmed; retrying");
                        tokio::time::sleep(*delay).await;
                    }
                    None => {
                        tracing::error!(error = %e, queue = target, "{what} copy still not confirmed; requeueing the original");
                        return Wire::Requeue;
                    }
                }
            }
        }
    }
}

async fn requeue(acker: &Acker) {
    let options = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    match acker.nack(options).await {
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "nack failed; the broker redelivers the message when the channel closes")
        }
    }
}
