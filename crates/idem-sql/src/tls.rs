//! TLS for the SQL connections: turns a database URL plus an [`idem_core::TlsConfig`]
//! into sqlx connect options with verified certificates.
//!
//! The stores and the inbox use the pool you give them, so TLS is whatever that pool
//! was built with. Build it from [`pg_connect_options`] (or [`mysql_connect_options`])
//! to get idem's rules, which are stricter than libpq's where libpq would encrypt
//! without checking anything:
//!
//! | URL says | idem connects with |
//! |---|---|
//! | `sslmode=verify-full` | TLS, certificate chain and host name verified |
//! | `sslmode=require` | the same as `verify-full` (libpq would skip verification) |
//! | `sslmode=verify-ca` | TLS, chain verified, host name **not** checked (a warning is logged) |
//! | no `sslmode`, `prefer`, `allow` | as libpq (TLS if the server offers it, unverified: no protection against an active attacker), unless the `TlsConfig` names a CA file or a client certificate: then `verify-full` |
//! | `sslmode=disable` | plain text |
//!
//! The CA comes from `sslrootcert=` in the URL or from [`TlsConfig::with_ca_file`]
//! (trusted in addition to the system roots); the client certificate from
//! `sslcert=`/`sslkey=` or [`TlsConfig::with_client_identity`]. Only
//! [`TlsConfig::danger_accept_invalid_certs`] turns verification off (as `require`
//! without checks); every connect options built with it logs a warning.
//! MySQL/MariaDB follow the same table with `ssl-mode=VERIFY_IDENTITY`, `REQUIRED`,
//! `VERIFY_CA`, `PREFERRED` and `DISABLED`.

use idem_core::redact::redact_url;
use idem_core::TlsConfig;

/// The connect options `$options` parsed from `$url` (an error without the password),
/// with the CA (set by the driver's `$ca`) and the client identity of `$tls`.
#[cfg(any(feature = "postgres", feature = "mysql"))]
macro_rules! with_certificates {
    ($options:ty, $ca:ident, $url:expr, $tls:expr) => {{
        let mut options: $options = $url.parse().map_err(|e: sqlx::Error| {
            sqlx::Error::Configuration(idem_core::redact::redact_in(&e.to_string(), $url).into())
        })?;
        if let Some(pem) = $tls.ca_pem() {
            options = options.$ca(pem.to_vec());
        }
        if let Some((cert, key)) = $tls.client_identity_pem() {
            options = options
                .ssl_client_cert_from_pem(cert)
                .ssl_client_key_from_pem(key);
        }
        options
    }};
}

/// PostgreSQL connect options for `url` with `tls` applied (see the [module docs](self)).
/// The error never contains the password.
#[cfg(feature = "postgres")]
pub fn pg_connect_options(
    url: &str,
    tls: &TlsConfig,
) -> Result<sqlx::postgres::PgConnectOptions, sqlx::Error> {
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    let options = with_certificates!(PgConnectOptions, ssl_root_cert_from_pem, url, tls);
    let level = match options.get_ssl_mode() {
        PgSslMode::Disable => Level::Off,
        PgSslMode::Allow | PgSslMode::Prefer => Level::Opportunistic,
        PgSslMode::Require => Level::Required,
        PgSslMode::VerifyCa => Level::VerifyCa,
        PgSslMode::VerifyFull => Level::VerifyFull,
    };
    let mode = match level.apply(tls, "PostgreSQL", url) {
        // `allow` and `prefer` stay what the URL said.
        Level::Opportunistic => options.get_ssl_mode(),
        Level::Off => PgSslMode::Disable,
        Level::Required => PgSslMode::Require,
        Level::VerifyCa => PgSslMode::VerifyCa,
        Level::VerifyFull => PgSslMode::VerifyFull,
    };
    Ok(options.ssl_mode(mode))
}

/// MySQL/MariaDB connect options for `url` with `tls` applied (see the
/// [module docs](self)). The error never contains the password.
#[cfg(feature = "mysql")]
pub fn mysql_connect_options(
    url: &str,
    tls: &TlsConfig,
) -> Result<sqlx::mysql::MySqlConnectOptions, sqlx::Error> {
    use sqlx::mysql::{MySqlConnectOptions, MySqlSslMode};
    let options = with_certificates!(MySqlConnectOptions, ssl_ca_from_pem, url, tls);
    let level = match options.get_ssl_mode() {
        MySqlSslMode::Disabled => Level::Off,
        MySqlSslMode::Preferred => Level::Opportunistic,
        MySqlSslMode::Required => Level::Required,
        MySqlSslMode::VerifyCa => Level::VerifyCa,
        MySqlSslMode::VerifyIdentity => Level::VerifyFull,
    };
    let mode = match level.apply(tls, "MySQL", url) {
        Level::Off => MySqlSslMode::Disabled,
        Level::Opportunistic => MySqlSslMode::Preferred,
        Level::Required => MySqlSslMode::Required,
        Level::VerifyCa => MySqlSslMode::VerifyCa,
        Level::VerifyFull => MySqlSslMode::VerifyIdentity,
    };
    Ok(options.ssl_mode(mode))
}

/// A driver's TLS mode in idem's terms, so both databases share one rule (the table in
/// the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    /// Plain text.
    Off,
    /// TLS if the server offers it, unverified (libpq's `prefer`, `allow`).
    Opportunistic,
    /// TLS without verification (only with `danger_accept_invalid_certs`).
    Required,
    /// Chain verified, host name not.
    VerifyCa,
    /// Chain and host name verified.
    VerifyFull,
}

impl Level {
    /// The mode idem connects with when the URL asks for `self`.
    fn apply(self, tls: &TlsConfig, db: &str, url: &str) -> Level {
        match self {
            Level::Off => Level::Off,
            _ if tls.accepts_invalid_certs() => {
                warn_insecure(db, &redact_url(url));
                Level::Required
            }
            Level::Required | Level::VerifyFull => Level::VerifyFull,
            Level::VerifyCa => {
                warn_no_host_check(db, &redact_url(url));
                Level::VerifyCa
            }
            Level::Opportunistic if tls.is_default() => Level::Opportunistic,
            Level::Opportunistic => Level::VerifyFull,
        }
    }
}

fn warn_insecure(db: &str, target: &str) {
    tracing::warn!(
        url = %target,
        "TLS CERTIFICATE VERIFICATION IS OFF for {db}: danger_accept_invalid_certs was set; anyone on the network path can read and change this connection's traffic"
    );
}

fn warn_no_host_check(db: &str, target: &str) {
    tracing::warn!(
        url = %target,
        "TLS host name verification is off for {db} (verify-ca): any certificate from the trusted CA is accepted; use verify-full"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks each `(query, insecure, mode)`: `url?query` with the default `TlsConfig`
    /// (or one accepting invalid certificates) connects in `mode`, as `connect_mode`
    /// names it.
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    fn assert_modes(
        url: &str,
        connect_mode: impl Fn(&str, &TlsConfig) -> String,
        cases: &[(&str, bool, &str)],
    ) {
        for &(query, insecure, expected) in cases {
            let tls = if insecure {
                TlsConfig::new().danger_accept_invalid_certs()
            } else {
                TlsConfig::default()
            };
            let mode = connect_mode(&format!("{url}?{query}"), &tls);
            assert_eq!(mode, expected, "{query}, insecure: {insecure}");
        }
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn pg_modes() {
        assert_modes(
            "postgres://u:p@db:5432/x",
            |url, tls| format!("{:?}", pg_connect_options(url, tls).unwrap().get_ssl_mode()),
            &[
                ("sslmode=require", false, "VerifyFull"),
                ("sslmode=verify-full", false, "VerifyFull"),
                ("sslmode=verify-ca", false, "VerifyCa"),
                ("sslmode=disable", false, "Disable"),
                ("sslmode=prefer", false, "Prefer"),
                ("sslmode=verify-full", true, "Require"),
                ("sslmode=disable", true, "Disable"),
            ],
        );
        let e = pg_connect_options("postgres://u:hunter2@db:notaport/x", &TlsConfig::default())
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[cfg(feature = "mysql")]
    #[test]
    fn mysql_modes() {
        assert_modes(
            "mysql://u:p@db:3306/x",
            |url, tls| {
                format!(
                    "{:?}",
                    mysql_connect_options(url, tls).unwrap().get_ssl_mode()
                )
            },
            &[
                ("ssl-mode=REQUIRED", false, "VerifyIdentity"),
                ("ssl-mode=DISABLED", false, "Disabled"),
                ("ssl-mode=VERIFY_CA", false, "VerifyCa"),
                ("ssl-mode=VERIFY_IDENTITY", true, "Required"),
            ],
        );
    }
}
