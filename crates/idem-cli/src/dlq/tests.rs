use super::*;
use lapin::types::{FieldArray, LongString};

pub(super) fn death_entry(reason: &str, queue: &str, count: AMQPValue) -> AMQPValue {
    let mut t = FieldTable::default();
    t.insert("reason".into(), long(reason));
    t.insert("queue".into(), long(queue));
    t.insert("count".into(), count);
    t.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
    t.insert("exchange".into(), long("amq.direct"));
    t.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![long("rk.1"), long("rk.2")])),
    );
    AMQPValue::FieldTable(t)
}

pub(super) fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

pub(super) fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(k.into(), v);
    }
    t
}

#[test]
fn the_most_recent_death_is_read_and_bad_values_are_left_out() {
    let headers = table(vec![
        (
            "x-death",
            AMQPValue::FieldArray(FieldArray::from(vec![
                death_entry("delivery_limit", "orders", AMQPValue::LongLongInt(2)),
                death_entry("expired", "orders.retry.1s", AMQPValue::LongLongInt(5)),
            ])),
        ),
        ("x-first-death-reason", long("expired")),
        ("x-first-death-queue", long("orders.retry.1s")),
    ]);
    let d = BrokerDeath::from_headers(&headers).unwrap();
    assert_eq!(d.reason.as_deref(), Some("delivery_limit"));
    assert_eq!(d.queue.as_deref(), Some("orders"));
    assert_eq!(d.count, Some(2));
    assert_eq!(d.time.as_deref(), Some("2023-11-14T22:13:20.000Z"));
    assert_eq!(d.exchange.as_deref(), Some("amq.direct"));
    assert_eq!(d.routing_key.as_deref(), Some("rk.1"));

    // Only x-first-death-* (e.g. x-death stripped by some tool), or a malformed
    // x-death: what can be read is, the rest is None.
    let headers = table(vec![
        ("x-death", long("not an array")),
        ("x-first-death-reason", long("rejected")),
        ("x-first-death-queue", long("orders")),
    ]);
    let d = BrokerDeath::from_headers(&headers).unwrap();
    assert_eq!(
        (d.reason.as_deref(), d.queue.as_deref(), d.count),
        (Some("rejected"), Some("orders"), None)
    );
    let headers = table(vec![(
        "x-death",
        AMQPValue::FieldArray(FieldArray::from(vec![death_entry(
            "rejected",
            "orders",
            long("three"),
        )])),
    )]);
    assert_eq!(BrokerDeath::from_headers(&headers).unwrap().count, None);
    assert_eq!(BrokerDeath::from_headers(&FieldTable::default()), None);
}

#[test]
fn idem_headers_win_over_the_broker_death_of_a_retry_hop() {
    // A message idem retried through a delay queue (x-death: expired there) and then
    // dead-lettered itself: shown with idem's failure, replayed to its original queue.
    let headers = table(vec![(
        "x-death",
        AMQPValue::FieldArray(FieldArray::from(vec![death_entry(
            "expired",
            "orders.retry.1s",
            AMQPValue::LongLongInt(2),
        )])),
    )]);
    let msg = Message::new("x")
        .with_header(h::ERROR, "card declined")
        .with_header(h::ERROR_KIND, "permanent")
        .with_header(h::ORIGINAL_QUEUE, "orders");
    let e = DlqEntry::from_delivery(&msg, Some(&headers), 1);
    assert_eq!(e.source, "idem");
    assert_eq!(e.kind(), "permanent");
    assert_eq!(e.source_queue(), Some("orders"));
    assert_eq!(e.error_text().as_deref(), Some("card declined"));

    let bare = Message::new("x");
    let e = DlqEntry::from_delivery(&bare, Some(&headers), 1);
    assert_eq!(e.source, "broker");
    assert_eq!(
        (e.kind().as_str(), e.count(), e.source_queue()),
        ("expired", Some(2), Some("orders.retry.1s"))
    );
    let e = DlqEntry::from_delivery(&bare, None, 1);
    assert_eq!(
        (e.source.as_str(), e.kind().as_str()),
        ("unknown", "unknown")
    );
}
