//! RedisStore through a TCP fault proxy in front of the real Redis (REDIS_URL's host
//! must be 127.0.0.1:6379, the default): what the first operation after an outage does.
#![allow(clippy::unwrap_used)] // test helpers panic on setup failures by design

use std::time::Duration;

use idem_core::dedup::{
    Claim, ClaimRequest, DedupStore, OwnerToken, ScopedKey, StoreErrorKind, Terms,
};
use idem_redis::RedisStore;
use idem_testkit::fault_proxy::{FaultProxy, Mode};
use idem_testkit::Service;

const REDIS: &str = "127.0.0.1:6379";

async fn through(proxy: &FaultProxy, prefix: &str) -> RedisStore {
    let url = format!("redis://127.0.0.1:{}", proxy.port());
    // Through the proxy, so a failure here means the real Redis behind it is missing.
    Service::Redis.expect_connected(
        &format!("redis://{REDIS}"),
        RedisStore::builder(&url).prefix(prefix).connect().await,
    )
}

async fn first_claim_after_recovery(mode: Mode) {
    let proxy = FaultProxy::start(REDIS).await;
    let prefix = idem_testkit::unique("outage");
    let store = through(&proxy, &prefix).await;
    let lease = Terms::new(Duration::from_secs(5), Duration::from_secs(60));
    let claim = |k: &str| {
        let req = ClaimRequest::new(ScopedKey::new("outage", k), OwnerToken::generate(), None);
        let store = store.clone();
        async move { store.claim(&req, lease).await }
    };
    assert_eq!(claim("before").await.unwrap(), Claim::Acquired);

    proxy.set(mode);
    for i in 0..3 {
        let err = claim(&format!("during-{i}"))
            .await
            .expect_err("Redis is cut off");
        // A cut connection is told apart from an error Redis answered with.
        assert!(
            matches!(
                err.kind(),
                StoreErrorKind::Unavailable | StoreErrorKind::Timeout
            ),
            "{err} is {:?}",
            err.kind()
        );
    }
    // Let the manager's background reconnect fail too: its error is what it keeps.
    tokio::time::sleep(Duration::from_millis(500)).await;

    proxy.set(Mode::Up);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let first = claim("after").await;
    assert_eq!(
        first.as_ref().ok(),
        Some(&Claim::Acquired),
        "the first claim after Redis came back failed: {first:?}"
    );

    let pattern = format!("{prefix}:*");
    idem_testkit::delete_redis_keys(&mut store.connection(), &pattern).await;
}

#[tokio::test]
async fn first_claim_after_refused_connections_does_not_get_the_stale_error() {
    first_claim_after_recovery(Mode::Refuse).await;
}

#[tokio::test]
async fn first_claim_after_reset_connections_does_not_get_the_stale_error() {
    first_claim_after_recovery(Mode::Reset).await;
}
