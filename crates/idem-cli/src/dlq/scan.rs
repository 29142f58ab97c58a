//! The walk over a DLQ that never hands a message back (see the
//! [module docs](super#reading-never-hands-a-message-back)), and `list`.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection, Consumer, PublisherConfirm};

use super::{resolve, restored_properties, DlqEntry, Selector};
use crate::broker::{close_channel, open_channel, passive_declare, queue_name};
use crate::error::CliError;

/// Copies put back into the DLQ whose confirm is awaited at once. Kept well under
/// the 32 commands a RabbitMQ quorum queue channel sends before it holds back acks
/// (see [`Scan::flush_acks`]).
const RESTORE_PIPELINE: usize = 16;

/// The prefetch of a read's consumer (module docs of [`dlq`](super)): how many
/// messages the broker sends ahead. The last this many of the snapshot are acked
/// only once the consumer is cancelled, so that the broker never sends one past it.
const READ_PREFETCH: u16 = 128;

/// A read acks its done messages once this many have gathered (one `basic.ack`
/// with `multiple`), or before it waits for the broker.
const READ_ACK_BATCH: usize = 8;

/// How long a read waits for the next delivery before it checks whether the queue
/// was emptied by someone else.
const READ_IDLE: Duration = Duration::from_secs(1);

/// Idle checks that found ready messages after which a read gives up its consumer
/// and takes the rest of the snapshot with `basic.get`.
const READ_STALLED: u32 = 5;

/// How a scan takes its messages.
enum Source {
    /// `basic.get`, one by one: for the commands that remove messages.
    Get,
    /// A consumer with a prefetch of at most the snapshot, cancelled once the
    /// snapshot is read: for reads (`list`, `stats`, `show`, `export`).
    Consume { consumer: Consumer, cancelled: bool },
    /// The consumer's stream ended.
    Done,
}

/// A copy on its way back to the DLQ; the original is acked once it is confirmed.
struct Restoring {
    tag: u64,
    position: u64,
    confirm: Result<PublisherConfirm, lapin::Error>,
}

/// A walk over the messages of a DLQ present when it was opened that never hands a
/// message back to the broker: what is not removed is restored (module docs).
pub(super) struct Scan {
    pub(super) channel: Channel,
    pub(super) queue: String,
    pub(super) dlq: String,
    remaining: u64,
    position: u64,
    restoring: VecDeque<Restoring>,
    /// Delivery tags received and not yet acked.
    held: BTreeSet<u64>,
    /// Those of them that may be acked (removed, or their copy confirmed).
    ackable: BTreeSet<u64>,
    /// Deliveries acked so far.
    acked: u64,
    /// While a read's consumer is active: at most this many deliveries may be acked
    /// (the snapshot less the prefetch), so that the broker sends none past the
    /// snapshot.
    ack_limit: Option<u64>,
    source: Source,
}

impl Scan {
    pub(super) async fn open(conn: &Connection, name: &str) -> Result<Self, CliError> {
        let resolved = resolve(conn, name).await?;
        Scan::open_exact(conn, resolved.queue, resolved.dlq).await
    }

    /// [`Scan::open`] on the queue named `read` exactly (`queue`: its work queue).
    async fn open_exact(conn: &Connection, queue: String, read: String) -> Result<Self, CliError> {
        let channel = open_channel(conn).await?;
        // Count again on the reading channel: the snapshot is what this channel sees.
        let Some(counts) = passive_declare(&channel, &read).await? else {
            return Err(CliError::NotFound(format!(
                "queue {read:?} was deleted while the command started"
            )));
        };
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(CliError::amqp("confirm.select"))?;
        Ok(Scan {
            channel,
            queue,
            dlq: read,
            remaining: u64::from(counts.messages),
            position: 0,
            restoring: VecDeque::new(),
            held: BTreeSet::new(),
            ackable: BTreeSet::new(),
            acked: 0,
            ack_limit: None,
            source: Source::Get,
        })
    }

    /// [`Scan::open`] for a read: the snapshot comes through a consumer whose
    /// prefetch is at most the snapshot, and the last `prefetch` messages are acked
    /// only after the consumer is cancelled, so the broker never sends a message past
    /// the snapshot (such as a restored copy) and hands nothing back. The broker
    /// streams the messages instead of answering one `basic.get` at a time, which on
    /// a quorum queue is a consensus round each.
    pub(super) async fn open_reading(conn: &Connection, name: &str) -> Result<Self, CliError> {
        Scan::open(conn, name).await?.start_reading().await
    }

    /// Turns a freshly opened scan into a read (see [`Scan::open_reading`]).
    async fn start_reading(self) -> Result<Self, CliError> {
        let mut scan = self;
        if scan.remaining == 0 {
            scan.source = Source::Done;
            return Ok(scan);
        }
        let prefetch =
            u16::try_from(scan.remaining).map_or(READ_PREFETCH, |n| n.min(READ_PREFETCH));
        scan.channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(CliError::amqp("basic.qos"))?;
        let consumer = scan
            .channel
            .basic_consume(
                queue_name(&scan.dlq)?,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(CliError::amqp("basic.consume"))?;
        scan.ack_limit = Some(scan.remaining - u64::from(prefetch));
        scan.source = Source::Consume {
            consumer,
            cancelled: false,
        };
        Ok(scan)
    }

    pub(super) fn total(&self) -> u64 {
        self.remaining + self.position
    }

    /// The next message of the snapshot, not yet acked: the caller removes it (ack) or
    /// restores it ([`Scan::restore`]).
    pub(super) async fn next(&mut self) -> Result<Option<(Delivery, DlqEntry)>, CliError> {
        if !matches!(self.source, Source::Get) {
            if let Some(delivery) = self.next_consumed().await? {
                return Ok(Some(self.took(delivery)));
            }
            if self.remaining == 0 {
                return Ok(None);
            }
            // The consumer stalled (or the broker cancelled it): the rest one by one.
            self.source = Source::Get;
        }
        let delivery = {
            if self.remaining == 0 {
                return Ok(None);
            }
            self.flush_acks(true).await?;
            let got = self
                .channel
                .basic_get(queue_name(&self.dlq)?, BasicGetOptions { no_ack: false })
                .await
                .map_err(CliError::amqp("basic.get"))?;
            let Some(got) = got else {
                self.remaining = 0;
                return Ok(None);
            };
            got.delivery
        };
        Ok(Some(self.took(delivery)))
    }

    /// Counts `delivery` as the next message of the snapshot.
    fn took(&mut self, delivery: Delivery) -> (Delivery, DlqEntry) {
        self.remaining = self.remaining.saturating_sub(1);
        self.position += 1;
        self.held.insert(delivery.delivery_tag);
        let msg = idem_amqp::convert::message_from_delivery(&delivery, &self.dlq);
        let entry =
            DlqEntry::from_delivery(&msg, delivery.properties.headers().as_ref(), self.position);
        (delivery, entry)
    }

    /// The next delivery of a read's consumer. Once the snapshot is read (or the
    /// queue turns out to be empty) the consumer is cancelled, and what the broker
    /// sent before the cancel is still handed out (none, unless someone else took
    /// messages from the queue meanwhile). A consumer that gets nothing for
    /// [`READ_STALLED`] idle checks although the queue has ready messages (another
    /// consumer is the single active one, say) is cancelled too, and the caller reads
    /// the rest with `basic.get`.
    async fn next_consumed(&mut self) -> Result<Option<Delivery>, CliError> {
        let mut idle = 0;
        loop {
            if self.remaining == 0 {
                self.cancel_consumer().await?;
            }
            let Source::Consume { consumer, .. } = &mut self.source else {
                return Ok(None);
            };
            let got = match consumer.next().now_or_never() {
                Some(got) => got,
                None => {
                    // Nothing has arrived: let the broker send more, then wait.
                    self.flush_acks(true).await?;
                    if !self.restoring.is_empty() {
                        self.settle_oldest_restore().await?;
                        continue;
                    }
                    let Source::Consume { consumer, .. } = &mut self.source else {
                        return Ok(None);
                    };
                    match tokio::time::timeout(READ_IDLE, consumer.next()).await {
                        Ok(got) => got,
                        Err(_) => {
                            idle += 1;
                            if self.ready().await? == 0 {
                                self.remaining = 0;
                            } else if idle >= READ_STALLED {
                                self.cancel_consumer().await?;
                            }
                            continue;
                        }
                    }
                }
            };
            match got {
                Some(Ok(delivery)) => return Ok(Some(delivery)),
                Some(Err(e)) => return Err(CliError::amqp("basic.consume")(e)),
                None => {
                    // Cancelled, by this scan or by the broker (queue deleted).
                    self.source = Source::Done;
                    self.ack_limit = None;
                    return Ok(None);
                }
            }
        }
    }

    /// Cancels a read's consumer (once): the broker sends nothing after the
    /// `cancel-ok`, so every delivery may then be acked.
    async fn cancel_consumer(&mut self) -> Result<(), CliError> {
        if let Source::Consume {
            consumer,
            cancelled,
        } = &mut self.source
        {
            if !*cancelled {
                *cancelled = true;
                self.channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await
                    .map_err(CliError::amqp("basic.cancel"))?;
                self.ack_limit = None;
            }
        }
        Ok(())
    }

    /// Ready messages of the DLQ now (on the scan's channel).
    async fn ready(&self) -> Result<u32, CliError> {
        match passive_declare(&self.channel, &self.dlq).await? {
            Some(counts) => Ok(counts.messages),
            None => Err(CliError::NotFound(format!(
                "queue {:?} was deleted during the command",
                self.dlq
            ))),
        }
    }

    /// Marks a delivery as done with: it is acked with the next batch of acks (see
    /// [`Scan::flush_acks`]), before the next read or when the scan finishes.
    pub(super) fn ack(&mut self, delivery_tag: u64) {
        self.ackable.insert(delivery_tag);
    }

    /// Acks, with one `basic.ack` (`multiple`), the longest run of the oldest held
    /// deliveries that may all be acked.
    ///
    /// One ack command per read, and at most [`RESTORE_PIPELINE`] copies awaiting
    /// their confirm: a RabbitMQ quorum queue's channel holds back acks once 32 of
    /// its commands (publishes and acks) await the queue's answer, and drops the
    /// held-back ones if the channel closes before it sends them, so the broker hands
    /// those messages back although they were acked
    /// (<https://github.com/rabbitmq/rabbitmq-server/issues/10327>; `rabbit_fifo_client`'s
    /// soft limit). With 128 copies in flight and acks one by one, a read of 1 000
    /// messages left dozens of duplicates. A `basic.get` is a synchronous command to
    /// the queue sent after the ack, so each read also waits for the previous ack.
    ///
    /// A read (through a consumer) acks in batches of [`READ_ACK_BATCH`] unless
    /// `now`, and never past its `ack_limit`: at most as many commands as the
    /// one-by-one path, and the broker never sends past the snapshot.
    async fn flush_acks(&mut self, now: bool) -> Result<(), CliError> {
        let room = self.ack_limit.map_or(usize::MAX, |l| {
            usize::try_from(l.saturating_sub(self.acked)).unwrap_or(usize::MAX)
        });
        let mut upto = None;
        let mut run = 0usize;
        for tag in &self.held {
            if run >= room || !self.ackable.contains(tag) {
                break;
            }
            upto = Some(*tag);
            run += 1;
        }
        let Some(upto) = upto else {
            return Ok(());
        };
        let batched = matches!(self.source, Source::Consume { .. });
        if batched && !now && run < READ_ACK_BATCH {
            return Ok(());
        }
        self.channel
            .basic_ack(upto, BasicAckOptions { multiple: true })
            .await
            .map_err(CliError::amqp("basic.ack"))?;
        self.held = self.held.split_off(&(upto + 1));
        self.ackable = self.ackable.split_off(&(upto + 1));
        self.acked += run as u64;
        Ok(())
    }

    /// Publishes an exact copy of `delivery` to the tail of the DLQ; the original is
    /// acked once the copy is confirmed.
    pub(super) async fn restore(
        &mut self,
        delivery: &Delivery,
        position: u64,
    ) -> Result<(), CliError> {
        let properties = restored_properties(&delivery.properties);
        self.put_back(delivery.delivery_tag, position, &delivery.data, properties)
            .await
    }

    /// Publishes `body` with `properties` to the tail of the DLQ in place of the
    /// delivery `tag`, which is acked once the broker confirmed the new message (an
    /// exact copy for [`Scan::restore`], an edited one for `edit`).
    pub(super) async fn put_back(
        &mut self,
        tag: u64,
        position: u64,
        body: &[u8],
        properties: lapin::BasicProperties,
    ) -> Result<(), CliError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = self
            .channel
            .basic_publish("".into(), queue_name(&self.dlq)?, options, body, properties)
            .await;
        self.restoring.push_back(Restoring {
            tag,
            position,
            confirm,
        });
        if self.restoring.len() >= RESTORE_PIPELINE {
            self.settle_oldest_restore().await?;
        }
        if matches!(self.source, Source::Consume { .. }) {
            self.flush_acks(false).await?;
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
            Ok(Confirmation::Ack(None)) => {
                self.ack(r.tag);
                return Ok(());
            }
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
    pub(super) async fn settle_restores(&mut self) -> Result<(), CliError> {
        while !self.restoring.is_empty() {
            self.settle_oldest_restore().await?;
        }
        Ok(())
    }

    /// Reads every message, each put back as a confirmed copy before `f` gets it
    /// (module docs), then finishes the scan.
    async fn visit_all(mut self, mut f: impl FnMut(&Delivery, DlqEntry)) -> Result<(), CliError> {
        let result = async {
            while let Some((delivery, entry)) = self.next().await? {
                self.restore(&delivery, entry.position).await?;
                f(&delivery, entry);
            }
            Ok::<_, CliError>(())
        }
        .await;
        self.finish(result).await
    }

    /// Settles the restores, then closes the channel. On an error, whatever is still
    /// unacked is handed back by the broker.
    pub(super) async fn finish(mut self, result: Result<(), CliError>) -> Result<(), CliError> {
        let settled = match result {
            Ok(()) => match self.settle_restores().await {
                Ok(()) => match self.cancel_consumer().await {
                    Ok(()) => self.flush_acks(true).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
            Err(e) => {
                // What is done with is still acked (one by one past the first
                // message held back), so that only the others are handed back.
                let _ = self.cancel_consumer().await;
                let _ = self.flush_acks(true).await;
                for tag in std::mem::take(&mut self.ackable) {
                    let _ = self
                        .channel
                        .basic_ack(tag, BasicAckOptions::default())
                        .await;
                }
                Err(e)
            }
        };
        close_channel(&self.channel).await;
        settled
    }
}

/// The first `limit` messages of the DLQ of `queue` (see [`resolve`](super::resolve)); every message
/// stays, in order (module docs).
pub async fn list(conn: &Connection, queue: &str, limit: u64) -> Result<Vec<DlqEntry>, CliError> {
    list_where(conn, queue, limit, &Selector::All).await
}

/// [`list`] of the messages `selector` selects: the first `limit` of them.
pub async fn list_where(
    conn: &Connection,
    queue: &str,
    limit: u64,
    selector: &Selector,
) -> Result<Vec<DlqEntry>, CliError> {
    let mut entries = Vec::new();
    visit(conn, queue, |_, entry| {
        if (entries.len() as u64) < limit && selector.matches(&entry) {
            entries.push(entry);
        }
    })
    .await
    .map(|_| entries)
}

/// Reads every message of the queue named exactly `queue` (a work queue, a delay
/// queue, a DLQ) as [`visit`] reads a DLQ, and hands each to `f` with its entry:
/// every message stays, each one read is put back as a confirmed copy at the tail
/// before its original is acked, nothing is handed back to the broker (module docs).
/// `idem verify` reads the queues of a topology this way.
pub(crate) async fn visit_queue(
    conn: &Connection,
    queue: &str,
    f: impl FnMut(&Delivery, DlqEntry),
) -> Result<(), CliError> {
    let scan = Scan::open_exact(conn, queue.to_owned(), queue.to_owned()).await?;
    scan.start_reading().await?.visit_all(f).await
}

/// Reads every message of the DLQ of `queue` and hands each to `f` with its entry;
/// every message stays, in order (module docs). Returns the DLQ's name.
pub(super) async fn visit(
    conn: &Connection,
    queue: &str,
    f: impl FnMut(&Delivery, DlqEntry),
) -> Result<String, CliError> {
    let scan = Scan::open_reading(conn, queue).await?;
    let dlq = scan.dlq.clone();
    scan.visit_all(f).await.map(|()| dlq)
}
