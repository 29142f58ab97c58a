//! Crash points for fault-injection tests (internal cargo feature `_failpoints`, off by default; hidden from the docs).
//!
//! When the feature is compiled in **and** the environment variable
//! [`IDEM_FAILPOINTS`](ENV) names a point, the worker calls [`std::process::abort`]
//! there: the process dies at once, like a `SIGKILL`, with no ack, no close and no
//! cleanup. The value is a comma-separated list of names, each optionally with a
//! probability (default 1.0):
//!
//! ```text
//! IDEM_FAILPOINTS=after-commit-before-ack=0.02,after-retry-publish-before-ack
//! ```
//!
//! Points:
//! - [`AFTER_COMMIT_BEFORE_ACK`]: the consumer's `process` returned a non-duplicate
//!   `Ack` (the handler ran and the dedup record is done: an SQL inbox has committed)
//!   and the broker ack is not sent yet. The broker redelivers the message; dedup must
//!   absorb it.
//! - [`AFTER_RETRY_PUBLISH_BEFORE_ACK`]: a retry or dead-letter copy was confirmed by
//!   the broker and the original is not acked yet. The broker redelivers the original
//!   while the copy exists too.
//! - [`BEFORE_ACK_FLUSH`]: with coalesced acks, a run of settled deliveries is about to
//!   be acked with one `basic.ack multiple=true` and the frame is not sent yet. Every
//!   delivery of the run (their effects done, their copies confirmed) is redelivered;
//!   dedup must absorb them all.
//!
//! Without the environment variable the checks cost one atomic load. The `idem-chaos`
//! crate uses this to prove that neither crash loses or repeats an effect.

use std::sync::OnceLock;

/// The environment variable read (once, at the first check).
pub const ENV: &str = "IDEM_FAILPOINTS";
/// After a handled `Ack`, before `basic.ack`.
pub const AFTER_COMMIT_BEFORE_ACK: &str = "after-commit-before-ack";
/// After a retry or dead-letter copy was confirmed, before the original's `basic.ack`.
pub const AFTER_RETRY_PUBLISH_BEFORE_ACK: &str = "after-retry-publish-before-ack";
/// Coalesced acks: a settled run is taken out, before its `basic.ack multiple=true`.
pub const BEFORE_ACK_FLUSH: &str = "before-ack-flush";

static ACTIVE: OnceLock<Vec<(String, f64)>> = OnceLock::new();

/// Parses an `IDEM_FAILPOINTS` value into `(name, probability)` pairs. Entries with an
/// unparsable probability are ignored (with a warning); probabilities are clamped to
/// `[0, 1]`.
pub fn parse(spec: &str) -> Vec<(String, f64)> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter_map(|entry| match entry.split_once('=') {
            None => Some((entry.to_owned(), 1.0)),
            Some((name, p)) => match p.trim().parse::<f64>() {
                Ok(p) if p.is_finite() => Some((name.trim().to_owned(), p.clamp(0.0, 1.0))),
                _ => {
                    tracing::warn!(entry, "ignoring {ENV} entry with an invalid probability");
                    None
                }
            },
        })
        .collect()
}

fn active() -> &'static [(String, f64)] {
    ACTIVE.get_or_init(|| {
        let points = std::env::var(ENV).map(|s| parse(&s)).unwrap_or_default();
        if !points.is_empty() {
            tracing::warn!(
                ?points,
                "failpoints armed: this process will abort on purpose"
            );
        }
        points
    })
}

/// Aborts the process if failpoint `name` is armed and its coin toss says so.
pub fn hit(name: &str) {
    let Some((_, p)) = active().iter().find(|(n, _)| n == name) else {
        return;
    };
    if *p >= 1.0 || fastrand::f64() < *p {
        eprintln!("idem failpoint {name}: aborting the process");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_probabilities() {
        assert_eq!(
            parse("after-commit-before-ack=0.02, after-retry-publish-before-ack,,x=2,y=oops"),
            vec![
                ("after-commit-before-ack".to_owned(), 0.02),
                ("after-retry-publish-before-ack".to_owned(), 1.0),
                ("x".to_owned(), 1.0),
            ]
        );
        assert!(parse("").is_empty());
    }

    #[test]
    fn unarmed_point_does_not_abort() {
        // The variable is not set in tests: hitting a point is a no-op.
        hit(AFTER_COMMIT_BEFORE_ACK);
    }
}
