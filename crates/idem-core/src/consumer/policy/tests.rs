//! One test per row of the decision table (docs/SEMANTICS.md section 3), run on the
//! pure decision: no stack, no store, no clock.

use super::*;
use crate::backoff::Jitter;

const SEC: Duration = Duration::from_secs(1);

/// 1 s, 2 s, 4 s ... no jitter, 5 attempts.
fn backoff() -> Backoff {
    Backoff::exponential(SEC)
        .jitter(Jitter::None)
        .max_attempts(5)
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

/// A first delivery (nothing failed before), decided at `at(0)`.
fn first() -> History {
    History {
        failed_before: 0,
        first_failed_at: None,
        now: at(0),
    }
}

/// A delivery whose earlier attempts failed `failed_before` times, the first at `at(0)`,
/// decided `elapsed` seconds later.
fn after(failed_before: u32, elapsed: u64) -> History {
    History {
        failed_before,
        first_failed_at: Some(at(0)),
        now: at(elapsed),
    }
}

fn run(result: Result<Processed, Verdict>, history: History) -> Decision {
    let backoff = backoff();
    let policy = Policy {
        mode: DeliveryMode::EffectivelyOnce,
        backoff: &backoff,
    };
    decide(result, &history, &policy)
}

fn fail(verdict: Verdict, history: History) -> Decision {
    run(Err(verdict), history)
}

const TRANSIENT: Verdict = Verdict::Fail(Some(ErrorKind::Transient));
const PERMANENT: Verdict = Verdict::Fail(Some(ErrorKind::Permanent));

fn backoff_retry(delay: Duration, attempts: u32) -> Decision {
    Decision::Retry {
        delay,
        delay_kind: DelayKind::Backoff,
        attempts,
    }
}

/// A retry after at least `delay` (asked for, not the backoff's), with `attempts`.
fn retry_at_least(delay: Duration, attempts: u32) -> Decision {
    Decision::Retry {
        delay,
        delay_kind: DelayKind::AtLeast,
        attempts,
    }
}

#[test]
fn ok_acks_and_a_done_key_acks_as_duplicate() {
    assert_eq!(
        run(Ok(Processed::Handled), first()),
        Decision::Ack { duplicate: false }
    );
    assert_eq!(
        run(Ok(Processed::Duplicate), after(3, 10)),
        Decision::Ack { duplicate: true }
    );
}

#[test]
fn transient_retries_after_the_backoff_delay_and_spends_an_attempt() {
    assert_eq!(fail(TRANSIENT, first()), backoff_retry(SEC, 1));
    assert_eq!(fail(TRANSIENT, after(2, 3)), backoff_retry(4 * SEC, 3));
}

#[test]
fn unclassified_counts_as_transient() {
    assert_eq!(fail(Verdict::Fail(None), first()), backoff_retry(SEC, 1));
}

#[test]
fn permanent_dead_letters_at_once() {
    assert_eq!(
        fail(PERMANENT, first()),
        Decision::DeadLetter { attempts: 1 }
    );
    // Whatever budget is left.
    assert_eq!(
        fail(PERMANENT, after(1, 1)),
        Decision::DeadLetter { attempts: 2 }
    );
}

#[test]
fn retry_after_waits_at_least_the_asked_delay_and_spends_an_attempt() {
    let asked = Duration::from_secs(90);
    assert_eq!(
        fail(Verdict::RetryAfter(asked), after(1, 2)),
        retry_at_least(asked, 2)
    );
}

#[test]
fn retry_after_on_the_last_attempt_dead_letters() {
    assert_eq!(
        fail(Verdict::RetryAfter(SEC), after(4, 20)),
        Decision::DeadLetter { attempts: 5 }
    );
}

#[test]
fn discard_is_a_discard_in_every_mode() {
    assert_eq!(fail(Verdict::Discard, after(4, 20)), Decision::Discard);
    let backoff = backoff();
    for mode in [DeliveryMode::AtMostOnce, DeliveryMode::AtLeastOnce] {
        let policy = Policy {
            mode,
            backoff: &backoff,
        };
        assert_eq!(
            decide(Err(Verdict::Discard), &first(), &policy),
            Decision::Discard
        );
    }
}

#[test]
fn at_most_once_drops_every_failure() {
    let backoff = backoff();
    let policy = Policy {
        mode: DeliveryMode::AtMostOnce,
        backoff: &backoff,
    };
    for verdict in [
        TRANSIENT,
        PERMANENT,
        Verdict::RetryAfter(SEC),
        Verdict::StoreDown,
        Verdict::Release,
    ] {
        assert_eq!(
            decide(Err(verdict), &first(), &policy),
            Decision::Dropped,
            "{verdict:?}"
        );
    }
    assert_eq!(
        decide(Ok(Processed::Handled), &first(), &policy),
        Decision::Ack { duplicate: false }
    );
}

#[test]
fn immediate_retries_only_for_transient_failures_that_spend_an_attempt() {
    assert!(retry_at_once(TRANSIENT, 0, 2));
    assert!(retry_at_once(Verdict::Fail(None), 1, 2));
    // The limit is the number of retries, not of tries.
    assert!(!retry_at_once(TRANSIENT, 2, 2));
    assert!(!retry_at_once(TRANSIENT, 0, 0));
    for never in [
        PERMANENT,
        Verdict::Discard,
        Verdict::StoreDown,
        Verdict::Release,
        Verdict::Busy(SEC),
        Verdict::RetryAfter(SEC),
    ] {
        assert!(!retry_at_once(never, 0, 5), "{never:?}");
    }
}

#[test]
fn release_while_the_breaker_is_open_spends_nothing_and_never_dead_letters() {
    assert_eq!(fail(Verdict::Release, first()), Decision::Release);
    // Even with the budget spent.
    assert_eq!(fail(Verdict::Release, after(9, 1000)), Decision::Release);
}

#[test]
fn busy_key_retries_after_its_delay_without_spending_an_attempt() {
    let delay = Duration::from_millis(250);
    assert_eq!(
        fail(Verdict::Busy(delay), after(4, 20)),
        retry_at_least(delay, 4)
    );
}

#[test]
fn store_failure_retries_with_backoff_and_spends_an_attempt() {
    assert_eq!(
        fail(Verdict::StoreDown, after(1, 1)),
        backoff_retry(2 * SEC, 2)
    );
}

#[test]
fn store_failure_on_the_last_attempt_is_retried_not_dead_lettered() {
    // Budget spent: retried at the last backoff delay, charged no further.
    assert_eq!(
        fail(Verdict::StoreDown, after(4, 20)),
        backoff_retry(8 * SEC, 4)
    );
    // A first delivery with a budget of one attempt: the delay after one failure.
    let one = Backoff::exponential(SEC)
        .jitter(Jitter::None)
        .max_attempts(1);
    let policy = Policy {
        mode: DeliveryMode::EffectivelyOnce,
        backoff: &one,
    };
    assert_eq!(
        decide(Err(Verdict::StoreDown), &first(), &policy),
        backoff_retry(SEC, 0)
    );
}

#[test]
fn attempts_exhausted_dead_letters_a_transient_failure() {
    // Attempt 4 of 5 still retries; attempt 5 is the last.
    assert_eq!(fail(TRANSIENT, after(3, 10)), backoff_retry(8 * SEC, 4));
    assert_eq!(
        fail(TRANSIENT, after(4, 20)),
        Decision::DeadLetter { attempts: 5 }
    );
}

#[test]
fn time_budget_dead_letters_when_the_next_delay_would_overrun_it() {
    let budget = Backoff::exponential(SEC)
        .jitter(Jitter::None)
        .max_attempts(100)
        .total_budget(Duration::from_secs(60));
    let policy = Policy {
        mode: DeliveryMode::EffectivelyOnce,
        backoff: &budget,
    };
    // 57 s since the first failure + 2 s fits in 60 s; + 4 s does not.
    assert_eq!(
        decide(Err(TRANSIENT), &after(1, 57), &policy),
        backoff_retry(2 * SEC, 2)
    );
    assert_eq!(
        decide(Err(TRANSIENT), &after(2, 57), &policy),
        Decision::DeadLetter { attempts: 3 }
    );
}

#[test]
fn a_first_failure_in_the_future_counts_as_now() {
    let skewed = History {
        failed_before: 1,
        first_failed_at: Some(at(3600)),
        now: at(0),
    };
    assert_eq!(skewed.first_failed_at(), at(0));
    assert_eq!(skewed.since_first_failure(), Duration::ZERO);
}
