//! Errors of the RabbitMQ transport. None of them carries a password: URLs are
//! redacted before they are stored.

/// An error from the RabbitMQ transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker could not be reached or refused the connection.
    #[error("cannot connect to RabbitMQ at {url}: {detail} (is the broker running, and do the host, port and scheme of the URL point at it?)")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// What went wrong, password scrubbed.
        detail: String,
    },
    /// No URL of a list of several answered (see [`crate::endpoints`]); with no URL at
    /// all, both lists are empty.
    #[error("{}", no_endpoint_text(errors))]
    NoEndpoint {
        /// The URLs tried, in order, passwords redacted.
        tried: Vec<String>,
        /// Why each one failed, in the same order.
        errors: Vec<Error>,
    },
    /// The broker answered but refused the connection: wrong user name or password
    /// (`ACCESS_REFUSED`, 403) or no access to the vhost (`NOT_ALLOWED`, 530).
    #[error("RabbitMQ at {url} refused the connection: {detail} (check the user name, password and vhost in the URL)")]
    Refused {
        /// The URL, password redacted.
        url: String,
        /// The broker's reason, password scrubbed.
        detail: String,
    },
    /// A queue exists with other arguments than the topology declares
    /// (`PRECONDITION_FAILED`, e.g. quorum delay queues declared by an older idem).
    #[error("queue {queue:?} exists with other arguments: {detail}. {hint}")]
    Inequivalent {
        /// The queue.
        queue: String,
        /// The broker's reason.
        detail: String,
        /// What to do about it.
        hint: String,
    },
    /// An exchange exists with another type or other flags than the topology
    /// declares (`PRECONDITION_FAILED`).
    #[error("exchange {exchange:?} exists with another type or other flags: {detail}. {hint}")]
    ExchangeInequivalent {
        /// The exchange.
        exchange: String,
        /// The broker's reason.
        detail: String,
        /// What to do about it.
        hint: String,
    },
    /// A [`Topology`](crate::Topology) the broker cannot declare as given (an exchange
    /// named twice with two types, a binding to the default exchange, a binding to an
    /// exchange that does not exist, ...); nothing after it was declared.
    #[error("invalid topology: {0}")]
    Topology(String),
    /// The TLS handshake failed: the broker is reachable but its certificate (or ours)
    /// was refused. See [`crate::tls`].
    #[error("TLS handshake with RabbitMQ at {url} failed: {failure} ({detail}); {}", failure.hint())]
    Tls {
        /// The URL, password redacted.
        url: String,
        /// What was wrong, as far as the error tells.
        failure: idem_core::TlsFailure,
        /// The TLS library's message, password scrubbed.
        detail: String,
    },
    /// The TLS settings cannot be used for this connection.
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    /// An AMQP operation failed.
    #[error("AMQP {op} failed: {source}")]
    Amqp {
        /// The operation, e.g. `queue.declare`.
        op: &'static str,
        /// The lapin error.
        #[source]
        source: lapin::Error,
    },
    /// A mandatory publish could not be routed and came back.
    #[error("message returned by the broker ({code} {text}): nothing is bound to exchange {exchange:?} with routing key {routing_key:?}")]
    Returned {
        /// AMQP reply code (312 = NO_ROUTE).
        code: u16,
        /// AMQP reply text.
        text: String,
        /// Exchange published to.
        exchange: String,
        /// Routing key published with.
        routing_key: String,
    },
    /// The broker did not accept the publish (negative confirm).
    #[error("the broker nacked the publish to exchange {exchange:?} with routing key {routing_key:?} (queue full with reject-publish, or an internal error)")]
    Nacked {
        /// Exchange published to.
        exchange: String,
        /// Routing key published with.
        routing_key: String,
    },
    /// Some messages of a batch were not confirmed. Publishing the batch again is safe:
    /// the message ids were set before the first try, so consumers dedup the repeats.
    #[error("{failed} of {total} messages of the batch were not confirmed; first error: {first}")]
    Batch {
        /// Messages not confirmed.
        failed: usize,
        /// Messages in the batch.
        total: usize,
        /// The first failure.
        first: Box<Error>,
    },
    /// A queue, exchange or header name longer than AMQP allows (255 bytes).
    #[error("name too long for AMQP (max 255 bytes): {0:?}")]
    NameTooLong(String),
    /// The consumer configuration does not fit the broker.
    #[error(transparent)]
    Config(#[from] idem_core::ConfigError),
    /// Dedup records would expire before the last retry could arrive, counting each
    /// backoff delay as the delay tier it waits in (see
    /// [`DelayTiers::horizon`](crate::DelayTiers::horizon)).
    #[error("dedup retention {retention:?} is shorter than the retry horizon in broker time {horizon:?} (each backoff delay rounded to the delay tier it waits in): a late retry could run twice; raise the retention, shorten the backoff, or add a delay tier closer to the backoff delays")]
    RetentionTooShortForTiers {
        /// Configured retention.
        retention: std::time::Duration,
        /// Sum of the delay tiers the retries wait in.
        horizon: std::time::Duration,
    },
    /// The Prometheus endpoint could not start.
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    /// A consumer of a [`Service`](crate::Service) failed (its settings were refused,
    /// or its first connection or declaration failed); the service stopped.
    #[error("consumer {consumer:?}: {source}")]
    Consumer {
        /// The consumer's name.
        consumer: String,
        /// Why it failed.
        source: Box<Error>,
    },
    /// A hosted task of a [`Service`](crate::Service) (the outbox relay, or any
    /// [`HostedTask`](crate::service::HostedTask)) returned an error; the service
    /// stopped.
    #[error("hosted task {task:?}: {source}")]
    Task {
        /// The task's name.
        task: String,
        /// Why it failed.
        source: crate::service::TaskError,
    },
    /// Two consumers of one [`Service`](crate::Service) have the same name.
    #[error("two consumers of the service are named {0:?}: names must differ (metrics, readiness and errors name consumers by name)")]
    DuplicateConsumer(String),
    /// [`Publisher::publish_delayed`](crate::Publisher::publish_delayed) was asked for
    /// a delay longer than the queue's longest delay tier; nothing was published.
    #[error("delay {delay:?} is longer than the longest delay tier of queue {queue:?} ({longest:?}): nothing published; add a longer tier (Topology::tiers) or hold the message elsewhere until it is due")]
    DelayTooLong {
        /// The delay asked for.
        delay: std::time::Duration,
        /// The longest tier of the queue's topology.
        longest: std::time::Duration,
        /// The work queue.
        queue: String,
    },
}

/// Whether a failed connection attempt was refused by the broker (bad credentials or
/// vhost) rather than unreachable: RabbitMQ closes the handshake with
/// `ACCESS_REFUSED` (403) or `NOT_ALLOWED` (530), which lapin reports as a protocol
/// error (lapin announces the `authentication_failure_close` capability, so the broker
/// says why instead of just dropping the socket).
pub(crate) fn is_refusal(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if matches!(
        p.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
    ))
}

/// Whether the broker refused a declaration because the object exists with other
/// arguments (`PRECONDITION_FAILED`, 406).
pub(crate) fn is_precondition_failed(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if *p.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
}

/// Whether the broker answered `NOT_FOUND` (404), e.g. a binding to a missing exchange.
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if *p.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

fn no_endpoint_text(errors: &[Error]) -> String {
    if errors.is_empty() {
        return "no RabbitMQ URL given: set AMQP_URL (one URL or a comma-separated list) or pass at least one amqp:// URL".to_owned();
    }
    let each: Vec<String> = errors.iter().map(ToString::to_string).collect();
    format!(
        "none of the {} RabbitMQ endpoints could be connected to: {}",
        errors.len(),
        each.join("; ")
    )
}

impl Error {
    pub(crate) fn amqp(op: &'static str) -> impl FnOnce(lapin::Error) -> Error {
        move |source| Error::Amqp { op, source }
    }

    pub(crate) fn consumer(name: &str, source: Error) -> Error {
        Error::Consumer {
            consumer: name.to_owned(),
            source: Box::new(source),
        }
    }
}
