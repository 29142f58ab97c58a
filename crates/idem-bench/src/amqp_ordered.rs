//! `amqp-noop --ordered`: the cost of ordered consumption. The idem worker consumes N
//! persistent 256-byte messages with a no-op handler, at-least-once, in interleaved
//! rounds of these variants, each on a fresh queue with the same prefetch:
//!
//! - `unordered`: the default worker (coalesced acks);
//! - `unordered, per-delivery acks`: `coalesce_acks(false)`, the ack mode an ordered
//!   worker uses, so the table separates the cost of the acks from that of the lanes;
//! - `ordered K=<k>` for each `--keys` value: `WorkerBuilder::ordered` by header
//!   `x-bench-key`, message `i` of key `i % k`;
//! - `ordered K=<largest>, coalesced acks`: the same with `Ordering::coalesce_acks(true)`.
//!
//! Every message carries the key header, whatever the variant. The report gives the
//! median, min and max msgs/s over the rounds and the median CPU microseconds per
//! message of this process and of the broker (less sensitive to a loaded machine).

use std::time::Duration;

use idem_amqp::ordered::Ordering;
use idem_amqp::{Publisher, Topology, WorkerBuilder};
use idem_core::dedup::HeaderKey;
use idem_core::Message;

use crate::amqp_noop::{noop_consumer, Clock, NoopArgs};
use crate::cpu::{PerMessage, Sample};
use crate::report::{median, Spread};

type BoxError = Box<dyn std::error::Error>;

const KEY_HEADER: &str = "x-bench-key";

/// One configuration of the worker.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Unordered,
    PerDeliveryAcks,
    Ordered(u64),
    /// Ordered, `Ordering::coalesce_acks(true)`.
    OrderedCoalesced(u64),
}

impl Variant {
    fn label(self) -> String {
        match self {
            Variant::Unordered => "unordered".into(),
            Variant::PerDeliveryAcks => "unordered, per-delivery acks".into(),
            Variant::Ordered(k) => format!("ordered K={k}"),
            Variant::OrderedCoalesced(k) => format!("ordered K={k}, coalesced acks"),
        }
    }
}

/// Runs the rounds and prints the table.
pub(crate) async fn run(args: NoopArgs) -> Result<(), BoxError> {
    let base = &args.base;
    let broker = base.broker().await?;
    let ch = &broker.ch;
    let mut variants = vec![Variant::Unordered, Variant::PerDeliveryAcks];
    variants.extend(args.keys.iter().map(|k| Variant::Ordered((*k).max(1))));
    let keys_max = args.keys.iter().copied().max().unwrap_or(1).max(1);
    variants.push(Variant::OrderedCoalesced(keys_max));
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut cpu: Vec<Vec<PerMessage>> = vec![Vec::new(); variants.len()];
    for round in 0..base.rounds.max(1) {
        for (i, variant) in variants.iter().enumerate() {
            let topo = Topology::new(format!("idem-bench-{}", uuid::Uuid::new_v4().simple()));
            topo.declare_on(ch).await?;
            let keys = match variant {
                Variant::Ordered(k) | Variant::OrderedCoalesced(k) => *k,
                _ => keys_max,
            };
            fill_keyed(&broker.publisher, topo.queue(), base.messages, keys).await?;
            let sample = Sample::now();
            let result = run_variant(&args, &topo, *variant).await;
            let used = sample.per_message(base.messages);
            topo.delete_on(ch).await?;
            let elapsed = result?;
            let rate = base.messages as f64 / elapsed.as_secs_f64();
            eprintln!("round {round} {}: {rate:.0} msgs/s", variant.label());
            rates[i].push(rate);
            cpu[i].push(used);
        }
    }
    broker.close().await;
    println!("{}", table(&args, &variants, &rates, &cpu));
    Ok(())
}

/// The Markdown table of the rounds.
fn table(
    args: &NoopArgs,
    variants: &[Variant],
    rates: &[Vec<f64>],
    cpu: &[Vec<PerMessage>],
) -> String {
    let base = &args.base;
    let mut out = format!(
        "amqp-noop --ordered: {} messages, prefetch {}, {} interleaved rounds\n\n\
         | variant | median msgs/s | min | max | vs unordered | client CPU µs/msg | broker CPU µs/msg |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        base.messages,
        base.prefetch,
        base.rounds.max(1)
    );
    let reference = median(&rates[0]);
    for ((variant, r), c) in variants.iter().zip(rates).zip(cpu) {
        let s = Spread::of(r);
        let m = PerMessage::median(c);
        let us = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1}"));
        out.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:+.1} % | {} | {} |\n",
            variant.label(),
            s.median,
            s.min,
            s.max,
            (s.median / reference - 1.0) * 100.0,
            us(m.0[0]),
            us(m.0[1]),
        ));
    }
    out
}

async fn run_variant(
    args: &NoopArgs,
    topo: &Topology,
    variant: Variant,
) -> Result<Duration, BoxError> {
    let base = &args.base;
    let clock = Clock::new(base.messages);
    let consumer = noop_consumer("idem-bench-ordered", &clock)?;
    let configure = |worker: WorkerBuilder| match variant {
        Variant::Unordered => worker,
        Variant::PerDeliveryAcks => worker.coalesce_acks(false),
        Variant::Ordered(_) => worker.ordered(Ordering::by(HeaderKey::new(KEY_HEADER))),
        Variant::OrderedCoalesced(_) => {
            worker.ordered(Ordering::by(HeaderKey::new(KEY_HEADER)).coalesce_acks(true))
        }
    };
    base.run_worker(topo, consumer, clock, "idem-bench-ordered", configure)
        .await
}

/// Fills `queue` with `n` persistent 256-byte messages, message `i` of key `i % keys`.
async fn fill_keyed(publisher: &Publisher, queue: &str, n: u64, keys: u64) -> Result<(), BoxError> {
    let body = bytes::Bytes::from(vec![b'x'; 256]);
    let mut sent = 0;
    while sent < n {
        let batch = (n - sent).min(1000);
        let mut msgs: Vec<Message> = (sent..sent + batch)
            .map(|i| Message::new(body.clone()).with_header(KEY_HEADER, (i % keys).to_string()))
            .collect();
        publisher.publish_batch("", queue, &mut msgs).await?;
        sent += batch;
    }
    Ok(())
}
