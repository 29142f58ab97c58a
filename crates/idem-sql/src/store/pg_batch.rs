//! The batched path of the lease store on PostgreSQL: see [`SqlStore`](super::SqlStore)'s
//! docs, "Batching".

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use idem_core::dedup::{BatchExecutor, HeldClaim, OwnerToken, ScopedKey, StoreError};
use sqlx::{PgPool, Row};

use super::{ms, PROCESSING};
use crate::backend::Dialect;
use crate::schema::TableName;

/// One batched operation.
pub(crate) enum Op {
    /// Insert-if-absent (the first step of a claim).
    Claim {
        key: ScopedKey,
        owner: OwnerToken,
        fingerprint: Option<String>,
        lease: std::time::Duration,
        counting: bool,
    },
    /// Complete (`state` given) or extend (`state` `None`) a held claim.
    Update {
        key: ScopedKey,
        owner: OwnerToken,
        state: Option<&'static str>,
        ms: i64,
    },
    /// Release a held claim.
    Release { key: ScopedKey, owner: OwnerToken },
}

impl Op {
    /// Completes (`state` given) or extends `held`, for `d`.
    pub(crate) fn update(held: &HeldClaim, state: Option<&'static str>, d: Duration) -> Op {
        Op::Update {
            key: held.key.clone(),
            owner: held.owner.clone(),
            state,
            ms: ms(d),
        }
    }

    /// Releases `held`.
    pub(crate) fn release(held: &HeldClaim) -> Op {
        Op::Release {
            key: held.key.clone(),
            owner: held.owner.clone(),
        }
    }

    fn key(&self) -> &ScopedKey {
        match self {
            Op::Claim { key, .. } | Op::Update { key, .. } | Op::Release { key, .. } => key,
        }
    }
}

/// The answer to one batched operation.
pub(crate) enum Answer {
    /// The claim was inserted: acquired, with its earlier starts when counting.
    Acquired(Option<u32>),
    /// The update or release applied (`true`) or found no claim of its owner.
    Settled(bool),
    /// Not settled by the batch: the caller runs the single-row statements (a
    /// claim of a key that has a row).
    Fallback,
}

/// Runs batches in one statement per round (one connection), each operation's key
/// at most once per round.
pub(crate) struct Exec {
    pub(crate) pool: PgPool,
    pub(crate) table: TableName,
    sql: String,
    /// The statement of `claim_many` (see `pg_claims`).
    pub(crate) claims: String,
}

impl Exec {
    pub(crate) fn new(pool: PgPool, table: TableName) -> Self {
        let now = Dialect::Postgres.now_ms();
        let t = &table;
        // Three data-modifying CTEs on disjoint keys (one operation per key per
        // round), so none can see or hide another's row change.
        let sql = format!(
            "WITH ins AS (\
               INSERT INTO {t} (consumer, idem_key, state, owner, fingerprint, expires_at, starts) \
               SELECT v.consumer, v.idem_key, '{PROCESSING}', v.owner, v.fingerprint, {now} + v.ms, v.starts \
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[]) \
                 AS v(consumer, idem_key, owner, fingerprint, ms, starts) \
               ON CONFLICT DO NOTHING \
               RETURNING consumer, idem_key, owner), \
             upd AS (\
               UPDATE {t} AS d SET state = COALESCE(v.state, d.state), expires_at = {now} + v.ms \
               FROM unnest($7::text[], $8::text[], $9::text[], $10::text[], $11::bigint[]) WITH ORDINALITY \
                 AS v(consumer, idem_key, owner, state, ms, i) \
               WHERE d.consumer = v.consumer AND d.idem_key = v.idem_key AND d.state = '{PROCESSING}' \
                 AND d.owner = v.owner AND d.expires_at > {now} \
               RETURNING v.i), \
             del AS (\
               DELETE FROM {t} AS d \
               USING unnest($12::text[], $13::text[], $14::text[]) WITH ORDINALITY AS v(consumer, idem_key, owner, i) \
               WHERE d.consumer = v.consumer AND d.idem_key = v.idem_key AND d.state = '{PROCESSING}' \
                 AND d.owner = v.owner AND d.expires_at > {now} \
               RETURNING v.i) \
             SELECT 0::bigint AS kind, 0::bigint AS i, consumer, idem_key, owner FROM ins \
             UNION ALL SELECT 1, i, NULL, NULL, NULL FROM upd \
             UNION ALL SELECT 2, i, NULL, NULL, NULL FROM del"
        );
        let claims = super::pg_claims::statement(&table);
        Exec {
            pool,
            table,
            sql,
            claims,
        }
    }

    fn error(&self, e: sqlx::Error, ops: usize) -> StoreError {
        crate::schema::store_error(
            format!(
                "SQL dedup batch of {ops} operations on table {} failed",
                self.table
            ),
            e,
        )
    }

    /// One round: every key at most once. Returns one answer per operation.
    async fn round(
        &self,
        conn: &mut sqlx::PgConnection,
        ops: &[&Op],
    ) -> Result<Vec<Answer>, sqlx::Error> {
        let mut ins: [Vec<Option<String>>; 4] = Default::default();
        let (mut ins_ms, mut ins_starts) = (Vec::new(), Vec::new());
        let mut upd: [Vec<Option<String>>; 4] = Default::default();
        let mut upd_ms = Vec::new();
        let mut del: [Vec<String>; 3] = Default::default();
        // Where each update / release sits in `ops`, by its ordinal (1-based).
        let (mut upd_at, mut del_at) = (Vec::new(), Vec::new());
        let mut claim_at: HashMap<(&str, &str, &str), usize> = HashMap::new();
        for (n, op) in ops.iter().enumerate() {
            match op {
                Op::Claim {
                    key,
                    owner,
                    fingerprint,
                    lease,
                    counting,
                } => {
                    ins[0].push(Some(key.consumer().to_owned()));
                    ins[1].push(Some(key.key().to_owned()));
                    ins[2].push(Some(owner.as_str().to_owned()));
                    ins[3].push(fingerprint.clone());
                    ins_ms.push(ms(*lease));
                    ins_starts.push(i64::from(*counting));
                    claim_at.insert((key.consumer(), key.key(), owner.as_str()), n);
                }
                Op::Update {
                    key,
                    owner,
                    state,
                    ms,
                } => {
                    upd[0].push(Some(key.consumer().to_owned()));
                    upd[1].push(Some(key.key().to_owned()));
                    upd[2].push(Some(owner.as_str().to_owned()));
                    upd[3].push(state.map(str::to_owned));
                    upd_ms.push(*ms);
                    upd_at.push(n);
                }
                Op::Release { key, owner } => {
                    del[0].push(key.consumer().to_owned());
                    del[1].push(key.key().to_owned());
                    del[2].push(owner.as_str().to_owned());
                    del_at.push(n);
                }
            }
        }
        let [c, k, o, f] = ins;
        let [uc, uk, uo, us] = upd;
        let [dc, dk, dout] = del;
        let rows = sqlx::query(&self.sql)
            .bind(c)
            .bind(k)
            .bind(o)
            .bind(f)
            .bind(ins_ms)
            .bind(ins_starts)
            .bind(uc)
            .bind(uk)
            .bind(uo)
            .bind(us)
            .bind(upd_ms)
            .bind(dc)
            .bind(dk)
            .bind(dout)
            .fetch_all(&mut *conn)
            .await?;
        let mut answers: Vec<Answer> = ops
            .iter()
            .map(|op| match op {
                Op::Claim { .. } => Answer::Fallback,
                _ => Answer::Settled(false),
            })
            .collect();
        for row in rows {
            let kind: i64 = row.try_get("kind")?;
            let at = match kind {
                0 => {
                    let consumer: String = row.try_get("consumer")?;
                    let key: String = row.try_get("idem_key")?;
                    let owner: String = row.try_get("owner")?;
                    claim_at
                        .get(&(consumer.as_str(), key.as_str(), owner.as_str()))
                        .copied()
                }
                _ => {
                    let i: i64 = row.try_get("i")?;
                    let list = if kind == 1 { &upd_at } else { &del_at };
                    usize::try_from(i - 1)
                        .ok()
                        .and_then(|i| list.get(i))
                        .copied()
                }
            };
            let Some(at) = at else { continue };
            answers[at] = match ops[at] {
                // An inserted row is a first start: no earlier ones.
                Op::Claim { counting, .. } => Answer::Acquired(counting.then_some(0)),
                _ => Answer::Settled(true),
            };
        }
        Ok(answers)
    }
}

#[async_trait]
impl BatchExecutor for Exec {
    type Op = Op;
    type Output = Answer;

    async fn execute(&self, ops: Vec<Op>) -> Vec<Result<Answer, StoreError>> {
        // Rounds: the n-th operation on a key goes in round n.
        let mut seen: HashMap<&ScopedKey, usize> = HashMap::new();
        let mut rounds: Vec<Vec<usize>> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let r = seen.entry(op.key()).or_insert(0);
            if rounds.len() <= *r {
                rounds.push(Vec::new());
            }
            rounds[*r].push(i);
            *r += 1;
        }
        let mut out: Vec<Option<Result<Answer, StoreError>>> = ops.iter().map(|_| None).collect();
        let mut conn = match self.pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                let e = self.error(e, ops.len());
                return ops.iter().map(|_| Err(e.clone())).collect();
            }
        };
        for members in rounds {
            let round: Vec<&Op> = members.iter().map(|&i| &ops[i]).collect();
            match self.round(&mut conn, &round).await {
                Ok(answers) => {
                    for (&i, a) in members.iter().zip(answers) {
                        out[i] = Some(Ok(a));
                    }
                }
                Err(e) => {
                    let e = self.error(e, members.len());
                    for &i in &members {
                        out[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        out.into_iter()
            .map(|a| a.unwrap_or(Ok(Answer::Fallback)))
            .collect()
    }
}

/// Completions or releases of many keys in one batch statement.
pub(super) async fn settle_many(exec: &Exec, ops: Vec<Op>) -> Vec<Result<bool, StoreError>> {
    if ops.is_empty() {
        return Vec::new();
    }
    exec.execute(ops)
        .await
        .into_iter()
        .map(|reply| match reply {
            Ok(Answer::Settled(done)) => Ok(done),
            Ok(_) => Err(StoreError::new(
                "SQL dedup batch answered a settle with a claim",
            )),
            Err(e) => Err(e),
        })
        .collect()
}
