//! Outbox and relay against the real PostgreSQL and RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{Consumer, Disposition, MemoryStore, Message};
use idem_outbox::{OutboxError, OutboxMessage, Relay};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::{amqp_url, message_id, Fixture};

#[tokio::test]
async fn rollback_publishes_nothing_commit_publishes_once() {
    let f = Fixture::new("t").await;
    let mut tx = f.pool.begin().await.unwrap();
    f.outbox
        .enqueue(
            &mut tx,
            OutboxMessage::new("", f.queue.clone(), b"rolled back".to_vec()),
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let id = f
        .enqueue(
            OutboxMessage::json("", f.queue.clone(), &serde_json::json!({"n": 1}))
                .unwrap()
                .header("tenant", "t-1"),
        )
        .await;
    let relay = Relay::builder(f.pool.clone(), f.outbox.clone(), amqp_url()).build();
    assert_eq!(relay.drain().await.unwrap().published, 1);
    let got = f.take(1).await;
    assert_eq!(got.len(), 1, "only the committed message is published");
    assert_eq!(
        message_id(&got[0]),
        id.to_string(),
        "the idempotency key is the message_id"
    );
    assert_eq!(got[0].data, br#"{"n":1}"#);
    assert_eq!(
        got[0]
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str()),
        Some("application/json")
    );
    let status = f.outbox.status(&f.pool).await.unwrap();
    assert_eq!((status.pending, status.published), (0, 1));
    assert_eq!(
        relay.drain().await.unwrap().published,
        1,
        "a marked row is not published again"
    );
    assert!(f.take(0).await.is_empty());
    f.cleanup(&[]).await;
}

#[tokio::test]
async fn crash_after_publish_republishes_same_id_and_dedup_absorbs_it() {
    let f = Fixture::new("t").await;
    let id = f
        .enqueue(OutboxMessage::new("", f.queue.clone(), b"deposit".to_vec()))
        .await;
    let relay = Relay::builder(f.pool.clone(), f.outbox.clone(), amqp_url())
        .fail_after_publish(1)
        .build();
    let err = relay.relay_once().await.unwrap_err();
    assert!(matches!(err, OutboxError::Failpoint(_)), "{err}");
    assert_eq!(
        f.outbox.status(&f.pool).await.unwrap().pending,
        1,
        "row still pending after the crash"
    );
    relay.drain().await.unwrap();
    let got = f.take(2).await;
    assert_eq!(
        got.len(),
        2,
        "published again after the crash: {:?}",
        got.iter().map(message_id).collect::<Vec<_>>()
    );
    assert!(
        got.iter().all(|d| message_id(d) == id.to_string()),
        "both copies carry the same message_id"
    );

    // The consumer's dedup applies it once.
    let applied = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let consumer = Consumer::builder("deposits")
        .store(MemoryStore::new())
        .handler_with_state(
            |idem_core::State(n): idem_core::State<Arc<std::sync::atomic::AtomicUsize>>| async move {
                n.fetch_add(1, Ordering::SeqCst);
            },
            applied.clone(),
        )
        .unwrap();
    let mut dispositions = Vec::new();
    for d in &got {
        let msg = Message::new(d.data.clone()).with_message_id(message_id(d));
        dispositions.push(consumer.process(msg).await);
    }
    assert_eq!(
        dispositions,
        vec![
            Disposition::Ack { duplicate: false },
            Disposition::Ack { duplicate: true }
        ]
    );
    assert_eq!(applied.load(Ordering::SeqCst), 1);
    f.cleanup(&[]).await;
}

/// Enqueues `per_key` rows for each of `keys` keys, interleaved, in one transaction;
/// bodies are `<key>:<seq>`.
async fn enqueue_keyed(f: &Fixture, keys: usize, per_key: usize) {
    let mut tx = f.pool.begin().await.unwrap();
    for seq in 0..per_key {
        for k in 0..keys {
            f.outbox
                .enqueue(
                    &mut tx,
                    OutboxMessage::new("", f.queue.clone(), format!("{k}:{seq}").into_bytes())
                        .ordering_key(format!("key-{k}")),
                )
                .await
                .unwrap();
        }
    }
    tx.commit().await.unwrap();
}

/// Bodies of `got` (`<key>:<seq>`) must come in sequence order per key, starting at
/// `from[key]`; returns the next expected sequence per key.
fn assert_key_order(
    got: &[lapin::message::Delivery],
    mut next: HashMap<String, usize>,
) -> HashMap<String, usize> {
    for d in got {
        let body = String::from_utf8(d.data.clone()).unwrap();
        let (k, seq) = body.split_once(':').unwrap();
        let expected = next.entry(k.to_owned()).or_insert(0);
        assert_eq!(
            seq.parse::<usize>().unwrap(),
            *expected,
            "key {k} out of order in {:?}",
            got.iter()
                .map(|d| String::from_utf8_lossy(&d.data).into_owned())
                .collect::<Vec<_>>()
        );
        *expected += 1;
    }
    next
}

/// Two relays race until the outbox is empty; returns both relays' stats.
async fn race_two_relays(
    f: &Fixture,
    batch: i64,
) -> (idem_outbox::RelayStats, idem_outbox::RelayStats) {
    let run = |r: Relay| {
        let pool = f.pool.clone();
        let outbox = f.outbox.clone();
        tokio::spawn(async move {
            // A relay may find nothing it may publish while the other holds the head of
            // every key, so each loops until the outbox is empty.
            loop {
                r.relay_once().await.unwrap();
                if outbox.status(&pool).await.unwrap().pending == 0 {
                    return r.stats();
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let a = Relay::builder(f.pool.clone(), f.outbox.clone(), amqp_url())
        .batch_size(batch)
        .build();
    let b = Relay::builder(f.pool.clone(), f.outbox.clone(), amqp_url())
        .batch_size(batch)
        .build();
    let (sa, sb) = tokio::join!(run(a), run(b));
    (sa.unwrap(), sb.unwrap())
}

/// One race of two relays over `keys` × `per_key` fresh rows: each row published
/// once, every key's rows in order.
async fn race_round(f: &Fixture, (keys, per_key): (usize, usize), batch: i64, what: &str) {
    enqueue_keyed(f, keys, per_key).await;
    let (sa, sb) = race_two_relays(f, batch).await;
    assert_eq!(
        sa.published + sb.published,
        (keys * per_key) as u64,
        "{what}: each row published once: {sa:?} {sb:?}"
    );
    let got = f.take(keys * per_key).await;
    assert_eq!(got.len(), keys * per_key, "{what}");
    assert_key_order(&got, HashMap::new());
}

#[tokio::test]
async fn two_relays_publish_each_row_once_and_keep_per_key_order() {
    let f = Fixture::new("t").await;
    race_round(&f, (5, 40), 7, "one race").await;
    f.cleanup(&[]).await;
}

/// The race above, fifty times over, so an ordering bug that needs an unlucky
/// interleaving shows up inside one test run.
#[tokio::test]
async fn two_relays_race_fifty_times_each_row_once_in_key_order() {
    let f = Fixture::new("t").await;
    let (keys, per_key) = (4, 12);
    let rounds = async {
        for round in 0..50 {
            race_round(&f, (keys, per_key), 5, &format!("round {round}")).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(180), rounds)
        .await
        .expect("fifty relay races finish within 3 minutes");
    f.cleanup(&[]).await;
}

/// Builds the gap by hand: another "relay" (an open transaction) holds the middle row of
/// a key, so `SKIP LOCKED` hands this relay the rows on both sides of it. Only the rows
/// before the held one may go out.
#[tokio::test]
async fn relay_leaves_a_key_alone_behind_a_row_another_relay_holds() {
    let f = Fixture::new("t").await;
    enqueue_keyed(&f, 1, 5).await; // key-0: 0:0 .. 0:4, ids ascending
    let t = f.outbox.table_name().to_owned();
    let ids: Vec<i64> = sqlx::query_scalar(&format!("SELECT id FROM {t} ORDER BY id"))
        .fetch_all(&f.pool)
        .await
        .unwrap();
    let mut holder = f.pool.begin().await.unwrap();
    sqlx::query(&format!("SELECT id FROM {t} WHERE id = $1 FOR UPDATE"))
        .bind(ids[2])
        .execute(&mut *holder)
        .await
        .unwrap();

    let relay = Relay::builder(f.pool.clone(), f.outbox.clone(), amqp_url())
        .batch_size(100)
        .build();
    assert_eq!(
        relay.relay_once().await.unwrap(),
        4,
        "leases the rows around the held one"
    );
    let got = f.take(2).await;
    let bodies: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    assert_eq!(
        bodies,
        ["0:0", "0:1"],
        "nothing after the held row goes out"
    );
    assert_eq!(f.outbox.status(&f.pool).await.unwrap().pending, 3);

    holder.rollback().await.unwrap(); // the other relay gives up its lease
    relay.drain().await.unwrap();
    let rest = f.take(3).await;
    let next = assert_key_order(&got, HashMap::new());
    assert_key_order(&rest, next);
    assert_eq!(rest.len(), 3);
    f.cleanup(&[]).await;
}

/// Two transactions enqueue the same key; the one that started later commits first if
/// it can. Order is commit order, so the later transaction waits for the earlier one and
/// its message goes out second, whatever a relay does in between.
#[tokio::test]
async fn concurrent_enqueues_of_one_key_go_out_in_commit_order() {
    let f = Fixture::new("t").await;
    let msg = |body: &str| {
        OutboxMessage::new("", f.queue.clone(), body.as_bytes().to_vec()).ordering_key("acct-7")
    };
    let mut first = f.pool.begin().await.unwrap();
    f.outbox.enqueue(&mut first, msg("first")).await.unwrap();

    let (pool, outbox, second_msg) = (f.pool.clone(), f.outbox.clone(), msg("second"));
    let mut second = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        outbox.enqueue(&mut tx, second_msg).await.unwrap();
        tx.commit().await.unwrap();
    });
    // Without per-key serialisation the second transaction commits now, and a relay
    // round publishes it ahead of the first.
    let finished_early = tokio::time::timeout(Duration::from_millis(500), &mut second)
        .await
        .is_ok();
    let relay = Relay::builder(f.pool.clone(), f.outbox.clone(), amqp_url()).build();
    relay.relay_once().await.unwrap();

    first.commit().await.unwrap();
    if !finished_early {
        second.await.unwrap();
    }
    relay.drain().await.unwrap();
    let bodies: Vec<String> = f
        .take(2)
        .await
        .iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    assert_eq!(bodies, ["first", "second"]);
    assert!(
        !finished_early,
        "the second enqueue of a key waits for the first transaction"
    );
    f.cleanup(&[]).await;
}

/// A TCP proxy to RabbitMQ that can be cut and restored, to take the broker away.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !flag.load(Ordering::SeqCst) {
                    let _ = client.shutdown().await;
                    continue;
                }
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect("127.0.0.1:5672").await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                    let cut = async {
                        while flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! { _ = copy => {}, _ = cut => {} }
                });
            }
        });
        Proxy { port, up }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

#[tokio::test]
async fn broker_down_rows_wait_then_go() {
    let f = Fixture::new("t").await;
    let proxy = Proxy::start().await;
    let relay = Relay::builder(f.pool.clone(), f.outbox.clone(), proxy.url()).build();
    f.enqueue(OutboxMessage::new("", f.queue.clone(), b"first".to_vec()))
        .await;
    relay.drain().await.unwrap();

    proxy.up.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.enqueue(OutboxMessage::new(
        "",
        f.queue.clone(),
        b"during outage".to_vec(),
    ))
    .await;
    let err = relay.relay_once().await.unwrap_err();
    assert!(matches!(err, OutboxError::Broker(_)), "{err}");
    assert!(
        !err.to_string().contains("guest:guest"),
        "credentials redacted: {err}"
    );
    assert_eq!(
        f.outbox.status(&f.pool).await.unwrap().pending,
        1,
        "the row waits in the outbox"
    );

    proxy.up.store(true, Ordering::SeqCst);
    let mut published = false;
    for _ in 0..50 {
        if relay.relay_once().await.is_ok() && f.outbox.status(&f.pool).await.unwrap().pending == 0
        {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(published, "row published once the broker is back");
    let bodies: Vec<Vec<u8>> = f.take(2).await.into_iter().map(|d| d.data).collect();
    assert_eq!(bodies, vec![b"first".to_vec(), b"during outage".to_vec()]);
    f.cleanup(&[]).await;
}

#[tokio::test]
async fn notify_wakes_the_running_relay_and_cleanup_removes_old_rows() {
    let f = Fixture::new("t").await;
    let relay = Arc::new(
        Relay::builder(f.pool.clone(), f.outbox.clone(), amqp_url())
            .poll_interval(Duration::from_secs(30))
            .build(),
    );
    let r = relay.clone();
    let running = idem_core::WorkerHandle::spawn(|stop| async move { r.run(stop.wait()).await });
    tokio::time::sleep(Duration::from_millis(300)).await; // let it LISTEN
    f.enqueue(OutboxMessage::new("", f.queue.clone(), b"wake".to_vec()))
        .await;
    let mut got = Vec::new();
    for _ in 0..50 {
        got.extend(f.take(0).await);
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        got.len(),
        1,
        "published well before the 30 s poll: NOTIFY woke the relay"
    );
    running.shutdown_and_join().await.unwrap();

    let cleanup = |older_than| f.outbox.cleanup(&f.pool, older_than, 10);
    let deleted = cleanup(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(deleted, 0, "recent rows kept");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let deleted = cleanup(Duration::from_millis(1)).await.unwrap();
    assert_eq!(deleted, 1, "old published rows deleted");
    f.cleanup(&[]).await;
}

#[tokio::test]
async fn bad_messages_are_refused_at_enqueue() {
    let f = Fixture::new("t").await;
    let mut tx = f.pool.begin().await.unwrap();
    let to_q = || OutboxMessage::new("", "q", b"x".to_vec());
    // (message, what the refusal says; "": any refusal as an invalid message)
    let cases = [
        (OutboxMessage::new("", "", b"x".to_vec()), ""),
        (OutboxMessage::new("", "q".repeat(300), b"x".to_vec()), ""),
        // One header rule (idem_amqp::headers): an over-long name is refused, not dropped.
        (to_q().header("h".repeat(256), "v"), "max 255 bytes"),
        (
            to_q().header("raw", idem_core::HeaderValue::Bytes(vec![1])),
            "\"raw\"",
        ),
    ];
    for (msg, says) in cases {
        let err = f.outbox.enqueue(&mut tx, msg).await.unwrap_err();
        assert!(
            matches!(&err, OutboxError::InvalidMessage(m) if m.contains(says)),
            "{err}"
        );
    }
    drop(tx);
    f.cleanup(&[]).await;
}
