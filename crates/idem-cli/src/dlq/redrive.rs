//! Redrive rules: handle a known kind of dead letter automatically.
//!
//! A rules file (TOML) lists rules in order; each names the work queue whose DLQ it
//! reads, filters (the same as the `idem dlq` options) and an action:
//!
//! ```toml
//! # Gateway timeouts of the billing consumer, dead-lettered more than 10 minutes
//! # ago: back to their queue at 20 per second, at most 3 times per message.
//! [[rule]]
//! name = "gateway-timeouts"
//! queue = "billing"
//! consumer = "billing"
//! match = "gateway timeout"
//! older_than = "10m"
//! action = "replay"
//! rate = 20
//! max_replays = 3
//!
//! # Validation errors: parked for a person, in billing.parked.
//! [[rule]]
//! name = "park-validation"
//! queue = "billing"
//! error_type = "billing::ValidationError"
//! action = "move"
//! to = "billing.parked"
//! ```
//!
//! Filters: `id` (a list), `group`, `error_type`, `consumer`, `match` (a regular
//! expression on the error), `since`/`until` (RFC 3339 or an age) and `older_than`
//! (an age: dead-lettered longer ago than that; the same as `until`). A rule with no
//! filter matches every message of its queue's DLQ.
//!
//! Actions:
//! - `replay`: like `idem dlq replay` (failure headers cleared, `x-idem-replay` set),
//!   at most `rate` messages per second (default: unpaced). Each replayed copy
//!   carries [`REDRIVE_COUNT_HEADER`] (`x-idem-redrive-count`), one more than the
//!   message had, and [`REDRIVE_RULE_HEADER`] (`x-idem-redrive-rule`). A message
//!   whose count has reached `max_replays` (default 3) is left in the DLQ for a
//!   person: reported as `held`, counted, and never replayed by a rule again. A
//!   person's `idem dlq replay` keeps the count (it is not a failure header).
//! - `move`: the message is published unchanged (its failure history kept, plus
//!   `x-idem-redrive-rule`) to the queue `to`, which must exist, and removed from the
//!   DLQ once the broker confirmed it.
//!
//! The first rule a message matches decides for it: each rule reads the DLQ in
//! turn, and a message an earlier rule matched (moved, replayed or held) is left to
//! it. Every action is logged (`tracing`, target `idem_cli::dlq::redrive`) and
//! counted in the metric `idem_dlq_redriven_total{rule, action}` (`action` is
//! `replay`, `move` or `held`); a dry run changes and counts nothing.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Connection;
use serde::{Deserialize, Serialize};

use super::replay::{transfer, Plan};
use super::{replay_properties, restored_properties, DlqEntry, Filter, MoveReport, ReplayOptions};
use crate::error::CliError;

/// Header on a copy a rule replayed: how many times rules replayed the message.
pub const REDRIVE_COUNT_HEADER: &str = "x-idem-redrive-count";
/// Header on a copy a rule replayed or moved: the rule's name.
pub const REDRIVE_RULE_HEADER: &str = "x-idem-redrive-rule";
/// The default `max_replays` of a replay rule.
pub const DEFAULT_MAX_REPLAYS: u32 = 3;

/// A rules file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// The rules, in order.
    #[serde(rename = "rule", default)]
    pub rules: Vec<Rule>,
}

/// What a rule does with the messages it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Back to their queue.
    Replay,
    /// To another queue (`to`).
    Move,
}

/// One rule (see the [module docs](self)).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Rule {
    /// Names the rule in logs, reports and the metric.
    pub name: String,
    /// The work queue Q (its DLQ is read), or the DLQ's own name.
    pub queue: String,
    pub action: Action,
    /// `move`: the queue the messages go to.
    #[serde(default)]
    pub to: Option<String>,
    /// `replay`: messages per second.
    #[serde(default)]
    pub rate: Option<f64>,
    /// `replay`: replays by rules per message (default 3).
    #[serde(default)]
    pub max_replays: Option<u32>,
    #[serde(default)]
    pub id: Vec<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub error_type: Option<String>,
    #[serde(default)]
    pub consumer: Option<String>,
    #[serde(default, rename = "match")]
    pub pattern: Option<String>,
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    #[serde(default)]
    pub older_than: Option<String>,
}

impl Rules {
    /// Parses and checks a rules file's text: every rule named once, a `to` for
    /// `move`, valid patterns, times and rates.
    pub fn parse(text: &str) -> Result<Rules, CliError> {
        let rules: Rules = toml::from_str(text)
            .map_err(|e| CliError::Usage(format!("invalid rules file: {e}")))?;
        if rules.rules.is_empty() {
            return Err(CliError::Usage("the rules file has no [[rule]]".to_owned()));
        }
        let mut names = std::collections::BTreeSet::new();
        for r in &rules.rules {
            if !names.insert(r.name.as_str()) {
                return Err(CliError::Usage(format!("two rules are named {:?}", r.name)));
            }
            r.filter()?;
            match (r.action, &r.to) {
                (Action::Move, None) => {
                    return Err(CliError::Usage(format!(
                        "rule {:?}: action \"move\" needs to = \"queue\"",
                        r.name
                    )))
                }
                (Action::Replay, Some(_)) => {
                    return Err(CliError::Usage(format!(
                        "rule {:?}: `to` is for action \"move\" (a replay goes to the message's own queue)",
                        r.name
                    )))
                }
                _ => {}
            }
            if r.rate.is_some_and(|x| !(x.is_finite() && x > 0.0)) {
                return Err(CliError::Usage(format!(
                    "rule {:?}: rate must be more than 0 (messages per second)",
                    r.name
                )));
            }
        }
        Ok(rules)
    }

    /// Reads and parses a rules file.
    pub fn load(path: &str) -> Result<Rules, CliError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::Usage(format!("cannot read the rules file {path:?}: {e}")))?;
        Self::parse(&text)
    }
}

impl Rule {
    /// The rule's filters.
    pub fn filter(&self) -> Result<Filter, CliError> {
        let now = std::time::SystemTime::now();
        let opt = |what: &str, v: &Option<String>| {
            v.as_deref()
                .map(|t| super::time_arg(&format!("rule {:?}: {what}", self.name), t, now))
                .transpose()
        };
        let older = match &self.older_than {
            Some(age) => Some(
                super::parse_age(age)
                    .and_then(|a| now.checked_sub(a))
                    .ok_or_else(|| {
                        CliError::Usage(format!(
                            "rule {:?}: older_than {age:?}: expected an age such as 10m, 2h, 7d",
                            self.name
                        ))
                    })?,
            ),
            None => None,
        };
        let until = match (opt("until", &self.until)?, older) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(Filter {
            ids: self.id.iter().cloned().collect(),
            group: self.group.clone(),
            error_type: self.error_type.clone(),
            consumer: self.consumer.clone(),
            since: opt("since", &self.since)?,
            until,
            pattern: self
                .pattern
                .as_deref()
                .map(|p| super::pattern(&format!("rule {:?}: match", self.name), p))
                .transpose()?,
        })
    }
}

fn redrive_count(delivery: &lapin::message::Delivery) -> u32 {
    let v = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(REDRIVE_COUNT_HEADER).cloned());
    match v {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u32::try_from(n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => n,
        _ => 0,
    }
}

fn with_headers(
    props: lapin::BasicProperties,
    extra: Vec<(&str, AMQPValue)>,
) -> lapin::BasicProperties {
    let mut t = props
        .headers()
        .as_ref()
        .map(|t| t.inner().clone())
        .unwrap_or_default();
    for (k, v) in extra {
        t.insert(k.into(), v);
    }
    props.with_headers(FieldTable::from(t))
}

/// What one rule did (or, in a dry run, would do).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleReport {
    /// The rule.
    pub rule: String,
    /// `replay` or `move`.
    pub action: Action,
    /// Messages left in the DLQ because rules replayed them `max_replays` times.
    pub held: u64,
    /// The moves (see [`MoveReport`]).
    pub report: MoveReport,
}

/// Runs every rule once, in order (see the [module docs](self)).
pub async fn redrive(
    conn: &Connection,
    rules: &Rules,
    dry_run: bool,
) -> Result<Vec<RuleReport>, CliError> {
    let mut out = Vec::new();
    let filters = rules
        .rules
        .iter()
        .map(Rule::filter)
        .collect::<Result<Vec<_>, _>>()?;
    for (i, rule) in rules.rules.iter().enumerate() {
        // Earlier rules on the same queue have the first say.
        let earlier: Vec<&Filter> = rules.rules[..i]
            .iter()
            .zip(&filters)
            .filter(|(r, _)| r.queue == rule.queue)
            .map(|(_, f)| f)
            .collect();
        let filter = &filters[i];
        let mine = |e: &DlqEntry| filter.matches(e) && !earlier.iter().any(|f| f.matches(e));
        let max = rule.max_replays.unwrap_or(DEFAULT_MAX_REPLAYS);
        let options = ReplayOptions {
            dry_run,
            rate: rule.rate,
        };
        let mut held = 0u64;
        let report = match rule.action {
            Action::Replay => {
                let replay_id = format!("redrive-{}-{}", rule.name, uuid::Uuid::now_v7());
                let id = replay_id.clone();
                transfer(conn, &rule.queue, Some(replay_id), &options, |d, e, q| {
                    if !mine(e) {
                        return None;
                    }
                    let count = redrive_count(d);
                    if count >= max {
                        held += 1;
                        if !dry_run {
                            tracing::info!(rule = %rule.name, message_id = ?e.message_id, replays = count, "held for a person: replayed by rules {count} time(s), the rule's max_replays");
                            metrics::counter!("idem_dlq_redriven_total", "rule" => rule.name.clone(), "action" => "held").increment(1);
                        }
                        return None;
                    }
                    let props = replay_properties(&d.properties, &id, e.broker_made());
                    Some(Plan {
                        target: e.source_queue().unwrap_or(q).to_owned(),
                        properties: with_headers(
                            props,
                            vec![
                                (REDRIVE_COUNT_HEADER, AMQPValue::LongInt(count.saturating_add(1).min(i32::MAX as u32) as i32)),
                                (REDRIVE_RULE_HEADER, AMQPValue::LongString(LongString::from(rule.name.as_bytes()))),
                            ],
                        ),
                        outcome: "moved",
                    })
                })
                .await?
            }
            Action::Move => {
                let to = rule.to.clone().unwrap_or_default();
                transfer(conn, &rule.queue, None, &options, |d, e, _| {
                    mine(e).then(|| Plan {
                        target: to.clone(),
                        properties: with_headers(
                            restored_properties(&d.properties),
                            vec![(
                                REDRIVE_RULE_HEADER,
                                AMQPValue::LongString(LongString::from(rule.name.as_bytes())),
                            )],
                        ),
                        outcome: "parked",
                    })
                })
                .await?
            }
        };
        if !dry_run && report.done > 0 {
            let action = match rule.action {
                Action::Replay => "replay",
                Action::Move => "move",
            };
            tracing::info!(rule = %rule.name, action, count = report.done, dlq = %report.dlq, "redrive");
            metrics::counter!("idem_dlq_redriven_total", "rule" => rule.name.clone(), "action" => action)
                .increment(report.done);
        }
        out.push(RuleReport {
            rule: rule.name.clone(),
            action: rule.action,
            held,
            report,
        });
    }
    Ok(out)
}

/// Runs the rules every `interval` until `stop` resolves: the task a worker process
/// (or `idem dlq redrive --watch`) runs. A failed round is logged and the next one
/// runs at the next tick; `on_round` sees each round's reports.
pub async fn redrive_every(
    conn: &Connection,
    rules: &Rules,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
    mut on_round: impl FnMut(Result<Vec<RuleReport>, CliError>),
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {
                let round = redrive(conn, rules, false).await;
                if let Err(e) = &round {
                    tracing::warn!(error = %e, "redrive round failed; trying again at the next tick");
                }
                on_round(round);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_files_are_checked() {
        let ok = r#"
            [[rule]]
            name = "t"
            queue = "billing"
            match = "gateway timeout"
            older_than = "10m"
            action = "replay"
            rate = 20
            [[rule]]
            name = "p"
            queue = "billing"
            error_type = "ValidationError"
            action = "move"
            to = "billing.parked"
        "#;
        let r = Rules::parse(ok).unwrap();
        assert_eq!(r.rules.len(), 2);
        assert!(r.rules[0].filter().unwrap().until.is_some());
        for bad in [
            "",
            "[[rule]]\nname='a'\nqueue='q'\naction='move'",
            "[[rule]]\nname='a'\nqueue='q'\naction='replay'\nmatch='('",
            "[[rule]]\nname='a'\nqueue='q'\naction='replay'\nrate=0",
            "[[rule]]\nname='a'\nqueue='q'\naction='explode'",
            "[[rule]]\nname='a'\nqueue='q'\naction='replay'\ntypo=1",
            "[[rule]]\nname='a'\nqueue='q'\naction='replay'\n[[rule]]\nname='a'\nqueue='q'\naction='replay'",
        ] {
            assert!(Rules::parse(bad).is_err(), "{bad}");
        }
    }
}
