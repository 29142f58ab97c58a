//! `idem dlq redrive --rules F` against the real RabbitMQ: a dry run prints the plan
//! and changes nothing; the real run replays exactly the matching group, parks the
//! other, and a message replayed its maximum number of times stays for a person.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{assert_says, dead, declare_durable, exit_text, idem, ids, Fixture};
use idem_cli::dlq::redrive::{REDRIVE_COUNT_HEADER, REDRIVE_RULE_HEADER};
use idem_core::ErrorKind::{Permanent, Transient};
use idem_core::HeaderValue;

#[tokio::test]
async fn rules_replay_one_group_park_another_and_hold_after_max_replays() {
    let f = Fixture::new("redrive").await;
    let parked = format!("{}.parked", f.queue);
    let ch = f.conn.create_channel().await.unwrap();
    declare_durable(&ch, &parked, &[]).await;
    // Dead-lettered at BASE (2023): "older than 10m" holds for all of them.
    f.bury_all(&[
        dead("t1", "gateway timeout after 30 s", Transient),
        dead("v1", "ValidationError: cents must be positive", Permanent),
        dead("o1", "something else", Transient),
        dead("t2", "gateway timeout after 31 s", Transient),
        dead("v2", "ValidationError: currency missing", Permanent),
    ])
    .await;
    let rules = std::env::temp_dir().join(format!("idem-rules-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &rules,
        format!(
            r#"
[[rule]]
name = "gateway-timeouts"
queue = "{q}"
consumer = "test-consumer"
match = "gateway timeout"
older_than = "10m"
action = "replay"
rate = 20
max_replays = 2

[[rule]]
name = "park-validation"
queue = "{q}"
match = "^ValidationError"
action = "move"
to = "{parked}"
"#,
            q = f.queue
        ),
    )
    .unwrap();
    let rules = rules.to_str().unwrap().to_owned();

    let plan = exit_text(
        &idem(&["dlq", "redrive", "--rules", &rules, "--dry-run"]),
        0,
    );
    assert_says(
        &plan,
        &[
            "rule gateway-timeouts: would replay 2",
            "rule park-validation: would move 2",
            "nothing was changed",
        ],
    );
    assert_eq!(f.depth(&f.dlq()).await, 5);
    assert_eq!(f.depth(&f.queue).await, 0);

    exit_text(&idem(&["dlq", "redrive", "--rules", &rules]), 0);
    let replayed = f.drain(&f.queue, 2).await;
    assert_eq!(ids(&replayed), ["t1", "t2"]);
    assert_eq!(
        replayed[0].headers[REDRIVE_COUNT_HEADER],
        HeaderValue::Int(1)
    );
    assert_eq!(
        replayed[0].header_str(REDRIVE_RULE_HEADER),
        Some("gateway-timeouts")
    );
    assert!(replayed[0]
        .header_str(idem_core::outcome::headers::ERROR)
        .is_none());
    let moved = f.drain(&parked, 2).await;
    assert_eq!(ids(&moved), ["v1", "v2"]);
    assert_eq!(
        moved[0].header_str(REDRIVE_RULE_HEADER),
        Some("park-validation")
    );
    assert_eq!(
        moved[0].header_str(idem_core::outcome::headers::ERROR),
        Some("ValidationError: cents must be positive"),
        "a parked message keeps its failure history"
    );
    assert_eq!(ids(&f.drain(&f.dlq(), 1).await), ["o1"]);

    // A timeout replayed twice by rules already stays for a person.
    let mut again = idem_core::Message::new("body of t3").with_message_id("t3");
    again.headers.insert(
        idem_core::outcome::headers::ERROR.into(),
        "gateway timeout after 5 s".into(),
    );
    again.headers.insert(
        idem_core::outcome::headers::CONSUMER.into(),
        "test-consumer".into(),
    );
    again.headers.insert(
        idem_core::outcome::headers::LAST_FAILED_AT.into(),
        "2023-11-14T22:13:20.000Z".into(),
    );
    again
        .headers
        .insert(REDRIVE_COUNT_HEADER.into(), HeaderValue::Int(2));
    f.publish_raw("", &f.dlq(), again).await;
    let said = exit_text(&idem(&["dlq", "redrive", "--rules", &rules]), 0);
    assert_says(&said, &["replayed 0 message(s)", "1 held for a person"]);
    assert_eq!(ids(&f.drain(&f.dlq(), 1).await), ["t3"]);
    assert_eq!(f.depth(&f.queue).await, 0);

    let _ = std::fs::remove_file(&rules);
    let _ = ch
        .queue_delete(parked.as_str().into(), Default::default())
        .await;
    f.cleanup().await;
}
