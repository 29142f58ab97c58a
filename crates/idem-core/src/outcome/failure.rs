//! The failure record ([`Failure`]) and the headers a copy of a failed delivery carries.

use std::time::SystemTime;

use super::{headers, MAX_BACKTRACE_LEN, MAX_ERROR_LEN, MAX_HEADER_LEN};
use crate::consumer::DeliveryContext;
use crate::crash::prior_deliveries;
use crate::error::ErrorKind;
use crate::headers::{ATTEMPTS, BROKER_DELIVERY_COUNT, DELIVERY_COUNT};
use crate::message::{HeaderValue, Headers, Message};
use crate::text::{rfc3339, truncate};

/// The host name written in [`headers::HOST`]: the system host name, looked up once
/// per process, bounded like the other headers; `unknown` if it cannot be read.
pub fn host() -> &'static str {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| match whoami::fallible::hostname() {
        Ok(h) if !h.trim().is_empty() => truncate(h.trim(), MAX_HEADER_LEN),
        _ => "unknown".to_owned(),
    })
}

/// Why a message failed, and its failure history.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Failure {
    /// Transient or permanent.
    pub kind: ErrorKind,
    /// Error chain, already truncated to [`MAX_ERROR_LEN`].
    pub error: String,
    /// Failed attempts so far, this one included (the new `x-idem-attempts` value).
    pub attempts: u32,
    /// When the first failure happened (carried across retries in a header).
    pub first_failed_at: SystemTime,
    /// When this failure happened.
    pub last_failed_at: SystemTime,
    /// The idempotency key, if one was found.
    pub key: Option<String>,
    /// The error's Rust type name, when known (see [`HandlerError::type_name`]),
    /// truncated to [`MAX_HEADER_LEN`].
    ///
    /// [`HandlerError::type_name`]: crate::HandlerError::type_name
    pub error_type: Option<String>,
    /// Immediate (in-process) retries this delivery spent before failing for good
    /// (see [`ConsumerBuilder::immediate_retries`](crate::ConsumerBuilder::immediate_retries)).
    pub immediate_retries: u32,
    /// Where the error was created, truncated to [`MAX_BACKTRACE_LEN`]; only when the
    /// consumer asked for it
    /// ([`ConsumerBuilder::backtrace_header`](crate::ConsumerBuilder::backtrace_header)).
    pub backtrace: Option<String>,
}

/// What the copies of a delivery say about the original, read before the handler
/// runs (the message itself is moved into the stack).
#[derive(Clone, Debug)]
pub(crate) struct Origin {
    exchange: String,
    routing_key: String,
    queue: String,
    /// Failed attempts before this delivery (its `x-idem-attempts`).
    failed_before: u32,
    /// Unsettled deliveries so far ([`prior_deliveries`]).
    prior: u32,
    /// It carries [`DELIVERY_COUNT`].
    carried: bool,
    /// It carries the broker's [`BROKER_DELIVERY_COUNT`].
    broker_count: bool,
}

impl Origin {
    /// What the copies of `msg` say about it; `failed_before` is its
    /// `x-idem-attempts`, read once by the caller.
    pub(crate) fn of(msg: &Message, failed_before: u32) -> Self {
        let d = &msg.delivery;
        Origin {
            exchange: d.exchange.clone(),
            routing_key: d.routing_key.clone(),
            queue: d.queue.clone(),
            failed_before,
            prior: prior_deliveries(msg),
            carried: msg.headers.contains_key(DELIVERY_COUNT),
            broker_count: msg.headers.contains_key(BROKER_DELIVERY_COUNT),
        }
    }

    fn insert_route(&self, h: &mut Headers) {
        for (name, value) in [
            (headers::ORIGINAL_EXCHANGE, &self.exchange),
            (headers::ORIGINAL_ROUTING_KEY, &self.routing_key),
        ] {
            h.insert(name.into(), truncate(value, MAX_HEADER_LEN).into());
        }
    }
}

impl Failure {
    /// A failure record: `kind`, the `error` text (truncated to
    /// [`MAX_ERROR_LEN`]), the `attempts` it counts and the time
    /// it happened `at`, which is also taken as the first failure's time. No key, no
    /// error type, no backtrace, no immediate retries: set those fields afterwards
    /// where they are known. Every record starts here (idem's own through
    /// [`for_delivery`](Self::for_delivery)), so a field added later gets its default
    /// in one place.
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use idem_core::{ErrorKind, Failure};
    ///
    /// let now = SystemTime::now();
    /// let mut failure = Failure::new(ErrorKind::Permanent, "no such customer", 1, now);
    /// failure.key = Some("order-42".into());
    /// assert_eq!(failure.first_failed_at, failure.last_failed_at);
    /// ```
    pub fn new(kind: ErrorKind, error: &str, attempts: u32, at: SystemTime) -> Self {
        Failure {
            kind,
            error: truncate(error, MAX_ERROR_LEN),
            attempts,
            first_failed_at: at,
            last_failed_at: at,
            key: None,
            error_type: None,
            immediate_retries: 0,
            backtrace: None,
        }
    }

    /// The failure record of the delivery whose context is `context`, failing with
    /// `kind` and `error` at `at`: its attempts are the delivery's
    /// [failed attempts before it](DeliveryContext::failed_before) (a retry or
    /// dead-letter decision then sets the count it charged); its first failure is the
    /// one the delivery carries, or `at` (a recorded time after `at`, from clock skew
    /// or a forged header, counts as `at`); its key is the one the dedup stage
    /// [resolved](DeliveryContext::key), else the message id. Error type, backtrace
    /// and immediate retries are left for the caller, as with [`new`](Self::new).
    ///
    /// Every failure record idem builds for a delivery comes from here: the
    /// consumer's, and a transport's for a delivery it refuses without running.
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use idem_core::{DeliveryContext, ErrorKind, Failure, Message};
    ///
    /// let msg = Message::new("x").with_message_id("m-1").with_header("x-idem-attempts", 2u32);
    /// let ctx = DeliveryContext::read(&msg);
    /// let failure = Failure::for_delivery(&ctx, ErrorKind::Permanent, "refused", SystemTime::now());
    /// assert_eq!((failure.attempts, failure.key.as_deref()), (2, Some("m-1")));
    /// ```
    pub fn for_delivery(
        context: &DeliveryContext,
        kind: ErrorKind,
        error: &str,
        at: SystemTime,
    ) -> Self {
        let mut failure = Failure::new(kind, error, context.failed_before(), at);
        if let Some(first) = context.first_failed_at() {
            failure.first_failed_at = first.min(at);
        }
        failure.key = context.failure_key().map(str::to_owned);
        failure
    }

    /// The failure history every copy carries: attempts, error, kind, first and last
    /// failure times.
    fn history_headers(&self) -> Headers {
        let mut h = Headers::new();
        h.insert(ATTEMPTS.into(), HeaderValue::from(self.attempts));
        h.insert(headers::ERROR.into(), self.error.clone().into());
        h.insert(headers::ERROR_KIND.into(), self.kind.as_str().into());
        h.insert(
            headers::FIRST_FAILED_AT.into(),
            rfc3339(self.first_failed_at).into(),
        );
        h.insert(
            headers::LAST_FAILED_AT.into(),
            rfc3339(self.last_failed_at).into(),
        );
        if let Some(t) = &self.error_type {
            h.insert(
                headers::ERROR_TYPE.into(),
                truncate(t, MAX_HEADER_LEN).into(),
            );
        }
        h.insert(headers::HOST.into(), host().into());
        h.insert(headers::PID.into(), HeaderValue::from(std::process::id()));
        h.insert(
            headers::IMMEDIATE_RETRIES.into(),
            HeaderValue::from(self.immediate_retries),
        );
        if let Some(bt) = &self.backtrace {
            h.insert(
                headers::BACKTRACE.into(),
                truncate(bt, MAX_BACKTRACE_LEN).into(),
            );
        }
        h
    }

    /// Headers for a retry copy of `msg` (the delivery as received), as carried by
    /// [`Disposition::Retry`](super::Disposition::Retry): the failure history, the original exchange and routing
    /// key, and the crash-loop delivery count (see [`crate::crash`]).
    pub fn retry_headers(&self, msg: &Message) -> Headers {
        self.retry_headers_from(&Origin::of(msg, quiet_attempts(msg)))
    }

    /// Headers for the dead-lettered copy of `msg` (the delivery as received), as
    /// carried by [`Disposition::DeadLetter`](super::Disposition::DeadLetter) (SEMANTICS section 5), every string
    /// bounded in size.
    pub fn dead_letter_headers(&self, msg: &Message, consumer: &str) -> Headers {
        self.dead_letter_headers_from(&Origin::of(msg, quiet_attempts(msg)), consumer)
    }

    /// A retry copy names the original route (it comes back from a delay queue with
    /// another one). A "busy" copy (no attempt spent: the message's claim was held,
    /// typically by a worker that just died) carries the unsettled deliveries so far
    /// in [`DELIVERY_COUNT`]; a copy after a settled failure resets it. The
    /// broker's `x-delivery-count` of the original is zeroed on the copy, which is a
    /// new message to the broker.
    pub(crate) fn retry_headers_from(&self, origin: &Origin) -> Headers {
        let mut h = self.history_headers();
        origin.insert_route(&mut h);
        let busy = self.attempts == origin.failed_before;
        if busy && origin.prior > 0 {
            h.insert(DELIVERY_COUNT.into(), HeaderValue::from(origin.prior));
        } else if origin.carried {
            h.insert(DELIVERY_COUNT.into(), HeaderValue::Int(0));
        }
        if origin.broker_count {
            h.insert(BROKER_DELIVERY_COUNT.into(), HeaderValue::Int(0));
        }
        h
    }

    pub(crate) fn dead_letter_headers_from(&self, origin: &Origin, consumer: &str) -> Headers {
        let mut h = self.history_headers();
        origin.insert_route(&mut h);
        for (name, value) in [
            (headers::ORIGINAL_QUEUE, origin.queue.as_str()),
            (headers::CONSUMER, consumer),
        ] {
            h.insert(name.into(), truncate(value, MAX_HEADER_LEN).into());
        }
        if let Some(key) = &self.key {
            h.insert(headers::KEY.into(), truncate(key, MAX_HEADER_LEN).into());
        }
        h
    }
}

/// The failed attempts of `msg`, for the public header builders: those its
/// [context](DeliveryContext) read, or, for a message without one (built by hand),
/// its header under the header rule without a log.
fn quiet_attempts(msg: &Message) -> u32 {
    msg.context
        .read_failed_before()
        .unwrap_or_else(|| crate::read::read_quiet::<u32>(msg, ATTEMPTS).unwrap_or(0))
}
