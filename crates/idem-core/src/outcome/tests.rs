//! Unit tests of the dispositions.

use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::error::ErrorKind;

#[test]
fn dispositions_print_one_line() {
    let failure = |kind| Failure::new(kind, "gateway timed out", 1, UNIX_EPOCH);
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
