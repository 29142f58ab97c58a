//! [`DedupStore::claim_many`](idem_core::dedup::DedupStore::claim_many) on
//! PostgreSQL: the claims of many keys, counting their starts, in one statement.
//!
//! The statement binds the requests as arrays (`unnest ... WITH ORDINALITY`) and, in
//! data-modifying CTEs, inserts a `processing` row for every key that has none
//! (`ON CONFLICT DO NOTHING`, start count 1) and takes over every key whose row has
//! expired (start count + 1 if it was `processing`: a start that never settled, else
//! 1), the same conditions as the single-row statements. It then answers, per
//! request, what happened and the row as it was when the statement began (the
//! snapshot all its parts share), which decides the keys neither inserted nor taken
//! over: `done` (succeeded or poisoned, with its fingerprint), `processing` under a
//! live lease (busy, or acquired if the owner is the request's own, a retried call).
//! A key the statement cannot decide (a row committed by another transaction after it
//! began, or taken over by another owner between its snapshot and its update) runs
//! the single-row claim statements after it, as does a key repeated in one call.

use std::collections::HashSet;
use std::time::Duration;

use idem_core::dedup::{Claim, ClaimRequest, Completion, StoreError};
use sqlx::Row;

use super::pg_batch::Exec;
use super::{ms, SqlStore, POISONED, PROCESSING};
use crate::backend::{Backend, Dialect};
use crate::schema::TableName;

/// The claim statement for `table`.
pub(super) fn statement(table: &TableName) -> String {
    let now = Dialect::Postgres.now_ms();
    let t = table;
    format!(
        "WITH v AS (\
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY \
             AS v(consumer, idem_key, owner, fingerprint, i)), \
         ins AS (\
           INSERT INTO {t} (consumer, idem_key, state, owner, fingerprint, expires_at, starts) \
           SELECT consumer, idem_key, '{PROCESSING}', owner, fingerprint, {now} + $5, 1 FROM v \
           ON CONFLICT DO NOTHING \
           RETURNING consumer, idem_key), \
         took AS (\
           UPDATE {t} AS d SET \
             starts = CASE WHEN d.state = '{PROCESSING}' THEN d.starts + 1 ELSE 1 END, \
             state = '{PROCESSING}', owner = v.owner, fingerprint = v.fingerprint, \
             expires_at = {now} + $5 \
           FROM v WHERE d.consumer = v.consumer AND d.idem_key = v.idem_key \
             AND d.expires_at <= {now} \
           RETURNING d.consumer, d.idem_key, d.starts) \
         SELECT v.i, ins.idem_key IS NOT NULL AS inserted, took.starts AS took_starts, \
           d.state, d.owner, d.fingerprint, d.starts, (d.expires_at - {now})::bigint AS left_ms \
         FROM v \
         LEFT JOIN ins ON ins.consumer = v.consumer AND ins.idem_key = v.idem_key \
         LEFT JOIN took ON took.consumer = v.consumer AND took.idem_key = v.idem_key \
         LEFT JOIN {t} AS d ON d.consumer = v.consumer AND d.idem_key = v.idem_key"
    )
}

type Answer = Result<(Claim, Option<u32>), StoreError>;

/// Earlier unsettled starts, from a start count that includes this one.
fn earlier(starts: i64) -> Option<u32> {
    Some(u32::try_from(starts.saturating_sub(1)).unwrap_or(0))
}

/// The answer of one row of the statement; `None` when the statement could not
/// decide it.
fn decide(row: &sqlx::postgres::PgRow, owner: &str) -> Result<Option<Answer>, sqlx::Error> {
    if row.try_get::<bool, _>("inserted")? {
        return Ok(Some(Ok((Claim::Acquired, Some(0)))));
    }
    if let Some(starts) = row.try_get::<Option<i64>, _>("took_starts")? {
        return Ok(Some(Ok((Claim::Acquired, earlier(starts)))));
    }
    let state: Option<String> = row.try_get("state")?;
    let left: Option<i64> = row.try_get("left_ms")?;
    let (Some(state), Some(left)) = (state, left) else {
        return Ok(None);
    };
    if left <= 0 {
        return Ok(None);
    }
    let fingerprint: Option<String> = row.try_get("fingerprint")?;
    let claim = match state.as_str() {
        PROCESSING => {
            let row_owner: Option<String> = row.try_get("owner")?;
            if row_owner.as_deref() == Some(owner) {
                // Our own claim, after a lost reply: not a new start.
                let starts: Option<i64> = row.try_get("starts")?;
                return Ok(Some(Ok((Claim::Acquired, earlier(starts.unwrap_or(1))))));
            }
            Claim::Busy {
                retry_in: Duration::from_millis(left.unsigned_abs()),
            }
        }
        POISONED => Claim::Done {
            completion: Completion::Poisoned,
            fingerprint,
        },
        _ => Claim::Done {
            completion: Completion::Succeeded,
            fingerprint,
        },
    };
    Ok(Some(Ok((claim, Some(0)))))
}

/// Runs the statement for `sent` (indices into `requests`, distinct keys); one
/// answer per index, `None` for those left to the single-row statements.
async fn one_statement(
    exec: &Exec,
    requests: &[ClaimRequest],
    sent: &[usize],
    lease: Duration,
) -> Result<Vec<Option<Answer>>, sqlx::Error> {
    let col = |f: fn(&ClaimRequest) -> Option<String>| -> Vec<Option<String>> {
        sent.iter().map(|&i| f(&requests[i])).collect()
    };
    let rows = sqlx::query(&exec.claims)
        .bind(col(|r| Some(r.held.key.consumer().to_owned())))
        .bind(col(|r| Some(r.held.key.key().to_owned())))
        .bind(col(|r| Some(r.held.owner.as_str().to_owned())))
        .bind(col(|r| r.fingerprint.clone()))
        .bind(ms(lease))
        .fetch_all(&exec.pool)
        .await?;
    let mut answers: Vec<Option<Answer>> = sent.iter().map(|_| None).collect();
    for row in rows {
        let i: i64 = row.try_get("i")?;
        let Some(at) = usize::try_from(i - 1).ok().filter(|&at| at < sent.len()) else {
            continue;
        };
        answers[at] = decide(&row, requests[sent[at]].held.owner.as_str())?;
    }
    Ok(answers)
}

/// The claims of `requests` (see the module docs). A key too long for the table is
/// refused without being sent.
pub(super) async fn claim_many<DB: Backend>(
    store: &SqlStore<DB>,
    exec: &Exec,
    requests: &[ClaimRequest],
    lease: Duration,
) -> Vec<Answer> {
    let mut answers: Vec<Option<Answer>> = requests.iter().map(|_| None).collect();
    let mut seen = HashSet::new();
    let mut sent = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        match super::many::check_claim::<DB>(r) {
            Ok(()) if seen.insert(&r.held.key) => sent.push(i),
            Ok(()) => {}
            Err(e) => answers[i] = Some(Err(e)),
        }
    }
    if !sent.is_empty() {
        match one_statement(exec, requests, &sent, lease).await {
            Ok(found) => {
                for (&i, answer) in sent.iter().zip(found) {
                    answers[i] = answer;
                }
            }
            Err(e) => {
                let e = crate::schema::store_error(
                    format!(
                        "SQL dedup claim of {} keys on table {} failed",
                        sent.len(),
                        exec.table
                    ),
                    e,
                );
                for &i in &sent {
                    answers[i] = Some(Err(e.clone()));
                }
            }
        }
    }
    let mut out = Vec::with_capacity(requests.len());
    for (r, answer) in requests.iter().zip(answers) {
        out.push(match answer {
            Some(answer) => answer,
            None => store.claim_with(r, lease, true).await,
        });
    }
    out
}
