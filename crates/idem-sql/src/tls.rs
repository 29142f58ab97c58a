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

/// PostgreSQL connect options for `url` with `tls` applied (see the [module docs](self)).
/// The error never contains the password.
#[cfg(feature = "postgres")]
pub fn pg_connect_options(
    url: &str,
    tls: &TlsConfig,
) -> Result<sqlx::postgres::PgConnectOptions, sqlx::Error> {
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    let mut options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
        sqlx::Error::Configuration(idem_core::redact::redact_in(&e.to_string(), url).into())
    })?;
    if let Some(pem) = tls.ca_pem() {
        options = options.ssl_root_cert_from_pem(pem.to_vec());
    }
    if let Some((cert, key)) = tls.client_identity_pem() {
        options = options
            .ssl_client_cert_from_pem(cert)
            .ssl_client_key_from_pem(key);
    }
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
    let mut options: MySqlConnectOptions = url.parse().map_err(|e: sqlx::Error| {
        sqlx::Error::Configuration(idem_core::redact::redact_in(&e.to_string(), url).into())
    })?;
    if let Some(pem) = tls.ca_pem() {
        options = options.ssl_ca_from_pem(pem.to_vec());
    }
    if let Some((cert, key)) = tls.client_identity_pem() {
        options = options
            .ssl_client_cert_from_pem(cert)
            .ssl_client_key_from_pem(key);
    }
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

    #[cfg(feature = "postgres")]
    #[test]
    fn pg_modes() {
        use sqlx::postgres::PgSslMode;
        let mode =
            |url: &str, tls: &TlsConfig| pg_connect_options(url, tls).unwrap().get_ssl_mode();
        let d = TlsConfig::default();
        let u = "postgres://u:p@db:5432/x";
        assert!(matches!(
            mode(&format!("{u}?sslmode=require"), &d),
            PgSslMode::VerifyFull
        ));
        assert!(matches!(
            mode(&format!("{u}?sslmode=verify-full"), &d),
            PgSslMode::VerifyFull
        ));
        assert!(matches!(
            mode(&format!("{u}?sslmode=verify-ca"), &d),
            PgSslMode::VerifyCa
        ));
        assert!(matches!(
            mode(&format!("{u}?sslmode=disable"), &d),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode(&format!("{u}?sslmode=prefer"), &d),
            PgSslMode::Prefer
        ));
        let insecure = TlsConfig::new().danger_accept_invalid_certs();
        assert!(matches!(
            mode(&format!("{u}?sslmode=verify-full"), &insecure),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode(&format!("{u}?sslmode=disable"), &insecure),
            PgSslMode::Disable
        ));
        let e = pg_connect_options("postgres://u:hunter2@db:notaport/x", &d)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[cfg(feature = "mysql")]
    #[test]
    fn mysql_modes() {
        use sqlx::mysql::MySqlSslMode;
        let mode =
            |url: &str, tls: &TlsConfig| mysql_connect_options(url, tls).unwrap().get_ssl_mode();
        let d = TlsConfig::default();
        let u = "mysql://u:p@db:3306/x";
        assert!(matches!(
            mode(&format!("{u}?ssl-mode=REQUIRED"), &d),
            MySqlSslMode::VerifyIdentity
        ));
        assert!(matches!(
            mode(&format!("{u}?ssl-mode=DISABLED"), &d),
            MySqlSslMode::Disabled
        ));
        assert!(matches!(
            mode(&format!("{u}?ssl-mode=VERIFY_CA"), &d),
            MySqlSslMode::VerifyCa
        ));
        let insecure = TlsConfig::new().danger_accept_invalid_certs();
        assert!(matches!(
            mode(&format!("{u}?ssl-mode=VERIFY_IDENTITY"), &insecure),
            MySqlSslMode::Required
        ));
    }
}
