//! `idem dlq replay --dedup-postgres URL` reports, in a dry run and in a real run, the
//! messages the consumer will ack as duplicates because their key is already done in
//! its PostgreSQL dedup store (an `idem_sql` lease store table), and those recorded
//! with another payload; expired records count as absent. Real RabbitMQ and
//! PostgreSQL (see the README, "Running the tests"); a table of its own, dropped at the
//! end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{idem, ids, outcome, record_done, replay_report, text, Fixture};
use idem_core::dedup::{Completion, ScopedKey};
use idem_core::ErrorKind::Transient;
use idem_sql::PgStore;
use idem_testkit::Service;

/// Records `key` of the fixture's consumer as done in `store`, with `fingerprint`,
/// kept for `retention`.
async fn record(
    store: &PgStore,
    key: &str,
    fingerprint: Option<&str>,
    completion: Completion,
    retention: Duration,
) {
    let key = ScopedKey::new("test-consumer", key);
    record_done(store, &key, fingerprint, completion, retention).await;
}

#[tokio::test]
async fn replay_predicts_duplicates_from_a_postgres_dedup_table() {
    let f = Fixture::new("pgdups").await;
    let buried = ["done-1", "fresh-1", "other-1", "expired-1", "poisoned-1"];
    f.bury_each(&buried, "timeout", Transient).await;
    let url = Service::PostgreSql.url();
    let pool = idem_testkit::postgres(
        sqlx::postgres::PgPoolOptions::new().max_connections(2),
        "idem-cli-test",
    )
    .await;
    let table = format!("idem_cli_test_{}", uuid::Uuid::new_v4().simple());
    let store = PgStore::new(pool.clone()).try_table(&table).unwrap();
    store.ensure_schema().await.unwrap();
    // The fixture's messages carry x-idem-consumer test-consumer, x-idem-key key-<id>
    // and the body "body of <id>".
    let fp = idem_cli::dlq::sha256_hex(b"body of done-1");
    let long = Duration::from_secs(600);
    record(&store, "key-done-1", Some(&fp), Completion::Succeeded, long).await;
    let other = idem_cli::dlq::sha256_hex(b"another payload");
    record(
        &store,
        "key-other-1",
        Some(&other),
        Completion::Succeeded,
        long,
    )
    .await;
    let short = Duration::from_millis(1);
    record(&store, "key-expired-1", None, Completion::Succeeded, short).await;
    record(&store, "key-poisoned-1", None, Completion::Poisoned, long).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let dedup = ["--dedup-postgres", &url, "--dedup-table", &table];
    for dry in [true, false] {
        let v = replay_report(&f.queue, &dedup, dry, &["done-1"]);
        assert!(
            outcome(&v, "other-1").ends_with("will be dead-lettered: different payload"),
            "{v}"
        );
        for runs in ["fresh-1", "expired-1", "poisoned-1"] {
            let o = outcome(&v, runs);
            assert!(
                !o.contains("duplicate") && !o.contains("different"),
                "{runs}: {v}"
            );
        }
        if dry {
            assert_eq!(f.depth(&f.queue).await, 0, "a dry run moves nothing");
            assert_eq!(f.depth(&f.dlq()).await, 5, "a dry run moves nothing");
        }
    }
    assert_eq!(ids(&f.drain(&f.queue, 5).await), buried);

    // A table that is not there: one clear error, nothing moved.
    f.bury_each(&["late-1"], "timeout", Transient).await;
    let missing = format!("{table}_missing");
    let out = idem(&[
        "dlq",
        "replay",
        f.queue.as_str(),
        "--all",
        "--dedup-postgres",
        url.as_str(),
        "--dedup-table",
        missing.as_str(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("--dedup-table"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(f.depth(&f.dlq()).await, 1, "nothing moved");

    idem_testkit::drop_pg_table(&pool, &table).await;
    f.cleanup().await;
}
