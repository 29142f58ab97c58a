//! Set-up shared by the Redis store's tests: a store on the test Redis and the
//! clean-up of its keys.

use idem_redis::RedisStore;
use idem_testkit::Service;

/// A store on the test Redis (REDIS_URL) with key prefix `prefix`, or a panic saying
/// Redis is not reachable.
pub(crate) async fn store(prefix: &str) -> RedisStore {
    let url = Service::Redis.url();
    Service::Redis.expect_connected(
        &url,
        RedisStore::builder(&url).prefix(prefix).connect().await,
    )
}

/// Deletes every key under the store's prefix.
pub(crate) async fn cleanup(store: &RedisStore) {
    let pattern = format!("{}:*", store.prefix());
    idem_testkit::delete_redis_keys(&mut store.connection(), &pattern).await;
}
