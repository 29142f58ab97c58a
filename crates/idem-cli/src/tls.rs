//! TLS options of every command: `--tls-ca`, `--tls-cert`, `--tls-key` (or the
//! environment variables `IDEM_TLS_CA`, `IDEM_TLS_CERT`, `IDEM_TLS_KEY`), applied to
//! `amqps://` broker URLs and to PostgreSQL URLs (whose own `sslmode=`, `sslrootcert=`,
//! `sslcert=`, `sslkey=` parameters work too). Certificates are verified by default:
//! see [`idem_core::tls`] and `idem_sql::tls` for the rules.
//!
//! A TLS failure (unknown CA, wrong host name, expired certificate, client
//! certificate refused) is [`CliError::Tls`], exit code
//! 6, distinct from an unreachable host (2). Messages never contain a password or a
//! key.

use std::path::PathBuf;

use clap::Args;
use idem_core::{TlsConfig, TlsFailure};

use crate::error::CliError;

/// The TLS options (global: they go before or after the subcommand).
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// PEM file of a CA to trust for amqps:// and PostgreSQL TLS (besides the system
    /// roots) [env: IDEM_TLS_CA].
    #[arg(long, global = true, value_name = "FILE", env = idem_core::tls::ENV_TLS_CA, hide_env = true)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS [env: IDEM_TLS_CERT].
    #[arg(long, global = true, value_name = "FILE", env = idem_core::tls::ENV_TLS_CERT, hide_env = true)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [env: IDEM_TLS_KEY].
    #[arg(long, global = true, value_name = "FILE", env = idem_core::tls::ENV_TLS_KEY, hide_env = true)]
    pub tls_key: Option<PathBuf>,
    /// Do not verify the PostgreSQL server's certificate (DANGEROUS: anyone on the
    /// path can read and change the traffic; logged as a warning). Refused for
    /// RabbitMQ. No environment variable turns this on.
    #[arg(long, global = true)]
    pub tls_danger_accept_invalid_certs: bool,
}

impl TlsArgs {
    /// The [`TlsConfig`] these options describe; unusable files are a usage error.
    pub fn config(&self) -> Result<TlsConfig, CliError> {
        let config = TlsConfig::from_files(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
        )
        .map_err(|e| CliError::Tls(e.to_string()))?;
        if self.tls_danger_accept_invalid_certs {
            eprintln!(
                "warning: --tls-danger-accept-invalid-certs: PostgreSQL certificates are NOT verified; anyone on the network path can read and change this traffic"
            );
            return Ok(config.danger_accept_invalid_certs());
        }
        Ok(config)
    }
}

/// A [`CliError::Tls`] for `text` if it describes a TLS failure.
pub(crate) fn tls_error(service: &str, target: &str, text: &str) -> Option<CliError> {
    let failure = TlsFailure::classify(text)?;
    Some(CliError::Tls(format!(
        "TLS handshake with {service} at {target} failed: {failure} ({text}); {}",
        failure.hint()
    )))
}
