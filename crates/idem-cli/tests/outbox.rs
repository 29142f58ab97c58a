//! `idem outbox status` against the real PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; see the README section "Running the
//! tests").

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use idem_cli::outbox::{status, DEFAULT_DATABASE_URL};
use idem_outbox::{Outbox, OutboxMessage};
use idem_testkit::Service;

fn db_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

#[tokio::test]
async fn status_counts_pending_rows() {
    let url = db_url();
    let pool = Service::PostgreSql.expect_connected(&url, sqlx::PgPool::connect(&url).await);
    let table = format!("idem_cli_test_{}", uuid::Uuid::new_v4().simple());
    let outbox = Outbox::new(&table).unwrap();
    outbox.ensure_schema(&pool).await.unwrap();

    let empty = status(&url, &table).await.unwrap();
    assert_eq!((empty.pending, empty.oldest_pending_age_secs), (0, None));

    let mut tx = pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, OutboxMessage::new("", "somewhere", b"x".to_vec()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let one = status(&url, &table).await.unwrap();
    assert_eq!(one.pending, 1);
    assert!(one.oldest_pending_age_secs.is_some());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["outbox", "status", "--table", &table, "--json"])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pending"], 1);

    let missing = status(&url, "idem_cli_test_no_such_table")
        .await
        .unwrap_err();
    assert_eq!(missing.exit_code(), 1, "{missing}");

    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .unwrap();
}

#[test]
fn unreachable_database_exits_2_without_the_password() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["outbox", "status"])
        .env("DATABASE_URL", "postgres://app:secret@127.0.0.1:1/db")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("secret"), "{err}");
}

/// `idem outbox relay` publishes committed rows, keeps running, and stops cleanly on
/// SIGTERM with its count.
#[tokio::test]
async fn relay_command_publishes_until_sigterm() {
    let url = db_url();
    let pool = Service::PostgreSql.expect_connected(&url, sqlx::PgPool::connect(&url).await);
    let amqp = idem_amqp::amqp_url_from_env();
    let conn = Service::RabbitMq.expect_connected(
        &amqp,
        idem_amqp::connect(&amqp, "idem-cli-test-relay").await,
    );
    let ch = conn.create_channel().await.unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let table = format!("idem_cli_relay_{id}");
    let queue = format!("idem-cli-relay-{id}");
    common::declare_durable(&ch, &queue, &[]).await;

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args([
            "outbox",
            "relay",
            "--table",
            &table,
            "--create-table",
            "--poll-ms",
            "100",
        ])
        .env("DATABASE_URL", &url)
        .env("AMQP_URL", &amqp)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let outbox = Outbox::new(&table).unwrap();
    // The relay creates the table; wait for it, then enqueue.
    let mut ready = false;
    for _ in 0..100 {
        if outbox.status(&pool).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready, "relay did not create its table");
    for n in 0..3 {
        let mut tx = pool.begin().await.unwrap();
        outbox
            .enqueue(
                &mut tx,
                OutboxMessage::new("", queue.clone(), format!("m{n}").into_bytes()),
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let mut published = false;
    for _ in 0..100 {
        if outbox.status(&pool).await.unwrap().pending == 0 {
            published = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let depth = ch
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions::default().passive(),
            Default::default(),
        )
        .await
        .unwrap()
        .message_count();
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    ch.queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    idem_testkit::drop_pg_table(&pool, &table).await;
    assert!(published, "rows still pending; relay output:\n{out}");
    assert_eq!(depth, 3, "three messages in the queue");
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(
        out.contains("relay stopped: published=3 refused=0"),
        "{out}"
    );
}
