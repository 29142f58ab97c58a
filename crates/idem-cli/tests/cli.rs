//! The real `idem` binary: output, exit codes, refusals and credential hygiene.
//! Needs the local RabbitMQ and PostgreSQL (see the README section "Running the tests").

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{dead, exit_json, fields, ids, text, Fixture};
use idem_core::ErrorKind::Transient;

/// The binary against the local broker, in a terminal 100 characters wide.
fn idem(args: &[&str]) -> std::process::Output {
    common::idem_at(&common::url(), 100, args)
}

#[tokio::test]
async fn dlq_list_json_and_table() {
    let f = Fixture::new("bin-list").await;
    for i in 1..=3 {
        f.bury(&dead(
            &format!("m{i}"),
            &format!("failed {}", "x".repeat(300)),
            Transient,
        ))
        .await;
    }
    let v = exit_json(&idem(&["dlq", "list", &f.queue, "--json"]), 0);
    assert_eq!(fields(&v, "message_id"), ["m1", "m2", "m3"]);
    assert_eq!(v[0]["attempts"], 3);
    assert_eq!(v[0]["error_kind"], "transient");

    let out = idem(&["dlq", "list", &f.queue]);
    assert_eq!(out.status.code(), Some(0));
    let table = text(&out.stdout);
    // Every table line fits the terminal (the summary line after it may not).
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    assert!(
        lines[..4].iter().all(|l| l.chars().count() <= 100),
        "{table}"
    );
    assert!(table.contains("m2") && table.contains('…'), "{table}");

    assert_eq!(ids(&f.drain(&f.dlq(), 3).await), ["m1", "m2", "m3"]);
    f.cleanup().await;
}

#[tokio::test]
async fn purge_needs_yes() {
    let f = Fixture::new("bin-purge").await;
    f.bury_all(&[
        dead("a", "bad input", Transient),
        dead("b", "timeout", Transient),
    ])
    .await;
    let out = idem(&["dlq", "purge", &f.queue, "--all"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--yes"), "{}", text(&out.stderr));
    assert_eq!(f.depth(&f.dlq()).await, 2);

    let out = idem(&["dlq", "purge", &f.queue, "--error-matches", "bad", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(ids(&f.drain(&f.dlq(), 1).await), ["b"]);
    f.cleanup().await;
}

#[tokio::test]
async fn replay_with_unroutable_message_exits_3() {
    let f = Fixture::new("bin-partial").await;
    f.bury(&dead("good", "x", Transient)).await;
    f.bury_unroutable("lost").await;
    let v = exit_json(&idem(&["dlq", "replay", &f.queue, "--all", "--json"]), 3);
    assert_eq!(
        (v["done"].as_u64(), v["failed"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(ids(&f.drain(&f.queue, 1).await), ["good"]);
    assert_eq!(ids(&f.drain(&f.dlq(), 1).await), ["lost"]);
    f.cleanup().await;
}

#[test]
fn unreachable_broker_exits_2_without_the_password() {
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args([
            "--url",
            "amqp://guest:secret@127.0.0.1:1/%2f",
            "dlq",
            "list",
            "q",
        ])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        !err.contains("secret") && !text(&out.stdout).contains("secret"),
        "{err}"
    );
    assert!(err.contains("amqp://guest:***@127.0.0.1:1"), "{err}");
}

#[test]
fn usage_errors_exit_1_and_help_lists_exit_codes() {
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["dlq", "replay", "q"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["dlq", "replay", "q", "--error-matches", "("])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // --error-matches is the old name of --match (still accepted).
    assert!(text(&out.stderr).contains("invalid --match"));
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["--help"])
        .env("AMQP_URL", "amqp://u:topsecret@h/%2f")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(
        help.contains("Exit codes") && help.contains("partial failure"),
        "{help}"
    );
    assert!(!help.contains("topsecret"), "{help}");
}

#[tokio::test]
async fn topology_declare_and_show() {
    let conn = common::connect().await;
    let q = format!("idem-cli-test-topo-{}", uuid::Uuid::new_v4().simple());
    let out = idem(&["topology", "declare", &q, "--tiers", "1s,5s"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let v = exit_json(
        &idem(&["topology", "show", &q, "--tiers", "1s,5s", "--json"]),
        0,
    );
    assert_eq!(
        fields(&v, "name"),
        [
            q.clone(),
            format!("{q}.dlq"),
            format!("{q}.retry.1s"),
            format!("{q}.retry.5s")
        ]
    );
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["exists"] == true && s["messages"] == 0));

    // Looking for a tier that was not declared: shown as missing, exit 1.
    let out = idem(&["topology", "show", &q, "--tiers", "1s,30s"]);
    assert_eq!(out.status.code(), Some(1));
    let table = text(&out.stdout);
    let line = table.lines().find(|l| l.contains(".retry.30s")).unwrap();
    assert!(line.contains("MISSING"), "{table}");

    // Declaring again with other arguments is refused by the broker (exit 4).
    let out = idem(&["topology", "declare", &q, "--quorum", "--tiers", "1s,5s"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));

    let topology = idem_amqp::Topology::new(q.as_str())
        .tiers(idem_cli::topology::parse_tiers("1s,5s").unwrap());
    let ch = conn.create_channel().await.unwrap();
    topology.delete_on(&ch).await.unwrap();
}
