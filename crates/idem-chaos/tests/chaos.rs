//! The CI-sized chaos run: real worker processes, SIGKILLs, crash points, forced AMQP
//! connection closes and `pg_terminate_backend`, PostgreSQL inbox. Needs RabbitMQ
//! (with `rabbitmqctl` on the PATH) and PostgreSQL; see the crate README.

mod support;

use support::{fields, run, summary};

/// The control group: the same faults without any dedup. The checker must see the
/// duplicates (the `after-commit-before-ack` crash point re-runs a handled message)
/// and fail the run; otherwise the suite could not tell a broken store from a good one.
#[test]
fn run_without_dedup_is_caught_applying_twice() {
    let (status, last, report) = run(&[
        "--messages",
        "1000",
        "--kills",
        "1",
        "--store",
        "none",
        "--workers",
        "2",
        "--prefetch",
        "5",
        "--faults",
        "failpoints",
        "--commit-failpoint-p",
        "0.05",
    ]);
    // This run fails on purpose, so the binary keeps its worker logs: remove them.
    if let Some(dir) = report
        .split_whitespace()
        .find_map(|w| w.strip_prefix("logs="))
    {
        let _ = std::fs::remove_dir_all(dir);
    }
    assert!(
        last.starts_with("chaos: published="),
        "last line: {last}\n{report}"
    );
    let f = fields(&last);
    assert!(f["duplicates"] > 0, "duplicates must be detected\n{report}");
    assert_eq!(f["lost"], 0, "{report}");
    assert_eq!(
        status.code(),
        Some(1),
        "a run with duplicates must fail\n{report}"
    );
}

#[test]
fn ci_sized_run_loses_nothing_and_applies_nothing_twice() {
    let (status, last, report) = run(&[
        "--messages",
        "2500",
        "--kills",
        "3",
        "--store",
        "postgres",
        "--faults",
        "conn-close,pg-terminate,failpoints",
        "--rounds",
        "2",
        "--drain-timeout",
        "120",
    ]);
    let f = summary(status, &last, &report);
    let get = |k: &str| *f.get(k).unwrap_or_else(|| panic!("no {k} in {last:?}"));
    assert_eq!(get("published"), 2500, "{report}");
    assert_eq!(
        get("confirmed"),
        2500,
        "every publish is eventually confirmed\n{report}"
    );
    assert_eq!(get("lost"), 0, "{report}");
    assert_eq!(get("duplicates"), 0, "{report}");
    assert!(
        get("poison") > 0,
        "the run must include poison messages\n{report}"
    );
    assert_eq!(get("dead_lettered"), get("poison"), "{report}");
    assert_eq!(
        get("effects"),
        get("confirmed") - get("poison"),
        "one effect per confirmed valid message\n{report}"
    );
    assert!(
        get("invocations") >= get("confirmed"),
        "every message was run at least once\n{report}"
    );
    assert_eq!(get("kills"), 3, "{report}");
    // 2 rounds of conn-close and pg-terminate at least (crash-point aborts come on top).
    assert!(get("faults") >= 4, "{report}");
}

/// The consumer outbox under the same faults: each applied effect has exactly its one
/// follow-up (the id derived from the message's key), none lost, none extra.
#[test]
fn follow_ups_through_the_consumer_outbox_are_neither_lost_nor_duplicated() {
    let (status, last, report) = run(&[
        "--messages",
        "1500",
        "--kills",
        "3",
        "--store",
        "postgres",
        "--follow-ups",
        "--faults",
        "conn-close,pg-terminate,failpoints",
        "--rounds",
        "2",
        "--drain-timeout",
        "120",
    ]);
    assert!(
        status.success(),
        "idem-chaos failed ({status}); if a service is down, stderr says how to start it\n{report}"
    );
    let f = fields(&last);
    let follow_line = report
        .lines()
        .find(|l| l.starts_with("chaos: follow_ups="))
        .unwrap_or_else(|| panic!("no follow-up line\n{report}"));
    let fu = fields(follow_line);
    assert_eq!(f["lost"], 0, "{report}");
    assert_eq!(f["duplicates"], 0, "{report}");
    assert!(f["effects"] > 0, "{report}");
    assert_eq!(
        fu["follow_ups"], f["effects"],
        "one follow-up per effect\n{report}"
    );
    assert_eq!(fu["follow_ups_lost"], 0, "{report}");
    assert_eq!(fu["follow_ups_unexpected"], 0, "{report}");
}
