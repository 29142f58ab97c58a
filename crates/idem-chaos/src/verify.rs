//! The checker: every confirmed message against the effects, the invocation log and
//! the dead-letter queue. [`verify`] gathers the evidence from PostgreSQL and the DLQ;
//! [`classify`] (pure) decides what was lost, applied twice, or re-run for a reason
//! the store's promise allows.

use std::collections::{HashMap, HashSet};

use lapin::options::BasicGetOptions;

use crate::common::{self, BoxError, Names, Store};
use crate::fleet::Fleet;
use crate::setup::Admin;

/// What a run left behind, read after the queues drained.
#[derive(Debug, Default)]
pub(crate) struct Evidence {
    /// Every message the broker (or the outbox transaction) confirmed: id -> poison.
    pub(crate) published: HashMap<String, bool>,
    /// Every applied effect (at most one per id: a unique constraint).
    pub(crate) effects: HashSet<String>,
    /// Messages whose effect was attempted again after it had been applied.
    pub(crate) dupes: HashSet<String>,
    /// Who invoked each of those messages (every invocation, in any order).
    pub(crate) runs: HashMap<String, Vec<String>>,
    /// Workers that died during the run (SIGKILL, crash point, anything else).
    pub(crate) dead: HashSet<String>,
    /// Duplicated messages whose effect was applied before a durability fault ended
    /// (a Redis restart or failover) and attempted again after it began.
    pub(crate) in_durability_window: HashSet<String>,
    /// The message id of every copy in the dead-letter queue.
    pub(crate) dlq: Vec<Option<String>>,
}

/// The verdict on each kind of message, from [`classify`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// Valid confirmed messages without an effect.
    pub(crate) lost: i64,
    /// Poison messages with an effect.
    pub(crate) poison_applied: i64,
    /// Effects of messages never confirmed.
    pub(crate) stray_effects: i64,
    /// Effects attempted twice that the store promised to prevent.
    pub(crate) duplicates: i64,
    /// Lease store: re-runs after the first runner died between effect and completion.
    pub(crate) reruns_after_crash: i64,
    /// Lease store: re-runs a Redis that forgot its writes explains.
    pub(crate) reruns_after_durability_fault: i64,
    /// Distinct poison messages in the DLQ.
    pub(crate) dead_lettered: i64,
    /// DLQ copies that are not of a poison message.
    pub(crate) dlq_foreign: usize,
}

/// Classifies the evidence of a run: which confirmed messages were lost, which were
/// applied twice against the store's promise, which re-runs the promise allows.
///
/// The PostgreSQL inbox (and the no-dedup control group) promise nothing is applied
/// twice, so every duplicate attempt counts. A Redis lease store re-runs a message whose
/// worker died between its effect and its completion (the lease expires), and a Redis
/// that lost writes re-runs what it had recorded as done: those are counted apart,
/// not as duplicates.
pub(crate) fn classify(store: Store, e: &Evidence) -> Verdict {
    let mut v = Verdict::default();
    for (id, &poison) in &e.published {
        match (poison, e.effects.contains(id)) {
            (false, false) => v.lost += 1,
            (true, true) => v.poison_applied += 1,
            _ => {}
        }
    }
    v.stray_effects = e
        .effects
        .iter()
        .filter(|id| !e.published.contains_key(*id))
        .count() as i64;
    for id in &e.dupes {
        let crashed = e
            .runs
            .get(id)
            .is_some_and(|ws| ws.iter().any(|w| e.dead.contains(w)));
        match store {
            Store::Postgres | Store::None => v.duplicates += 1,
            Store::Redis if crashed => v.reruns_after_crash += 1,
            Store::Redis if e.in_durability_window.contains(id) => {
                v.reruns_after_durability_fault += 1;
            }
            Store::Redis => v.duplicates += 1,
        }
    }
    let mut seen = HashSet::new();
    for id in &e.dlq {
        match id {
            Some(id) if e.published.get(id) == Some(&true) => {
                seen.insert(id.as_str());
            }
            _ => v.dlq_foreign += 1,
        }
    }
    v.dead_lettered = seen.len() as i64;
    v
}

/// The consumer outbox's record (`--follow-ups`): the follow-up rows against the
/// effects.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FollowUps {
    /// Follow-up rows in the outbox.
    pub(crate) rows: i64,
    /// Effects without their follow-up.
    pub(crate) lost: i64,
    /// Rows whose id is not the one derived for an effect (a second, distinct
    /// follow-up of one message, or one of a message never applied).
    pub(crate) unexpected: i64,
}

impl FollowUps {
    /// Each effect has its one follow-up and nothing else is there.
    pub(crate) fn exact(&self) -> bool {
        self.lost == 0 && self.unexpected == 0
    }
}

/// Compares the follow-up ids found with the ones the effects call for (the first
/// follow-up of each applied message, see [`idem_outbox::follow_up_id_at`]).
pub(crate) fn check_follow_ups(effects: &HashSet<String>, found: &[String]) -> FollowUps {
    let expected: HashSet<String> = effects
        .iter()
        .map(|id| idem_outbox::follow_up_id_at(crate::worker::CONSUMER, id, 0).to_string())
        .collect();
    let found_set: HashSet<&str> = found.iter().map(String::as_str).collect();
    FollowUps {
        rows: found.len() as i64,
        lost: expected
            .iter()
            .filter(|id| !found_set.contains(id.as_str()))
            .count() as i64,
        // The table's unique id makes a repeated id impossible; count it anyway.
        unexpected: (found.len() - found_set.len()) as i64
            + found_set
                .iter()
                .filter(|id| !expected.contains(**id))
                .count() as i64,
    }
}

/// The run's counts and its [`Verdict`].
pub(crate) struct Totals {
    pub(crate) confirmed: i64,
    pub(crate) poison: i64,
    pub(crate) effects: i64,
    pub(crate) invocations: i64,
    pub(crate) dlq_copies: usize,
    pub(crate) verdict: Verdict,
    /// With `--follow-ups`: the consumer outbox's record.
    pub(crate) follow_ups: Option<FollowUps>,
    /// With `--keys`: effects applied after the effect of a later message of their
    /// key ([`count_reordered`]).
    pub(crate) reordered: Option<i64>,
}

/// Counts the effects applied out of their key's sequence: `applied` lists the ids of
/// the effects in the order they were applied (`<run>-<n>`; key `n % keys`, sequence
/// `n / keys`); an effect counts when an effect of a later message of its key was
/// applied before it. Lost or poison messages (no effect) do not count.
pub(crate) fn count_reordered(applied: &[String], keys: u64) -> i64 {
    let mut highest: HashMap<u64, u64> = HashMap::new();
    let mut reordered = 0;
    for id in applied {
        let Some(n) = id.rsplit_once('-').and_then(|(_, n)| n.parse::<u64>().ok()) else {
            continue;
        };
        let (key, seq) = (n % keys.max(1), n / keys.max(1));
        match highest.get(&key) {
            Some(&top) if top > seq => reordered += 1,
            _ => {
                highest.insert(key, seq);
            }
        }
    }
    reordered
}

/// Reads (and removes) every message of the DLQ: the message ids.
pub(crate) async fn read_dlq(
    admin: &mut Admin,
    dlq: &str,
) -> Result<Vec<Option<String>>, BoxError> {
    let ch = admin.channel().await?;
    let mut ids = Vec::new();
    while let Some(got) = ch
        .basic_get(dlq.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        ids.push(
            got.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
        );
    }
    Ok(ids)
}

/// Gathers the [`Evidence`] (tables and DLQ) and classifies it.
pub(crate) async fn verify(
    admin: &mut Admin,
    names: &Names,
    fleet: &Fleet,
    store: Store,
    durability_windows: &[(String, String)],
    follow_ups: bool,
    keys: u64,
) -> Result<Totals, BoxError> {
    let t = |k: &str| names.table(k);
    let (published, effects, invocations, dupes) =
        (t("published"), t("effects"), t("invocations"), t("dupes"));
    let published_rows: Vec<(String, bool)> =
        sqlx::query_as(&format!("SELECT msg_id, poison FROM {published}"))
            .fetch_all(&admin.pg)
            .await?;
    let effect_ids: Vec<String> = sqlx::query_scalar(&format!("SELECT msg_id FROM {effects}"))
        .fetch_all(&admin.pg)
        .await?;
    let invocation_rows = admin
        .count(&format!("SELECT count(*) FROM {invocations}"))
        .await?;
    // Every duplicate effect attempt, and who had run the message before.
    let dupe_ids: Vec<String> = sqlx::query_scalar(&format!("SELECT DISTINCT msg_id FROM {dupes}"))
        .fetch_all(&admin.pg)
        .await?;
    let runs: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT msg_id, worker FROM {invocations} WHERE msg_id = ANY($1)"
    ))
    .bind(&dupe_ids)
    .fetch_all(&admin.pg)
    .await?;
    // Duplicates a durability fault explains: the effect was applied before Redis came
    // back (its `done` record, if any, was forgotten) and re-attempted after it went down.
    let (starts, ends): (Vec<&str>, Vec<&str>) = durability_windows
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .unzip();
    let in_window: Vec<String> = sqlx::query_scalar::<_, String>(&format!(
        "SELECT DISTINCT d.msg_id FROM {dupes} d JOIN {effects} e USING (msg_id) \
         WHERE EXISTS (SELECT 1 FROM unnest($1::text[], $2::text[]) AS w(t0, t1) \
         WHERE e.at < w.t1::timestamptz AND d.at > w.t0::timestamptz)"
    ))
    .bind(&starts)
    .bind(&ends)
    .fetch_all(&admin.pg)
    .await?;
    let mut by_msg: HashMap<String, Vec<String>> = HashMap::new();
    for (msg, worker) in runs {
        by_msg.entry(msg).or_default().push(worker);
    }
    let dlq = read_dlq(admin, &common::topology(&names.queue()).dlq()).await?;
    let evidence = Evidence {
        published: published_rows.into_iter().collect(),
        effects: effect_ids.into_iter().collect(),
        dupes: dupe_ids.into_iter().collect(),
        runs: by_msg,
        dead: fleet.dead.clone(),
        in_durability_window: in_window.into_iter().collect(),
        dlq,
    };
    let verdict = classify(store, &evidence);
    let follow_ups = if follow_ups {
        let found: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT message_id FROM {}",
            names.table("followups")
        ))
        .fetch_all(&admin.pg)
        .await?;
        Some(check_follow_ups(&evidence.effects, &found))
    } else {
        None
    };
    let reordered = if keys > 0 {
        let applied: Vec<String> =
            sqlx::query_scalar(&format!("SELECT msg_id FROM {effects} ORDER BY at, msg_id"))
                .fetch_all(&admin.pg)
                .await?;
        Some(count_reordered(&applied, keys))
    } else {
        None
    };
    Ok(Totals {
        reordered,
        confirmed: evidence.published.len() as i64,
        poison: evidence.published.values().filter(|p| **p).count() as i64,
        effects: evidence.effects.len() as i64,
        invocations: invocation_rows,
        dlq_copies: evidence.dlq.len(),
        verdict,
        follow_ups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reordered_counts_effects_applied_after_a_later_one_of_their_key() {
        let ids = |ns: &[u64]| ns.iter().map(|n| format!("run-{n}")).collect::<Vec<_>>();
        // 2 keys: key 0 = 0, 2, 4; key 1 = 1, 3, 5.
        assert_eq!(count_reordered(&ids(&[0, 1, 2, 3, 4, 5]), 2), 0);
        assert_eq!(count_reordered(&ids(&[1, 0, 3, 2, 5, 4]), 2), 0);
        assert_eq!(count_reordered(&ids(&[2, 0, 4, 1, 3, 5]), 2), 1);
        assert_eq!(count_reordered(&ids(&[4, 2, 0, 1, 5, 3]), 2), 3);
        // Gaps (lost or poison) are no reorder.
        assert_eq!(count_reordered(&ids(&[0, 4, 1, 5]), 2), 0);
    }

    fn ids(list: &[&str]) -> HashSet<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    /// m1..m4 valid, p1 poison; m1, m2, m3 applied.
    fn base() -> Evidence {
        Evidence {
            published: [
                ("m1", false),
                ("m2", false),
                ("m3", false),
                ("m4", false),
                ("p1", true),
            ]
            .into_iter()
            .map(|(id, p)| (id.to_owned(), p))
            .collect(),
            effects: ids(&["m1", "m2", "m3"]),
            ..Evidence::default()
        }
    }

    #[test]
    fn a_confirmed_message_without_effect_is_lost_poison_is_not() {
        let v = classify(Store::Postgres, &base());
        assert_eq!(v.lost, 1, "m4 has no effect");
        assert_eq!(v.poison_applied, 0);
        assert_eq!(v.stray_effects, 0);
    }

    #[test]
    fn applied_poison_and_unconfirmed_effects_are_counted() {
        let mut e = base();
        e.effects.extend(ids(&["p1", "m4", "ghost"]));
        let v = classify(Store::Postgres, &e);
        assert_eq!((v.lost, v.poison_applied, v.stray_effects), (0, 1, 1));
    }

    #[test]
    fn the_inbox_counts_every_duplicate_even_after_a_crash() {
        let mut e = base();
        e.dupes = ids(&["m1", "m2"]);
        e.runs
            .insert("m1".into(), vec!["w0g1".into(), "w1g2".into()]);
        e.dead = ids(&["w0g1"]);
        e.in_durability_window = ids(&["m2"]);
        for store in [Store::Postgres, Store::None] {
            let v = classify(store, &e);
            assert_eq!(v.duplicates, 2, "{store:?}");
            assert_eq!(v.reruns_after_crash + v.reruns_after_durability_fault, 0);
        }
    }

    #[test]
    fn a_lease_store_rerun_is_explained_by_a_dead_runner_or_a_durability_fault() {
        let mut e = base();
        e.dupes = ids(&["m1", "m2", "m3"]);
        // m1: its first runner died; m2: applied before Redis forgot; m3: neither.
        e.runs
            .insert("m1".into(), vec!["w0g1".into(), "w1g2".into()]);
        e.runs
            .insert("m2".into(), vec!["w1g2".into(), "w2g3".into()]);
        e.runs
            .insert("m3".into(), vec!["w1g2".into(), "w2g3".into()]);
        e.dead = ids(&["w0g1"]);
        e.in_durability_window = ids(&["m2"]);
        let v = classify(Store::Redis, &e);
        assert_eq!(v.reruns_after_crash, 1);
        assert_eq!(v.reruns_after_durability_fault, 1);
        assert_eq!(v.duplicates, 1, "m3 is a real duplicate");
    }

    #[test]
    fn dlq_copies_of_poison_count_once_anything_else_is_foreign() {
        let mut e = base();
        e.dlq = vec![
            Some("p1".into()),
            Some("p1".into()),
            Some("m1".into()),
            Some("unknown".into()),
            None,
        ];
        let v = classify(Store::Postgres, &e);
        assert_eq!(v.dead_lettered, 1);
        assert_eq!(v.dlq_foreign, 3);
    }

    #[test]
    fn follow_ups_must_match_the_effects_one_to_one() {
        let effects = ids(&["m1", "m2"]);
        let id = |m: &str| idem_outbox::follow_up_id_at(crate::worker::CONSUMER, m, 0).to_string();
        let exact = check_follow_ups(&effects, &[id("m1"), id("m2")]);
        assert!(exact.exact(), "{exact:?}");
        let lost = check_follow_ups(&effects, &[id("m1")]);
        assert_eq!((lost.lost, lost.unexpected), (1, 0));
        let second = idem_outbox::follow_up_id_at(crate::worker::CONSUMER, "m1", 1).to_string();
        let extra = check_follow_ups(&effects, &[id("m1"), id("m2"), second, id("m3")]);
        assert_eq!((extra.lost, extra.unexpected), (0, 2));
        assert!(!extra.exact());
    }

    #[test]
    fn a_clean_run_has_an_all_zero_verdict() {
        let mut e = base();
        e.effects.insert("m4".into());
        e.dlq = vec![Some("p1".into())];
        let v = classify(Store::Redis, &e);
        assert_eq!(
            v,
            Verdict {
                dead_lettered: 1,
                ..Verdict::default()
            }
        );
    }
}
