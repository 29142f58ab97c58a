//! Errors of the CLI and the process exit code each one maps to.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | usage error, refused operation (`purge` without `--yes`), queue or table not found, invalid pattern |
//! | 2 | the broker or the database cannot be reached |
//! | 3 | partial failure: some messages were handled, others could not be (they stay where they were) |
//! | 4 | the broker or the database refused an operation (e.g. a queue exists with other arguments) or the connection (wrong user name, password or vhost) |
//! | 5 | `idem verify` found something: lost, stuck or at-risk messages, or a configuration hazard |
//! | 6 | TLS failure: the server's certificate was refused (unknown CA, wrong host name, expired) or it refused ours, or a TLS file is unusable |
//!
//! No error text carries a password: URLs are redacted before they are stored.

use std::process::ExitCode;

/// Success.
pub const EXIT_OK: u8 = 0;
/// Usage error, refused operation, queue or table not found.
pub const EXIT_USAGE: u8 = 1;
/// Broker or database unreachable.
pub const EXIT_UNREACHABLE: u8 = 2;
/// Partial failure.
pub const EXIT_PARTIAL: u8 = 3;
/// The broker or the database refused an operation.
pub const EXIT_FAILED: u8 = 4;
/// `idem verify` found something.
pub const EXIT_FINDINGS: u8 = 5;
/// A TLS failure (certificate refused either way, unusable TLS file).
pub const EXIT_TLS: u8 = 6;

/// An error of an `idem` command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments, or an operation refused for safety (exit 1).
    #[error("{0}")]
    Usage(String),
    /// A queue or table does not exist (exit 1).
    #[error("{0}")]
    NotFound(String),
    /// The broker or database cannot be reached (exit 2).
    #[error("{0}")]
    Unreachable(String),
    /// Some messages were handled and others not (exit 3).
    #[error("{0}")]
    Partial(String),
    /// The broker or database refused an operation (exit 4).
    #[error("{0}")]
    Failed(String),
    /// A TLS failure: certificate refused (unknown CA, wrong host name, expired), our
    /// client certificate refused, or an unusable TLS file (exit 6).
    #[error("{0}")]
    Tls(String),
    /// `idem verify` found lost, stuck or at-risk messages or a hazard (exit 5); the
    /// report was printed.
    #[error("{0}")]
    Findings(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::NotFound(_) => EXIT_USAGE,
            CliError::Unreachable(_) => EXIT_UNREACHABLE,
            CliError::Partial(_) => EXIT_PARTIAL,
            CliError::Failed(_) => EXIT_FAILED,
            CliError::Tls(_) => EXIT_TLS,
            CliError::Findings(_) => EXIT_FINDINGS,
        }
    }

    /// The exit code as an [`ExitCode`].
    pub fn to_exit_code(&self) -> ExitCode {
        ExitCode::from(self.exit_code())
    }

    /// The error of a failed SQL query: a missing table (42P01: PostgreSQL's undefined
    /// table; 42S02: MySQL's) is `missing`, another error the database returned
    /// `failed: <its message>`, anything else (the connection) `unreachable: <error>`.
    pub(crate) fn sql(e: &sqlx::Error, missing: String, failed: &str, unreachable: &str) -> Self {
        match e {
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("42P01" | "42S02")) =>
            {
                CliError::NotFound(missing)
            }
            sqlx::Error::Database(db) => CliError::Failed(format!("{failed}: {}", db.message())),
            _ => CliError::Unreachable(format!("{unreachable}: {e}")),
        }
    }

    pub(crate) fn amqp(op: &str) -> impl FnOnce(lapin::Error) -> CliError + '_ {
        move |e| {
            if e.is_io_error() || matches!(e.kind(), lapin::ErrorKind::InvalidConnectionState(_)) {
                CliError::Unreachable(format!("lost the connection to RabbitMQ during {op}: {e}"))
            } else {
                CliError::Failed(format!("RabbitMQ {op} failed: {e}"))
            }
        }
    }
}

impl From<idem_amqp::Error> for CliError {
    fn from(e: idem_amqp::Error) -> Self {
        match e {
            idem_amqp::Error::NoEndpoint { ref errors, .. } => {
                // Several URLs failed: the worst cause decides the exit code (a TLS
                // problem, then a refused login, else unreachable).
                let tls = errors.iter().any(|e| {
                    matches!(
                        e,
                        idem_amqp::Error::Tls { .. } | idem_amqp::Error::TlsSetup(_)
                    )
                });
                let refused = errors
                    .iter()
                    .any(|e| matches!(e, idem_amqp::Error::Refused { .. }));
                match (tls, refused) {
                    (true, _) => CliError::Tls(e.to_string()),
                    (false, true) => CliError::Failed(e.to_string()),
                    (false, false) => CliError::Unreachable(e.to_string()),
                }
            }
            idem_amqp::Error::Connect { .. } => CliError::Unreachable(e.to_string()),
            // The broker answered: not "unreachable", whatever the error says.
            idem_amqp::Error::Refused { .. } => CliError::Failed(e.to_string()),
            idem_amqp::Error::Tls { .. } | idem_amqp::Error::TlsSetup(_) => {
                CliError::Tls(e.to_string())
            }
            idem_amqp::Error::NameTooLong(_) => CliError::Usage(e.to_string()),
            other => CliError::Failed(other.to_string()),
        }
    }
}
