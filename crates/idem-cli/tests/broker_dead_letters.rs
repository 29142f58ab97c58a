//! Dead letters made by RabbitMQ itself (TTL expiry, `basic.reject requeue=false` by
//! another client) and reads of a quorum DLQ that must never drop a message. Real
//! RabbitMQ (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`; see the README
//! section "Running the tests"). Unique queue names, deleted at
//! the end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{declare_durable, ids, long, unspent, Fixture};
use idem_cli::dlq;
use idem_core::dedup::REPLAY_HEADER;
use idem_core::outcome::headers as h;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch
}

async fn publish(ch: &Channel, exchange: &str, rk: &str, body: &str, props: BasicProperties) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            rk.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body.as_bytes(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(None)),
        "{confirm:?}"
    );
}

async fn wait_depth(f: &Fixture, queue: &str, n: u32) {
    let what = format!("{queue} holds {n} messages");
    common::wait_for(&what, async || f.depth(queue).await == n).await;
}

/// Another client takes `n` messages from `queue` and rejects them without requeue:
/// the broker dead-letters them.
async fn reject_from(conn: &Connection, queue: &str, n: usize) {
    let ch = conn.create_channel().await.unwrap();
    for _ in 0..n {
        let got = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a message to reject");
        got.delivery
            .reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
    let _ = ch.close(200, "bye".into()).await;
}

/// A connection, a confirm channel on it, a unique queue name
/// `idem-cli-test-{name}-<uuid>` and its DLQ's.
async fn quorum_setup(name: &str) -> (Connection, Channel, String, String) {
    let conn = common::connect().await;
    let q = format!("idem-cli-test-{name}-{}", uuid::Uuid::new_v4().simple());
    let dlq_name = format!("{q}.dlq");
    let ch = confirm_channel(&conn).await;
    (conn, ch, q, dlq_name)
}

/// The arguments of a quorum queue with the delivery limit `limit`.
fn quorum(limit: i64) -> [(&'static str, AMQPValue); 2] {
    [
        ("x-queue-type", long("quorum")),
        ("x-delivery-limit", AMQPValue::LongLongInt(limit)),
    ]
}

/// The arguments of a queue whose dead letters go to `dlq` (default exchange).
fn dead_letters_to(dlq: &str) -> [(&'static str, AMQPValue); 2] {
    [
        ("x-dead-letter-exchange", long("")),
        ("x-dead-letter-routing-key", long(dlq)),
    ]
}

/// Deletes `queues`.
async fn delete_queues(ch: &Channel, queues: &[&str]) {
    for name in queues {
        ch.queue_delete((*name).into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
}

fn props(id: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("x-tenant".into(), long("acme"));
    BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_headers(headers)
}

#[tokio::test]
async fn broker_dead_letters_are_listed_grouped_and_replayed_to_their_queue() {
    let f = Fixture::new("broker-dead").await;
    let q = f.queue.clone();
    let conn = common::connect().await;
    let ch = confirm_channel(&conn).await;

    // A second queue dead-letters into the same DLQ: replay must send its message back
    // there, not to Q.
    let side = format!("{q}-side");
    declare_durable(&ch, &side, &dead_letters_to(&f.dlq())).await;

    // 1. TTL: two messages published through amq.direct with a routing key expire in Q.
    let rk = format!("rk-{}", uuid::Uuid::new_v4().simple());
    ch.queue_bind(
        q.as_str().into(),
        "amq.direct".into(),
        rk.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for id in ["ttl-1", "ttl-2"] {
        let p = props(id).with_expiration("1".into());
        publish(&ch, "amq.direct", &rk, &format!("body of {id}"), p).await;
    }
    wait_depth(&f, &f.dlq(), 2).await;

    // 2. Reject: another client rejects three messages of Q and one of the side queue.
    for id in ["rej-1", "rej-2", "rej-3"] {
        publish(&ch, "", &q, &format!("body of {id}"), props(id)).await;
    }
    reject_from(&conn, &q, 3).await;
    publish(&ch, "", &side, "body of side-1", props("side-1")).await;
    reject_from(&conn, &side, 1).await;
    wait_depth(&f, &f.dlq(), 6).await;

    // list: reason, queue, count, route.
    let entries = dlq::list(&f.conn, &q, 50).await.unwrap();
    assert_eq!(entries.len(), 6);
    let by_id = |id: &str| {
        entries
            .iter()
            .find(|e| e.message_id.as_deref() == Some(id))
            .unwrap_or_else(|| panic!("{id} not listed: {entries:?}"))
    };
    let ttl = by_id("ttl-1");
    assert_eq!(ttl.source, "broker");
    assert_eq!(ttl.kind(), "expired");
    assert_eq!(ttl.count(), Some(1));
    assert_eq!(ttl.source_queue(), Some(q.as_str()));
    let death = ttl.broker_death.as_ref().unwrap();
    assert_eq!(death.exchange.as_deref(), Some("amq.direct"));
    assert_eq!(death.routing_key.as_deref(), Some(rk.as_str()));
    assert!(death.time.is_some() && ttl.first_time().is_some());
    let text = ttl.error_text().unwrap();
    assert!(text.contains("expired") && text.contains(&q), "{text}");
    let rej = by_id("rej-2");
    assert_eq!(
        (rej.kind().as_str(), rej.count(), rej.source_queue()),
        ("rejected", Some(1), Some(q.as_str()))
    );
    assert_eq!(by_id("side-1").source_queue(), Some(side.as_str()));

    // stats: grouped by reason and queue.
    let stats = dlq::stats(&f.conn, &q, None).await.unwrap();
    let groups: Vec<(String, Option<String>, u64)> = stats
        .groups
        .iter()
        .map(|g| (g.error_kind.clone(), g.queue.clone(), g.count))
        .collect();
    assert_eq!(
        groups,
        [
            ("rejected".to_owned(), Some(q.clone()), 3),
            ("expired".to_owned(), Some(q.clone()), 2),
            ("rejected".to_owned(), Some(side.clone()), 1),
        ]
    );

    // The binary shows them too.
    let out = common::idem_at(&common::url(), 250, &["dlq", "list", &q]);
    let table = common::text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    let line = table.lines().find(|l| l.contains("ttl-1")).unwrap();
    assert!(
        line.contains("expired") && line.contains(&format!("{q:?}")),
        "{table}"
    );

    // replay: each to its own queue, the broker's death headers gone, the original route
    // kept in idem's headers.
    let report = dlq::replay(&f.conn, &q, &dlq::Selector::All, false)
        .await
        .unwrap();
    assert_eq!((report.done, report.failed), (6, 0), "{report:?}");
    let back = f.drain(&q, 5).await;
    let mut got = ids(&back);
    got.sort();
    assert_eq!(got, ["rej-1", "rej-2", "rej-3", "ttl-1", "ttl-2"]);
    assert_eq!(ids(&f.drain(&side, 1).await), ["side-1"]);
    for m in &back {
        for gone in dlq::BROKER_DEATH_HEADERS {
            assert!(!m.headers.contains_key(gone), "{gone} kept: {m:?}");
        }
        assert!(m.header_str(REPLAY_HEADER).is_some(), "{m:?}");
        assert_eq!(m.header_str("x-tenant"), Some("acme"));
        let id = m.properties.message_id.clone().unwrap();
        assert_eq!(m.body.as_ref(), format!("body of {id}").as_bytes());
    }
    let ttl = common::by_id(&back, "ttl-1");
    assert_eq!(ttl.header_str(h::ORIGINAL_EXCHANGE), Some("amq.direct"));
    assert_eq!(ttl.header_str(h::ORIGINAL_ROUTING_KEY), Some(rk.as_str()));
    // (The broker removed their 1 ms expiration when they died; the copies have none,
    // or they would not have waited in Q for the drain above.)
    let rej = common::by_id(&back, "rej-1");
    assert_eq!(rej.header_str(h::ORIGINAL_EXCHANGE), Some(""));
    assert_eq!(rej.header_str(h::ORIGINAL_ROUTING_KEY), Some(q.as_str()));
    assert_eq!(f.depth(&f.dlq()).await, 0);

    delete_queues(&ch, &[&side]).await;
    let _ = conn.close(200, "bye".into()).await;
    f.cleanup().await;
}

/// A quorum DLQ with the delivery limit RabbitMQ 4.x gives every quorum queue (20):
/// if a read handed messages back, about 20 reads would drop them (the DLQ has no
/// dead-letter target of its own).
#[tokio::test]
async fn a_hundred_lists_leave_a_quorum_dlq_unchanged() {
    let (conn, ch, q, dlq_name) = quorum_setup("qq-reads").await;
    declare_durable(&ch, &dlq_name, &quorum(20)).await;
    let sent: Vec<(String, BasicProperties)> = (1..=5)
        .map(|i| {
            let id = format!("m{i}");
            let mut p = props(&id);
            if let Some(t) = p.headers().clone() {
                let mut t = t.inner().clone();
                t.insert(h::ERROR.into(), long(&format!("boom {i}")));
                t.insert(h::ATTEMPTS.into(), AMQPValue::LongLongInt(3));
                p = p.with_headers(FieldTable::from(t));
            }
            (id, p)
        })
        .collect();
    for (id, p) in &sent {
        publish(&ch, "", &dlq_name, &format!("body of {id}"), p.clone()).await;
    }

    for run in 1..=100 {
        let got = dlq::list(&conn, &q, 50).await.unwrap();
        let got: Vec<String> = got.into_iter().filter_map(|e| e.message_id).collect();
        assert_eq!(got, ["m1", "m2", "m3", "m4", "m5"], "run {run}");
    }
    let stats = dlq::stats(&conn, &q, None).await.unwrap();
    assert_eq!(stats.scanned, 5);

    // Every message is still there, in order, with the same body, properties and
    // headers, never handed back.
    let ch2 = conn.create_channel().await.unwrap();
    for (id, p) in &sent {
        let m = ch2
            .basic_get(dlq_name.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} is gone"));
        assert_eq!(m.delivery.data, format!("body of {id}").into_bytes());
        // The broker adds x-delivery-count to this delivery: 0, no read ever counted.
        assert_eq!(&unspent(&m.delivery.properties, id), p, "{id}");
    }
    assert!(ch2
        .basic_get(dlq_name.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .is_none());
    delete_queues(&ch2, &[&dlq_name]).await;
    let _ = conn.close(200, "bye".into()).await;
}

/// A quorum work queue's delivery limit: the broker dead-letters a message returned
/// too often (reason `delivery_limit`, the 4.x default path for poison messages).
#[tokio::test]
async fn delivery_limit_dead_letters_show_their_reason_and_replay_to_their_queue() {
    let (conn, ch, q, dlq_name) = quorum_setup("qq-limit").await;
    declare_durable(&ch, &q, &[quorum(1), dead_letters_to(&dlq_name)].concat()).await;
    declare_durable(&ch, &dlq_name, &[]).await;
    publish(&ch, "", &q, "body of poison-1", props("poison-1")).await;
    // Another client takes it and hands it back until the broker gives up on it.
    let taker = conn.create_channel().await.unwrap();
    let start = Instant::now();
    loop {
        if common::depth(&conn, &dlq_name).await == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the delivery limit never dead-lettered the message"
        );
        if let Some(got) = taker
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        {
            got.delivery
                .reject(BasicRejectOptions { requeue: true })
                .await
                .unwrap();
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = taker.close(200, "bye".into()).await;

    let entries = dlq::list(&conn, &q, 10).await.unwrap();
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(
        (e.source.as_str(), e.kind().as_str(), e.source_queue()),
        ("broker", "delivery_limit", Some(q.as_str()))
    );
    let report = dlq::replay(&conn, &dlq_name, &dlq::Selector::All, false)
        .await
        .unwrap();
    assert_eq!((report.done, report.failed), (1, 0), "{report:?}");
    let back = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the replayed message in its queue");
    assert_eq!(back.delivery.data, b"body of poison-1");
    let headers = back.delivery.properties.headers().clone().unwrap();
    assert!(!headers.inner().contains_key("x-death"), "{headers:?}");
    delete_queues(&ch, &[&q, &dlq_name]).await;
    let _ = conn.close(200, "bye".into()).await;
}
