//! `idem verify`: an after-the-fact check that what was published was applied once.
//!
//! For a time window, verify takes what was published (the rows of an outbox table
//! created in the window, or a list of message ids) and looks for each one:
//!
//! 1. in the queues of its topology, read without consuming (the work queue `Q`, its
//!    delay queues `Q.retry.<tier>`, its DLQ `Q.dlq`; every message read is put back
//!    as a confirmed copy before its original is acked, as the `dlq` reads do, see
//!    [`crate::dlq`]);
//! 2. in the consumer's dedup records (an `idem_sql` inbox or lease-store table in
//!    PostgreSQL or MariaDB/MySQL, or an `idem_redis` store; not SQLite), under the
//!    consumer's name and the message
//!    id as key (the default key; a consumer with another key extractor cannot be
//!    checked this way).
//!
//! Each id ends up in one class: `done` (a `succeeded` or `poisoned` record, expired
//! or not), `queued`, `delayed`, `dead_lettered`, `in_flight` (a `processing` record,
//! also past its lease, or found only by the second look, see below), `pending` (an
//! outbox row not yet published), `recent` (published less than the grace period ago:
//! not judged), or **lost** (none of these). Besides, verify reports:
//!
//! - **stuck**: `processing` records past their lease (SQL tables; Redis
//!   deletes a record when its lease ends), and outbox rows pending longer than
//!   `--stuck-after`;
//! - **at risk**: DLQ messages dead-lettered longer ago than the dedup retention (a
//!   replay would find no record and run them again), and copies waiting in a delay
//!   queue (or the work queue) whose key's done record expires before the copy comes
//!   back (or has already expired: the row is still there, the store ignores it);
//! - **config hazards** from the values given on the command line: a quorum queue's
//!   `delivery_limit` not above the crash limit, a retention shorter than the retry
//!   horizon through the delay tiers, a pool smaller than the concurrency.
//!
//! # In-flight messages
//!
//! A delivery a live consumer holds unacked is in no queue a reader can see, and an
//! inbox writes its record only when the handler's transaction commits: for a moment
//! such a message is neither queued nor done. Verify reads the queues first and the
//! records after, so a message taken from a queue before the read and finished by
//! the time the records are read is found as done. The ids still unaccounted for
//! after that are looked for a second time, queues then records, after
//! `--recheck-after` (3 s by default): those found then count as `in_flight`; only
//! ids found nowhere both times are lost. Rows published less than `--grace` ago are
//! never judged. A message held unacked through both looks (a handler slower than
//! the recheck delay) is reported lost: give such consumers a longer
//! `--recheck-after`, or run verify on a window that ended longer ago than the
//! slowest handler.
//!
//! # Memory
//!
//! One entry per id of the window and per message of the topology's queues (ids and
//! keys, never bodies) is held at once: narrow the window for very large outboxes.

mod classify;
pub(crate) mod cmd;
mod published;
mod queues;
mod records;
mod render;
mod sql;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use lapin::Connection;
use serde::Serialize;

use crate::error::CliError;

pub use classify::{hazards, Limits};
pub use published::{read_ids, Published};
pub use records::{Record, RecordState, Records};
pub use render::write_text;

pub use crate::error::EXIT_FINDINGS;

/// Where the list of what was published comes from.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Source {
    /// Rows of this outbox table created within the window (PostgreSQL).
    Outbox {
        /// The table (`schema.name` allowed).
        table: String,
    },
    /// These message ids (e.g. read with [`read_ids`]); the window and the grace
    /// period do not apply.
    Ids(Vec<String>),
}

/// What `idem verify` checks and how.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct VerifyOptions {
    /// The work queue (its delay queues and DLQ are derived from it).
    pub queue: String,
    /// The delay tiers of the topology.
    pub tiers: idem_amqp::DelayTiers,
    /// The consumer name the dedup records are scoped by.
    pub consumer: String,
    /// Start of the window (outbox rows created at or after).
    pub since: SystemTime,
    /// End of the window (outbox rows created at or before).
    pub until: SystemTime,
    /// Rows published (or created, if not yet published) less than this ago are not
    /// judged.
    pub grace: Duration,
    /// Outbox rows due and pending longer than this are stuck.
    pub stuck_after: Duration,
    /// How long to wait before the second look for unaccounted ids.
    pub recheck_after: Duration,
    /// The values the configuration hazards are checked from.
    pub limits: Limits,
}

impl VerifyOptions {
    /// Options for `queue` and `consumer`: the default tiers, the last 24 hours, a
    /// grace period of 60 s, stuck after 5 min, a recheck after 3 s, default limits.
    pub fn new(queue: impl Into<String>, consumer: impl Into<String>) -> Self {
        let until = SystemTime::now();
        VerifyOptions {
            queue: queue.into(),
            tiers: idem_amqp::DelayTiers::default(),
            consumer: consumer.into(),
            since: until - Duration::from_secs(24 * 3600),
            until,
            grace: Duration::from_secs(60),
            stuck_after: Duration::from_secs(300),
            recheck_after: Duration::from_secs(3),
            limits: Limits::default(),
        }
    }
}

/// The kind of a finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Class {
    /// Published, found nowhere.
    Lost,
    /// A record processing past its lease, or an outbox row pending too long.
    Stuck,
    /// A message a replay or a late copy would run again.
    AtRisk,
    /// A configuration that can lose or repeat work.
    Hazard,
}

impl Class {
    /// `lost`, `stuck`, `at-risk` or `hazard` (the word of the text output).
    pub fn word(self) -> &'static str {
        match self {
            Class::Lost => "lost",
            Class::Stuck => "stuck",
            Class::AtRisk => "at-risk",
            Class::Hazard => "hazard",
        }
    }
}

/// One finding: what, about which id or key (or setting), and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[non_exhaustive]
pub struct Finding {
    /// The class.
    pub class: Class,
    /// What exactly: `lost`, `processing_past_lease`, `outbox_pending`,
    /// `dlq_older_than_retention`, `record_expires_before_copy`, `delivery_limit`,
    /// `retention_vs_horizon`, `pool_vs_concurrency`.
    pub kind: String,
    /// The message id or key (the setting's name for a hazard).
    pub id: String,
    /// Details for a person.
    pub detail: String,
}

impl Finding {
    pub(crate) fn new(class: Class, kind: &str, id: &str, detail: String) -> Self {
        Finding {
            class,
            kind: kind.to_owned(),
            id: id.to_owned(),
            detail,
        }
    }
}

/// How many published ids fell in each class, and how many findings of each class.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Counts {
    /// Ids checked (rows of the window, or ids given).
    pub published: u64,
    /// With a `succeeded` record (expired or not).
    pub done: u64,
    /// With a `poisoned` record (dead-lettered by the consumer).
    pub poisoned: u64,
    /// In the work queue.
    pub queued: u64,
    /// In a delay queue.
    pub delayed: u64,
    /// In the DLQ.
    pub dead_lettered: u64,
    /// With a `processing` record (past its lease too: also a stuck finding), or
    /// found only by the second look.
    pub in_flight: u64,
    /// Outbox rows not yet published.
    pub pending: u64,
    /// Published less than the grace period ago: not judged.
    pub recent: u64,
    /// Lost findings.
    pub lost: u64,
    /// Stuck findings.
    pub stuck: u64,
    /// At-risk findings.
    pub at_risk: u64,
    /// Configuration hazards.
    pub hazards: u64,
}

/// The result of `idem verify` (its `--json` document).
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct VerifyReport {
    /// The work queue.
    pub queue: String,
    /// The consumer.
    pub consumer: String,
    /// Where the published ids came from (`outbox <table>` or `ids`).
    pub source: String,
    /// Where the records were read (`postgres <table>` or `redis <prefix>`).
    pub records: String,
    /// Start of the window (RFC 3339; outbox only).
    pub since: Option<String>,
    /// End of the window (RFC 3339; outbox only).
    pub until: Option<String>,
    /// The counts.
    pub counts: Counts,
    /// Every finding, lost first.
    pub findings: Vec<Finding>,
    /// What verify could not see, e.g. a missing delay queue or consumers holding
    /// deliveries.
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// Whether nothing was found (exit 0).
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Runs the check on `conn` (the broker), reading the published ids from `db` (the
/// outbox's database, with [`Source::Outbox`]) and the records from `records`.
pub async fn verify(
    conn: &Connection,
    db: Option<&sqlx::PgPool>,
    source: &Source,
    records: &Records,
    opts: &VerifyOptions,
) -> Result<VerifyReport, CliError> {
    let (published, source_name) = match source {
        Source::Outbox { table } => {
            let pool = db.ok_or_else(|| {
                CliError::Usage("the outbox source needs a database connection".to_owned())
            })?;
            let rows = published::outbox_window(pool, table, opts).await?;
            (rows, format!("outbox {table}"))
        }
        Source::Ids(ids) => (published::from_ids(ids), "ids".to_owned()),
    };
    let topology = idem_amqp::Topology::new(opts.queue.as_str()).tiers(opts.tiers.clone());
    let mut notes = Vec::new();
    let seen = queues::read(conn, &topology, &mut notes).await?;
    let keys = classify::lookup_keys(&published, &seen);
    let found = records.lookup(&opts.consumer, &keys).await?;
    let mut outcome = classify::classify(&published, &seen, &found, opts.grace);
    if !outcome.unresolved.is_empty() {
        tokio::time::sleep(opts.recheck_after).await;
        let mut ignored = Vec::new();
        let again = queues::read(conn, &topology, &mut ignored).await?;
        let keys: Vec<String> = outcome.unresolved.iter().cloned().collect();
        let later = records.lookup(&opts.consumer, &keys).await?;
        outcome.recheck(&again, &later);
    }
    let mut findings = outcome.lost_findings(&published, &opts.queue);
    findings.extend(records.stuck(&opts.consumer).await?);
    if let (Source::Outbox { table }, Some(pool)) = (source, db) {
        findings.extend(published::stuck_rows(pool, table, opts.stuck_after).await?);
    }
    findings.extend(classify::at_risk(
        &seen,
        &found,
        opts.limits.retention,
        SystemTime::now(),
    ));
    findings.extend(hazards(&opts.limits, &opts.tiers));
    findings.sort();
    let mut counts = outcome.counts;
    for f in &findings {
        match f.class {
            Class::Lost => counts.lost += 1,
            Class::Stuck => counts.stuck += 1,
            Class::AtRisk => counts.at_risk += 1,
            Class::Hazard => counts.hazards += 1,
        }
    }
    let window = matches!(source, Source::Outbox { .. });
    let time = |t: SystemTime| window.then(|| idem_core::__private::rfc3339(t));
    Ok(VerifyReport {
        queue: opts.queue.clone(),
        consumer: opts.consumer.clone(),
        source: source_name,
        records: records.describe(),
        since: time(opts.since),
        until: time(opts.until),
        counts,
        findings,
        notes,
    })
}

/// The ids of `findings` of class `class` (for tests and scripts).
pub fn ids_of(findings: &[Finding], class: Class) -> BTreeSet<String> {
    findings
        .iter()
        .filter(|f| f.class == class)
        .map(|f| f.id.clone())
        .collect()
}
