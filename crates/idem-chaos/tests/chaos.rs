//! The CI-sized chaos run: real worker processes, SIGKILLs, crash points, forced AMQP
//! connection closes and `pg_terminate_backend`, PostgreSQL inbox. Needs RabbitMQ
//! (with `rabbitmqctl` on the PATH) and PostgreSQL; see the crate README.

mod support;

use support::{fields, run, run_chaos, Run};

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

/// A run on the PostgreSQL inbox with 3 kills and 2 rounds of connection closes,
/// `pg_terminate_backend` and crash points; `extra` arguments on top.
fn postgres_run(messages: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "--messages",
        messages,
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
    ];
    args.extend_from_slice(extra);
    run_chaos(&args)
}

#[test]
fn ci_sized_run_loses_nothing_and_applies_nothing_twice() {
    let run = postgres_run("2500", &[]);
    run.assert_exactly_once_with_poison(2500, 3);
    let report = &run.report;
    assert_eq!(run.total("published"), 2500, "{report}");
    assert!(
        run.total("invocations") >= run.total("confirmed"),
        "every message was run at least once\n{report}"
    );
    // 2 rounds of conn-close and pg-terminate at least (crash-point aborts come on top).
    assert!(run.total("faults") >= 4, "{report}");
}

/// The consumer outbox under the same faults: each applied effect has exactly its one
/// follow-up (the id derived from the message's key), none lost, none extra.
#[test]
fn follow_ups_through_the_consumer_outbox_are_neither_lost_nor_duplicated() {
    let run = postgres_run("1500", &["--follow-ups"]);
    let report = &run.report;
    assert!(
        run.status.success(),
        "idem-chaos failed ({}); if a service is down, stderr says how to start it\n{report}",
        run.status
    );
    assert_eq!(run.total("lost"), 0, "{report}");
    assert_eq!(run.total("duplicates"), 0, "{report}");
    assert!(run.total("effects") > 0, "{report}");
    let follow_ups = |key: &str| run.get("chaos: follow_ups=", key);
    assert_eq!(
        follow_ups("follow_ups"),
        run.total("effects"),
        "one follow-up per effect\n{report}"
    );
    assert_eq!(follow_ups("follow_ups_lost"), 0, "{report}");
    assert_eq!(follow_ups("follow_ups_unexpected"), 0, "{report}");
}
