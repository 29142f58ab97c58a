//! Several broker URLs for one logical broker (the nodes of a RabbitMQ cluster).
//!
//! Every place idem opens an AMQP connection ([`Worker`](crate::Worker),
//! [`Publisher`](crate::Publisher), the outbox relay, the `idem` CLI,
//! [`connect`](crate::connect)) takes [`Endpoints`]: one URL or several. A string
//! converts, split on commas, so `AMQP_URL=amqp://mq1:5672,amqp://mq2:5672` works
//! wherever a URL does; a list of strings converts too.
//!
//! The rules:
//!
//! - **In order, first that answers**: a connection tries the URLs in the order given
//!   and keeps the first one that completes the AMQP handshake. Each try is bounded by
//!   [`Endpoints::ATTEMPT_TIMEOUT`], so a node that swallows packets does not hold up
//!   the others.
//! - **Rotation after a loss**: the next connection made through the same
//!   `Endpoints` value (the worker's or publisher's reconnect after the broker closed
//!   the connection) starts with the URL *after* the one last connected, and wraps
//!   around. A node that went down is so tried last rather than first, and the
//!   surviving nodes are not kept waiting behind it. A clone starts from the clone's
//!   position at the time of cloning and rotates on its own.
//! - **Errors name every try**: when no URL answers, the error is
//!   [`Error::NoEndpoint`](crate::Error::NoEndpoint) listing each URL (password
//!   redacted) with its own failure. With a single URL the error is that URL's own
//!   ([`Error::Connect`](crate::Error::Connect), [`Error::Refused`](crate::Error::Refused),
//!   [`Error::Tls`](crate::Error::Tls)), as before.
//! - A refused login or a TLS failure on one node does not stop the tries: another
//!   node may have the user (a half-applied rollout); each failure is listed.
//! - All URLs share the connection name and the TLS settings; mixing `amqp://` and
//!   `amqps://` is allowed (each URL's scheme decides).
//! - A comma cannot appear unencoded inside one URL: write a comma in a password as
//!   `%2C`. Spaces around the commas are ignored, and empty items are skipped.
//!
//! ```
//! use idem_amqp::Endpoints;
//!
//! let e = Endpoints::from("amqp://u:secret@mq1:5672/%2f, amqp://u:secret@mq2:5672/%2f");
//! assert_eq!(e.len(), 2);
//! assert_eq!(e.to_string(), "amqp://u:***@mq1:5672/%2f,amqp://u:***@mq2:5672/%2f");
//! let same = Endpoints::from(["amqp://u:secret@mq1:5672/%2f", "amqp://u:secret@mq2:5672/%2f"]);
//! assert_eq!(e.urls(), same.urls());
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem_core::TlsConfig;
use lapin::Connection;

use crate::error::Error;
use crate::url::redact_url;

/// One or more AMQP URLs of one broker (cluster). See the [module docs](self).
pub struct Endpoints {
    urls: Vec<String>,
    /// Index of the URL the next connection tries first.
    next: AtomicUsize,
}

impl Endpoints {
    /// The longest one connection attempt to one URL may take (TCP, TLS and AMQP
    /// handshakes) before the next URL is tried.
    pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

    /// The URLs of a comma-separated list (spaces around items ignored, empty items
    /// skipped). Same as `Endpoints::from(list)`.
    pub fn parse(list: &str) -> Self {
        Self::from_urls(
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    /// `AMQP_URL` from the environment (a comma-separated list is several
    /// endpoints), else [`DEFAULT_AMQP_URL`](crate::DEFAULT_AMQP_URL).
    pub fn from_env() -> Self {
        Self::parse(&crate::url::amqp_url_from_env())
    }

    fn from_urls(urls: Vec<String>) -> Self {
        Endpoints {
            urls,
            next: AtomicUsize::new(0),
        }
    }

    /// The URLs, in the order they are tried first (passwords included: do not log
    /// them; [`Display`](std::fmt::Display) redacts).
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// How many URLs.
    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// Whether there is no URL at all (connecting then fails at once).
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// Opens a connection named `name`: tries each URL once, starting with the one
    /// after the URL last connected (the first URL the first time), and returns the
    /// first connection that opens. See the [module docs](self).
    pub async fn connect(&self, name: &str, tls: &TlsConfig) -> Result<Connection, Error> {
        let (conn, _) = self.connect_indexed(name, tls).await?;
        Ok(conn)
    }

    /// [`connect`](Self::connect), also returning the redacted URL connected to.
    pub(crate) async fn connect_indexed(
        &self,
        name: &str,
        tls: &TlsConfig,
    ) -> Result<(Connection, String), Error> {
        let n = self.urls.len();
        if n == 0 {
            return Err(Error::NoEndpoint {
                tried: Vec::new(),
                errors: Vec::new(),
            });
        }
        let start = self.next.load(Ordering::Relaxed) % n;
        let mut tried = Vec::new();
        let mut errors = Vec::new();
        for i in (0..n).map(|k| (start + k) % n) {
            let url = &self.urls[i];
            let attempt = crate::tls::connect_one(url, name, tls);
            let result = match tokio::time::timeout(Self::ATTEMPT_TIMEOUT, attempt).await {
                Ok(r) => r,
                Err(_) => Err(Error::Connect {
                    url: redact_url(url),
                    detail: format!("no answer within {}s", Self::ATTEMPT_TIMEOUT.as_secs()),
                }),
            };
            match result {
                Ok(conn) => {
                    self.next.store((i + 1) % n, Ordering::Relaxed);
                    if !errors.is_empty() {
                        tracing::warn!(connected = %redact_url(url), skipped = %tried.join(", "), "connected to a later broker endpoint; the earlier ones did not answer");
                    }
                    return Ok((conn, redact_url(url)));
                }
                Err(e) if n == 1 => return Err(e),
                Err(e) => {
                    tracing::warn!(url = %redact_url(url), error = %e, "broker endpoint did not answer; trying the next");
                    tried.push(redact_url(url));
                    errors.push(e);
                }
            }
        }
        Err(Error::NoEndpoint { tried, errors })
    }
}

impl Clone for Endpoints {
    fn clone(&self) -> Self {
        Endpoints {
            urls: self.urls.clone(),
            next: AtomicUsize::new(self.next.load(Ordering::Relaxed)),
        }
    }
}

impl PartialEq for Endpoints {
    /// Same URLs in the same order (the rotation position is ignored).
    fn eq(&self, other: &Self) -> bool {
        self.urls == other.urls
    }
}

impl Eq for Endpoints {}

/// The URLs, passwords redacted, comma-separated.
impl std::fmt::Display for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.write_str(&redacted.join(","))
    }
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_tuple("Endpoints").field(&redacted).finish()
    }
}

impl From<&str> for Endpoints {
    fn from(list: &str) -> Self {
        Self::parse(list)
    }
}

impl From<String> for Endpoints {
    fn from(list: String) -> Self {
        Self::parse(&list)
    }
}

impl From<&String> for Endpoints {
    fn from(list: &String) -> Self {
        Self::parse(list)
    }
}

impl From<&Endpoints> for Endpoints {
    fn from(e: &Endpoints) -> Self {
        e.clone()
    }
}

/// Each item is one URL (or itself a comma-separated list).
impl<S: AsRef<str>> From<Vec<S>> for Endpoints {
    fn from(urls: Vec<S>) -> Self {
        Self::from(urls.as_slice())
    }
}

/// Each item is one URL (or itself a comma-separated list).
impl<S: AsRef<str>> From<&[S]> for Endpoints {
    fn from(urls: &[S]) -> Self {
        Self::from_urls(
            urls.iter()
                .flat_map(|u| Self::parse(u.as_ref()).urls)
                .collect(),
        )
    }
}

/// Each item is one URL (or itself a comma-separated list).
impl<S: AsRef<str>, const N: usize> From<[S; N]> for Endpoints {
    fn from(urls: [S; N]) -> Self {
        Self::from(urls.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_on_commas_and_skip_blanks() {
        let e = Endpoints::from(" amqp://a:1 ,, amqp://b:2,");
        assert_eq!(e.urls(), ["amqp://a:1", "amqp://b:2"]);
        let e = Endpoints::from(vec!["amqp://a:1,amqp://b:2", "amqp://c:3"]);
        assert_eq!(e.len(), 3);
        assert!(Endpoints::from("").is_empty());
        assert!(Endpoints::from(" , ").is_empty());
    }

    #[test]
    fn display_and_debug_redact_every_password() {
        let e = Endpoints::from("amqp://u:hunter2@a/%2f,amqps://v:hunter3@b/%2f");
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!text.contains("hunter"), "{text}");
            assert!(text.contains("amqp://u:***@a/%2f"), "{text}");
            assert!(text.contains("amqps://v:***@b/%2f"), "{text}");
        }
    }

    #[tokio::test]
    async fn an_empty_list_fails_at_once() {
        let err = Endpoints::from("")
            .connect("t", &TlsConfig::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NoEndpoint { .. }), "{err}");
        assert!(err.to_string().contains("no RabbitMQ URL given"), "{err}");
    }

    #[tokio::test]
    async fn all_dead_names_each_endpoint_without_passwords() {
        let e =
            Endpoints::from("amqp://u:hunter2@127.0.0.1:1/%2f,amqp://u:hunter2@127.0.0.1:2/%2f");
        let err = e.connect("t", &TlsConfig::default()).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::NoEndpoint { .. }), "{text}");
        assert!(text.contains("127.0.0.1:1"), "{text}");
        assert!(text.contains("127.0.0.1:2"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        // The rotation does not move without a connection.
        assert_eq!(e.next.load(Ordering::Relaxed), 0);
    }
}
