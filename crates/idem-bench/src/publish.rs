//! `publish`: publish N persistent messages (`--size` bytes, 256 by default) with
//! publisher confirms to a fresh durable queue.
//!
//! - idem: [`Publisher::publish_batch`] of all N messages (each gets a UUIDv7
//!   `message_id`; windows of `--max-in-flight` published back to back, then their
//!   confirms awaited).
//! - baseline: the hand-written lapin loop with the same discipline on one
//!   confirm-mode channel: per window of `--max-in-flight`, every message published
//!   (mandatory, persistent, a UUIDv7 `message_id`), then every confirm awaited and
//!   checked to be a plain ack (a returned or nacked message is an error).
//!
//! The clock covers building the messages, publishing and the last confirm; the
//! connection is opened before it. After each run the queue must hold exactly N
//! messages (checked, then the queue is deleted). The report's `prefetch` is 0 (no
//! consumer).

use std::time::{Duration, Instant};

use idem_amqp::Publisher;
use idem_core::Message;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};

use crate::report::{Report, Side};

type BoxError = Box<dyn std::error::Error>;

/// Arguments of `publish`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) messages: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    pub(crate) size: usize,
    /// Most messages published and not yet confirmed (both sides).
    #[arg(long, default_value_t = idem_amqp::PublisherBuilder::DEFAULT_MAX_IN_FLIGHT)]
    pub(crate) max_in_flight: usize,
    /// Rounds; each round runs idem then the baseline.
    #[arg(long, default_value_t = 5)]
    pub(crate) rounds: u32,
    #[command(flatten)]
    amqp: crate::urls::AmqpUrl,
}

pub(crate) async fn run(args: Args) -> Result<Report, BoxError> {
    let window = args.max_in_flight.max(1);
    let admin = idem_amqp::connect(&args.amqp.url, "idem-bench-admin").await?;
    let ch = admin.create_channel().await?;
    let publisher = Publisher::builder(args.amqp.url.as_str())
        .connection_name("idem-bench-publish-idem")
        .max_in_flight(window)
        .connect()
        .await?;
    let conn = idem_amqp::connect(&args.amqp.url, "idem-bench-publish-baseline").await?;
    let base = conn.create_channel().await?;
    base.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = bytes::Bytes::from(vec![b'x'; args.size]);
    let mut report = Report::new("publish", args.messages, 0);
    for round in 0..args.rounds.max(1) {
        for side in [Side::Idem, Side::Baseline] {
            let queue = format!("idem-bench-publish-{}", uuid::Uuid::new_v4().simple());
            ch.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
            let cpu = crate::cpu::Sample::now();
            let start = Instant::now();
            let result = match side {
                Side::Idem => {
                    let mut msgs: Vec<Message> = (0..args.messages)
                        .map(|_| Message::new(body.clone()))
                        .collect();
                    publisher
                        .publish_batch("", &queue, &mut msgs)
                        .await
                        .map_err(Into::into)
                }
                _ => baseline(&base, &queue, &body, args.messages, window).await,
            };
            let elapsed = start.elapsed();
            let used = cpu.per_message(args.messages);
            let counted = match result {
                Ok(()) => count(&ch, &queue, args.messages).await,
                Err(e) => Err(e),
            };
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let counted = counted?;
            if counted != args.messages {
                return Err(format!(
                    "{}: the queue holds {counted} of {} messages",
                    side.label(),
                    args.messages
                )
                .into());
            }
            report.record(round, side, elapsed);
            report.record_cpu(side, used);
        }
    }
    publisher.close().await;
    let _ = conn.close(200, "bye".into()).await;
    let _ = admin.close(200, "bye".into()).await;
    Ok(report)
}

/// The hand-written confirm loop.
async fn baseline(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    n: u64,
    window: usize,
) -> Result<(), BoxError> {
    let mut left = n;
    let mut confirms = Vec::with_capacity(window);
    while left > 0 {
        let size = left.min(window as u64);
        for _ in 0..size {
            let props = BasicProperties::default()
                .with_message_id(uuid::Uuid::now_v7().to_string().into())
                .with_delivery_mode(2);
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    props,
                )
                .await?;
            confirms.push(confirm);
        }
        for confirm in confirms.drain(..) {
            match confirm.await? {
                Confirmation::Ack(None) => {}
                other => return Err(format!("publish not confirmed: {other:?}").into()),
            }
        }
        left -= size;
    }
    Ok(())
}

/// Messages in `queue`, read until it reaches `want` or 5 s passed (a confirmed
/// publish can take a moment to show on another channel).
async fn count(ch: &Channel, queue: &str, want: u64) -> Result<u64, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let n = u64::from(q.message_count());
        if n >= want || Instant::now() > deadline {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
