//! Chaos runs with batch handlers (`--batch 50`): real worker processes consuming in
//! batches of 50, SIGKILLs, forced AMQP connection closes, store connection kills and
//! crash points, one of them inside a batch's transaction (after one message's
//! savepoint, before the next one's) and one after the commit, before the acks.
//! Needs RabbitMQ (with `rabbitmqctl` on the PATH), PostgreSQL and Redis; see the
//! crate README.

use std::collections::HashMap;
use std::process::Command;

/// `key=value` fields of the summary line.
fn fields(line: &str) -> HashMap<&str, i64> {
    line.trim_start_matches("chaos:")
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect()
}

fn run(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_idem-chaos"))
        .args(args)
        .output()
        .expect("run idem-chaos");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default().to_owned();
    (out.status, last, report)
}

fn check(store: &str, faults: &str) -> String {
    let (status, last, report) = run(&[
        "--messages",
        "1500",
        "--kills",
        "2",
        "--store",
        store,
        "--batch",
        "50",
        "--prefetch",
        "100",
        "--faults",
        faults,
        "--rounds",
        "1",
        "--savepoint-failpoint-p",
        "0.05",
        "--commit-failpoint-p",
        "0.05",
        "--drain-timeout",
        "120",
    ]);
    assert!(
        status.success(),
        "idem-chaos failed ({status}); if a service is down, stderr says how to start it\n{report}"
    );
    assert!(
        last.starts_with("chaos: published="),
        "last line: {last}\n{report}"
    );
    let f = fields(&last);
    let get = |k: &str| *f.get(k).unwrap_or_else(|| panic!("no {k} in {last:?}"));
    assert_eq!(get("confirmed"), 1500, "{report}");
    assert_eq!(get("lost"), 0, "{report}");
    assert_eq!(get("duplicates"), 0, "{report}");
    assert!(get("poison") > 0, "the run must include poison\n{report}");
    assert_eq!(get("dead_lettered"), get("poison"), "{report}");
    assert_eq!(
        get("effects"),
        get("confirmed") - get("poison"),
        "one effect per confirmed valid message\n{report}"
    );
    assert_eq!(get("kills"), 2, "{report}");
    report
}

#[test]
fn batches_on_the_postgres_inbox_lose_nothing_and_apply_nothing_twice() {
    let report = check("postgres", "conn-close,pg-terminate,failpoints");
    assert!(
        report.contains("batch-between-savepoints=1"),
        "the crash point between two savepoints fired\n{report}"
    );
}

#[test]
fn batches_on_the_redis_lease_store_lose_nothing_and_apply_nothing_twice() {
    check("redis", "conn-close,redis-kill,failpoints");
}

/// Batches on the Redis lease store admitted a batch at a time (one claim call, one
/// completion call, one release call per batch), under three kills, crash points,
/// forced connection closes and Redis client kills, with 5 % of the handler calls
/// failing transiently (their claims given back together): nothing lost, nothing
/// applied twice, every poison message dead-lettered.
#[test]
fn redis_batches_admitted_whole_survive_kills_and_transient_failures() {
    let (status, last, report) = run(&[
        "--messages",
        "1500",
        "--kills",
        "3",
        "--store",
        "redis",
        "--batch",
        "50",
        "--prefetch",
        "100",
        "--faults",
        "conn-close,redis-kill,failpoints",
        "--transient-percent",
        "5",
        "--commit-failpoint-p",
        "0.05",
        "--drain-timeout",
        "120",
    ]);
    assert!(status.success(), "idem-chaos failed ({status})\n{report}");
    let f = fields(&last);
    let get = |k: &str| {
        *f.get(k)
            .unwrap_or_else(|| panic!("no {k} in {last:?}\n{report}"))
    };
    assert_eq!(get("confirmed"), 1500, "{report}");
    assert_eq!((get("lost"), get("duplicates")), (0, 0), "{report}");
    assert!(get("poison") > 0, "the run must include poison\n{report}");
    assert_eq!(get("dead_lettered"), get("poison"), "{report}");
    assert_eq!(get("effects"), get("confirmed") - get("poison"), "{report}");
    assert_eq!(get("kills"), 3, "{report}");
    println!("{last}");
}
