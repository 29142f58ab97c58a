//! Where the time goes: CPU seconds used by this process and by the local services
//! (RabbitMQ's `beam.smp`, `redis-server`, `postgres`) over one run, divided by the
//! messages of the run. Read from `/proc` (Linux); a service that does not run on this
//! machine reads as absent.
//!
//! A comparing scenario samples before and after each run of each side, so the report
//! can say, per message, how much CPU idem's process and each service spent next to
//! the baseline's. On a machine whose cores are shared by the client and the services
//! (this 2-core box), CPU per message, not latency, is what sets the rate.

use std::fmt;

/// CPU seconds this process used so far (user + system), from `/proc/self/stat`.
pub(crate) fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux the benchmarks run on.
    Some((utime + stime) / 100.0)
}

/// CPU seconds used so far by every local process named `name` (`beam.smp`: the
/// RabbitMQ nodes on this machine, the test clusters' included, summed so that the
/// reading does not depend on which one is found first), from `/proc/<pid>/stat`.
pub(crate) fn process_cpu_secs(name: &str) -> Option<f64> {
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        let is_it = std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == name);
        let Some(stat) = is_it
            .then(|| std::fs::read_to_string(path.join("stat")).ok())
            .flatten()
        else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        if let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) {
            *total.get_or_insert(0.0) += (utime + stime) / 100.0;
        }
    }
    total
}

/// The processes a sample reads, in report order: the bench itself, then the services.
pub(crate) const PARTS: [&str; 4] = ["client", "broker", "redis", "postgres"];

/// CPU seconds so far of this process and of each local service (see [`PARTS`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample([Option<f64>; 4]);

impl Sample {
    /// Reads the counters now.
    pub(crate) fn now() -> Sample {
        Sample([
            cpu_secs(),
            process_cpu_secs("beam.smp"),
            process_cpu_secs("redis-server"),
            process_cpu_secs("postgres"),
        ])
    }

    /// CPU microseconds per message of each part since `self`, for a run of `messages`.
    pub(crate) fn per_message(&self, messages: u64) -> PerMessage {
        let later = Sample::now();
        let mut out = [None; 4];
        for (i, slot) in out.iter_mut().enumerate() {
            if let (Some(a), Some(b)) = (self.0[i], later.0[i]) {
                *slot = Some((b - a).max(0.0) * 1e6 / messages.max(1) as f64);
            }
        }
        PerMessage(out)
    }
}

/// CPU microseconds per message of each part (see [`PARTS`]) over one run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PerMessage(pub(crate) [Option<f64>; 4]);

impl PerMessage {
    /// The median of each part over several runs (a part absent from every run stays
    /// absent).
    pub(crate) fn median(runs: &[PerMessage]) -> PerMessage {
        let mut out = [None; 4];
        for (i, slot) in out.iter_mut().enumerate() {
            let values: Vec<f64> = runs.iter().filter_map(|r| r.0[i]).collect();
            if !values.is_empty() {
                *slot = Some(crate::report::median(&values));
            }
        }
        PerMessage(out)
    }
}

/// As a JSON object, `{"client":12.3,"broker":40.1,...}`, absent parts left out.
impl fmt::Display for PerMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        let mut first = true;
        for (name, value) in PARTS.iter().zip(self.0) {
            if let Some(v) = value.filter(|v| v.is_finite()) {
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                write!(f, "\"{name}\":{v:.1}")?;
            }
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_always_sampled_and_time_only_grows() {
        let before = Sample::now();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        let used = before.per_message(1);
        let client = used.0[0].expect("/proc/self/stat is readable on Linux");
        assert!(client >= 0.0);
    }

    #[test]
    fn medians_per_part_and_json_leaves_absent_parts_out() {
        let runs = [
            PerMessage([Some(10.0), Some(40.0), None, None]),
            PerMessage([Some(30.0), Some(20.0), None, None]),
            PerMessage([Some(20.0), Some(30.0), None, Some(5.0)]),
        ];
        let m = PerMessage::median(&runs);
        assert_eq!(m, PerMessage([Some(20.0), Some(30.0), None, Some(5.0)]));
        assert_eq!(
            m.to_string(),
            r#"{"client":20.0,"broker":30.0,"postgres":5.0}"#
        );
    }
}
