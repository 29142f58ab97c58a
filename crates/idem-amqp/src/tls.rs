//! `amqps://` connections with verified certificates.
//!
//! With the `tls` feature (on by default) an `amqps://user:pass@host:5671/vhost` URL
//! connects over TLS with rustls: the server's certificate must chain to a system root
//! (or to the CA given with [`TlsConfig::with_ca_file`], which lapin trusts in addition
//! to the system roots) and be valid for the URL's host name. A client certificate
//! ([`TlsConfig::with_client_identity`]) is presented when given (mutual TLS).
//!
//! Verification cannot be turned off for RabbitMQ: a [`TlsConfig`] with
//! [`danger_accept_invalid_certs`](TlsConfig::danger_accept_invalid_certs) is refused
//! with [`Error::TlsSetup`]; give the server's CA instead. Without the `tls` feature an
//! `amqps://` URL is refused too, rather than talking plain AMQP to a TLS port.
//!
//! A failed handshake is an [`Error::Tls`] naming the cause ([`TlsFailure`]: unknown CA,
//! wrong host name, expired certificate, client certificate refused), distinct from
//! [`Error::Connect`] (broker unreachable) and [`Error::Refused`] (login refused).

use idem_core::{TlsConfig, TlsFailure};
use lapin::{Connection, ConnectionProperties};

use crate::endpoints::Endpoints;
use crate::error::Error;
use crate::url::{redact_url, scrub};

fn is_amqps(url: &str) -> bool {
    url.trim_start()
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("amqps://"))
}

/// Opens a connection named `name` to the first URL of `urls` that answers (one URL
/// or a comma-separated list; see [`crate::endpoints`], and [`Endpoints::connect`]
/// for a typed list), with the TLS settings `tls` (used only for `amqps://` URLs).
/// Errors never contain a password.
pub async fn connect_tls(urls: &str, name: &str, tls: &TlsConfig) -> Result<Connection, Error> {
    Endpoints::parse(urls).connect(name, tls).await
}

/// Opens a connection named `name` to the one URL `url`.
pub(crate) async fn connect_one(
    url: &str,
    name: &str,
    tls: &TlsConfig,
) -> Result<Connection, Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let tls_url = is_amqps(url);
    if tls_url && tls.accepts_invalid_certs() {
        return Err(Error::TlsSetup(format!(
            "{}: certificate verification cannot be turned off for RabbitMQ; give the broker's CA with a CA file (--tls-ca / IDEM_TLS_CA)",
            redact_url(url)
        )));
    }
    let result = open(url, props, tls, tls_url).await;
    let conn = result.map_err(|(detail, refused)| {
        let detail = scrub(&detail, url);
        match TlsFailure::classify_tls_connect(&detail).filter(|_| tls_url) {
            Some(failure) => Error::Tls {
                url: redact_url(url),
                failure,
                detail,
            },
            // The broker answered and refused the login: not "unreachable".
            None if refused => Error::Refused {
                url: redact_url(url),
                detail,
            },
            None => Error::Connect {
                url: redact_url(url),
                detail,
            },
        }
    })?;
    tracing::info!(url = %redact_url(url), connection = name, tls = tls_url, "connected to RabbitMQ");
    Ok(conn)
}

/// A connect error's text, and whether the broker refused the login.
fn describe(e: lapin::Error) -> (String, bool) {
    (e.to_string(), crate::error::is_refusal(&e))
}

#[cfg(feature = "tls")]
async fn open(
    url: &str,
    props: ConnectionProperties,
    tls: &TlsConfig,
    tls_url: bool,
) -> Result<Connection, (String, bool)> {
    if !tls_url || tls.is_default() {
        return Connection::connect(url, props).await.map_err(describe);
    }
    let config = lapin::tcp::OwnedTLSConfig {
        identity: tls
            .client_identity_pem()
            .map(|(cert, key)| lapin::tcp::OwnedIdentity::PKCS8 {
                pem: cert.to_vec(),
                key: key.to_vec(),
            }),
        cert_chain: tls
            .ca_pem()
            .map(|pem| String::from_utf8_lossy(pem).into_owned()),
    };
    let runtime = lapin::runtime::default_runtime().map_err(describe)?;
    Connection::connect_with_config(url, props, config, runtime)
        .await
        .map_err(describe)
}

#[cfg(not(feature = "tls"))]
async fn open(
    url: &str,
    props: ConnectionProperties,
    _tls: &TlsConfig,
    tls_url: bool,
) -> Result<Connection, (String, bool)> {
    if tls_url {
        return Err(("this build of idem-amqp has no TLS support (enable its `tls` feature) and refuses to send plain AMQP to an amqps:// URL".to_owned(), false));
    }
    Connection::connect(url, props).await.map_err(describe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqps_detection() {
        assert!(is_amqps("amqps://h"));
        assert!(is_amqps("AMQPS://h"));
        assert!(!is_amqps("amqp://h"));
        assert!(!is_amqps("amqp"));
    }

    #[tokio::test]
    async fn insecure_is_refused_for_rabbitmq() {
        let tls = TlsConfig::new().danger_accept_invalid_certs();
        let err = connect_tls("amqps://u:hunter2@127.0.0.1:1/%2f", "t", &tls)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TlsSetup(_)), "{err}");
        let text = err.to_string();
        assert!(text.contains("cannot be turned off"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
