//! Every header name idem writes or reads back: the wire contract of its copies.
//!
//! This module is the crate's ground floor: it holds names only and depends on no
//! other module, so that every layer (the message, the dedup stages, the crash guard,
//! the dispositions, the transports) can name a header without importing the others.
//! The older homes of these names ([`outcome::headers`](crate::outcome::headers),
//! [`message::ATTEMPTS_HEADER`](crate::message::ATTEMPTS_HEADER),
//! [`crash::DELIVERY_COUNT_HEADER`](crate::crash::DELIVERY_COUNT_HEADER),
//! [`dedup::REPLAY_HEADER`](crate::dedup::REPLAY_HEADER), ...) re-export them.
//!
//! # The read rule
//!
//! Anyone can publish a message with any header, so the names idem reads back
//! ([`ATTEMPTS`], [`FIRST_FAILED_AT`], [`ORIGINAL_EXCHANGE`], [`ORIGINAL_ROUTING_KEY`],
//! [`REPLAY`], [`DELIVERY_COUNT`], and [`BROKER_DELIVERY_COUNT`] in the transport) are
//! all read under [one rule](crate::read): a malformed value (wrong type, negative or non-decimal
//! count, a time that is not RFC 3339 UTC) is ignored as if absent, with one `warn`
//! log naming the header and the value; counts saturate at `u32::MAX`. A delivery is
//! never dead-lettered because of a header idem itself writes. Each name below says
//! what it holds and whether idem reads it; names marked "written only" are for
//! operators and never change what a worker does.

/// The number of failed attempts so far (absent on a first delivery). Read back: an
/// integer >= 0 or a string of decimal digits; a value above `u32::MAX` saturates (a
/// count past the attempt budget dead-letters at the first failure); anything else
/// counts as 0 failed attempts, with one `warn` log.
pub const ATTEMPTS: &str = "x-idem-attempts";

/// A header a producer may set to carry the idempotency key when `message_id` is not
/// set. A non-empty string is the key as is; an integer of any AMQP width is the key in
/// decimal text (`42` and `"42"` are the same key); an empty string counts as absent.
/// Any other type is a permanent error naming the header and the type
/// ([`KeyTypeError`](crate::dedup::KeyTypeError)): unlike the `x-idem-*` names, this
/// one is the producer's, and a broken key must not pass as "no key".
pub const IDEMPOTENCY_KEY: &str = "x-idempotency-key";

/// The error chain, truncated to [`MAX_ERROR_LEN`](crate::outcome::MAX_ERROR_LEN).
/// Written only.
pub const ERROR: &str = "x-idem-error";

/// `transient` or `permanent`. Written only.
pub const ERROR_KIND: &str = "x-idem-error-kind";

/// RFC 3339 time of the first failure. Read back from retry copies to keep the
/// backoff's time budget: malformed (not RFC 3339 UTC, before 1970, wrong type)
/// counts as absent, so this failure becomes the first; a time later than now counts
/// as now.
pub const FIRST_FAILED_AT: &str = "x-idem-first-failed-at";

/// RFC 3339 time of the latest failure. Written only.
pub const LAST_FAILED_AT: &str = "x-idem-last-failed-at";

/// Exchange of the original publish. Read back from retry copies (a string; any other
/// type is ignored and the delivery's own exchange is used).
pub const ORIGINAL_EXCHANGE: &str = "x-idem-original-exchange";

/// Routing key of the original publish. Read back like [`ORIGINAL_EXCHANGE`].
pub const ORIGINAL_ROUTING_KEY: &str = "x-idem-original-routing-key";

/// Queue the message was consumed from. Written only (the CLI replays to it).
pub const ORIGINAL_QUEUE: &str = "x-idem-original-queue";

/// Consumer name. Written only.
pub const CONSUMER: &str = "x-idem-consumer";

/// Idempotency key, if one was found. Written only.
pub const KEY: &str = "x-idem-key";

/// Rust type name of the error (`std::any::type_name`, e.g. `std::io::error::Error`),
/// when known. Written only.
pub const ERROR_TYPE: &str = "x-idem-error-type";

/// Host name of the process that recorded the failure. Written only.
pub const HOST: &str = "x-idem-host";

/// Process id of the process that recorded the failure (an integer). Written only.
pub const PID: &str = "x-idem-pid";

/// How many immediate (in-process) retries the failed delivery spent before this copy
/// was made (an integer, 0 without immediate retries). Written only.
pub const IMMEDIATE_RETRIES: &str = "x-idem-immediate-retries";

/// Backtrace of where the error was created, truncated to
/// [`MAX_BACKTRACE_LEN`](crate::outcome::MAX_BACKTRACE_LEN). Opt-in
/// ([`ConsumerBuilder::backtrace_header`](crate::ConsumerBuilder::backtrace_header)).
/// Written only.
pub const BACKTRACE: &str = "x-idem-backtrace";

/// Set by an operator's replay (value: any non-empty string). A message carrying it
/// may reopen a `done(poisoned)` record; a `done(succeeded)` one is still a duplicate.
/// Read back: an empty string is no replay, a value of another type is ignored (no
/// replay) with one `warn` log.
pub const REPLAY: &str = "x-idem-replay";

/// Written on a retry copy that was answered "busy" (the message's claim was still
/// held, typically by a worker that just died): how many times the message was
/// delivered before without being settled, carried over from the broker's
/// `redelivered` flag, [`BROKER_DELIVERY_COUNT`] and earlier copies. A copy carrying
/// it is a suspect, and the transport can enforce a delivery limit across copies with
/// it. Read back as a count ([`crash::prior_deliveries`](crate::crash::prior_deliveries)).
pub const DELIVERY_COUNT: &str = "x-idem-delivery-count";

/// The delivery-count header RabbitMQ quorum queues set on redeliveries (not idem's
/// own name). The transport reads it, as a count under the rule above, into the
/// transport-neutral [`DeliveryInfo::delivery_count`](crate::DeliveryInfo::delivery_count),
/// which is what the crash guard uses; the core only zeroes the header on idem's
/// copies, which are new messages to the broker.
pub const BROKER_DELIVERY_COUNT: &str = "x-delivery-count";

/// On retry and dead-letter copies: the `traceparent` of the delivery attempt that
/// failed; the next attempt's `idem.delivery` span links to it (feature `otel`).
/// Written, and read back only by that feature.
pub const PREVIOUS_ATTEMPT: &str = "x-idem-previous-attempt";

/// Every header of the failure record. A retry or dead-letter copy describes the
/// latest failure only: [`copy_onto`](crate::outcome::copy_onto) (and the RabbitMQ
/// worker, the same way) removes these names from the original's headers before adding
/// the copy's, so a field the latest failure lacks (an error type, a backtrace) is
/// never carried over from an earlier one. The history that must survive (attempts,
/// first failure time) is written anew on every copy.
pub const FAILURE_RECORD: [&str; 10] = [
    ATTEMPTS,
    ERROR,
    ERROR_KIND,
    FIRST_FAILED_AT,
    LAST_FAILED_AT,
    ERROR_TYPE,
    HOST,
    PID,
    IMMEDIATE_RETRIES,
    BACKTRACE,
];

/// Set by an operator's edit of a dead letter (`idem dlq edit`): the time of the edit
/// (RFC 3339). Written only; kept by a replay.
pub const EDITED: &str = "x-idem-edited";

/// Set by an operator's edit of a dead letter: the payload fingerprint (hex SHA-256 of
/// the body, as the dedup stages record it) of the body *before* the first edit, kept
/// through later edits and replays. It makes the edited body a new version of the same
/// message rather than "same key, different payload": a dedup stage that finds the key
/// done with that fingerprint treats the edited copy as that message (see
/// [the dedup docs](crate::dedup#edited-messages)). Read under the read rule.
pub const ORIGINAL_FINGERPRINT: &str = "x-idem-original-sha256";

/// Every header idem writes to record a failure or an unsettled delivery: the failure
/// history ([`FAILURE_RECORD`]), who failed it, and the crash-loop delivery count. An
/// operator's replay removes all of them, so the replayed message starts with no
/// attempts, no delivery count and no stale error. The `x-idem-*` headers not listed here are
/// [`KEPT_ON_REPLAY`]; a test of this crate fails when a header is in neither list.
pub const FAILURE: [&str; 14] = joined(
    &FAILURE_RECORD,
    &[ORIGINAL_QUEUE, CONSUMER, KEY, DELIVERY_COUNT],
);

/// `first` then `then`, as one array of `N` (a build error unless `N` is their total).
const fn joined<const N: usize>(
    first: &[&'static str],
    then: &[&'static str],
) -> [&'static str; N] {
    assert!(
        first.len() + then.len() == N,
        "N must be the length of both lists"
    );
    let mut out = [""; N];
    let mut i = 0;
    while i < N {
        out[i] = if i < first.len() {
            first[i]
        } else {
            then[i - first.len()]
        };
        i += 1;
    }
    out
}

/// The `x-idem-*` headers a replay keeps: where the message was first published (a
/// replay may route on it), the replay marker itself (replaced by the new replay's),
/// an operator's edit ([`EDITED`], [`ORIGINAL_FINGERPRINT`]: the dedup stages read
/// it), and the trace link to the attempt that failed ([`PREVIOUS_ATTEMPT`]), so a
/// trace shows the failure and the replayed run together.
pub const KEPT_ON_REPLAY: [&str; 6] = [
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    REPLAY,
    EDITED,
    ORIGINAL_FINGERPRINT,
    PREVIOUS_ATTEMPT,
];

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(found.contains(BACKTRACE), "{found:?}");
        let unclassified: Vec<&String> = found
            .iter()
            .filter(|n| !FAILURE.contains(&n.as_str()) && !KEPT_ON_REPLAY.contains(&n.as_str()))
            .collect();
        assert!(
            unclassified.is_empty(),
            "x-idem headers in neither headers::FAILURE nor headers::KEPT_ON_REPLAY: {unclassified:?}"
        );
        // The failure record a copy replaces is part of what a replay clears.
        assert!(FAILURE_RECORD.iter().all(|n| FAILURE.contains(n)));
    }
}
