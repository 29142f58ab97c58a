//! What a transport does with a delivery once the stack has run: the [`Disposition`].
//!
//! Every handler result maps to exactly one disposition (SEMANTICS section 3):
//! `Ok` -> [`Disposition::Ack`]; transient error -> [`Disposition::Retry`] until the
//! attempt budget is spent, then [`Disposition::DeadLetter`]; permanent error ->
//! [`Disposition::DeadLetter`] at once. Transports carry a retry or a dead-letter out as
//! "publish the copy with a publisher confirm, then ack the original"; the disposition
//! names every header the copy gets, so transports only merge and publish. A message
//! the handler dropped on purpose ([`HandlerError::discard`](crate::HandlerError::discard))
//! is [`Disposition::Discard`]: acked, no copy. After settling, a transport tells its
//! settle hook ([`Settled`]), and after a dead-letter copy is safely stored, the
//! consumer's dead-letter hook ([`DeadLettered`]).
//!
//! Besides the failure history, every copy names who failed it and how: the error's
//! type ([`headers::ERROR_TYPE`]), the host and process id ([`headers::HOST`],
//! [`headers::PID`]), the immediate retries spent ([`headers::IMMEDIATE_RETRIES`]) and,
//! opt-in, a backtrace ([`headers::BACKTRACE`]); strings are bounded like the others.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::crash::{prior_deliveries, BROKER_DELIVERY_COUNT_HEADER, DELIVERY_COUNT_HEADER};
use crate::error::ErrorKind;
use crate::message::{HeaderValue, Headers, Message, ATTEMPTS_HEADER};

/// Longest `x-idem-error` header value, in bytes.
pub const MAX_ERROR_LEN: usize = 2048;
/// Longest value of any other `x-idem-*` string header, in bytes.
pub const MAX_HEADER_LEN: usize = 512;
/// Longest `x-idem-backtrace` header value, in bytes (the innermost frames are kept).
pub const MAX_BACKTRACE_LEN: usize = 8192;

/// Header names written on retry copies and dead-lettered messages.
///
/// The ones idem reads back from a delivery ([`ATTEMPTS`](headers::ATTEMPTS),
/// [`FIRST_FAILED_AT`](headers::FIRST_FAILED_AT),
/// [`ORIGINAL_EXCHANGE`](headers::ORIGINAL_EXCHANGE),
/// [`ORIGINAL_ROUTING_KEY`](headers::ORIGINAL_ROUTING_KEY), and
/// [`REPLAY_HEADER`](crate::dedup::REPLAY_HEADER)) follow one
/// [rule](crate::read): a malformed value is ignored as if absent, with one `warn`
/// log naming the header and the value; counts saturate at `u32::MAX`. The others are
/// written for operators and never change what a worker does.
pub mod headers {
    pub use crate::message::ATTEMPTS_HEADER as ATTEMPTS;
    /// The error chain, truncated to [`MAX_ERROR_LEN`](super::MAX_ERROR_LEN). Written
    /// only.
    pub const ERROR: &str = "x-idem-error";
    /// `transient` or `permanent`. Written only.
    pub const ERROR_KIND: &str = "x-idem-error-kind";
    /// RFC 3339 time of the first failure. Read back from retry copies to keep the
    /// backoff's time budget: malformed (not RFC 3339 UTC, before 1970, wrong type)
    /// counts as absent, so this failure becomes the first; a time later than now
    /// counts as now.
    pub const FIRST_FAILED_AT: &str = "x-idem-first-failed-at";
    /// RFC 3339 time of the latest failure. Written only.
    pub const LAST_FAILED_AT: &str = "x-idem-last-failed-at";
    /// Exchange of the original publish. Read back from retry copies (a string; any
    /// other type is ignored and the delivery's own exchange is used).
    pub const ORIGINAL_EXCHANGE: &str = "x-idem-original-exchange";
    /// Routing key of the original publish. Read back like [`ORIGINAL_EXCHANGE`].
    pub const ORIGINAL_ROUTING_KEY: &str = "x-idem-original-routing-key";
    /// Queue the message was consumed from. Written only (the CLI replays to it).
    pub const ORIGINAL_QUEUE: &str = "x-idem-original-queue";
    /// Consumer name. Written only.
    pub const CONSUMER: &str = "x-idem-consumer";
    /// Idempotency key, if one was found. Written only.
    pub const KEY: &str = "x-idem-key";
    /// Rust type name of the error (`std::any::type_name`, e.g.
    /// `std::io::error::Error`), when known. Written only.
    pub const ERROR_TYPE: &str = "x-idem-error-type";
    /// Host name of the process that recorded the failure. Written only.
    pub const HOST: &str = "x-idem-host";
    /// Process id of the process that recorded the failure (an integer). Written only.
    pub const PID: &str = "x-idem-pid";
    /// How many immediate (in-process) retries the failed delivery spent before this
    /// copy was made (an integer, 0 without immediate retries). Written only.
    pub const IMMEDIATE_RETRIES: &str = "x-idem-immediate-retries";
    /// Backtrace of where the error was created, truncated to
    /// [`MAX_BACKTRACE_LEN`](super::MAX_BACKTRACE_LEN). Opt-in
    /// ([`ConsumerBuilder::backtrace_header`](crate::ConsumerBuilder::backtrace_header)).
    /// Written only.
    pub const BACKTRACE: &str = "x-idem-backtrace";

    /// Every header idem writes to record a failure or an unsettled delivery: the
    /// failure history, who failed it, and the crash-loop delivery count
    /// ([`DELIVERY_COUNT_HEADER`](crate::crash::DELIVERY_COUNT_HEADER)). An operator's
    /// replay removes all of them, so the replayed message starts with no attempts,
    /// no delivery count and no stale error. The `x-idem-*` headers not listed here
    /// are [`KEPT_ON_REPLAY`]; a test of this crate fails when a header is in
    /// neither list.
    pub const FAILURE: [&str; 14] = [
        ATTEMPTS,
        ERROR,
        ERROR_KIND,
        FIRST_FAILED_AT,
        LAST_FAILED_AT,
        ORIGINAL_QUEUE,
        CONSUMER,
        KEY,
        ERROR_TYPE,
        HOST,
        PID,
        IMMEDIATE_RETRIES,
        BACKTRACE,
        crate::crash::DELIVERY_COUNT_HEADER,
    ];

    /// The `x-idem-*` headers a replay keeps: where the message was first published
    /// (a replay may route on it), the replay marker itself
    /// ([`REPLAY_HEADER`](crate::dedup::REPLAY_HEADER), replaced by the new replay's),
    /// an operator's edit ([`EDITED_HEADER`](crate::dedup::EDITED_HEADER),
    /// [`ORIGINAL_FINGERPRINT_HEADER`](crate::dedup::ORIGINAL_FINGERPRINT_HEADER): the
    /// dedup stages read it), and the trace link to the attempt that failed (`x-idem-previous-attempt`, with
    /// the `otel` feature), so a trace shows the failure and the replayed run together.
    pub const KEPT_ON_REPLAY: [&str; 6] = [
        ORIGINAL_EXCHANGE,
        ORIGINAL_ROUTING_KEY,
        crate::dedup::REPLAY_HEADER,
        crate::dedup::EDITED_HEADER,
        crate::dedup::ORIGINAL_FINGERPRINT_HEADER,
        "x-idem-previous-attempt",
    ];
}

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

/// How a transport that can only approximate delays (RabbitMQ's delay tiers) may
/// round a retry delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelayKind {
    /// Computed by the [`Backoff`](crate::Backoff) policy: any delay close to it will
    /// do, so a transport may round it either way (RabbitMQ: the nearest tier).
    Backoff,
    /// Asked for by the handler (`HandlerError::retry_after`): a floor. A transport
    /// never shortens it (RabbitMQ: the smallest tier at least that long, or the
    /// longest tier if none is).
    AtLeast,
}

impl DelayKind {
    /// `backoff` or `at_least`.
    pub fn as_str(self) -> &'static str {
        match self {
            DelayKind::Backoff => "backoff",
            DelayKind::AtLeast => "at_least",
        }
    }
}

impl fmt::Display for DelayKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the transport must do with a delivery.
///
/// A retry or a dead-letter carries the complete set of `x-idem-*` headers the copy
/// must have (see [`headers`] and SEMANTICS section 5): the transport adds them to the
/// original's headers (replacing values of the same name) and publishes. Both
/// transports therefore write the same headers.
///
/// `Display` writes one line for logs and examples:
///
/// ```
/// use idem_core::Disposition;
///
/// assert_eq!(Disposition::Ack { duplicate: false }.to_string(), "processed, acked");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum Disposition {
    /// Ack it. `duplicate` is true when the handler did not run because the key was done.
    Ack {
        /// The key was already processed.
        duplicate: bool,
    },
    /// Publish a copy for redelivery after `delay` (with confirm), then ack the original.
    Retry {
        /// Requested delay.
        delay: Duration,
        /// How a transport may round `delay`.
        delay_kind: DelayKind,
        /// The failure.
        failure: Failure,
        /// The `x-idem-*` headers of the copy (failure history, original exchange and
        /// routing key, the crash-loop delivery count).
        headers: Headers,
    },
    /// Publish a copy to the dead-letter queue (with confirm), then ack the original.
    DeadLetter {
        /// The failure.
        failure: Failure,
        /// The `x-idem-*` headers of the copy (failure history, original exchange,
        /// routing key and queue, consumer, key).
        headers: Headers,
    },
    /// Hand the delivery back to the broker untouched (RabbitMQ: `basic.nack` with
    /// `requeue=true`): no attempt spent, no copy published. Returned while the
    /// consumer's circuit breaker is open (its store is down), so an outage never
    /// spends a message's retry budget.
    Release {
        /// Why (the store error or the breaker's cause), for logs.
        reason: String,
    },
    /// Ack it: the handler dropped the message on purpose
    /// ([`HandlerError::discard`](crate::HandlerError::discard)). No copy is published;
    /// the dedup record says `done`, as for a success.
    Discard {
        /// What the handler gave as the reason.
        reason: String,
    },
}

impl Disposition {
    /// A short name: `ack`, `duplicate`, `retry`, `dead_letter`, `release` or
    /// `discard`.
    pub fn name(&self) -> &'static str {
        match self {
            Disposition::Ack { duplicate: false } => "ack",
            Disposition::Ack { duplicate: true } => "duplicate",
            Disposition::Retry { .. } => "retry",
            Disposition::DeadLetter { .. } => "dead_letter",
            Disposition::Release { .. } => "release",
            Disposition::Discard { .. } => "discard",
        }
    }

    /// Whether the transport settles it with a plain ack (no copy, no requeue):
    /// [`Ack`](Self::Ack) and [`Discard`](Self::Discard).
    pub fn is_ack(&self) -> bool {
        matches!(self, Disposition::Ack { .. } | Disposition::Discard { .. })
    }

    /// Dead-letters `msg` with `failure` on behalf of consumer `consumer`, with the
    /// same headers [`Consumer::process`](crate::Consumer::process) would write. For a
    /// transport that refuses a delivery without running it (RabbitMQ: a delivery
    /// limit exceeded across copies). `msg` is the delivery as received.
    pub fn dead_letter(msg: &Message, consumer: &str, failure: Failure) -> Disposition {
        let headers = failure.dead_letter_headers(msg, consumer);
        Disposition::DeadLetter { failure, headers }
    }

    /// The headers a retry or dead-letter copy carries; `None` for the others.
    pub fn copy_headers(&self) -> Option<&Headers> {
        match self {
            Disposition::Retry { headers, .. } | Disposition::DeadLetter { headers, .. } => {
                Some(headers)
            }
            Disposition::Ack { .. } | Disposition::Release { .. } | Disposition::Discard { .. } => {
                None
            }
        }
    }
}

impl fmt::Display for Disposition {
    /// One line: `processed, acked`; `duplicate: key already done, handler not run,
    /// acked`; `transient failure, retry in 100 ms: <error>` (`retry in at least` for a
    /// delay the handler asked for); `permanent failure, dead-lettered: <error>`;
    /// `handed back, no attempt spent: <reason>`; `discarded on purpose, acked:
    /// <reason>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disposition::Ack { duplicate: false } => f.write_str("processed, acked"),
            Disposition::Ack { duplicate: true } => {
                f.write_str("duplicate: key already done, handler not run, acked")
            }
            Disposition::Retry {
                delay,
                delay_kind,
                failure,
                ..
            } => {
                let floor = match delay_kind {
                    DelayKind::Backoff => "",
                    DelayKind::AtLeast => "at least ",
                };
                write!(
                    f,
                    "{} failure, retry in {floor}{}: {}",
                    failure.kind,
                    ShortDelay(*delay),
                    failure.error
                )
            }
            Disposition::DeadLetter { failure, .. } => write!(
                f,
                "{} failure, dead-lettered: {}",
                failure.kind, failure.error
            ),
            Disposition::Release { reason } => {
                write!(f, "handed back, no attempt spent: {reason}")
            }
            Disposition::Discard { reason } => write!(f, "discarded on purpose, acked: {reason}"),
        }
    }
}

/// A delay for people: `250 ms`, `5 s`, `1.5 s`.
struct ShortDelay(Duration);

impl fmt::Display for ShortDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms < 1000 {
            write!(f, "{ms} ms")
        } else if ms.is_multiple_of(1000) {
            write!(f, "{} s", ms / 1000)
        } else {
            write!(f, "{} s", self.0.as_secs_f64())
        }
    }
}

/// What a settle hook is told about a delivery once it is settled (acked, released,
/// or its copy published and the original acked). The same for every transport: see
/// `MemoryWorker::on_settle` and the RabbitMQ `WorkerBuilder::on_settle`.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Settled<'a> {
    /// The delivery's `message_id`, if any.
    pub message_id: Option<&'a str>,
    /// Which attempt this delivery was: 1 for a first delivery, else the failed
    /// attempts its `x-idem-attempts` header recorded plus one.
    pub attempt: u32,
    /// The queue it was consumed from.
    pub queue: &'a str,
    /// What was done with it.
    pub disposition: &'a Disposition,
}

impl<'a> Settled<'a> {
    /// A settled delivery (for transports). `failed_before` is the failed attempts
    /// the delivery's `x-idem-attempts` header recorded.
    pub fn new(
        message_id: Option<&'a str>,
        failed_before: u32,
        queue: &'a str,
        disposition: &'a Disposition,
    ) -> Self {
        Settled {
            message_id,
            attempt: failed_before.saturating_add(1),
            queue,
            disposition,
        }
    }
}

/// A settle hook, as transports store it: called after each delivery is settled
/// (tests, custom metrics, progress output).
pub type SettleHook = Arc<dyn Fn(Settled<'_>) + Send + Sync>;

/// What a dead-letter hook is told: a message was dead-lettered, and its copy is
/// safely in the dead-letter queue (RabbitMQ: the publish was confirmed; memory: the
/// copy was stored). See
/// [`ConsumerBuilder::on_dead_letter`](crate::ConsumerBuilder::on_dead_letter).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct DeadLettered<'a> {
    /// The delivery's `message_id`, if any.
    pub message_id: Option<&'a str>,
    /// The queue it was consumed from.
    pub queue: &'a str,
    /// The dead-letter queue its copy was published to.
    pub dead_letter_queue: &'a str,
    /// The consumer that dead-lettered it.
    pub consumer: &'a str,
    /// The failure record (kind, error chain, attempts, times, key, error type,
    /// immediate retries, backtrace if enabled).
    pub failure: &'a Failure,
    /// The `x-idem-*` headers written on the copy (host and process id included).
    pub headers: &'a Headers,
}

/// A dead-letter hook, as a consumer stores it (alerting, custom metrics, audit).
/// It runs on the delivery's task before the next delivery can take its slot:
/// keep it short, and hand slow work (an HTTP call to a pager) to a channel or a
/// spawned task.
pub type DeadLetterHook = Arc<dyn Fn(DeadLettered<'_>) + Send + Sync>;

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
    /// It carries [`DELIVERY_COUNT_HEADER`].
    carried: bool,
    /// It carries the broker's [`BROKER_DELIVERY_COUNT_HEADER`].
    broker_count: bool,
}

impl Origin {
    pub(crate) fn of(msg: &Message) -> Self {
        let d = &msg.delivery;
        Origin {
            exchange: d.exchange.clone(),
            routing_key: d.routing_key.clone(),
            queue: d.queue.clone(),
            // Already read (and a malformed value logged) by the consumer.
            failed_before: crate::read::read_quiet::<u32>(msg, ATTEMPTS_HEADER).unwrap_or(0),
            prior: prior_deliveries(msg),
            carried: msg.headers.contains_key(DELIVERY_COUNT_HEADER),
            broker_count: msg.headers.contains_key(BROKER_DELIVERY_COUNT_HEADER),
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
    /// The failure history every copy carries: attempts, error, kind, first and last
    /// failure times.
    fn history_headers(&self) -> Headers {
        let mut h = Headers::new();
        h.insert(ATTEMPTS_HEADER.into(), HeaderValue::from(self.attempts));
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
    /// [`Disposition::Retry`]: the failure history, the original exchange and routing
    /// key, and the crash-loop delivery count (see [`crate::crash`]).
    pub fn retry_headers(&self, msg: &Message) -> Headers {
        self.retry_headers_from(&Origin::of(msg))
    }

    /// Headers for the dead-lettered copy of `msg` (the delivery as received), as
    /// carried by [`Disposition::DeadLetter`] (SEMANTICS section 5), every string
    /// bounded in size.
    pub fn dead_letter_headers(&self, msg: &Message, consumer: &str) -> Headers {
        self.dead_letter_headers_from(&Origin::of(msg), consumer)
    }

    /// A retry copy names the original route (it comes back from a delay queue with
    /// another one). A "busy" copy (no attempt spent: the message's claim was held,
    /// typically by a worker that just died) carries the unsettled deliveries so far
    /// in [`DELIVERY_COUNT_HEADER`]; a copy after a settled failure resets it. The
    /// broker's `x-delivery-count` of the original is zeroed on the copy, which is a
    /// new message to the broker.
    pub(crate) fn retry_headers_from(&self, origin: &Origin) -> Headers {
        let mut h = self.history_headers();
        origin.insert_route(&mut h);
        let busy = self.attempts == origin.failed_before;
        if busy && origin.prior > 0 {
            h.insert(
                DELIVERY_COUNT_HEADER.into(),
                HeaderValue::from(origin.prior),
            );
        } else if origin.carried {
            h.insert(DELIVERY_COUNT_HEADER.into(), HeaderValue::Int(0));
        }
        if origin.broker_count {
            h.insert(BROKER_DELIVERY_COUNT_HEADER.into(), HeaderValue::Int(0));
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

/// Cuts `s` to at most `max` bytes on a character boundary, ending with a marker that
/// says how many bytes were cut: `... [N bytes cut]`, where `N` is the length of `s`
/// minus the length of the part kept. `max` should leave room for the marker (about 30
/// bytes); with less, only the marker is returned.
#[doc(hidden)] // not API: reached through `crate::__private`
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    // Room for the marker: at most as many digits as `s.len()` has, since the count
    // cut is never more than that.
    let room = marker(s.len()).len();
    let mut end = max.saturating_sub(room);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{}", &s[..end], marker(s.len() - end))
}

fn marker(cut: usize) -> String {
    format!("... [{cut} bytes cut]")
}

/// Formats a time as RFC 3339 UTC with millisecond precision.
#[doc(hidden)] // not API: reached through `crate::__private`
pub fn rfc3339(t: SystemTime) -> String {
    let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()) as i64;
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// Parses what [`rfc3339`] writes (UTC, `Z` suffix, optional fraction of 1 to 9
/// digits, of which milliseconds are kept). `None` for anything else, including
/// out-of-range fields (month 13, hour 24, year past 9999) and times before 1970.
#[doc(hidden)] // not API: reached through `crate::__private`
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    fn num(p: &str, len: usize, max: i64) -> Option<i64> {
        if p.len() != len || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok().filter(|n| *n <= max)
    }
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut dp = date.split('-');
    let (y, m, d) = (dp.next()?, dp.next()?, dp.next()?);
    let (y, m, d) = (num(y, 4, 9999)?, num(m, 2, 12)?, num(d, 2, 31)?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut tp = hms.split(':');
    let (h, min, sec) = (tp.next()?, tp.next()?, tp.next()?);
    let (h, min, sec) = (num(h, 2, 23)?, num(min, 2, 59)?, num(sec, 2, 60)?);
    if dp.next().is_some() || tp.next().is_some() || m == 0 || d == 0 {
        return None;
    }
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac_ms: i64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    let days = days_from_civil(y, m, d);
    let ms = ((days * 24 + h) * 60 + min) * 60_000 + sec * 1000 + frac_ms;
    u64::try_from(ms)
        .ok()
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
}

// Howard Hinnant's civil-date algorithms.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every `"x-idem-..."` name written anywhere in this crate's sources is either a
    /// failure header (cleared by a replay) or one a replay keeps: a header added later
    /// cannot be forgotten by the replay rules.
    #[test]
    fn every_idem_header_is_classified_for_replay() {
        fn walk(dir: &std::path::Path, found: &mut std::collections::BTreeSet<String>) {
            for entry in std::fs::read_dir(dir).expect("read src") {
                let path = entry.expect("dir entry").path();
                if path.is_dir() {
                    walk(&path, found);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).expect("read source");
                    for (i, _) in text.match_indices("\"x-idem-") {
                        let rest = &text[i + 1..];
                        let end = rest.find('"').unwrap_or(rest.len());
                        let name = &rest[..end];
                        // A whole name (this test's own prefix literal is not one).
                        if !name.ends_with('-')
                            && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
                        {
                            found.insert(name.to_owned());
                        }
                    }
                }
            }
        }
        let mut found = std::collections::BTreeSet::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        assert!(found.contains(headers::BACKTRACE), "{found:?}");
        let unclassified: Vec<&String> = found
            .iter()
            .filter(|n| {
                !headers::FAILURE.contains(&n.as_str())
                    && !headers::KEPT_ON_REPLAY.contains(&n.as_str())
            })
            .collect();
        assert!(
            unclassified.is_empty(),
            "x-idem headers in neither headers::FAILURE nor headers::KEPT_ON_REPLAY: {unclassified:?}"
        );
    }

    #[test]
    fn truncation_is_bounded_and_utf8_safe() {
        let long = "é".repeat(5000);
        let t = truncate(&long, MAX_ERROR_LEN);
        assert!(t.len() <= MAX_ERROR_LEN);
        assert!(t.ends_with(" bytes cut]"));
        assert_eq!(truncate("short", 10), "short");
    }

    #[test]
    fn truncation_marker_counts_the_bytes_cut() {
        // 2 KiB kept out of 5 MiB: the marker names the bytes dropped, not the length.
        let long = "E".repeat(5 << 20);
        let t = truncate(&long, MAX_ERROR_LEN);
        let marker = "... [5240855 bytes cut]";
        assert_eq!(t, format!("{}{marker}", "E".repeat(2025)));
        assert_eq!(t.len(), MAX_ERROR_LEN);

        // The count cut can have fewer digits than the length: the result is then a
        // byte or two under the limit, never over it.
        let s = "a".repeat(1000);
        assert_eq!(
            truncate(&s, 100),
            format!("{}... [920 bytes cut]", "a".repeat(80))
        );
        let s = "a".repeat(101);
        assert_eq!(
            truncate(&s, 100),
            format!("{}... [20 bytes cut]", "a".repeat(81))
        );

        // Multi-byte characters: the cut backs off to a boundary and counts it.
        let s = "é".repeat(5000); // 10 000 bytes
        let t = truncate(&s, MAX_ERROR_LEN);
        assert_eq!(t, format!("{}... [7974 bytes cut]", "é".repeat(1013)));
    }

    #[test]
    fn rfc3339_rejects_out_of_range_fields() {
        for bad in [
            "99999999999999999-01-01T00:00:00Z",
            "2023-13-01T00:00:00Z",
            "2023-00-01T00:00:00Z",
            "2023-01-00T00:00:00Z",
            "2023-01-01T24:00:00Z",
            "2023-01-01T00:60:00Z",
            "2023-01-01T00:00:00.Z",
            "2023-01-01T00:00:00.+12Z",
            "2023-01-01T00:00:00.1234567890Z",
            "+2023-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2023-01-01T00:00:00",
            "2023-01-01T00:00:00:00Z",
            "2023-01-01-01T00:00:00Z",
            "",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.123456Z"),
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
        );
    }

    #[test]
    fn dispositions_print_one_line() {
        let failure = |kind| Failure {
            kind,
            error: "gateway timed out".into(),
            attempts: 1,
            first_failed_at: UNIX_EPOCH,
            last_failed_at: UNIX_EPOCH,
            key: None,
            error_type: None,
            immediate_retries: 0,
            backtrace: None,
        };
        let retry = |ms, delay_kind| Disposition::Retry {
            delay: Duration::from_millis(ms),
            delay_kind,
            failure: failure(ErrorKind::Transient),
            headers: Headers::new(),
        };
        assert_eq!(
            retry(100, DelayKind::Backoff).to_string(),
            "transient failure, retry in 100 ms: gateway timed out"
        );
        assert_eq!(
            retry(1500, DelayKind::AtLeast).to_string(),
            "transient failure, retry in at least 1.5 s: gateway timed out"
        );
        assert_eq!(
            retry(30_000, DelayKind::Backoff).to_string(),
            "transient failure, retry in 30 s: gateway timed out"
        );
        let dead = Disposition::DeadLetter {
            failure: failure(ErrorKind::Permanent),
            headers: Headers::new(),
        };
        assert_eq!(
            dead.to_string(),
            "permanent failure, dead-lettered: gateway timed out"
        );
        assert_eq!(
            Disposition::Ack { duplicate: true }.to_string(),
            "duplicate: key already done, handler not run, acked"
        );
        let release = Disposition::Release {
            reason: "store down".into(),
        };
        assert_eq!(
            release.to_string(),
            "handed back, no attempt spent: store down"
        );
    }

    #[test]
    fn rfc3339_known_value() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20.123Z"), Some(t));
    }

    proptest! {
        #[test]
        fn rfc3339_round_trips(ms in 0u64..4_000_000_000_000) {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            prop_assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
    }
}
