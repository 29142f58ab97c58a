//! The text output of `idem verify`.

use std::io::Write;

use super::VerifyReport;
use crate::error::CliError;
use crate::write_err;

/// A duration in seconds, for people: `850ms`, `42s`, `5m 3s`, `2h 10m`, `8d 3h`.
pub(crate) fn age(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "0s".to_owned();
    }
    if secs < 1.0 {
        return format!("{}ms", (secs * 1000.0).round() as u64);
    }
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Writes `report` as text: the summary line
/// `verify: lost=N stuck=N at_risk=N hazards=N`, the counts, one line per finding
/// (`lost <id>: ...`), then the notes.
pub fn write_text(out: &mut dyn Write, report: &VerifyReport) -> Result<(), CliError> {
    let c = &report.counts;
    writeln!(
        out,
        "verify: lost={} stuck={} at_risk={} hazards={}",
        c.lost, c.stuck, c.at_risk, c.hazards
    )
    .map_err(write_err)?;
    let window = match (&report.since, &report.until) {
        (Some(s), Some(u)) => format!(", window {s} .. {u}"),
        _ => String::new(),
    };
    writeln!(
        out,
        "  {} ({} published{window}) against {} for consumer {:?}, queue {}",
        report.source, c.published, report.records, report.consumer, report.queue
    )
    .map_err(write_err)?;
    writeln!(
        out,
        "  done={} poisoned={} queued={} delayed={} dead_lettered={} in_flight={} pending={} recent={}",
        c.done, c.poisoned, c.queued, c.delayed, c.dead_lettered, c.in_flight, c.pending, c.recent
    )
    .map_err(write_err)?;
    for f in &report.findings {
        writeln!(out, "{} {}: {}", f.class.word(), f.id, f.detail).map_err(write_err)?;
    }
    for n in &report.notes {
        writeln!(out, "note: {n}").map_err(write_err)?;
    }
    Ok(())
}
