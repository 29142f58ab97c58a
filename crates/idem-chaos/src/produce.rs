//! The producer: publishes every message with confirms (or through the outbox) and
//! records what the broker confirmed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem_amqp::Publisher;
use idem_core::Message;
use idem_outbox::{Outbox, OutboxMessage};
use sqlx::PgPool;

use crate::common::{self, BoxError, Names};
use crate::setup::Admin;

pub(crate) const PUBLISH_BATCH: usize = 200;
/// The ordering key of a message of a `--keys` run (`n % keys`).
pub(crate) const KEY_HEADER: &str = "x-chaos-key";

/// What has been published so far, shared by the producer and the fault injector.
#[derive(Default)]
pub(crate) struct Published {
    /// Messages confirmed by the broker to the publisher.
    pub(crate) direct: AtomicU64,
    /// Messages committed into the outbox.
    pub(crate) outbox: AtomicU64,
}

impl Published {
    pub(crate) fn total(&self) -> u64 {
        self.direct.load(Ordering::Relaxed) + self.outbox.load(Ordering::Relaxed)
    }
}

pub(crate) fn body(id: &str, n: u64, poison: bool) -> Vec<u8> {
    if poison {
        format!("poison {id}: not JSON").into_bytes()
    } else {
        serde_json::json!({ "id": id, "n": n })
            .to_string()
            .into_bytes()
    }
}

/// Publishes every message with confirms, re-publishing a batch with the same ids
/// until it is confirmed, and records the confirmed ids. With `outbox`, every other
/// batch is instead enqueued into the outbox in the transaction that records its ids
/// (the outbox generates the ids; the body then carries `"outbox": true` instead of
/// the id). With a `rate`, batches are small and paced.
pub(crate) async fn produce(
    names: Names,
    pg: PgPool,
    poison: Arc<Vec<bool>>,
    published: Arc<Published>,
    outbox: Option<Outbox>,
    rate: u32,
    keys: u64,
) -> Result<(), BoxError> {
    // On a cluster: every node's URL; the publisher moves on to the next node when
    // its connection is lost.
    let publisher = Publisher::builder(common::amqp_url())
        .connection_name(format!("{}producer", names.conn_prefix()))
        .connect()
        .await?;
    let queue = names.queue();
    let insert = format!(
        "INSERT INTO {} (msg_id, poison) SELECT * FROM UNNEST($1::text[], $2::bool[]) ON CONFLICT DO NOTHING",
        names.table("published")
    );
    let batch = if rate == 0 {
        PUBLISH_BATCH
    } else {
        (rate as usize / 10).clamp(1, PUBLISH_BATCH)
    };
    let started = Instant::now();
    let ids: Vec<u64> = (0..poison.len() as u64).collect();
    for (index, chunk) in ids.chunks(batch).enumerate() {
        if rate > 0 {
            let due = started + Duration::from_secs_f64((index * batch) as f64 / f64::from(rate));
            tokio::time::sleep_until(due.into()).await;
        }
        let flags: Vec<bool> = chunk
            .iter()
            .map(|&n| poison.get(n as usize).copied().unwrap_or(false))
            .collect();
        if let Some(outbox) = outbox.as_ref().filter(|_| index % 2 == 1) {
            let n = enqueue_batch(outbox, &pg, &insert, &queue, chunk, &flags).await?;
            published.outbox.fetch_add(n, Ordering::Relaxed);
            continue;
        }
        let mut msgs: Vec<Message> = chunk
            .iter()
            .zip(&flags)
            .map(|(&n, &bad)| {
                let id = format!("{}-{n}", names.run);
                let msg = Message::new(body(&id, n, bad)).with_message_id(id);
                match keys {
                    0 => msg,
                    k => msg
                        .with_header(KEY_HEADER, (n % k).to_string())
                        .with_header("x-chaos-seq", (n / k).to_string()),
                }
            })
            .collect();
        let mut ok = false;
        for attempt in 0..100 {
            match publisher.publish_batch("", &queue, &mut msgs).await {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "batch not confirmed; publishing it again with the same ids");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if !ok {
            println!(
                "chaos: producer gave up on a batch of {} messages",
                msgs.len()
            );
            continue;
        }
        let ids: Vec<String> = msgs
            .iter()
            .filter_map(|m| m.properties.message_id.clone())
            .collect();
        let mut recorded = false;
        for _ in 0..20 {
            match sqlx::query(&insert)
                .bind(&ids)
                .bind(&flags)
                .execute(&pg)
                .await
            {
                Ok(_) => {
                    recorded = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record confirmed ids; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if !recorded {
            return Err("cannot record the confirmed ids in PostgreSQL".into());
        }
        published
            .direct
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
    }
    publisher.close().await;
    Ok(())
}

/// Enqueues one batch into the outbox and records its ids, in one transaction
/// (retried on error: a failed transaction left nothing). Returns the batch size.
pub(crate) async fn enqueue_batch(
    outbox: &Outbox,
    pg: &PgPool,
    insert: &str,
    queue: &str,
    chunk: &[u64],
    flags: &[bool],
) -> Result<u64, BoxError> {
    let mut last = None;
    for _ in 0..20 {
        let attempt = async {
            let mut tx = pg.begin().await?;
            let mut ids = Vec::with_capacity(chunk.len());
            for (&n, &bad) in chunk.iter().zip(flags) {
                let body = if bad {
                    format!("poison {n} (outbox): not JSON").into_bytes()
                } else {
                    serde_json::json!({ "n": n, "outbox": true })
                        .to_string()
                        .into_bytes()
                };
                let id = outbox
                    .enqueue(&mut tx, OutboxMessage::new("", queue, body))
                    .await?;
                ids.push(id.to_string());
            }
            sqlx::query(insert)
                .bind(&ids)
                .bind(flags)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, BoxError>(ids.len() as u64)
        };
        match attempt.await {
            Ok(n) => return Ok(n),
            Err(e) => {
                tracing::warn!(error = %e, "cannot enqueue a batch into the outbox; retrying");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Err(format!(
        "cannot enqueue into the outbox: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )
    .into())
}

/// Publishes again the `count` valid messages whose effects were applied first (long
/// before the fault), with their ids and bodies. Returns how many were confirmed.
pub(crate) async fn replay_completed(
    names: &Names,
    admin: &Admin,
    count: u32,
) -> Result<usize, BoxError> {
    let ids: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT e.msg_id FROM {} e JOIN {} p USING (msg_id) WHERE NOT p.poison ORDER BY e.at LIMIT $1",
        names.table("effects"),
        names.table("published")
    ))
    .bind(i64::from(count))
    .fetch_all(&admin.pg)
    .await?;
    let mut msgs: Vec<Message> = ids
        .iter()
        .map(|id| {
            let n = id
                .rsplit('-')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Message::new(body(id, n, false)).with_message_id(id.clone())
        })
        .collect();
    let publisher = Publisher::builder(common::amqp_url())
        .connection_name(format!("{}replayer", names.conn_prefix()))
        .connect()
        .await?;
    let sent = publisher
        .publish_batch("", &names.queue(), &mut msgs)
        .await
        .map(|()| msgs.len());
    publisher.close().await;
    Ok(sent?)
}
