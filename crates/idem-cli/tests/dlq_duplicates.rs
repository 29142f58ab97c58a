//! `idem dlq replay --dedup-redis URL` reports, in a dry run and in a real run, the
//! messages the consumer will ack as duplicates because their key is already done in
//! its Redis dedup store. Real RabbitMQ and Redis (see the README, "Running the tests").

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{dead, ids, Fixture};
use idem_core::dedup::{Claim, Completion, DedupStore, OwnerToken, ScopedKey};
use idem_core::ErrorKind::Transient;
use idem_redis::RedisStore;
use idem_testkit::Service;

fn idem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .env("AMQP_URL", common::url())
        .env("COLUMNS", "200")
        .output()
        .expect("run the idem binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn replay_reports_which_messages_will_be_acked_as_duplicates() {
    let f = Fixture::new("dups").await;
    f.bury_all(&[
        dead("done-1", "timeout", Transient),
        dead("fresh-1", "timeout", Transient),
    ])
    .await;
    let url = Service::Redis.url();
    let prefix = format!("idem-cli-test-{}", uuid::Uuid::new_v4().simple());
    let store = Service::Redis.expect_connected(
        &url,
        RedisStore::builder(&url)
            .prefix(prefix.as_str())
            .connect()
            .await,
    );
    // The fixture's messages carry x-idem-consumer test-consumer and x-idem-key key-<id>.
    let key = ScopedKey::new("test-consumer", "key-done-1");
    let owner = OwnerToken::generate();
    let claim = store
        .claim(&key, &owner, None, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claim, Claim::Acquired);
    assert!(store
        .complete(
            &key,
            &owner,
            Completion::Succeeded,
            Duration::from_secs(600)
        )
        .await
        .unwrap());

    for dry in [true, false] {
        let mut args = vec![
            "dlq",
            "replay",
            f.queue.as_str(),
            "--all",
            "--json",
            "--dedup-redis",
            url.as_str(),
            "--dedup-prefix",
            prefix.as_str(),
        ];
        if dry {
            args.push("--dry-run");
        }
        let out = idem(&args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["duplicates"], 1, "{v}");
        let outcome = |id: &str| {
            v["messages"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["message_id"] == id)
                .unwrap()["outcome"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert!(
            outcome("done-1").ends_with("will be acked as a duplicate"),
            "{v}"
        );
        assert!(!outcome("fresh-1").contains("duplicate"), "{v}");
        if dry {
            assert_eq!(f.depth(&f.queue).await, 0, "a dry run moves nothing");
        }
    }
    assert_eq!(ids(&f.drain(&f.queue, 2).await), ["done-1", "fresh-1"]);
    let _ = store.release(&key, &owner).await;
    f.cleanup().await;
}
