//! A full RabbitMQ restart (`rabbitmqctl stop_app; start_app`) while a publisher, an
//! outbox relay and two worker processes (PostgreSQL inbox) are at work, checked with
//! the chaos accounting. A binary of its own: cargo runs test binaries one after
//! another, so no other test of the workspace runs while the broker is down.
//!
//! Needs RabbitMQ with `rabbitmqctl` on the PATH (same host) and PostgreSQL; see the
//! crate README. Each restart is announced in the restart log (`IDEM_RESTART_LOG`,
//! default `$TMPDIR/idem-restarts.log`).

mod support;

use support::{run_restart, KeepRunning, Service, RESTART_MESSAGES};

#[test]
fn broker_restart_loses_nothing_and_every_client_reconnects_on_its_own() {
    let _guard = KeepRunning(Service::RabbitMq);
    let run = run_restart(
        "postgres",
        "broker-restart",
        &["--workers", "2", "--outbox"],
    );
    let report = &run.report;
    // Every message is eventually confirmed or committed to the outbox.
    run.assert_exactly_once(RESTART_MESSAGES);
    let last = "chaos: published=";
    assert_eq!(run.get(last, "published"), RESTART_MESSAGES, "{report}");

    // One restart, and nothing restarted the workers: no kill, no crash point, no exit.
    run.assert_one_restart_kept_the_workers("broker-restart");
    let injected = "chaos: faults injected:";
    assert_eq!(run.get(injected, "failpoint-aborts"), 0, "{report}");

    // Work was left when the broker came back, and it was done: the same worker
    // processes consumed again (checked above), the publisher published again, the
    // relay relayed again.
    let back = "chaos: back after broker-restart:";
    let publishing = "chaos: publishing";
    assert!(
        run.get(back, "direct") < run.get(publishing, "direct"),
        "the publisher published after the restart\n{report}"
    );
    assert!(
        run.get(back, "relayed") < run.get(publishing, "relayed"),
        "the relay published after the restart\n{report}"
    );
    assert_eq!(
        run.get(publishing, "relayed"),
        run.get(publishing, "outbox"),
        "every outbox row was relayed and marked once\n{report}"
    );
}
