//! Example smoke tests: each runnable example runs to completion against the local
//! services and its summary line is checked. The examples are built by
//! `cargo test --workspace` (cargo builds every example of the workspace for a test
//! run); these tests run the built binaries.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    // target/debug/deps/examples-<hash> -> target/debug/examples/<name>
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "example binary {} is missing: run the tests with `cargo test --workspace`, which builds the examples",
        path.display()
    );
    path
}

/// Runs an example and returns its stdout; fails with its output if it failed.
fn run(name: &str, args: &[&str]) -> String {
    let out = Command::new(example(name)).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "example {name} failed ({}).\nstdout:\n{stdout}\nstderr:\n{stderr}\n(RabbitMQ, PostgreSQL and Redis must run locally: see \"Running the tests\" in the README)",
        out.status
    );
    stdout
}

fn last_line(out: &str) -> &str {
    out.lines().last().unwrap_or("")
}

fn field(line: &str, name: &str) -> String {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
        .to_owned()
}

use idem_testkit::unique;

/// Deletes a work queue and its retry and dead-letter queues.
fn delete_queues(queue: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = idem_testkit::rabbitmq("idem-examples-test").await;
        let ch = conn.create_channel().await.unwrap();
        for suffix in [
            "",
            ".dlq",
            ".retry.1s",
            ".retry.2s",
            ".retry.3s",
            ".retry.5s",
        ] {
            let name = format!("{queue}{suffix}");
            ch.queue_delete(name.as_str().into(), Default::default())
                .await
                .unwrap();
        }
    });
}

#[test]
fn quickstart_prints_the_documented_summary() {
    let out = run("quickstart", &[]);
    assert_eq!(
        last_line(&out),
        "summary: processed=4 duplicates=1 retries=2 dead_lettered=1"
    );
    assert!(
        out.contains("settle   order-2  attempt 1  duplicate"),
        "{out}"
    );
    assert!(
        out.contains("settle   order-5  attempt 1  permanent failure, dead-lettered"),
        "{out}"
    );
}

#[test]
fn welcome_email_delivers_every_mail_with_rare_duplicates() {
    let queue = unique("welcome");
    let out = run("welcome_email", &["--users", "20", "--queue", &queue]);
    let last = last_line(&out);
    assert!(last.starts_with("summary: "), "{out}");
    assert!(
        out.contains("every user got the welcome mail: true"),
        "{out}"
    );
    assert_eq!(field(last, "users"), "20");
    assert_eq!(
        field(last, "mails_sent"),
        "22",
        "20 mails + 2 duplicates after timeouts"
    );
    assert_eq!(field(last, "duplicate_mails"), "2");
    assert_eq!(field(last, "retries"), "6");
    assert_eq!(field(last, "dead_lettered"), "0");
}

#[test]
fn redelivery_retries_technical_errors_and_dead_letters_content_errors() {
    let queue = unique("redelivery");
    let out = run("redelivery", &["--queue", &queue]);
    delete_queues(&queue);
    let last = last_line(&out);
    assert!(last.starts_with("summary: "), "{out}");
    assert_eq!(
        field(last, "stored"),
        "12",
        "every valid update landed once the database was back"
    );
    assert_eq!(field(last, "dead_lettered"), "3");
    assert!(
        field(last, "retries").parse::<u32>().unwrap() >= 12,
        "the outage caused retries: {last}"
    );
    assert_eq!(field(last, "queue"), format!("{queue}.dlq"));
    assert!(
        out.contains(&format!("dlq      {queue}.dlq holds 3 message(s):")),
        "{out}"
    );
}

#[test]
fn billing_charges_each_card_once() {
    let out = run("billing", &[]);
    assert_eq!(
        last_line(&out),
        "summary: deliveries=8 billed=6 duplicates=2 double_billed=0",
        "{out}"
    );
}

#[test]
fn transfer_conserves_money_under_crashes() {
    let out = run("transfer", &["--transfers", "150"]);
    assert_eq!(
        last_line(&out),
        "transfer: transfers=150 deposits_applied=150 money_conserved=true duplicates=0 announced=150",
        "{out}"
    );
    assert!(out.contains("crash "), "the run injected crashes: {out}");
}

#[test]
fn rabbitmq_redis_runs_the_handler_once_for_two_copies() {
    let queue = unique("rabbitmq_redis");
    let out = run("rabbitmq_redis", &["--queue", &queue]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The example leaves its queues and dedup records in place, as a consumer
        // would; the test removes them.
        let conn = idem_testkit::rabbitmq("idem-examples-test").await;
        let ch = conn.create_channel().await.unwrap();
        idem_amqp::Topology::new(queue.as_str())
            .delete_on(&ch)
            .await
            .unwrap();
        let mut redis = idem_testkit::redis().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{queue}:*"))
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(keys.len(), 1, "one dedup record: {keys:?}");
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut redis)
            .await
            .unwrap();
    });
    assert_eq!(
        last_line(&out),
        "summary: processed=1 duplicates=1 retries=0 dead_lettered=0",
        "{out}"
    );
    let charged: Vec<&str> = out.lines().filter(|l| l.starts_with("charging ")).collect();
    assert_eq!(charged.len(), 1, "the handler ran once: {out}");
    assert!(
        charged[0].starts_with("charging 500 cents for charge-"),
        "{out}"
    );
}
