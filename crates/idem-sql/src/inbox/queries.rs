//! The inbox's SQL statements, built once per table and dialect.

use crate::backend::Dialect;
use crate::schema::{self, TableName};
use crate::store::{POISONED, SUCCEEDED};

#[derive(Clone)]
pub(crate) struct Queries {
    pub(crate) insert_done: String,
    pub(crate) record_locked: String,
    pub(crate) present: String,
    pub(crate) present_clearing_start: String,
    pub(crate) take_expired: String,
    pub(crate) reopen: String,
    pub(crate) insert_poisoned: String,
    pub(crate) mark_poisoned: String,
    pub(crate) cleanup: String,
    pub(crate) starts_table: TableName,
    pub(crate) count_start: String,
    pub(crate) read_start: String,
    pub(crate) clear_start: String,
    pub(crate) cleanup_starts: String,
}

impl Queries {
    pub(crate) fn new(d: Dialect, t: &TableName) -> Self {
        let now = d.now_ms();
        let key = "consumer = ? AND idem_key = ?";
        let cols = "consumer, idem_key, state, owner, fingerprint, expires_at";
        let q = |s: String| d.placeholders(&s);
        let starts = t.suffixed("_starts");
        let record = format!(
            "SELECT {}, {} FROM {t} WHERE {key}",
            d.record_columns(),
            d.int_cast(&format!("expires_at - {now}"))
        );
        Queries {
            insert_done: q(d.insert_ignore(
                &t.to_string(),
                cols,
                &format!("?, ?, '{SUCCEEDED}', NULL, ?, {now} + ?"),
            )),
            record_locked: q(format!("{record}{}", d.for_update())),
            present: q(format!("SELECT {} FROM {t} WHERE {key}", d.int_cast("1"))),
            // PostgreSQL only (data-modifying CTE), numbered by hand: both halves
            // use the same two arguments.
            present_clearing_start: format!(
                "WITH cleared AS (DELETE FROM {starts} WHERE consumer = $1 AND idem_key = $2) \
                 SELECT CAST(1 AS BIGINT) FROM {t} WHERE consumer = $1 AND idem_key = $2"
            ),
            take_expired: q(format!(
                "UPDATE {t} SET state = '{SUCCEEDED}', owner = NULL, fingerprint = ?, expires_at = {now} + ? \
                 WHERE {key} AND expires_at <= {now}"
            )),
            reopen: q(format!(
                "UPDATE {t} SET state = '{SUCCEEDED}', fingerprint = ?, expires_at = {now} + ? \
                 WHERE {key} AND state = '{POISONED}'"
            )),
            insert_poisoned: q(d.insert_ignore(
                &t.to_string(),
                cols,
                &format!("?, ?, '{POISONED}', NULL, ?, {now} + ?"),
            )),
            mark_poisoned: q(format!(
                "UPDATE {t} SET state = '{POISONED}', fingerprint = ?, expires_at = {now} + ? \
                 WHERE {key} AND (state = '{POISONED}' OR expires_at <= {now})"
            )),
            cleanup: schema::cleanup_sql(d, t),
            count_start: q(count_start_sql(d, &starts)),
            read_start: q(format!("SELECT starts FROM {starts} WHERE {key}")),
            clear_start: q(format!("DELETE FROM {starts} WHERE {key}")),
            cleanup_starts: schema::cleanup_sql(d, &starts),
            starts_table: starts,
        }
    }
}

/// One more start of a message: a fresh counter, or the live one plus one.
fn count_start_sql(d: Dialect, t: &TableName) -> String {
    let now = d.now_ms();
    match d {
        // Assignments run left to right: `starts` still sees the old `expires_at`.
        Dialect::MySql => format!(
            "INSERT INTO {t} (consumer, idem_key, starts, expires_at) VALUES (?, ?, 1, {now} + ?) \
             ON DUPLICATE KEY UPDATE starts = IF(expires_at > {now}, starts + 1, 1), \
             expires_at = VALUES(expires_at)"
        ),
        _ => format!(
            "INSERT INTO {t} (consumer, idem_key, starts, expires_at) VALUES (?, ?, 1, {now} + ?) \
             ON CONFLICT (consumer, idem_key) DO UPDATE SET \
             starts = CASE WHEN {name}.expires_at > {now} THEN {name}.starts + 1 ELSE 1 END, \
             expires_at = excluded.expires_at RETURNING starts",
            name = t.name()
        ),
    }
}
