//! Ordered consumption under chaos (issue 24): 3 real worker processes consuming in
//! per-key lanes from a single-active-consumer queue, with SIGKILLs, crash points,
//! forced AMQP connection closes, `pg_terminate_backend` and 5 % transient handler
//! failures, PostgreSQL inbox. Needs RabbitMQ (with `rabbitmqctl` on the PATH) and
//! PostgreSQL; see the crate README. No broker or Redis restarts.
//!
//! Sized for a loop on a shared machine (20 keys x 20 messages); the size
//! (`--keys 100 --per-key 50`) is run by hand, see docs/ordering.md.

use std::collections::HashMap;
use std::process::Command;

/// `key=value` fields of a summary line.
fn fields(line: &str) -> HashMap<&str, String> {
    line.trim_start_matches("chaos:")
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k, v.to_owned()))
        .collect()
}

/// Runs idem-chaos with `--keys 20 --per-key 20` and `extra`; the exit status, the
/// `chaos: ordered=...` line, the `chaos: published=...` line and the whole output.
fn run(extra: &[&str]) -> (std::process::ExitStatus, String, String, String) {
    let mut args = vec![
        "--keys",
        "20",
        "--per-key",
        "20",
        "--workers",
        "3",
        "--kills",
        "3",
        "--transient-percent",
        "5",
        "--store",
        "postgres",
        "--faults",
        "conn-close,pg-terminate,failpoints",
        "--drain-timeout",
        "120",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_idem-chaos"))
        .args(&args)
        .output()
        .expect("run idem-chaos");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_default()
            .to_owned()
    };
    (
        out.status,
        line("chaos: ordered="),
        line("chaos: published="),
        report,
    )
}

fn get<'a>(f: &'a HashMap<&str, String>, k: &str, report: &str) -> &'a str {
    f.get(k)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no {k}\n{report}"))
}

#[test]
fn ordered_run_loses_nothing_applies_nothing_twice_and_keeps_key_order() {
    let (status, ordered, totals, report) = run(&["--ordered"]);
    assert!(
        status.success(),
        "idem-chaos failed ({status}); if a service is down, stderr says how to start it\n{report}"
    );
    let o = fields(&ordered);
    assert_eq!(get(&o, "ordered", &report), "true", "{report}");
    assert_eq!(get(&o, "lost", &report), "0", "{report}");
    assert_eq!(get(&o, "duplicates", &report), "0", "{report}");
    assert_eq!(get(&o, "reordered", &report), "0", "{report}");
    let t = fields(&totals);
    assert_eq!(get(&t, "confirmed", &report), "400", "{report}");
    assert_eq!(get(&t, "kills", &report), "3", "{report}");
}

/// The control: the same run without ordering. Retry copies rejoin the queue behind
/// later messages of their key, so the verifier must see reordered effects.
#[test]
fn unordered_run_is_caught_reordering() {
    let (_status, ordered, _totals, report) = run(&[]);
    let o = fields(&ordered);
    assert_eq!(get(&o, "ordered", &report), "false", "{report}");
    assert_eq!(get(&o, "lost", &report), "0", "{report}");
    assert_eq!(get(&o, "duplicates", &report), "0", "{report}");
    let reordered: i64 = get(&o, "reordered", &report).parse().unwrap();
    assert!(reordered > 0, "the verifier must see the reorder\n{report}");
}
