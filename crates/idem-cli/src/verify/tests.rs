use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use super::classify::{at_risk, classify, hazards, Limits, Outcome};
use super::published::{from_ids, read_ids, Published};
use super::queues::{Copy, Role, Seen};
use super::records::{Record, RecordState};
use super::render::age;
use super::Class;

fn row(id: &str, age_secs: f64, pending: bool) -> Published {
    Published {
        id: id.to_owned(),
        created_at: Some("2026-12-06T10:00:00Z".to_owned()),
        age_secs: Some(age_secs),
        pending,
    }
}

fn copy(id: &str, role: Role) -> Copy {
    Copy {
        queue: "q".to_owned(),
        role,
        id: Some(id.to_owned()),
        key: Some(id.to_owned()),
        dead_lettered_at: None,
    }
}

/// The records of `list`: key, state, milliseconds until the record expires.
fn records(list: &[(&str, RecordState, i64)]) -> HashMap<String, Record> {
    list.iter()
        .map(|&(key, state, expires_in_ms)| {
            let record = Record {
                state,
                expires_in_ms: Some(expires_in_ms),
            };
            (key.to_owned(), record)
        })
        .collect()
}

/// `classify` of ids found in no queue and no store, with `grace` for young ones.
fn classify_unseen(published: &[Published], grace: Duration) -> Outcome {
    classify(published, &Seen::default(), &HashMap::new(), grace)
}

#[test]
fn each_published_id_lands_in_one_class() {
    let published = vec![
        row("done", 100.0, false),
        row("poisoned", 100.0, false),
        row("queued", 100.0, false),
        row("delayed", 100.0, false),
        row("dead", 100.0, false),
        row("processing", 100.0, false),
        row("pending", 100.0, true),
        row("recent", 5.0, false),
        row("lost", 100.0, false),
        row("expired-done", 100.0, false),
    ];
    let seen = Seen {
        copies: vec![
            copy("queued", Role::Work),
            copy("delayed", Role::Delay(Duration::from_secs(5))),
            copy("dead", Role::Dead),
            // A copy in the work queue of a message also in the DLQ counts once.
            copy("dead", Role::Work),
        ],
    };
    let found = records(&[
        ("done", RecordState::Succeeded, 1000),
        ("poisoned", RecordState::Poisoned, 1000),
        ("processing", RecordState::Processing, 1000),
        ("expired-done", RecordState::Succeeded, -1000),
    ]);
    let out = classify(&published, &seen, &found, Duration::from_secs(60));
    let c = &out.counts;
    assert_eq!(c.published, 10);
    assert_eq!((c.done, c.poisoned), (2, 1));
    assert_eq!((c.queued, c.delayed, c.dead_lettered), (1, 1, 1));
    assert_eq!((c.in_flight, c.pending, c.recent), (1, 1, 1));
    assert_eq!(
        out.unresolved.iter().collect::<Vec<_>>(),
        vec!["lost"],
        "only the id found nowhere and older than the grace period"
    );
    let lost = out.lost_findings(&published, "q");
    assert_eq!(lost.len(), 1);
    assert_eq!((lost[0].class, lost[0].id.as_str()), (Class::Lost, "lost"));
}

#[test]
fn the_second_look_turns_found_ids_into_in_flight() {
    let published = vec![row("a", 100.0, false), row("b", 100.0, false)];
    let mut out = classify_unseen(&published, Duration::ZERO);
    assert_eq!(out.unresolved.len(), 2);
    let found = records(&[("a", RecordState::Succeeded, 1000)]);
    out.recheck(&Seen::default(), &found);
    assert_eq!(out.counts.in_flight, 1);
    assert_eq!(out.unresolved.iter().collect::<Vec<_>>(), vec!["b"]);
}

#[test]
fn ids_of_a_list_are_always_judged() {
    let published = from_ids(&["x".to_owned(), "y".to_owned(), "x".to_owned()]);
    assert_eq!(published.len(), 2, "duplicates in the list count once");
    let out = classify_unseen(&published, Duration::from_secs(3600));
    assert_eq!(out.unresolved.len(), 2);
    assert_eq!(out.counts.recent, 0);
}

#[test]
fn at_risk_dead_letters_and_copies_outliving_their_record() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let day = Duration::from_secs(86_400);
    let dead_at = |d: Duration| Some(idem_core::__private::rfc3339(now - d));
    let mut old = copy("old-dead", Role::Dead);
    old.dead_lettered_at = dead_at(8 * day);
    let mut young = copy("young-dead", Role::Dead);
    young.dead_lettered_at = dead_at(day);
    let seen = Seen {
        copies: vec![
            old,
            young,
            copy("short", Role::Delay(Duration::from_secs(30))),
            copy("long", Role::Delay(Duration::from_secs(30))),
            copy("transient", Role::Delay(Duration::from_secs(30))),
            copy("expired", Role::Work),
            copy("fresh", Role::Work),
        ],
    };
    let found = records(&[
        ("short", RecordState::Succeeded, 10_000),
        ("long", RecordState::Succeeded, 60_000),
        ("expired", RecordState::Succeeded, -5_000),
        ("fresh", RecordState::Succeeded, 5_000),
    ]);
    let risks = at_risk(&seen, &found, 7 * day, now);
    let ids: Vec<(&str, &str)> = risks
        .iter()
        .map(|f| (f.id.as_str(), f.kind.as_str()))
        .collect();
    assert_eq!(
        ids,
        vec![
            ("old-dead", "dlq_older_than_retention"),
            ("short", "record_expires_before_copy"),
            ("expired", "record_expires_before_copy"),
        ]
    );
    assert!(risks.iter().all(|f| f.class == Class::AtRisk));
}

#[test]
fn hazards_come_from_the_limits_given() {
    let tiers = idem_amqp::DelayTiers::default();
    assert!(
        hazards(&Limits::default(), &tiers).is_empty(),
        "the defaults are safe"
    );
    let limits = Limits {
        delivery_limit: Some(3),
        crash_limit: 3,
        retention: Duration::from_secs(60),
        pool_size: Some(5),
        concurrency: Some(10),
        ..Limits::default()
    };
    let kinds: Vec<String> = hazards(&limits, &tiers)
        .into_iter()
        .map(|f| f.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            "delivery_limit",
            "retention_vs_horizon",
            "pool_vs_concurrency"
        ]
    );
    let fine = Limits {
        delivery_limit: Some(20),
        pool_size: Some(10),
        concurrency: Some(10),
        horizon: Some(Duration::from_secs(30)),
        retention: Duration::from_secs(60),
        ..Limits::default()
    };
    assert!(hazards(&fine, &tiers).is_empty());
}

#[test]
fn id_lists_and_ages_parse_and_print() {
    assert_eq!(
        read_ids("a\n\n  b  \n# comment\nc\r\n"),
        vec!["a", "b", "c"]
    );
    assert_eq!(age(0.25), "250ms");
    assert_eq!(age(42.0), "42s");
    assert_eq!(age(303.0), "5m 3s");
    assert_eq!(age(7.0 * 86_400.0), "7d 0h");
    assert_eq!(age(-1.0), "0s");
}
