//! The report of a comparing scenario: per-round rates of idem and its baseline(s),
//! their medians, the median, min and max of the per-round ratios, as one JSON line.
//!
//! A ratio is taken within a round (idem's rate over the baseline's rate of the same
//! round), never between medians: rounds run interleaved, so drift in the machine or
//! broker hits both sides of one round alike and cancels out of that round's ratio.

use std::fmt;
use std::time::Duration;

/// Which side of a round a run measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// idem.
    Idem,
    /// The hand-written loop a user would write (per-delivery acks, confirm loop ...).
    Baseline,
    /// `amqp-noop` only: the best-case hand-written loop (`multiple=true` acks).
    BestCase,
    /// `amqp-redis` or `amqp-postgres` with `--batch N`: idem with a batch handler.
    Batch,
}

impl Side {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Side::Idem => "idem",
            Side::Baseline => "baseline",
            Side::BestCase => "best-case baseline",
            Side::Batch => "idem batch",
        }
    }
}

/// Median, min and max of some values (NaN for none).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Spread {
    pub(crate) fn of(values: &[f64]) -> Spread {
        Spread {
            median: median(values),
            min: values.iter().copied().reduce(f64::min).unwrap_or(f64::NAN),
            max: values.iter().copied().reduce(f64::max).unwrap_or(f64::NAN),
        }
    }
}

/// The result of a scenario: one JSON line (and the data of its chart).
pub(crate) struct Report {
    pub(crate) scenario: &'static str,
    pub(crate) messages: u64,
    pub(crate) prefetch: u16,
    /// msgs/s per round, in round order.
    pub(crate) idem: Vec<f64>,
    pub(crate) baseline: Vec<f64>,
    /// Empty unless the scenario has a best-case baseline (`amqp-noop`).
    pub(crate) best_case: Vec<f64>,
    /// Empty unless the scenario runs a batch side (`--batch N`), and its batch size.
    pub(crate) batch: Vec<f64>,
    pub(crate) batch_size: Option<usize>,
    /// How the batch handler does its work: `each` (per message through `Batch::each`;
    /// a savepoint per message on PostgreSQL) or `bulk` (one multi-row insert).
    pub(crate) batch_mode: &'static str,
    /// CPU per message of each run, by side (scenarios that sample it).
    pub(crate) cpu: Vec<(Side, crate::cpu::PerMessage)>,
}

impl Report {
    pub(crate) fn new(scenario: &'static str, messages: u64, prefetch: u16) -> Report {
        Report {
            scenario,
            messages,
            prefetch,
            idem: Vec::new(),
            baseline: Vec::new(),
            best_case: Vec::new(),
            batch: Vec::new(),
            batch_size: None,
            batch_mode: "each",
            cpu: Vec::new(),
        }
    }

    /// Records the CPU one run of `side` used (from [`crate::cpu::Sample`]), and prints
    /// it to stderr.
    pub(crate) fn record_cpu(&mut self, side: Side, used: crate::cpu::PerMessage) {
        eprintln!("  {} CPU us/msg: {used}", side.label());
        self.cpu.push((side, used));
    }

    /// The median CPU per message of `side`'s runs, if any were sampled.
    fn cpu_of(&self, side: Side) -> Option<crate::cpu::PerMessage> {
        let runs: Vec<_> = self
            .cpu
            .iter()
            .filter(|(s, _)| *s == side)
            .map(|(_, c)| *c)
            .collect();
        (!runs.is_empty()).then(|| crate::cpu::PerMessage::median(&runs))
    }

    /// Records one run of `messages` that took `elapsed`, and prints it to stderr.
    pub(crate) fn record(&mut self, round: u32, side: Side, elapsed: Duration) {
        let rate = self.messages as f64 / elapsed.as_secs_f64().max(1e-9);
        eprintln!(
            "round {round} {}: {rate:.0} msg/s ({elapsed:?})",
            side.label()
        );
        match side {
            Side::Idem => self.idem.push(rate),
            Side::Baseline => self.baseline.push(rate),
            Side::BestCase => self.best_case.push(rate),
            Side::Batch => self.batch.push(rate),
        }
    }

    /// The series of the chart: label and per-round rates, idem first.
    pub(crate) fn series(&self) -> Vec<(&'static str, &[f64])> {
        let mut series = vec![
            (Side::Idem.label(), self.idem.as_slice()),
            (Side::Baseline.label(), self.baseline.as_slice()),
        ];
        if !self.best_case.is_empty() {
            series.push((Side::BestCase.label(), self.best_case.as_slice()));
        }
        if !self.batch.is_empty() {
            series.push((Side::Batch.label(), self.batch.as_slice()));
        }
        series
    }
}

/// idem's rate over `other`'s, round by round (only rounds both sides finished).
pub(crate) fn ratios(idem: &[f64], other: &[f64]) -> Vec<f64> {
    idem.iter().zip(other).map(|(a, b)| a / b).collect()
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A JSON number (JSON has no NaN or infinity: those become `null`).
struct Num(f64, usize);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_finite() {
            write!(f, "{:.*}", self.1, self.0)
        } else {
            f.write_str("null")
        }
    }
}

/// The JSON fields `,"<name>":<median>,"<name>_min":<min>,"<name>_max":<max>` of a
/// spread of ratios (3 decimals).
struct RatioFields(&'static str, Spread);

impl fmt::Display for RatioFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let RatioFields(name, s) = self;
        write!(
            f,
            r#","{name}":{},"{name}_min":{},"{name}_max":{}"#,
            Num(s.median, 3),
            Num(s.min, 3),
            Num(s.max, 3),
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ratio = Spread::of(&ratios(&self.idem, &self.baseline));
        write!(
            f,
            r#"{{"scenario":"{}","messages":{},"prefetch":{},"rounds":{},"msgs_per_s":{},"baseline_msgs_per_s":{}{}"#,
            self.scenario,
            self.messages,
            self.prefetch,
            self.idem.len().min(self.baseline.len()),
            Num(median(&self.idem), 0),
            Num(median(&self.baseline), 0),
            RatioFields("ratio", ratio),
        )?;
        if !self.best_case.is_empty() {
            let best = Spread::of(&ratios(&self.idem, &self.best_case));
            write!(
                f,
                r#","best_case_baseline_msgs_per_s":{}{}"#,
                Num(median(&self.best_case), 0),
                RatioFields("best_case_ratio", best),
            )?;
        }
        if !self.batch.is_empty() {
            let per = Spread::of(&ratios(&self.batch, &self.idem));
            let base = Spread::of(&ratios(&self.batch, &self.baseline));
            write!(
                f,
                r#","batch_size":{},"batch_mode":"{}","batch_msgs_per_s":{}{}{}"#,
                self.batch_size.unwrap_or(0),
                self.batch_mode,
                Num(median(&self.batch), 0),
                RatioFields("batch_vs_per_message", per),
                RatioFields("batch_vs_baseline", base),
            )?;
        }
        if !self.cpu.is_empty() {
            f.write_str(r#","cpu_us_per_msg":{"#)?;
            let mut first = true;
            for side in [Side::Idem, Side::Baseline, Side::BestCase, Side::Batch] {
                if let Some(cpu) = self.cpu_of(side) {
                    let key = match side {
                        Side::Idem => "idem",
                        Side::Baseline => "baseline",
                        Side::BestCase => "best_case",
                        Side::Batch => "batch",
                    };
                    write!(f, r#"{}"{key}":{cpu}"#, if first { "" } else { "," })?;
                    first = false;
                }
            }
            f.write_str("}")?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn spread_gives_median_min_and_max() {
        assert_eq!(
            Spread::of(&[1.2, 0.5, 2.0, 0.9, 1.0]),
            Spread {
                median: 1.0,
                min: 0.5,
                max: 2.0
            }
        );
        assert!(Spread::of(&[]).min.is_nan());
    }

    #[test]
    fn ratios_are_per_round_not_of_medians() {
        // Round 1 is slow for both sides: its ratio is still 1.
        let idem = [100.0, 10.0, 100.0];
        let baseline = [100.0, 10.0, 50.0];
        assert_eq!(ratios(&idem, &baseline), [1.0, 1.0, 2.0]);
        // A side that has one round more is cut to the common rounds.
        assert_eq!(ratios(&[1.0, 2.0], &[1.0]), [1.0]);
    }

    #[test]
    fn json_line_keeps_its_fields_and_adds_the_spread() {
        let mut r = Report::new("x", 10, 5);
        r.idem = vec![90.0, 100.0, 80.0];
        r.baseline = vec![100.0, 100.0, 100.0];
        assert_eq!(
            r.to_string(),
            r#"{"scenario":"x","messages":10,"prefetch":5,"rounds":3,"msgs_per_s":90,"baseline_msgs_per_s":100,"ratio":0.900,"ratio_min":0.800,"ratio_max":1.000}"#
        );
    }

    #[test]
    fn json_line_ends_with_the_median_cpu_per_message_of_each_side() {
        use crate::cpu::PerMessage;
        let mut r = Report::new("y", 10, 5);
        r.idem = vec![100.0];
        r.baseline = vec![100.0];
        r.cpu = vec![
            (
                Side::Idem,
                PerMessage([Some(10.0), Some(30.0), Some(5.0), None]),
            ),
            (
                Side::Baseline,
                PerMessage([Some(8.0), Some(20.0), Some(1.0), None]),
            ),
            (
                Side::Idem,
                PerMessage([Some(20.0), Some(50.0), Some(7.0), None]),
            ),
        ];
        assert!(r.to_string().ends_with(
            r#""cpu_us_per_msg":{"idem":{"client":15.0,"broker":40.0,"redis":6.0},"baseline":{"client":8.0,"broker":20.0,"redis":1.0}}}"#
        ));
    }

    #[test]
    fn json_line_with_a_batch_side_gives_both_batch_ratios_with_their_spread() {
        let mut r = Report::new("amqp-postgres", 10, 5);
        r.idem = vec![100.0, 50.0, 100.0];
        r.baseline = vec![200.0, 100.0, 100.0];
        r.batch = vec![300.0, 200.0, 100.0];
        r.batch_size = Some(50);
        let line = r.to_string();
        // Per round: batch / idem = 3 4 1; batch / baseline = 1.5 2 1.
        assert!(
            line.ends_with(r#","batch_size":50,"batch_mode":"each","batch_msgs_per_s":200,"batch_vs_per_message":3.000,"batch_vs_per_message_min":1.000,"batch_vs_per_message_max":4.000,"batch_vs_baseline":1.500,"batch_vs_baseline_min":1.000,"batch_vs_baseline_max":2.000}"#),
            "{line}"
        );
    }

    #[test]
    fn json_line_of_amqp_noop_has_the_best_case_fields() {
        let mut r = Report::new("amqp-noop", 10, 5);
        r.idem = vec![120.0, 100.0, 150.0, 90.0, 100.0];
        r.baseline = vec![100.0, 100.0, 100.0, 100.0, 50.0];
        r.best_case = vec![200.0, 200.0, 100.0, 300.0, 200.0];
        // Per-round ratios: baseline 1.2 1 1.5 0.9 2; best case 0.6 0.5 1.5 0.3 0.5.
        assert_eq!(
            r.to_string(),
            r#"{"scenario":"amqp-noop","messages":10,"prefetch":5,"rounds":5,"msgs_per_s":100,"baseline_msgs_per_s":100,"ratio":1.200,"ratio_min":0.900,"ratio_max":2.000,"best_case_baseline_msgs_per_s":200,"best_case_ratio":0.500,"best_case_ratio_min":0.300,"best_case_ratio_max":1.500}"#
        );
        let labels: Vec<&str> = r.series().iter().map(|(l, _)| *l).collect();
        assert_eq!(labels, ["idem", "baseline", "best-case baseline"]);
    }

    #[test]
    fn no_rounds_gives_null_not_nan() {
        let r = Report::new("x", 1, 1);
        let line = r.to_string();
        assert!(line.contains(r#""ratio":null"#), "{line}");
        assert!(!line.contains("NaN"), "{line}");
    }

    #[test]
    fn record_turns_elapsed_into_a_rate() {
        let mut r = Report::new("x", 1000, 1);
        r.record(0, Side::Idem, Duration::from_millis(500));
        r.record(0, Side::Baseline, Duration::from_secs(1));
        r.record(0, Side::BestCase, Duration::from_millis(250));
        assert_eq!(
            (r.idem[0], r.baseline[0], r.best_case[0]),
            (2000.0, 1000.0, 4000.0)
        );
    }
}
