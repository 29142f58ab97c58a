/// Errors of the outbox and its relay. Connection strings never appear in them.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// A table name from configuration is not a plain SQL identifier.
    #[error("invalid outbox table name {0:?}: use letters, digits and '_' (optionally schema.table), at most 63 characters each, not starting with a digit")]
    InvalidTableName(String),
    /// The message cannot be stored (e.g. an empty routing target).
    #[error("invalid outbox message: {0}")]
    InvalidMessage(String),
    /// The database failed.
    #[error("outbox database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The broker could not be reached or failed a publish; the transport's error
    /// is the source.
    #[error("broker error: {0}")]
    Broker(#[from] idem_amqp::Error),
    /// A test failpoint fired (only with the internal `failpoints` feature, which
    /// the crate's own crash tests turn on).
    #[cfg(feature = "_failpoints")]
    #[error("failpoint {0} fired")]
    Failpoint(&'static str),
}
