//! A Redis restart without persistence (`redis-cli shutdown nosave`, then the
//! machine's `redis-server` command) while a publisher and two worker processes with
//! the Redis lease store are at work, checked with the chaos accounting. A binary of
//! its own: cargo runs test binaries one after another, so no other test of the
//! workspace runs while Redis is down.
//!
//! Redis runs here with `--save "" --appendonly no`: the restart forgets every dedup
//! record. What that costs is documented (README "Durability caveats", crate README):
//! nothing is lost, and a message whose effect was applied before Redis came back but
//! whose delivery was not yet settled runs again (`reruns_after_durability_fault`),
//! at most one per message in flight (workers x prefetch). Any other re-run fails.
//!
//! Needs Redis (with `redis-cli` and `redis-server` on the PATH, same host), RabbitMQ
//! and PostgreSQL; see the crate README.

mod support;

use support::{run_chaos, KeepRunning, Service};

const WORKERS: i64 = 2;
const PREFETCH: i64 = 10;

#[test]
fn redis_restart_without_persistence_loses_nothing_and_reruns_only_in_flight_messages() {
    let _guard = KeepRunning(Service::Redis);
    let (workers, prefetch) = (WORKERS.to_string(), PREFETCH.to_string());
    let run = run_chaos(&[
        "--messages",
        "2000",
        "--store",
        "redis",
        "--workers",
        &workers,
        "--prefetch",
        &prefetch,
        "--kills",
        "0",
        "--faults",
        "redis-restart",
        "--rounds",
        "1",
        "--publish-rate",
        "100",
        "--drain-timeout",
        "60",
    ]);
    let report = &run.report;
    assert!(
        run.status.success(),
        "idem-chaos failed ({}); if a service is down, stderr says how to start it\n{report}",
        run.status
    );
    let last = "chaos: published=";
    assert_eq!(run.get(last, "confirmed"), 2000, "{report}");
    assert_eq!(run.get(last, "lost"), 0, "{report}");
    assert_eq!(
        run.get(last, "duplicates"),
        0,
        "a re-run the restart does not explain\n{report}"
    );
    assert_eq!(
        run.get(last, "dead_lettered"),
        run.get(last, "poison"),
        "no valid message is dead-lettered because Redis was down\n{report}"
    );
    assert_eq!(
        run.get(last, "effects"),
        run.get(last, "confirmed") - run.get(last, "poison"),
        "{report}"
    );

    let injected = "chaos: faults injected:";
    assert_eq!(run.get(injected, "redis-restart"), 1, "{report}");
    assert_eq!(run.get(injected, "unexpected-worker-exits"), 0, "{report}");
    assert_eq!(run.get(last, "kills"), 0, "{report}");

    let back = "chaos: back after redis-restart:";
    assert!(
        run.get(back, "effects") < run.get(last, "effects"),
        "the workers applied effects after the restart\n{report}"
    );
    let drained = "chaos: drained=";
    assert_eq!(run.get(drained, "reruns_after_crash"), 0, "{report}");
    let reruns = run.get(drained, "reruns_after_durability_fault");
    assert!(
        reruns <= WORKERS * PREFETCH,
        "{reruns} re-runs: more than the {} messages that can be in flight\n{report}",
        WORKERS * PREFETCH
    );
    println!("redis restart: reruns_after_durability_fault={reruns}");
}
