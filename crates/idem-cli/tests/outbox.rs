//! `idem outbox status` against the real PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; start it with your service manager,
//! e.g. `pg_ctlcluster <version> main start`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_cli::outbox::{status, DEFAULT_DATABASE_URL};
use idem_outbox::{Outbox, OutboxMessage};

fn db_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

#[tokio::test]
async fn status_counts_pending_rows() {
    let url = db_url();
    let pool = sqlx::PgPool::connect(&url).await.unwrap_or_else(|e| {
        panic!("PostgreSQL not reachable at {}: start it (e.g. `pg_ctlcluster <version> main start`) or set DATABASE_URL: {e}", idem_core::redact_url(&url))
    });
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
