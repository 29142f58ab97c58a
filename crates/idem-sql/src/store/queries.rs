//! The statements of the lease store, built once per table and dialect.

use super::{POISONED, PROCESSING};
use crate::backend::Dialect;
use crate::schema::{self, TableName};

pub(super) struct Queries {
    pub(super) insert: String,
    pub(super) take_over: String,
    pub(super) insert_counting: String,
    pub(super) take_over_counting: String,
    pub(super) read_starts: String,
    pub(super) probe_starts: String,
    pub(super) add_starts: String,
    pub(super) record: String,
    pub(super) extend: String,
    pub(super) complete: String,
    pub(super) release: String,
    pub(super) reopen: String,
    pub(super) cleanup: String,
}

impl Queries {
    pub(super) fn new(d: Dialect, t: &TableName) -> Self {
        let now = d.now_ms();
        let key = "consumer = ? AND idem_key = ?";
        let held = format!("{key} AND state = '{PROCESSING}' AND owner = ? AND expires_at > {now}");
        let q = |s: String| d.placeholders(&s);
        Queries {
            insert: q(d.insert_ignore(
                &t.to_string(),
                "consumer, idem_key, state, owner, fingerprint, expires_at",
                &format!("?, ?, '{PROCESSING}', ?, ?, {now} + ?"),
            )),
            take_over: q(format!(
                "UPDATE {t} SET state = '{PROCESSING}', owner = ?, fingerprint = ?, expires_at = {now} + ? \
                 WHERE {key} AND expires_at <= {now}"
            )),
            insert_counting: q(d.insert_ignore(
                &t.to_string(),
                "consumer, idem_key, state, owner, fingerprint, expires_at, starts",
                &format!("?, ?, '{PROCESSING}', ?, ?, {now} + ?, 1"),
            )),
            // An expired `processing` row is a start that never settled: count on.
            // `starts` is assigned first: MariaDB evaluates assignments left to right.
            take_over_counting: q(format!(
                "UPDATE {t} SET starts = CASE WHEN state = '{PROCESSING}' THEN starts + 1 ELSE 1 END, \
                 state = '{PROCESSING}', owner = ?, fingerprint = ?, expires_at = {now} + ? \
                 WHERE {key} AND expires_at <= {now}"
            )),
            read_starts: q(format!(
                "SELECT {} FROM {t} WHERE {key} AND owner = ?",
                d.int_cast("starts")
            )),
            probe_starts: format!("SELECT starts FROM {t} WHERE 1 = 0"),
            add_starts: format!("ALTER TABLE {t} ADD COLUMN starts BIGINT NOT NULL DEFAULT 0"),
            record: q(format!(
                "SELECT {}, {} FROM {t} WHERE {key}",
                d.record_columns(),
                d.int_cast(&format!("expires_at - {now}"))
            )),
            extend: q(format!(
                "UPDATE {t} SET expires_at = {now} + ? WHERE {held}"
            )),
            complete: q(format!(
                "UPDATE {t} SET state = ?, expires_at = {now} + ? WHERE {held}"
            )),
            release: q(format!("DELETE FROM {t} WHERE {held}")),
            reopen: q(format!(
                "UPDATE {t} SET state = '{PROCESSING}', owner = ?, expires_at = {now} + ? \
                 WHERE {key} AND state = '{POISONED}' AND expires_at > {now}"
            )),
            cleanup: schema::cleanup_sql(d, t),
        }
    }
}
