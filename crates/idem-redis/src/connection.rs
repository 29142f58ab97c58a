//! The connection a store talks through (one Redis, or a Redis Cluster), and the
//! redaction of its URLs in errors and logs.

use std::fmt;

use idem_core::dedup::{StoreError, StoreErrorKind};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

/// The connection behind a [`RedisStore`](crate::RedisStore): a single Redis (through
/// redis-rs's reconnecting [`ConnectionManager`]) or a Redis Cluster (through redis-rs's
/// [`ClusterConnection`], which follows `MOVED`/`ASK` redirects and refreshes the slot
/// map after a failover). Both are multiplexed; cloning shares them.
///
/// It implements [`redis::aio::ConnectionLike`], so any redis-rs command runs on it
/// (`redis::cmd("PTTL").arg(key).query_async(&mut conn)`); on a cluster a command is
/// routed by its first key.
#[derive(Clone)]
pub struct RedisConnection(Inner);

#[derive(Clone)]
enum Inner {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConnection {
    pub(crate) fn single(conn: ConnectionManager) -> Self {
        RedisConnection(Inner::Single(conn))
    }

    pub(crate) fn cluster(conn: ClusterConnection) -> Self {
        RedisConnection(Inner::Cluster(conn))
    }

    /// Whether this is a Redis Cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self.0, Inner::Cluster(_))
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Inner::Single(_) => "RedisConnection::Single",
            Inner::Cluster(_) => "RedisConnection::Cluster",
        })
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Inner::Single(c) => c.req_packed_command(cmd),
            Inner::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Inner::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Inner::Single(c) => c.get_db(),
            Inner::Cluster(c) => c.get_db(),
        }
    }
}

/// The URLs a store connects to, printable without their passwords (idem-core's
/// redaction), and the scrubbing of those passwords out of driver error texts.
pub(crate) struct Target {
    urls: Vec<String>,
    /// The redacted URLs, comma-separated.
    pub(crate) redacted: String,
}

impl Target {
    pub(crate) fn new(urls: &[String]) -> Self {
        Target {
            redacted: urls
                .iter()
                .map(|u| idem_core::redact::redact_url(u))
                .collect::<Vec<_>>()
                .join(","),
            urls: urls.to_vec(),
        }
    }

    pub(crate) fn scrub(&self, text: &str) -> String {
        self.urls.iter().fold(text.to_owned(), |t, url| {
            idem_core::redact::redact_in(&t, url)
        })
    }

    fn is_tls(&self) -> bool {
        self.urls.iter().any(|u| is_rediss(u))
    }

    pub(crate) fn error(&self, what: &str, err: &RedisError) -> StoreError {
        self.error_with(what, err, idem_core::TlsFailure::classify)
    }

    /// [`error`](Self::error) for a connection attempt: a reset during the TLS
    /// handshake counts as a TLS failure too.
    pub(crate) fn connect_error(&self, what: &str, err: &RedisError) -> StoreError {
        self.error_with(what, err, idem_core::TlsFailure::classify_tls_connect)
    }

    fn error_with(
        &self,
        what: &str,
        err: &RedisError,
        classify: fn(&str) -> Option<idem_core::TlsFailure>,
    ) -> StoreError {
        let detail = self.scrub(&err.to_string());
        if self.is_tls() {
            if let Some(failure) = classify(&detail) {
                return StoreError::with_source(
                    format!(
                        "TLS handshake with Redis failed ({}): {failure}; {}",
                        self.redacted,
                        failure.hint()
                    ),
                    detail,
                )
                .with_kind(StoreErrorKind::Unavailable);
            }
        }
        let kind = if err.is_timeout() {
            StoreErrorKind::Timeout
        } else if err.is_io_error() || err.is_connection_refusal() || err.is_connection_dropped() {
            StoreErrorKind::Unavailable
        } else {
            StoreErrorKind::Refused
        };
        StoreError::with_source(format!("{what} ({})", self.redacted), detail).with_kind(kind)
    }
}

pub(crate) fn is_rediss(url: &str) -> bool {
    url.trim_start()
        .get(..9)
        .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_by_idem_core() {
        let urls = [
            "redis://127.0.0.1:6379",
            "redis://:pw@h:1/2",
            "redis://u:p@ss@h",
            "rediss://tok@h/0?x=@",
        ];
        for url in urls {
            let t = Target::new(&[url.to_owned()]);
            assert_eq!(t.redacted, idem_core::redact::redact_url(url), "{url}");
        }
        let t = Target::new(&["redis://u:hunter2@h".into(), "redis://u:sw0rd@g".into()]);
        assert_eq!(t.redacted, "redis://u:***@h,redis://u:***@g");
        assert_eq!(
            t.scrub("auth hunter2 failed, then sw0rd"),
            "auth *** failed, then ***"
        );
        assert!(!t.scrub("redis://u:hunter2@h").contains("hunter2"));
    }

    #[test]
    fn rediss_is_recognised_case_blind() {
        assert!(is_rediss(" REDISS://h"));
        assert!(!is_rediss("redis://h"));
    }
}
