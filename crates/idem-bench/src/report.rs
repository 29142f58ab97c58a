//! Medians and the one-line JSON report.

use std::fmt;

/// The result of a scenario: one JSON line.
pub(crate) struct Report {
    pub(crate) scenario: &'static str,
    pub(crate) messages: u64,
    pub(crate) prefetch: u16,
    pub(crate) idem: Vec<f64>,
    pub(crate) baseline: Vec<f64>,
}

impl Report {
    /// Records one run of `messages` that took `elapsed`, on idem's side or the
    /// baseline's, and prints it to stderr.
    pub(crate) fn record(&mut self, round: u32, idem: bool, elapsed: std::time::Duration) {
        let rate = self.messages as f64 / elapsed.as_secs_f64();
        let who = if idem { "idem" } else { "baseline" };
        eprintln!("round {round} {who}: {rate:.0} msg/s ({elapsed:?})");
        if idem {
            self.idem.push(rate);
        } else {
            self.baseline.push(rate);
        }
    }
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

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ratios: Vec<f64> = self
            .idem
            .iter()
            .zip(&self.baseline)
            .map(|(a, b)| a / b)
            .collect();
        write!(
            f,
            r#"{{"scenario":"{}","messages":{},"prefetch":{},"rounds":{},"msgs_per_s":{:.0},"baseline_msgs_per_s":{:.0},"ratio":{:.3}}}"#,
            self.scenario,
            self.messages,
            self.prefetch,
            ratios.len(),
            median(&self.idem),
            median(&self.baseline),
            median(&ratios)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_json() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let r = Report {
            scenario: "x",
            messages: 10,
            prefetch: 5,
            idem: vec![90.0, 100.0, 80.0],
            baseline: vec![100.0, 100.0, 100.0],
        };
        assert_eq!(
            r.to_string(),
            r#"{"scenario":"x","messages":10,"prefetch":5,"rounds":3,"msgs_per_s":90,"baseline_msgs_per_s":100,"ratio":0.900}"#
        );
    }
}
