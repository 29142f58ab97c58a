//! The dead-letter workbench against the real RabbitMQ (issue 23): reads that leave a
//! quorum DLQ unchanged, replay of one group at a rate, edit then replay through a
//! dedup consumer, export then import. `AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; unique queue names, deleted at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{declare_durable, idem, long, text, unspent};
use idem_amqp::{Publisher, RawOutgoing, Topology, Worker};
use idem_cli::dlq::{self, Filter, Selector};
use idem_core::outcome::headers as h;
use idem_core::{Consumer, HandlerError, Json, MemoryStore};
use lapin::options::QueueDeleteOptions;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Connection};

const GROUPS: [(&str, &str); 3] = [
    ("transient", "gateway timeout after {} ms"),
    (
        "permanent",
        "ValidationError: cents must be positive, got {}",
    ),
    ("transient", "ledger row {} locked"),
];

/// A dead letter as a worker writes it: message `i` of group `i % 3`.
fn dead_letter(q: &str, i: usize) -> (BasicProperties, Vec<u8>) {
    let (kind, error) = GROUPS[i % 3];
    let mut t = FieldTable::default();
    t.insert(
        h::ERROR.into(),
        long(&error.replace("{}", &(i * 7).to_string())),
    );
    t.insert(h::ERROR_KIND.into(), long(kind));
    t.insert(h::ATTEMPTS.into(), AMQPValue::LongInt(3));
    t.insert(h::ORIGINAL_QUEUE.into(), long(q));
    t.insert(h::CONSUMER.into(), long("billing"));
    t.insert(h::LAST_FAILED_AT.into(), long("2026-12-06T08:00:00.000Z"));
    t.insert(
        "x-tags".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(i as i32)])),
    );
    let props = BasicProperties::default()
        .with_message_id(format!("m{i:04}").into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(t);
    (props, format!(r#"{{"n":{i},"cents":-{i}}}"#).into_bytes())
}

struct Queues {
    conn: Connection,
    q: String,
    dlq: String,
    publisher: Publisher,
}

impl Queues {
    /// Q and Q.dlq, quorum queues; the DLQ with the delivery limit of 20 RabbitMQ 4.x
    /// gives every quorum queue.
    async fn new(name: &str) -> Queues {
        Queues::of_type(name, "quorum").await
    }

    /// Q and Q.dlq of `x-queue-type` `kind` (`quorum`: the DLQ with a delivery
    /// limit of 20).
    async fn of_type(name: &str, kind: &str) -> Queues {
        let conn = common::connect().await;
        let q = format!("idem-cli-test-{name}-{}", uuid::Uuid::new_v4().simple());
        let dlq = format!("{q}.dlq");
        let ch = conn.create_channel().await.unwrap();
        let limit = (kind == "quorum").then_some(20);
        for (queue, limit) in [(&q, None), (&dlq, limit)] {
            let mut args = vec![("x-queue-type", long(kind))];
            if let Some(l) = limit {
                args.push(("x-delivery-limit", AMQPValue::LongLongInt(l)));
            }
            declare_durable(&ch, queue, &args).await;
        }
        let publisher = Publisher::connect(&common::url()).await.unwrap();
        Queues {
            conn,
            q,
            dlq,
            publisher,
        }
    }

    async fn publish_all(&self, queue: &str, messages: &[(BasicProperties, Vec<u8>)]) {
        for chunk in messages.chunks(200) {
            let batch: Vec<RawOutgoing<'_>> = chunk
                .iter()
                .map(|(p, b)| RawOutgoing {
                    exchange: "",
                    routing_key: queue,
                    body: b,
                    properties: p.clone(),
                })
                .collect();
            for r in self.publisher.publish_raw_each(&batch).await.unwrap() {
                r.unwrap();
            }
        }
    }

    async fn depth(&self, queue: &str) -> u32 {
        common::depth(&self.conn, queue).await
    }

    /// Removes every message of `queue`, in order: properties (without the broker's
    /// per-delivery headers, after checking no delivery was ever counted) and body.
    async fn take_all(&self, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
        let ch = self.conn.create_channel().await.unwrap();
        let taken = common::get_all(&ch, queue, true).await;
        let _ = ch.close(200, "bye".into()).await;
        taken
            .into_iter()
            .map(|m| (unspent(&m.delivery.properties, queue), m.delivery.data))
            .collect()
    }

    async fn cleanup(self) {
        let ch = self.conn.create_channel().await.unwrap();
        for q in [&self.q, &self.dlq] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        self.publisher.close().await;
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// A GET of the console API at `addr` (HTTP/1.0, so the body is not chunked):
/// the status and the JSON body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let out = text(&out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// 1 000 dead letters in 3 groups in a quorum DLQ with delivery limit 20: 100 reads
/// (show, stats, list, export and GETs of the console API, in turn) leave the count,
/// the order, the properties and the headers exactly as they were, and no read
/// spends a delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reads_of_a_thousand_dead_letters_change_nothing() {
    reads_change_nothing("quorum", 100).await;
}

/// The same reads of a classic DLQ (25 of them: the read path is the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_classic_dlq_change_nothing_either() {
    reads_change_nothing("classic", 25).await;
}

/// `reads` reads of 1 000 dead letters in a DLQ of type `kind`, in turn show, stats,
/// list, export and a GET of the console API (groups, messages of a group, queues).
async fn reads_change_nothing(kind: &str, reads: usize) {
    let qs = Queues::of_type("reads", kind).await;
    let sent: Vec<_> = (0..1000).map(|i| dead_letter(&qs.q, i)).collect();
    qs.publish_all(&qs.dlq, &sent).await;

    let group0 = dlq::stats(&qs.conn, &qs.q, None).await.unwrap();
    assert_eq!(group0.scanned, 1000);
    assert_eq!(
        group0.groups.iter().map(|g| g.count).collect::<Vec<_>>(),
        [334, 333, 333]
    );
    let g = group0.groups[0].id.clone();

    // The console, read-only, on a connection of its own.
    let config = idem_cli::serve::ConsoleConfig {
        queues: vec![qs.q.clone()],
        write_token: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = idem_cli::serve::router(common::connect().await, config);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let get = |path: String| tokio::task::spawn_blocking(move || http_get(addr, &path));

    for run in 0..reads {
        match run % 5 {
            0 => {
                let f = Filter {
                    group: Some(g.clone()),
                    ..Filter::default()
                };
                let shown = dlq::show(&qs.conn, &qs.q, &Selector::Filter(Box::new(f)), 64, 5)
                    .await
                    .unwrap();
                assert_eq!(shown.len(), 5, "run {run}");
                assert_eq!(shown[0].entry.message_id.as_deref(), Some("m0000"));
            }
            1 => {
                let s = dlq::stats(&qs.conn, &qs.q, None).await.unwrap();
                assert_eq!(s.scanned, 1000, "run {run}");
                assert_eq!(s.groups[0].id, g, "group ids are stable");
            }
            2 => {
                let l = dlq::list(&qs.conn, &qs.q, 2000).await.unwrap();
                assert_eq!(l.len(), 1000, "run {run}");
                assert_eq!(l[999].message_id.as_deref(), Some("m0999"));
            }
            3 => {
                let mut out = Vec::new();
                let n = dlq::export(&qs.conn, &qs.q, &Selector::All, &mut out)
                    .await
                    .unwrap();
                assert_eq!(n, 1000, "run {run}");
            }
            _ => match (run / 5) % 3 {
                0 => {
                    let (status, body) = get(format!("/api/queues/{}/groups", qs.q)).await.unwrap();
                    assert_eq!(status, 200, "run {run}: {body}");
                    assert_eq!(body["scanned"], 1000, "run {run}");
                    assert_eq!(body["groups"][0]["id"], g.as_str(), "run {run}");
                }
                1 => {
                    let path = format!("/api/queues/{}/messages?group={g}&limit=7", qs.q);
                    let (status, body) = get(path).await.unwrap();
                    assert_eq!(status, 200, "run {run}: {body}");
                    let ids: Vec<_> = body
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|m| m["entry"]["message_id"].as_str().unwrap().to_owned())
                        .collect();
                    assert_eq!(
                        ids,
                        ["m0000", "m0003", "m0006", "m0009", "m0012", "m0015", "m0018"]
                    );
                }
                _ => {
                    let (status, body) = get("/api/queues".to_owned()).await.unwrap();
                    assert_eq!(status, 200, "run {run}: {body}");
                    assert_eq!(body["queues"][0]["depth"], 1000, "run {run}");
                }
            },
        }
    }
    server.abort();
    let left = qs.take_all(&qs.dlq).await;
    assert_eq!(left.len(), 1000);
    for (i, ((p, b), (sp, sb))) in left.iter().zip(&sent).enumerate() {
        assert_eq!((p, b), (sp, sb), "message {i} changed");
    }
    qs.cleanup().await;
}

/// A classic DLQ with single active consumer, whose active consumer is someone
/// else's: a read's consumer never gets a message, so the read gives it up and takes
/// the snapshot with `basic.get`; it lists every ready message in order and leaves
/// them unchanged, with no delivery spent.
#[tokio::test]
async fn a_read_that_gets_no_delivery_falls_back_to_basic_get() {
    read_behind_another_active_consumer("classic").await;
}

/// The same on a quorum DLQ, where RabbitMQ refuses `basic.get` with single active
/// consumer: the read stops with that error instead of waiting for ever, and the DLQ
/// is unchanged, with no delivery spent.
#[tokio::test]
async fn a_read_behind_a_quorum_single_active_consumer_stops_and_changes_nothing() {
    read_behind_another_active_consumer("quorum").await;
}

async fn read_behind_another_active_consumer(kind: &str) {
    use futures_util::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
    };
    let conn = common::connect().await;
    let q = format!("idem-cli-test-sac-{}", uuid::Uuid::new_v4().simple());
    let dlq_name = format!("{q}.dlq");
    let ch = conn.create_channel().await.unwrap();
    let args = [
        ("x-queue-type", long(kind)),
        ("x-single-active-consumer", AMQPValue::Boolean(true)),
    ];
    declare_durable(&ch, &dlq_name, &args).await;
    let publisher = Publisher::connect(&common::url()).await.unwrap();
    let qs = Queues {
        conn,
        q: q.clone(),
        dlq: dlq_name.clone(),
        publisher,
    };
    let sent: Vec<_> = (0..20).map(|i| dead_letter(&q, i)).collect();
    qs.publish_all(&dlq_name, &sent).await;

    // The single active consumer: holds message 0, gets nothing more.
    let other = qs.conn.create_channel().await.unwrap();
    other
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut active = other
        .basic_consume(
            dlq_name.as_str().into(),
            "active".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let held = active.next().await.unwrap().unwrap();
    assert_eq!(
        held.properties.message_id().as_ref().unwrap().as_str(),
        "m0000"
    );

    let listed = dlq::list(&qs.conn, &dlq_name, 100).await;
    if kind == "quorum" {
        let err = listed.unwrap_err().to_string();
        assert!(err.contains("single active consumer"), "{err}");
    } else {
        let ids: Vec<_> = listed
            .unwrap()
            .iter()
            .map(|e| e.message_id.clone().unwrap())
            .collect();
        let want: Vec<_> = (1..20).map(|i| format!("m{i:04}")).collect();
        assert_eq!(ids, want);
    }

    other
        .basic_cancel("active".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    other
        .basic_ack(held.delivery_tag, BasicAckOptions::default())
        .await
        .unwrap();
    let _ = other.close(200, "bye".into()).await;
    // basic.get is refused on a quorum queue with single active consumer: a consumer.
    let ch = qs.conn.create_channel().await.unwrap();
    let mut taker = ch
        .basic_consume(
            dlq_name.as_str().into(),
            "taker".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut left = Vec::new();
    while left.len() < 19 {
        let d = tokio::time::timeout(Duration::from_secs(10), taker.next())
            .await
            .expect("the DLQ holds 19 messages")
            .unwrap()
            .unwrap();
        left.push((unspent(&d.properties, &dlq_name), d.data));
    }
    assert_eq!(qs.depth(&dlq_name).await, 0, "nothing more");
    let _ = ch.close(200, "bye".into()).await;
    for (i, ((p, b), (sp, sb))) in left.iter().zip(&sent[1..]).enumerate() {
        assert_eq!((p, b), (sp, sb), "message {} changed", i + 1);
    }
    qs.cleanup().await;
}

/// `replay --group G --rate 200/s` moves exactly G's messages to Q, takes at least
/// |G|/200 s, and leaves the other groups in the DLQ in their order.
#[tokio::test]
async fn replay_of_one_group_at_a_rate_moves_exactly_that_group() {
    let qs = Queues::new("rate").await;
    let sent: Vec<_> = (0..300).map(|i| dead_letter(&qs.q, i)).collect();
    qs.publish_all(&qs.dlq, &sent).await;
    let stats = dlq::stats(&qs.conn, &qs.q, None).await.unwrap();
    let g = stats
        .groups
        .iter()
        .find(|g| g.error.starts_with("ValidationError"))
        .unwrap();
    assert_eq!(g.count, 100);

    let start = Instant::now();
    let out = idem(&[
        "dlq", "replay", &qs.q, "--group", &g.id, "--rate", "200/s", "--json",
    ]);
    let took = start.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["matched"].as_u64(), report["done"].as_u64()),
        (Some(100), Some(100))
    );
    assert!(
        took >= Duration::from_millis(500),
        "100 messages at 200/s took {took:?}"
    );

    // The ids of the 300 messages whose number passes `keep`.
    let numbered = |keep: fn(&usize) -> bool| -> Vec<String> {
        (0..300).filter(keep).map(|i| format!("m{i:04}")).collect()
    };
    let ids_of = |taken: Vec<(BasicProperties, Vec<u8>)>| -> Vec<String> {
        taken
            .iter()
            .map(|(p, _)| p.message_id().clone().unwrap().to_string())
            .collect()
    };
    let moved = ids_of(qs.take_all(&qs.q).await);
    assert_eq!(moved, numbered(|i| i % 3 == 1));
    let left = ids_of(qs.take_all(&qs.dlq).await);
    assert_eq!(
        left,
        numbered(|i| i % 3 != 1),
        "the other groups stay, in order"
    );
    qs.cleanup().await;
}

/// Export then import into an empty DLQ: the same properties, headers (with their
/// AMQP types) and bodies, byte for byte, in order; the source DLQ is unchanged.
#[tokio::test]
async fn export_then_import_is_lossless() {
    let from = Queues::new("export").await;
    let to = Queues::new("import").await;
    let mut sent: Vec<_> = (0..30).map(|i| dead_letter(&from.q, i)).collect();
    // A binary body and headers of unusual types.
    let mut t = FieldTable::default();
    t.insert(
        "x-bin".into(),
        AMQPValue::LongString(LongString::from(vec![0xff, 0, 7])),
    );
    t.insert("x-f".into(), AMQPValue::Double(0.25));
    t.insert("x-ts".into(), AMQPValue::Timestamp(1_700_000_000));
    t.insert("x-b".into(), AMQPValue::Boolean(false));
    let mut inner = FieldTable::default();
    inner.insert("k".into(), AMQPValue::ShortInt(-3));
    t.insert("x-t".into(), AMQPValue::FieldTable(inner));
    sent.push((
        BasicProperties::default()
            .with_message_id("bin".into())
            .with_priority(3)
            .with_timestamp(1_700_000_001)
            .with_headers(t),
        vec![0, 159, 146, 150, 255],
    ));
    from.publish_all(&from.dlq, &sent).await;

    let file = std::env::temp_dir().join(format!("idem-export-{}.jsonl", uuid::Uuid::new_v4()));
    let out = idem(&["dlq", "export", &from.q]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 31);
    std::fs::write(&file, &out.stdout).unwrap();
    let out = idem(&["dlq", "import", &to.q, file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("imported 31 of 31"),
        "{}",
        text(&out.stdout)
    );

    let imported = to.take_all(&to.dlq).await;
    assert_eq!(imported.len(), sent.len());
    for (i, (got, want)) in imported.iter().zip(&sent).enumerate() {
        assert_eq!(got, want, "message {i}");
    }
    assert_eq!(
        from.take_all(&from.dlq).await,
        sent,
        "export changes nothing"
    );

    // A bad file imports nothing.
    std::fs::write(&file, "{\"body\":\"aGk=\"}\nnot json\n").unwrap();
    let out = idem(&["dlq", "import", &to.q, file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("line 2"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(to.depth(&to.dlq).await, 0);
    let _ = std::fs::remove_file(&file);
    from.cleanup().await;
    to.cleanup().await;
}

/// A message dead-lettered as poison (negative amount), shown, edited to
/// `/cents=500`, then replayed: the handler runs once more, on 500, and the dedup
/// layer neither reports a payload mismatch nor acks it as a duplicate.
#[tokio::test]
async fn edit_then_replay_runs_the_handler_once_on_the_edited_body() {
    #[derive(serde::Deserialize)]
    struct Charge {
        cents: i64,
    }
    let conn = common::connect().await;
    let q = format!("idem-cli-test-edit-{}", uuid::Uuid::new_v4().simple());
    let topology = Topology::new(q.as_str()).tiers(idem_cli::topology::parse_tiers("1s").unwrap());
    idem_cli::topology::declare(&conn, &topology).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::<i64>::new()));
    let s = seen.clone();
    let consumer = Consumer::builder("edit-test")
        .store(MemoryStore::new())
        .handler(move |Json(c): Json<Charge>| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(c.cents);
                if c.cents < 0 {
                    return Err(HandlerError::permanent(
                        "ValidationError: cents must be positive",
                    ));
                }
                Ok(())
            }
        })
        .unwrap();
    let worker = Worker::builder(common::url(), topology.clone(), consumer.clone())
        .build()
        .unwrap()
        .spawn();
    let publisher = Publisher::connect(&common::url()).await.unwrap();
    let mut m =
        idem_core::Message::new(r#"{"cents":-500,"to":"acme"}"#).with_message_id("charge-1");
    publisher.publish("", &q, &mut m).await.unwrap();
    let dlq_name = topology.dlq();
    let deadline = Instant::now() + Duration::from_secs(30);
    while idem_cli::broker::probe(&conn, &dlq_name)
        .await
        .unwrap()
        .unwrap()
        .messages
        < 1
    {
        assert!(Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let out = idem(&["dlq", "show", &q, "--id", "charge-1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("\"cents\": -500") && shown.contains("x-idem-error: ValidationError"),
        "{shown}"
    );

    let out = idem(&[
        "dlq",
        "edit",
        &q,
        "--id",
        "charge-1",
        "--json-set",
        "/cents=500",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = dlq::show(&conn, &q, &Selector::All, 4096, 10)
        .await
        .unwrap();
    assert_eq!(shown.len(), 1);
    let h = &shown[0].headers;
    assert!(h.contains_key(idem_core::dedup::EDITED_HEADER), "{h:?}");
    assert_eq!(
        h.get(idem_core::dedup::ORIGINAL_FINGERPRINT_HEADER)
            .map(String::as_str),
        Some(dlq::sha256_hex(br#"{"cents":-500,"to":"acme"}"#).as_str())
    );
    assert!(shown[0].body.text.contains("\"cents\": 500"));

    let out = idem(&["dlq", "replay", &q, "--id", "charge-1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumer.stats().processed < 1 {
        assert!(
            Instant::now() < deadline,
            "the edited copy never ran: {:?}",
            consumer.stats()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let stats = worker.shutdown_and_join().await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [-500, 500]);
    assert_eq!(
        (stats.processed, stats.duplicates, stats.dead_lettered),
        (1, 0, 1),
        "{stats:?}"
    );
    assert_eq!(
        idem_cli::broker::probe(&conn, &dlq_name)
            .await
            .unwrap()
            .unwrap()
            .messages,
        0
    );
    let ch = conn.create_channel().await.unwrap();
    topology.delete_on(&ch).await.unwrap();
    publisher.close().await;
}
