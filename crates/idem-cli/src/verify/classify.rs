//! Sorting the published ids into classes, and the at-risk and hazard checks: pure
//! functions of what was read.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use idem_amqp::DelayTiers;
use idem_core::Backoff;

use super::published::Published;
use super::queues::{Role, Seen};
use super::records::{Record, RecordState};
use super::render::age;
use super::{Class, Counts, Finding};

/// The settings the configuration hazards are checked from, as given on the command
/// line (verify cannot read them from a running consumer or from the broker).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// The consumer's dedup retention (default 7 days, idem's default).
    pub retention: Duration,
    /// The backoff's attempts, for the retry horizon through the tiers (default 10,
    /// idem's default backoff).
    pub max_attempts: u32,
    /// The retry horizon, if given: else computed from the tiers and the default
    /// backoff with `max_attempts` attempts.
    pub horizon: Option<Duration>,
    /// The consumer's crash limit (default 3, idem's default).
    pub crash_limit: u32,
    /// The work queue's `x-delivery-limit` (a quorum queue), if known.
    pub delivery_limit: Option<u32>,
    /// The SQL pool's size, if known.
    pub pool_size: Option<u32>,
    /// The worker's concurrency (handlers at once), if known.
    pub concurrency: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            retention: Duration::from_secs(7 * 24 * 3600),
            max_attempts: 10,
            horizon: None,
            crash_limit: idem_core::crash::DEFAULT_CRASH_LIMIT,
            delivery_limit: None,
            pool_size: None,
            concurrency: None,
        }
    }
}

impl Limits {
    /// The retry horizon: the given one, else the time the default backoff with
    /// `max_attempts` attempts spends in `tiers`.
    pub fn horizon(&self, tiers: &DelayTiers) -> Duration {
        self.horizon
            .unwrap_or_else(|| tiers.horizon(&Backoff::default().max_attempts(self.max_attempts)))
    }
}

/// The configuration hazards `limits` show.
pub fn hazards(limits: &Limits, tiers: &DelayTiers) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(limit) = limits.delivery_limit {
        if limit <= limits.crash_limit {
            out.push(Finding::new(
                Class::Hazard,
                "delivery_limit",
                "delivery_limit",
                format!(
                    "the queue's delivery_limit {limit} is not above the crash limit {}: the broker drops or dead-letters messages (crash-looping ones and their prefetched neighbours) before idem counts their crashes",
                    limits.crash_limit
                ),
            ));
        }
    }
    let horizon = limits.horizon(tiers);
    if limits.retention < horizon {
        out.push(Finding::new(
            Class::Hazard,
            "retention_vs_horizon",
            "retention",
            format!(
                "dedup retention {} is shorter than the retry horizon through the delay tiers {}: a late retry finds no record and runs again",
                age(limits.retention.as_secs_f64()),
                age(horizon.as_secs_f64())
            ),
        ));
    }
    if let (Some(pool), Some(concurrency)) = (limits.pool_size, limits.concurrency) {
        if pool < concurrency {
            out.push(Finding::new(
                Class::Hazard,
                "pool_vs_concurrency",
                "pool_size",
                format!(
                    "pool size {pool} is smaller than the concurrency {concurrency}: each message in the SQL inbox holds a connection, the others wait for the pool and time out"
                ),
            ));
        }
    }
    out
}

/// The keys to look up: every published id, and the key of every copy in a queue
/// (for the at-risk check).
pub(super) fn lookup_keys(published: &[Published], seen: &Seen) -> Vec<String> {
    let mut keys: BTreeSet<&str> = published.iter().map(|p| p.id.as_str()).collect();
    keys.extend(seen.copies.iter().filter_map(|c| c.key.as_deref()));
    keys.into_iter().map(str::to_owned).collect()
}

/// Where the published ids are, and those found nowhere yet.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub(super) counts: Counts,
    /// Ids found nowhere (so far).
    pub(super) unresolved: BTreeSet<String>,
}

/// Counts `record` and the queue role of one id; `false` if it is found nowhere.
fn place(counts: &mut Counts, record: Option<&Record>, role: Option<Role>) -> bool {
    match (record.map(|r| r.state), role) {
        (Some(RecordState::Succeeded), _) => counts.done += 1,
        (Some(RecordState::Poisoned), _) => counts.poisoned += 1,
        (_, Some(Role::Dead)) => counts.dead_lettered += 1,
        (_, Some(Role::Delay(_))) => counts.delayed += 1,
        (_, Some(Role::Work)) => counts.queued += 1,
        // Within its lease or past it (a stuck finding of its own): being processed.
        (Some(RecordState::Processing), None) => counts.in_flight += 1,
        (None, None) => return false,
    }
    true
}

/// Sorts `published` by what the queues (`seen`) and the records (`found`) show.
pub(super) fn classify(
    published: &[Published],
    seen: &Seen,
    found: &HashMap<String, Record>,
    grace: Duration,
) -> Outcome {
    let by_id = seen.by_id();
    let mut out = Outcome::default();
    for p in published {
        out.counts.published += 1;
        if p.pending {
            out.counts.pending += 1;
            continue;
        }
        if place(
            &mut out.counts,
            found.get(&p.id),
            by_id.get(p.id.as_str()).copied(),
        ) {
            continue;
        }
        if p.age_secs.is_some_and(|a| a < grace.as_secs_f64()) {
            out.counts.recent += 1;
        } else {
            out.unresolved.insert(p.id.clone());
        }
    }
    out
}

impl Outcome {
    /// The second look: ids found now count as in flight.
    pub(super) fn recheck(&mut self, seen: &Seen, found: &HashMap<String, Record>) {
        let by_id = seen.by_id();
        self.unresolved.retain(|id| {
            let now_found = found.contains_key(id.as_str()) || by_id.contains_key(id.as_str());
            if now_found {
                self.counts.in_flight += 1;
            }
            !now_found
        });
    }

    /// A lost finding per id still unresolved.
    pub(super) fn lost_findings(&self, published: &[Published], queue: &str) -> Vec<Finding> {
        published
            .iter()
            .filter(|p| self.unresolved.contains(&p.id))
            .map(|p| {
                let when = match (&p.created_at, p.age_secs) {
                    (Some(t), Some(a)) => format!("created {t}, published {} ago", age(a)),
                    _ => "given in the id list".to_owned(),
                };
                Finding::new(
                    Class::Lost,
                    "lost",
                    &p.id,
                    format!("{when}; no done record, not in {queue}, its delay queues or its DLQ"),
                )
            })
            .collect()
    }
}

/// DLQ messages dead-lettered longer ago than `retention`, and copies in a delay
/// queue (or the work queue) whose key's done record expires before the copy comes
/// back.
pub(super) fn at_risk(
    seen: &Seen,
    found: &HashMap<String, Record>,
    retention: Duration,
    now: SystemTime,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for c in &seen.copies {
        let name = c.id.as_deref().or(c.key.as_deref()).unwrap_or("(no id)");
        let wait = match c.role {
            Role::Dead => {
                let dead_for = c
                    .dead_lettered_at
                    .as_deref()
                    .and_then(idem_core::__private::parse_rfc3339)
                    .and_then(|t| now.duration_since(t).ok());
                if let Some(d) = dead_for.filter(|d| *d > retention) {
                    out.push(Finding::new(
                        Class::AtRisk,
                        "dlq_older_than_retention",
                        name,
                        format!(
                            "in {} for {}, longer than the dedup retention {}: its record is gone, a replay runs it again",
                            c.queue,
                            age(d.as_secs_f64()),
                            age(retention.as_secs_f64())
                        ),
                    ));
                }
                continue;
            }
            Role::Delay(tier) => tier,
            Role::Work => Duration::ZERO,
        };
        let Some(record) = c.key.as_deref().and_then(|k| found.get(k)) else {
            continue;
        };
        let Some(left) = record.expires_in_ms else {
            continue;
        };
        let done = matches!(record.state, RecordState::Succeeded);
        let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        if done && left < wait_ms {
            let when = if left < 0 {
                format!("expired {} ago", age(-left as f64 / 1000.0))
            } else {
                format!("expires in {}", age(left as f64 / 1000.0))
            };
            out.push(Finding::new(
                Class::AtRisk,
                "record_expires_before_copy",
                name,
                format!(
                    "a copy waits in {} (up to {}) while its done record {when}: the copy would run again",
                    c.queue,
                    age(wait.as_secs_f64())
                ),
            ));
        }
    }
    out
}
