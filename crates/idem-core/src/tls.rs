//! TLS settings shared by every idem connection (RabbitMQ, Redis, PostgreSQL/MySQL).
//!
//! A [`TlsConfig`] says whom to trust and who we are; the scheme of the URL says
//! whether TLS is used at all (`amqps://`, `rediss://`, `sslmode=...`). The transport
//! crates (`idem-amqp`, `idem-redis`, `idem-sql`, `idem-outbox`) turn it into their
//! client's settings; all of them use rustls.
//!
//! - **Verified by default.** [`TlsConfig::default()`] trusts the operating system's
//!   root certificates (read with `rustls-native-certs`, i.e. the system CA bundle,
//!   `SSL_CERT_FILE`/`SSL_CERT_DIR` honoured) and checks the server's host name.
//! - **Private CA.** [`TlsConfig::with_ca_file`] adds a PEM CA bundle. RabbitMQ and
//!   PostgreSQL/MySQL then trust the system roots *and* that CA; Redis trusts that CA
//!   *only* (what each client library does with a custom root).
//! - **Mutual TLS.** [`TlsConfig::with_client_identity`] presents a client certificate
//!   chain and its private key (PEM; PKCS#8, PKCS#1 or SEC1 key). The key is read
//!   into memory and never printed (`Debug` shows only whether one is set).
//! - **No verification** exists only as [`TlsConfig::danger_accept_invalid_certs`],
//!   honoured by the PostgreSQL/MySQL connections alone (RabbitMQ and Redis refuse to
//!   connect with it: give them the CA instead). Every connection made with it logs a
//!   warning. It is never the default and no URL turns it on by itself.
//!
//! [`TlsConfig::from_env`] reads `IDEM_TLS_CA`, `IDEM_TLS_CERT` and `IDEM_TLS_KEY`.
//! [`TlsFailure::classify`] names the usual handshake failures (unknown CA, wrong host
//! name, expired certificate, client certificate refused) from an error text, so that
//! tools can tell them from an unreachable host or a refused login.

use std::fmt;
use std::path::{Path, PathBuf};

/// Environment variable naming a PEM CA bundle to trust (see [`TlsConfig::from_env`]).
pub const ENV_TLS_CA: &str = "IDEM_TLS_CA";
/// Environment variable naming a PEM client certificate chain (mutual TLS).
pub const ENV_TLS_CERT: &str = "IDEM_TLS_CERT";
/// Environment variable naming the PEM private key of [`ENV_TLS_CERT`].
pub const ENV_TLS_KEY: &str = "IDEM_TLS_KEY";

/// Whom to trust and which client certificate to present on TLS connections.
/// See the [module docs](self).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    ca: Option<(PathBuf, Vec<u8>)>,
    identity: Option<ClientIdentity>,
    accept_invalid_certs: bool,
}

#[derive(Clone, PartialEq, Eq)]
struct ClientIdentity {
    cert_path: PathBuf,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_file", &self.ca.as_ref().map(|(p, _)| p))
            .field("client_cert", &self.identity.as_ref().map(|i| &i.cert_path))
            .field(
                "client_key",
                &self.identity.as_ref().map(|_| "(set, not shown)"),
            )
            .field("accept_invalid_certs", &self.accept_invalid_certs)
            .finish()
    }
}

/// A TLS file that cannot be used. Names the file, never its contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// The file could not be read.
    #[error("cannot read TLS {what} file {path}: {source}")]
    Read {
        /// `CA`, `client certificate` or `client key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no PEM block of the expected kind.
    #[error("TLS {what} file {path} holds no PEM {expected} block")]
    NotPem {
        /// `CA`, `client certificate` or `client key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The PEM label looked for.
        expected: &'static str,
    },
    /// A client certificate without its key, or a key without its certificate.
    #[error("mutual TLS needs both a client certificate and its key; only the {given} was given")]
    Incomplete {
        /// What was given.
        given: &'static str,
    },
}

fn read_pem(
    path: &Path,
    what: &'static str,
    expected: &'static str,
    ok: impl Fn(&str) -> bool,
) -> Result<Vec<u8>, TlsConfigError> {
    let bytes = std::fs::read(path).map_err(|source| TlsConfigError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .filter_map(|l| l.strip_suffix("-----"))
        .any(ok);
    if !found {
        return Err(TlsConfigError::NotPem {
            what,
            path: path.to_owned(),
            expected,
        });
    }
    Ok(bytes)
}

impl TlsConfig {
    /// Verified TLS against the system roots, no client certificate (the default).
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the CA certificate(s) in the PEM file `path` too. The file is read now;
    /// a missing file or one without a `CERTIFICATE` block is an error.
    pub fn with_ca_file(mut self, path: impl AsRef<Path>) -> Result<Self, TlsConfigError> {
        let path = path.as_ref();
        let pem = read_pem(path, "CA", "CERTIFICATE", |l| l == "CERTIFICATE")?;
        self.ca = Some((path.to_owned(), pem));
        Ok(self)
    }

    /// Presents the client certificate chain in `cert` (PEM) with the private key in
    /// `key` (PEM: `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`) for mutual TLS.
    /// Both files are read now.
    pub fn with_client_identity(
        mut self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsConfigError> {
        let cert = cert.as_ref();
        let cert_pem = read_pem(cert, "client certificate", "CERTIFICATE", |l| {
            l == "CERTIFICATE"
        })?;
        let key_pem = read_pem(key.as_ref(), "client key", "PRIVATE KEY", |l| {
            l.ends_with("PRIVATE KEY") && !l.contains("ENCRYPTED")
        })?;
        self.identity = Some(ClientIdentity {
            cert_path: cert.to_owned(),
            cert_pem,
            key_pem,
        });
        Ok(self)
    }

    /// Builds a config from optional files, as the CLI flags `--tls-ca`, `--tls-cert`
    /// and `--tls-key` give them. A certificate without a key (or the reverse) is an
    /// error.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, TlsConfigError> {
        let mut config = Self::new();
        if let Some(ca) = ca {
            config = config.with_ca_file(ca)?;
        }
        match (cert, key) {
            (Some(cert), Some(key)) => config = config.with_client_identity(cert, key)?,
            (Some(_), None) => {
                return Err(TlsConfigError::Incomplete {
                    given: "certificate",
                })
            }
            (None, Some(_)) => return Err(TlsConfigError::Incomplete { given: "key" }),
            (None, None) => {}
        }
        Ok(config)
    }

    /// Reads `IDEM_TLS_CA`, `IDEM_TLS_CERT` and `IDEM_TLS_KEY` (file paths; unset or
    /// empty means not given). With none set this is [`TlsConfig::default()`].
    pub fn from_env() -> Result<Self, TlsConfigError> {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let (ca, cert, key) = (var(ENV_TLS_CA), var(ENV_TLS_CERT), var(ENV_TLS_KEY));
        Self::from_files(ca.as_deref(), cert.as_deref(), key.as_deref())
    }

    /// Turns certificate and host name verification **off**. Anyone on the network
    /// path can then read and change the traffic. Only the SQL connections honour it
    /// (RabbitMQ and Redis connections fail with it); each such connection logs a
    /// warning. Meant for a throwaway test server, never for production.
    pub fn danger_accept_invalid_certs(mut self) -> Self {
        self.accept_invalid_certs = true;
        self
    }

    /// Whether [`danger_accept_invalid_certs`](Self::danger_accept_invalid_certs) was
    /// called.
    pub fn accepts_invalid_certs(&self) -> bool {
        self.accept_invalid_certs
    }

    /// The PEM bytes of the extra CA bundle, if one was given.
    pub fn ca_pem(&self) -> Option<&[u8]> {
        self.ca.as_ref().map(|(_, pem)| pem.as_slice())
    }

    /// The path of the extra CA bundle, if one was given.
    pub fn ca_path(&self) -> Option<&Path> {
        self.ca.as_ref().map(|(path, _)| path.as_path())
    }

    /// The client certificate chain and key (PEM), if mutual TLS is configured.
    pub fn client_identity_pem(&self) -> Option<(&[u8], &[u8])> {
        self.identity
            .as_ref()
            .map(|i| (i.cert_pem.as_slice(), i.key_pem.as_slice()))
    }

    /// True when nothing differs from the default (system roots, no client
    /// certificate, verification on).
    pub fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

/// Why a TLS handshake failed, as far as the error text tells. See
/// [`TlsFailure::classify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The server's certificate is not signed by a trusted CA (wrong or missing
    /// `--tls-ca`).
    UnknownCa,
    /// The certificate is valid but not for the host name connected to.
    WrongHostName,
    /// The certificate (or one in its chain) has expired or is not valid yet.
    Expired,
    /// The server refused us for our client certificate (missing, or not signed by a
    /// CA it trusts).
    ClientCertificateRefused,
    /// The server closed the connection during or right after the TLS handshake.
    /// With TLS 1.3 a server that refuses a (missing) client certificate says so with
    /// an alert that can be lost to the connection reset that follows, so this is most
    /// often a client certificate problem. Only reported by
    /// [`classify_tls_connect`](TlsFailure::classify_tls_connect).
    ClosedDuringHandshake,
    /// Another TLS error (protocol mismatch, bad certificate file, plain-text server
    /// on a TLS URL...).
    Other,
}

impl TlsFailure {
    /// Recognises a TLS failure in an error text from lapin, redis-rs or sqlx (all of
    /// which carry rustls's messages). `None` when the text is not about TLS.
    pub fn classify(text: &str) -> Option<TlsFailure> {
        let t = text.to_ascii_lowercase();
        if t.contains("unknownissuer") || t.contains("unknown issuer") {
            return Some(TlsFailure::UnknownCa);
        }
        if t.contains("notvalidforname") || t.contains("not valid for name") {
            return Some(TlsFailure::WrongHostName);
        }
        if t.contains("certificate expired")
            || t.contains("expired") && (t.contains("certificate") || t.contains("invalid peer"))
            || t.contains("notvalidyet")
            || t.contains("not valid yet")
        {
            return Some(TlsFailure::Expired);
        }
        if t.contains("certificaterequired")
            || t.contains("certificate required")
            || t.contains("alert: badcertificate")
            || t.contains("alert: unknownca")
            || t.contains("alert: handshakefailure")
            || t.contains("alert: decrypterror")
            || t.contains("requires a valid client certificate")
        {
            return Some(TlsFailure::ClientCertificateRefused);
        }
        let tls_words = [
            "invalid peer certificate",
            "received fatal alert",
            "tls handshake",
            "tls error",
            "invalidcontenttype",
            "invalid content type",
            "corrupt message",
            "peer is incompatible",
            "peerincompatible",
            "tls connection",
            "does not support tls",
            "handshake",
        ];
        if tls_words.iter().any(|w| t.contains(w)) {
            return Some(TlsFailure::Other);
        }
        None
    }

    /// [`classify`](Self::classify) for the error of a connection attempt to a TLS
    /// URL: there, a connection reset or an unexpected end of stream is also a TLS
    /// failure ([`TlsFailure::ClosedDuringHandshake`]).
    pub fn classify_tls_connect(text: &str) -> Option<TlsFailure> {
        Self::classify(text).or_else(|| {
            let t = text.to_ascii_lowercase();
            let closed = [
                "connection reset",
                "unexpected eof",
                "unexpectedeof",
                "broken pipe",
                "peer closed connection",
                "connection closed",
            ];
            closed
                .iter()
                .any(|w| t.contains(w))
                .then_some(TlsFailure::ClosedDuringHandshake)
        })
    }

    /// A one-line hint for an operator.
    pub fn hint(self) -> &'static str {
        match self {
            TlsFailure::UnknownCa => "the server's certificate is not signed by a trusted CA: give the CA with --tls-ca / IDEM_TLS_CA (or sslrootcert= for PostgreSQL)",
            TlsFailure::WrongHostName => "the server's certificate is not valid for the host name in the URL: connect with a name the certificate lists",
            TlsFailure::Expired => "a certificate in the chain has expired or is not valid yet: renew it (or check the clock)",
            TlsFailure::ClientCertificateRefused => "the server refused the client certificate: give a certificate and key it trusts with --tls-cert/--tls-key (IDEM_TLS_CERT/IDEM_TLS_KEY)",
            TlsFailure::ClosedDuringHandshake => "the server closed the connection during the TLS handshake: most often it requires a client certificate it trusts (--tls-cert/--tls-key, IDEM_TLS_CERT/IDEM_TLS_KEY)",
            TlsFailure::Other => "TLS handshake failed: check that the port speaks TLS and the TLS files",
        }
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFailure::UnknownCa => "certificate signed by an unknown CA",
            TlsFailure::WrongHostName => "certificate not valid for this host name",
            TlsFailure::Expired => "certificate expired or not yet valid",
            TlsFailure::ClientCertificateRefused => "client certificate refused",
            TlsFailure::ClosedDuringHandshake => {
                "connection closed during the TLS handshake (client certificate refused?)"
            }
            TlsFailure::Other => "TLS handshake failed",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Texts as rustls 0.23 prints them (through lapin, redis-rs and sqlx).
    #[test]
    fn classifies_rustls_messages() {
        let classify = TlsFailure::classify;
        let during_connect = TlsFailure::classify_tls_connect;
        type Classifier = fn(&str) -> Option<TlsFailure>;
        let cases: [(Classifier, &str, Option<TlsFailure>); 13] = [
            (classify, "invalid peer certificate: UnknownIssuer", Some(TlsFailure::UnknownCa)),
            (classify, "io error: invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate is only valid for DnsName(\"localhost\")", Some(TlsFailure::WrongHostName)),
            (classify, "invalid peer certificate: certificate expired: verification time 1764000000 (UNIX), but certificate is not valid after 1700000000 (64000000 seconds ago)", Some(TlsFailure::Expired)),
            (classify, "received fatal alert: CertificateRequired", Some(TlsFailure::ClientCertificateRefused)),
            (classify, "error returned from database: connection requires a valid client certificate", Some(TlsFailure::ClientCertificateRefused)),
            (classify, "received corrupt message of type InvalidContentType", Some(TlsFailure::Other)),
            (classify, "error occurred while attempting to establish a TLS connection: server does not support TLS", Some(TlsFailure::Other)),
            (classify, "Connection refused (os error 111)", None),
            (classify, "IO error: Connection reset by peer (os error 104)", None),
            (during_connect, "IO error: Connection reset by peer (os error 104)", Some(TlsFailure::ClosedDuringHandshake)),
            (during_connect, "Connection refused (os error 111)", None),
            (classify, "password authentication failed for user \"tls_ssl_user\"", None),
            (classify, "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN", None),
        ];
        for (classify, text, expected) in cases {
            assert_eq!(classify(text), expected, "{text}");
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn files_are_checked_and_key_never_printed() {
        let dir = std::env::temp_dir().join(format!("idem-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = write(
            &dir,
            "c.pem",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        );
        let key = write(
            &dir,
            "k.pem",
            "-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES\n-----END PRIVATE KEY-----\n",
        );
        let cfg = TlsConfig::from_files(Some(&cert), Some(&cert), Some(&key)).unwrap();
        assert!(cfg.ca_pem().is_some());
        assert!(cfg.client_identity_pem().is_some());
        assert!(!cfg.is_default());
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("SECRETKEYBYTES"), "{shown}");

        // A key where the CA should be, a missing file, half an identity: clear errors.
        let e = TlsConfig::new().with_ca_file(&key).unwrap_err().to_string();
        assert!(e.contains("no PEM CERTIFICATE"), "{e}");
        assert!(!e.contains("SECRETKEYBYTES"), "{e}");
        let e = TlsConfig::new()
            .with_ca_file(dir.join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read TLS CA file"), "{e}");
        let e = TlsConfig::from_files(None, Some(&cert), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only the certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(TlsConfig::default().is_default());
        assert!(!TlsConfig::default().accepts_invalid_certs());
    }
}
