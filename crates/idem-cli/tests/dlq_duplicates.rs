//! `idem dlq replay --dedup-redis URL` reports, in a dry run and in a real run, the
//! messages the consumer will ack as duplicates because their key is already done in
//! its Redis dedup store. Real RabbitMQ and Redis (see the README, "Running the tests").

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{ids, outcome, record_done, replay_report, Fixture};
use idem_core::dedup::{Completion, ScopedKey};
use idem_core::ErrorKind::Transient;
use idem_redis::RedisStore;
use idem_testkit::Service;

#[tokio::test]
async fn replay_reports_which_messages_will_be_acked_as_duplicates() {
    let f = Fixture::new("dups").await;
    f.bury_each(&["done-1", "fresh-1"], "timeout", Transient)
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
    let long = Duration::from_secs(600);
    record_done(&store, &key, None, Completion::Succeeded, long).await;

    let dedup = ["--dedup-redis", &url, "--dedup-prefix", &prefix];
    for dry in [true, false] {
        let v = replay_report(&f.queue, &dedup, dry, &["done-1"]);
        assert!(!outcome(&v, "fresh-1").contains("duplicate"), "{v}");
        if dry {
            assert_eq!(f.depth(&f.queue).await, 0, "a dry run moves nothing");
        }
    }
    assert_eq!(ids(&f.drain(&f.queue, 2).await), ["done-1", "fresh-1"]);
    // The done record outlives the test by its 10 min retention: delete what it wrote.
    idem_testkit::delete_redis_keys(&mut store.connection(), &format!("{prefix}*")).await;
    f.cleanup().await;
}
