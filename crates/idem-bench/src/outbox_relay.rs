//! `outbox-relay`: publish N pre-filled outbox rows (256-byte bodies) to a queue.
//! idem: [`idem_outbox::Relay::drain`] (batches of `--batch`, `FOR UPDATE SKIP LOCKED`,
//! ordering-key check, publish with confirms, mark). Baseline: a hand-written loop over
//! an identical table doing the same SQL lease, pipelined confirm publishes on one
//! channel, and the same `UPDATE ... published_at` per batch. Each run gets a fresh
//! table and queue, deleted afterwards. The report's `prefetch` is 0 (no consumer).

use std::time::{Duration, Instant};

use idem_outbox::{Outbox, Relay};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use sqlx::{PgPool, Row};

use crate::report::{Report, Side};

type BoxError = Box<dyn std::error::Error>;

/// Arguments of `outbox-relay`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Rows per run.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Rows per relay round (both sides).
    #[arg(long, default_value_t = 500)]
    batch: i64,
    /// Rounds; each round runs idem then the baseline.
    #[arg(long, default_value_t = 5)]
    pub(crate) rounds: u32,
    #[command(flatten)]
    amqp: crate::urls::AmqpUrl,
    // --database-url.
    #[command(flatten)]
    postgres: crate::urls::PostgresUrl,
}

pub(crate) async fn run(args: Args) -> Result<Report, BoxError> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&args.postgres.database_url)
        .await?;
    let admin = idem_amqp::connect(&args.amqp.url, "idem-bench-admin").await?;
    let ch = admin.create_channel().await?;
    let mut report = Report::new("outbox-relay", args.messages, 0);
    for round in 0..args.rounds.max(1) {
        for idem in [true, false] {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let outbox = Outbox::new(&format!("idem_bench_outbox_{}", &id[..12]))?;
            outbox.ensure_schema(&pool).await?;
            let queue = format!("idem-bench-outbox-{id}");
            ch.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
            fill(&pool, &outbox, &queue, args.messages).await?;
            let cpu = crate::cpu::Sample::now();
            let result: Result<(Duration, u64), BoxError> = if idem {
                let relay = Relay::builder(pool.clone(), outbox.clone(), args.amqp.url.clone())
                    .batch_size(args.batch)
                    .build();
                let start = Instant::now();
                relay
                    .drain()
                    .await
                    .map(|s| (start.elapsed(), s.published))
                    .map_err(Into::into)
            } else {
                baseline(&pool, &outbox, &args).await
            };
            let used = cpu.per_message(args.messages);
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            sqlx::query(&format!("DROP TABLE IF EXISTS {}", outbox.table_name()))
                .execute(&pool)
                .await?;
            let (elapsed, published) = result?;
            if published != args.messages {
                return Err(format!("published {published} of {} rows", args.messages).into());
            }
            let side = if idem { Side::Idem } else { Side::Baseline };
            report.record(round, side, elapsed);
            report.record_cpu(side, used);
        }
    }
    let _ = admin.close(200, "bye".into()).await;
    Ok(report)
}

async fn fill(pool: &PgPool, outbox: &Outbox, queue: &str, n: u64) -> Result<(), BoxError> {
    sqlx::query(&format!(
        "INSERT INTO {} (message_id, exchange, routing_key, body)
         SELECT gen_random_uuid()::text, '', $1, decode(repeat('78', 256), 'hex') FROM generate_series(1, $2)",
        outbox.table_name()
    ))
    .bind(queue)
    .bind(n as i64)
    .execute(pool)
    .await?;
    Ok(())
}

/// The hand-written relay: lease, publish with confirms, mark, commit.
async fn baseline(
    pool: &PgPool,
    outbox: &Outbox,
    args: &Args,
) -> Result<(Duration, u64), BoxError> {
    let conn = idem_amqp::connect(&args.amqp.url, "idem-bench-baseline").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let t = outbox.table_name();
    let start = Instant::now();
    let mut published = 0u64;
    loop {
        let mut tx = pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT id, message_id, exchange, routing_key, body FROM {t}
             WHERE published_at IS NULL AND available_at <= now()
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .bind(args.batch)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            break;
        }
        let mut confirms = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: i64 = r.try_get(0)?;
            let message_id: String = r.try_get(1)?;
            let exchange: String = r.try_get(2)?;
            let routing_key: String = r.try_get(3)?;
            let body: Vec<u8> = r.try_get(4)?;
            let props = BasicProperties::default()
                .with_message_id(message_id.into())
                .with_delivery_mode(2);
            let c = ch
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &body,
                    props,
                )
                .await?;
            confirms.push(c);
            ids.push(id);
        }
        for c in confirms {
            match c.await? {
                Confirmation::Ack(None) => {}
                other => return Err(format!("publish not confirmed: {other:?}").into()),
            }
        }
        sqlx::query(&format!(
            "UPDATE {t} SET published_at = now() WHERE id = ANY($1)"
        ))
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        published += ids.len() as u64;
    }
    let elapsed = start.elapsed();
    let _ = conn.close(200, "bye".into()).await;
    Ok((elapsed, published))
}
