//! A Redis restart without persistence (`redis-cli shutdown nosave`, then the
//! machine's `redis-server` command) while a publisher and two worker processes with
//! the Redis lease store are at work, checked with the chaos accounting. A binary of
//! its own: cargo runs test binaries one after another, so no other test of the
//! workspace runs while Redis is down.
//!
//! Redis runs here with `--save "" --appendonly no`: the restart forgets every dedup
//! record. What that costs is documented (README "Durability caveats", crate README)
//! and is what this test expects: nothing is lost, no valid message is dead-lettered;
//! a message applied before the restart runs again if it arrives again afterwards.
//! The run publishes 20 messages completed long before the restart once more (a
//! publisher retry would do the same): each of them runs again. Messages in flight at
//! the restart (at most workers x prefetch) may run again too. Those re-runs are
//! reported as `reruns_after_durability_fault`; any other re-run fails the test.
//!
//! Needs Redis (with `redis-cli` and `redis-server` on the PATH, same host), RabbitMQ
//! and PostgreSQL; see the crate README.

mod support;

use support::{run_restart, KeepRunning, Service, RESTART_MESSAGES};

const WORKERS: i64 = 2;
const PREFETCH: i64 = 10;
const REPLAYED: i64 = 20;

#[test]
fn redis_restart_without_persistence_loses_nothing_and_reruns_only_what_it_forgot() {
    let _guard = KeepRunning(Service::Redis);
    let (workers, prefetch, replayed) = (
        WORKERS.to_string(),
        PREFETCH.to_string(),
        REPLAYED.to_string(),
    );
    let run = run_restart(
        "redis",
        "redis-restart",
        &[
            "--workers",
            &workers,
            "--prefetch",
            &prefetch,
            "--replay-after-restart",
            &replayed,
        ],
    );
    let report = &run.report;
    // No duplicate the restart does not explain (the re-runs it explains are counted
    // apart, below); no valid message dead-lettered because Redis was down.
    run.assert_exactly_once(RESTART_MESSAGES);

    run.assert_one_restart_kept_the_workers("redis-restart");
    let drained = "chaos: drained=";
    assert_eq!(run.get(drained, "reruns_after_crash"), 0, "{report}");
    assert_eq!(
        run.get("chaos: replayed=", "replayed"),
        REPLAYED,
        "{report}"
    );
    let reruns = run.get(drained, "reruns_after_durability_fault");
    assert!(
        reruns >= REPLAYED,
        "the {REPLAYED} messages published again after the restart must run again: \
         their dedup records were forgotten ({reruns} re-runs)\n{report}"
    );
    assert!(
        reruns <= REPLAYED + WORKERS * PREFETCH,
        "{reruns} re-runs: more than the replayed messages and the {} that can be in flight\n{report}",
        WORKERS * PREFETCH
    );
    println!("redis restart: reruns_after_durability_fault={reruns}");
}
