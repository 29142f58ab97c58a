//! [`RedisStoreBuilder`]: URLs, cluster mode, timeouts, reconnects and TLS.

use std::fmt;
use std::time::Duration;

use idem_core::dedup::{StoreError, DEFAULT_MAX_BATCH};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};

use crate::connection::{is_rediss, RedisConnection, Target};
use crate::{RedisStore, DEFAULT_PREFIX};

/// Configures and connects a [`RedisStore`]. Defaults: prefix [`DEFAULT_PREFIX`],
/// connect timeout 500 ms, response timeout 1 s, 2 reconnect retries 50-200 ms apart.
/// With these a dead Redis fails an operation in well under a second (a refused
/// connection in about 0.1-0.3 s; an unreachable host after about 3 connect timeouts).
///
/// One URL connects to a single Redis; several (comma-separated in
/// [`RedisStore::builder`], or [`cluster(true)`](Self::cluster) with one) connect to a
/// Redis Cluster. See the [crate docs](crate#redis-cluster).
#[derive(Clone)]
pub struct RedisStoreBuilder {
    urls: Vec<String>,
    cluster: bool,
    tls: idem_core::TlsConfig,
    prefix: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    retries: usize,
    min_delay: Duration,
    max_delay: Duration,
    max_batch: usize,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("urls", &Target::new(&self.urls).redacted)
            .field("cluster", &self.is_cluster())
            .field("prefix", &self.prefix)
            .field("tls", &self.tls)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("retries", &self.retries)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    pub(crate) fn new(urls: &str) -> Self {
        RedisStoreBuilder {
            urls: urls
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect(),
            cluster: false,
            tls: idem_core::TlsConfig::default(),
            prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_secs(1),
            retries: 2,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            max_batch: DEFAULT_MAX_BATCH,
        }
    }

    /// Key prefix (default `idem`), e.g. one per application sharing a Redis.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Talk to a Redis Cluster even if only one URL (a seed node) was given: the other
    /// nodes are discovered from it. Several URLs always mean a cluster.
    pub fn cluster(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
    }

    /// How long to wait for a TCP connection (default 500 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long to wait for a reply (default 1 s). After a timeout the late reply
    /// can delay the next command on the shared connection too. On a cluster this
    /// bounds a whole command, including the client's own retries and redirects.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Reconnect attempts per failure, and the delay bounds between them (default 2,
    /// 50 ms to 200 ms, exponential). On a cluster: the client's retries of a command
    /// whose node failed or moved (each within the response timeout).
    pub fn reconnect(mut self, retries: usize, min_delay: Duration, max_delay: Duration) -> Self {
        self.retries = retries;
        self.min_delay = min_delay;
        self.max_delay = max_delay.max(min_delay);
        self
    }

    /// TLS settings for a `rediss://` URL: a private CA (trusted instead of the
    /// system roots), a client certificate and key (mutual TLS). Default: verified
    /// against the system roots. See the [crate docs](crate#tls).
    pub fn tls(mut self, tls: idem_core::TlsConfig) -> Self {
        self.tls = tls;
        self
    }

    /// The most operations one script call carries (default [`DEFAULT_MAX_BATCH`]).
    /// Operations of concurrent deliveries that arrive while a call is in flight go
    /// out together in the next call. 1 (or 0) turns batching off: every operation is
    /// a script call of its own, sent from its caller's task, calls of concurrent
    /// callers in flight together. See the [crate docs](crate#batching).
    pub fn max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }

    fn is_cluster(&self) -> bool {
        self.cluster || self.urls.len() > 1
    }

    fn check(&self, target: &Target) -> Result<(), StoreError> {
        if self.urls.is_empty() {
            return Err(StoreError::new("no Redis URL given"));
        }
        let tls_urls = self.urls.iter().filter(|u| is_rediss(u)).count();
        if tls_urls != 0 && tls_urls != self.urls.len() {
            return Err(StoreError::new(format!(
                "mixing redis:// and rediss:// URLs ({}): a cluster is reached over TLS or not at all",
                target.redacted
            )));
        }
        if tls_urls != 0
            && (self.tls.accepts_invalid_certs()
                || self.urls.iter().any(|u| u.contains("#insecure")))
        {
            return Err(StoreError::new(format!(
                "refusing to connect to Redis at {} without certificate verification: give the server's CA with a CA file instead",
                target.redacted
            )));
        }
        Ok(())
    }

    /// The custom TLS files, if any (`None`: the URL's own TLS mode, system roots).
    #[cfg(feature = "tls")]
    fn certificates(&self) -> Option<redis::TlsCertificates> {
        (!self.tls.is_default()).then(|| redis::TlsCertificates {
            client_tls: self
                .tls
                .client_identity_pem()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.to_vec(),
                    client_key: key.to_vec(),
                }),
            root_cert: self.tls.ca_pem().map(<[u8]>::to_vec),
        })
    }

    fn single_client(&self, target: &Target) -> Result<redis::Client, StoreError> {
        let url = self.urls[0].as_str();
        #[cfg(feature = "tls")]
        if is_rediss(url) {
            if let Some(certificates) = self.certificates() {
                return redis::Client::build_with_tls(url, certificates)
                    .map_err(|e| target.error("invalid Redis URL or TLS files", &e));
            }
        }
        redis::Client::open(url).map_err(|e| target.error("invalid Redis URL", &e))
    }

    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(self.retries)
            .set_min_delay(self.min_delay)
            .set_max_delay(self.max_delay)
            .set_exponent_base(2.0)
    }

    fn cluster_client(&self, target: &Target) -> Result<ClusterClient, StoreError> {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        #[allow(unused_mut)] // mutated only with TLS
        let mut builder = ClusterClient::builder(self.urls.iter().map(String::as_str))
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.response_timeout)
            .retries(u32::try_from(self.retries).unwrap_or(u32::MAX))
            .min_retry_wait(millis(self.min_delay))
            .max_retry_wait(millis(self.max_delay));
        #[cfg(feature = "tls")]
        if is_rediss(&self.urls[0]) {
            if let Some(certificates) = self.certificates() {
                builder = builder.certs(certificates);
            }
        }
        builder
            .build()
            .map_err(|e| target.error("invalid Redis Cluster URLs or TLS files", &e))
    }

    fn cluster_config(&self) -> ClusterConfig {
        ClusterConfig::new()
            .set_connection_timeout(self.connect_timeout)
            .set_response_timeout(self.response_timeout)
    }

    fn finish(&self, conn: RedisConnection, target: Target) -> RedisStore {
        RedisStore::assemble(conn, self.prefix.clone(), target, self.max_batch)
    }

    /// Connects now: fails if Redis is unreachable (fast, see the defaults). On a
    /// cluster, fails unless a seed node answers with the cluster's slot map.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let target = Target::new(&self.urls);
        self.check(&target)?;
        let conn = if self.is_cluster() {
            let client = self.cluster_client(&target)?;
            let conn = client
                .get_async_connection_with_config(self.cluster_config())
                .await
                .map_err(|e| target.connect_error("cannot connect to the Redis Cluster", &e))?;
            RedisConnection::cluster(conn)
        } else {
            let client = self.single_client(&target)?;
            let conn = ConnectionManager::new_with_config(client, self.manager_config())
                .await
                .map_err(|e| target.connect_error("cannot connect to Redis", &e))?;
            RedisConnection::single(conn)
        };
        Ok(self.finish(conn, target))
    }

    /// Connects on first use: never fails for an unreachable Redis (the operations do,
    /// with a [`StoreError`], until it is reachable).
    pub fn connect_lazy(self) -> Result<RedisStore, StoreError> {
        let target = Target::new(&self.urls);
        self.check(&target)?;
        let conn = if self.is_cluster() {
            let client = self.cluster_client(&target)?;
            RedisConnection::cluster(
                client.get_pending_async_connection_with_config(self.cluster_config()),
            )
        } else {
            let client = self.single_client(&target)?;
            let conn = ConnectionManager::new_lazy_with_config(client, self.manager_config())
                .map_err(|e| target.error("cannot set up the Redis connection", &e))?;
            RedisConnection::single(conn)
        };
        Ok(self.finish(conn, target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_urls_mean_a_cluster() {
        let b = RedisStoreBuilder::new("redis://127.0.0.1:7001, redis://127.0.0.1:7002,");
        assert_eq!(b.urls.len(), 2);
        assert!(b.is_cluster());
        let one = RedisStoreBuilder::new("redis://127.0.0.1:7001");
        assert!(!one.is_cluster());
        assert!(one.cluster(true).is_cluster());
    }

    #[test]
    fn debug_shows_no_password() {
        let b = RedisStoreBuilder::new("redis://u:hunter2@a:1,redis://u:hunter2@b:2");
        let s = format!("{b:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("redis://u:***@a:1,redis://u:***@b:2"), "{s}");
    }

    #[test]
    fn mixed_tls_and_empty_lists_are_refused() {
        let b = RedisStoreBuilder::new("redis://a:1,rediss://b:2");
        let err = b.check(&Target::new(&b.urls)).unwrap_err();
        assert!(err.to_string().contains("mixing"), "{err}");
        let b = RedisStoreBuilder::new(" , ");
        assert!(b.check(&Target::new(&b.urls)).is_err());
    }
}
