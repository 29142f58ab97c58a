//! Chaos runs with batch handlers (`--batch 50`): real worker processes consuming in
//! batches of 50, SIGKILLs, forced AMQP connection closes, store connection kills and
//! crash points, one of them inside a batch's transaction (after one message's
//! savepoint, before the next one's) and one after the commit, before the acks.
//! Needs RabbitMQ (with `rabbitmqctl` on the PATH), PostgreSQL and Redis; see the
//! crate README.

mod support;

use support::run_chaos;

fn check(store: &str, faults: &str) -> String {
    let run = run_chaos(&[
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
    run.assert_exactly_once_with_poison(1500, 2);
    run.report
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
    let run = run_chaos(&[
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
    run.assert_exactly_once_with_poison(1500, 3);
    println!("{}", run.last);
}
