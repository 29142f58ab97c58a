//! DLQ operations against the real RabbitMQ (`AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; see the README section "Running the tests").
//! Each test declares its own queues (uuid suffix) and deletes them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{dead, header, ids, Dead, Fixture, BASE};
use idem_cli::dlq::{self, Selector};
use idem_core::__private::rfc3339;
use idem_core::dedup::REPLAY_HEADER;
use idem_core::outcome::headers as h;
use idem_core::ErrorKind::{Permanent, Transient};
use idem_core::Message;

fn five() -> Vec<Dead<'static>> {
    (1..=5)
        .map(|i| dead(&format!("m{i}"), &format!("boom {i}"), Transient))
        .collect()
}

#[tokio::test]
async fn list_reads_every_field_and_leaves_the_dlq_unchanged() {
    let f = Fixture::new("list").await;
    f.bury_all(&five()).await;

    let all = dlq::list(&f.conn, &f.queue, 50).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|e| e.message_id.clone().unwrap())
            .collect::<Vec<_>>(),
        ["m1", "m2", "m3", "m4", "m5"]
    );
    let e = &all[0];
    assert_eq!(e.position, 1);
    assert_eq!(e.key.as_deref(), Some("key-m1"));
    assert_eq!(e.error_kind.as_deref(), Some("transient"));
    assert_eq!(e.attempts, Some(3));
    assert_eq!(e.error.as_deref(), Some("boom 1"));
    assert_eq!(e.original_queue.as_deref(), Some(f.queue.as_str()));
    assert_eq!(e.consumer.as_deref(), Some("test-consumer"));
    assert_eq!(e.error_type.as_deref(), Some("billing::LedgerLocked"));
    assert_eq!(e.host.as_deref(), Some(idem_core::outcome::host()));
    assert_eq!(e.pid, Some(i64::from(std::process::id())));
    assert_eq!(e.immediate_retries, Some(2));
    assert_eq!(e.backtrace, None);
    let t0 = std::time::UNIX_EPOCH + std::time::Duration::from_secs(BASE);
    assert_eq!(e.first_failed_at.as_deref(), Some(rfc3339(t0).as_str()));

    // A limit reads only the head; the queue still holds everything, in order.
    let head = dlq::list(&f.conn, &f.queue, 2).await.unwrap();
    assert_eq!(head.len(), 2);
    let left = f.drain(&f.dlq(), 5).await;
    assert_eq!(ids(&left), ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(left[2].body.as_ref(), b"body of m3");
    f.cleanup().await;
}

#[tokio::test]
async fn missing_dlq_is_not_found() {
    let conn = common::connect().await;
    let q = format!("idem-cli-test-absent-{}", uuid::Uuid::new_v4().simple());
    let err = dlq::list(&conn, &q, 10).await.unwrap_err();
    assert_eq!(err.exit_code(), 1, "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test]
async fn stats_fold_variable_parts_into_groups() {
    let f = Fixture::new("stats").await;
    let mut list = vec![
        dead("t1", "timeout after 1234 ms", Transient),
        dead(
            "d1",
            "decode error: expected value at line 1 column 7",
            Permanent,
        ),
        dead("t2", "timeout after 99 ms", Transient),
        dead(
            "d2",
            "decode error: expected value at line 3 column 2",
            Permanent,
        ),
        dead("t3", "timeout after 5 ms", Transient),
    ];
    for (i, d) in list.iter_mut().enumerate() {
        d.at = i as u64 * 100;
    }
    f.bury_all(&list).await;

    let stats = dlq::stats(&f.conn, &f.queue, None).await.unwrap();
    assert_eq!(stats.scanned, 5);
    assert_eq!(stats.groups.len(), 2, "{stats:?}");
    let (timeouts, decodes) = (&stats.groups[0], &stats.groups[1]);
    assert_eq!(timeouts.count, 3);
    assert_eq!(timeouts.error_kind, "transient");
    assert_eq!(timeouts.error, "timeout after <n> ms");
    assert_eq!(timeouts.message_ids, ["t1", "t2", "t3"]);
    let at = |s: u64| rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(BASE + s));
    assert_eq!(timeouts.first_seen, Some(at(0)));
    assert_eq!(timeouts.last_seen, Some(at(410)));
    assert_eq!(decodes.count, 2);
    assert_eq!(decodes.error_kind, "permanent");
    assert_eq!(
        decodes.error,
        "decode error: expected value at line <n> column <n>"
    );
    assert_eq!(decodes.first_seen, Some(at(100)));
    assert_eq!(decodes.last_seen, Some(at(310)));

    let left = f.drain(&f.dlq(), 5).await;
    assert_eq!(ids(&left), ["t1", "d1", "t2", "d2", "t3"]);
    f.cleanup().await;
}

fn assert_replayed(m: &Message, id: &str) {
    assert_eq!(m.properties.message_id.as_deref(), Some(id));
    assert_eq!(m.body.as_ref(), format!("body of {id}").as_bytes());
    for gone in [
        h::ATTEMPTS,
        h::ERROR,
        h::ERROR_KIND,
        h::FIRST_FAILED_AT,
        h::LAST_FAILED_AT,
    ] {
        assert!(header(m, gone).is_none(), "{gone} still on {m:?}");
    }
    let replay = m.header_str(REPLAY_HEADER).unwrap_or_default();
    assert!(replay.starts_with("replay-"), "{m:?}");
    assert_eq!(
        m.header_str("x-tenant"),
        Some("acme"),
        "application headers are kept"
    );
    assert_eq!(m.failed_attempts(), 0);
}

#[tokio::test]
async fn replay_by_id_moves_exactly_the_chosen_messages() {
    let f = Fixture::new("replay-id").await;
    f.bury_all(&five()).await;

    let report = dlq::replay(&f.conn, &f.queue, &Selector::ids(["m2", "m4"]), false)
        .await
        .unwrap();
    assert_eq!(
        (report.scanned, report.matched, report.done, report.failed),
        (5, 2, 2, 0)
    );

    let moved = f.drain(&f.queue, 2).await;
    assert_eq!(ids(&moved), ["m2", "m4"]);
    for (m, id) in moved.iter().zip(["m2", "m4"]) {
        assert_replayed(m, id);
        assert_eq!(m.header_str(REPLAY_HEADER), report.replay_id.as_deref());
    }
    let left = f.drain(&f.dlq(), 3).await;
    assert_eq!(ids(&left), ["m1", "m3", "m5"]);
    assert_eq!(
        left[0].failed_attempts(),
        3,
        "untouched messages keep their history"
    );
    f.cleanup().await;
}

#[tokio::test]
async fn replay_by_pattern_and_target_from_original_queue_header() {
    let f = Fixture::new("replay-re").await;
    f.bury_all(&[
        dead("t1", "timeout after 10 ms", Transient),
        dead("d1", "decode error at line 1", Permanent),
        dead("t2", "upstream timeout after 20 ms", Transient),
        dead("d2", "decode error at line 2", Permanent),
    ])
    .await;
    // A message without x-idem-original-queue goes back to Q.
    let bare = Message::new("body of b1")
        .with_message_id("b1")
        .with_header(h::ERROR, "timeout (no origin)");
    f.publish_raw("", &f.dlq(), bare).await;

    let sel = Selector::error_matches("timeout").unwrap();
    let report = dlq::replay(&f.conn, &f.queue, &sel, false).await.unwrap();
    assert_eq!((report.matched, report.done, report.failed), (3, 3, 0));
    let moved = f.drain(&f.queue, 3).await;
    assert_eq!(ids(&moved), ["t1", "t2", "b1"]);
    assert_replayed(&moved[0], "t1");
    let left = f.drain(&f.dlq(), 2).await;
    assert_eq!(ids(&left), ["d1", "d2"]);
    f.cleanup().await;
}

#[tokio::test]
async fn replay_to_a_missing_queue_leaves_the_message_in_the_dlq() {
    let f = Fixture::new("replay-lost").await;
    f.bury(&dead("ok1", "x", Transient)).await;
    f.bury_unroutable("orphan").await;
    f.bury(&dead("ok2", "x", Transient)).await;

    let report = dlq::replay(&f.conn, &f.queue, &Selector::All, false)
        .await
        .unwrap();
    assert_eq!((report.matched, report.done, report.failed), (3, 2, 1));
    assert!(
        report.messages[1].outcome.starts_with("failed: returned"),
        "{report:?}"
    );
    assert_eq!(ids(&f.drain(&f.queue, 2).await), ["ok1", "ok2"]);
    // Neither lost nor half-moved: the unroutable one is still in the DLQ, unchanged.
    let left = f.drain(&f.dlq(), 1).await;
    assert_eq!(ids(&left), ["orphan"]);
    assert!(left[0].header_str(REPLAY_HEADER).is_none());
    f.cleanup().await;
}

#[tokio::test]
async fn dry_runs_change_nothing() {
    let f = Fixture::new("dry").await;
    f.bury_all(&five()).await;

    let report = dlq::replay(&f.conn, &f.queue, &Selector::All, true)
        .await
        .unwrap();
    assert!(report.dry_run);
    assert_eq!((report.matched, report.done), (5, 0));
    assert!(report
        .messages
        .iter()
        .all(|m| m.outcome == "would move" && m.target.as_deref() == Some(f.queue.as_str())));
    let sel = Selector::error_matches("boom [24]").unwrap();
    let report = dlq::purge(&f.conn, &f.queue, &sel, true).await.unwrap();
    assert_eq!((report.matched, report.done), (2, 0));

    assert_eq!(f.depth(&f.queue).await, 0);
    assert_eq!(
        ids(&f.drain(&f.dlq(), 5).await),
        ["m1", "m2", "m3", "m4", "m5"]
    );
    f.cleanup().await;
}

#[tokio::test]
async fn purge_removes_exactly_the_matching_messages() {
    let f = Fixture::new("purge").await;
    f.bury_all(&five()).await;
    let sel = Selector::error_matches("^boom [13]$").unwrap();
    let report = dlq::purge(&f.conn, &f.queue, &sel, false).await.unwrap();
    assert_eq!((report.scanned, report.matched, report.done), (5, 2, 2));
    assert_eq!(ids(&f.drain(&f.dlq(), 3).await), ["m2", "m4", "m5"]);

    f.bury_all(&five()).await;
    let report = dlq::purge(&f.conn, &f.queue, &Selector::All, false)
        .await
        .unwrap();
    assert_eq!(report.done, 5);
    assert_eq!(f.depth(&f.dlq()).await, 0);
    f.cleanup().await;
}

#[tokio::test]
async fn list_is_non_destructive_on_quorum_queues_too() {
    let conn = common::connect().await;
    let q = format!("idem-cli-test-quorum-{}", uuid::Uuid::new_v4().simple());
    let topology = idem_amqp::Topology::new(q.as_str())
        .queue_type(idem_amqp::QueueType::Quorum)
        .tiers(idem_cli::topology::parse_tiers("1s").unwrap());
    idem_cli::topology::declare(&conn, &topology).await.unwrap();
    let publisher = idem_amqp::Publisher::connect(&common::url()).await.unwrap();
    for i in 1..=3 {
        let mut m = Message::new("x").with_message_id(format!("q{i}"));
        publisher
            .publish("", &topology.dlq(), &mut m)
            .await
            .unwrap();
    }
    for _ in 0..5 {
        let got = dlq::list(&conn, &q, 10).await.unwrap();
        let got: Vec<_> = got.into_iter().filter_map(|e| e.message_id).collect();
        // Nothing is handed back asynchronously: each read sees every message, in order.
        assert_eq!(got, ["q1", "q2", "q3"]);
    }
    let ch = conn.create_channel().await.unwrap();
    // Drain through a fixture-like loop: all three are still there, in order.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen = Vec::new();
    while seen.len() < 3 && tokio::time::Instant::now() < deadline {
        match ch
            .basic_get(
                topology.dlq().as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            Some(m) => seen.push(
                m.delivery
                    .properties
                    .message_id()
                    .clone()
                    .unwrap()
                    .to_string(),
            ),
            None => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    assert_eq!(seen, ["q1", "q2", "q3"]);
    topology.delete_on(&ch).await.unwrap();
    publisher.close().await;
}
