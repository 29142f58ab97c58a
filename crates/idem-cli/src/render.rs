//! Plain-text tables sized to the terminal (`COLUMNS`, else 120 characters).

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

/// The terminal width: `COLUMNS` if set to a number, else 120.
pub fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|w| *w >= 20)
        .unwrap_or(120)
}

/// Cuts `s` to at most `width` characters, ending with `…` when cut. Control
/// characters (newlines in error chains) become spaces.
pub fn cut(s: &str, width: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() <= width {
        return clean;
    }
    if width == 0 {
        return String::new();
    }
    let mut out: String = clean.chars().take(width - 1).collect();
    out.push('…');
    out
}

/// A table whose last column takes the room left on the line.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    max: Vec<usize>,
}

impl Table {
    /// A table with these column titles; `max` caps each column but the last.
    pub fn new(header: &[&str], max: &[usize]) -> Self {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
            max: max.to_vec(),
        }
    }

    /// Adds a row (one cell per column).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Writes the table, at most `width` characters per line.
    pub fn write(&self, out: &mut dyn Write, width: usize) -> io::Result<()> {
        let n = self.header.len();
        let mut widths: Vec<usize> = (0..n)
            .map(|i| {
                let cells = self.rows.iter().filter_map(|r| r.get(i));
                let longest = cells
                    .chain(std::iter::once(&self.header[i]))
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0);
                longest.min(self.max.get(i).copied().unwrap_or(usize::MAX))
            })
            .collect();
        let fixed: usize = widths.iter().take(n.saturating_sub(1)).map(|w| w + 2).sum();
        if let Some(last) = widths.last_mut() {
            *last = (*last).min(width.saturating_sub(fixed).max(10));
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = cut(cells.get(i).map_or("", String::as_str), *w);
                if i + 1 == n {
                    s.push_str(&cell);
                } else {
                    s.push_str(&format!("{cell:<w$}  "));
                }
            }
            s.trim_end().to_owned()
        };
        writeln!(out, "{}", line(&self.header))?;
        for row in &self.rows {
            writeln!(out, "{}", line(row))?;
        }
        Ok(())
    }
}

/// A one-line progress report on stderr, redrawn in place, only when stderr is a
/// terminal (scripts and logs get nothing).
pub struct Progress {
    enabled: bool,
    verb: &'static str,
    total: u64,
    last: Option<Instant>,
}

impl Progress {
    /// Progress of `verb` over `total` messages.
    pub fn new(verb: &'static str, total: u64) -> Self {
        Progress {
            enabled: io::stderr().is_terminal() && total > 0,
            verb,
            total,
            last: None,
        }
    }

    /// Redraws the line (at most every 100 ms).
    pub fn update(&mut self, scanned: u64, moved: u64) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now - t < Duration::from_millis(100))
            && scanned < self.total
        {
            return;
        }
        self.last = Some(now);
        let pct = scanned * 100 / self.total.max(1);
        let filled = usize::try_from(pct / 5).unwrap_or(20).min(20);
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(20 - filled));
        let mut err = io::stderr();
        let _ = write!(
            err,
            "\r[{bar}] {scanned}/{} scanned, {moved} {}",
            self.total, self.verb
        );
        let _ = err.flush();
    }

    /// Ends the line.
    pub fn finish(&mut self) {
        if self.enabled && self.last.is_some() {
            let _ = writeln!(io::stderr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_column_is_cut_to_the_width() {
        let mut t = Table::new(&["ID", "ERROR"], &[10]);
        t.row(vec!["a".into(), "x".repeat(100)]);
        let mut out = Vec::new();
        t.write(&mut out, 40).unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in text.lines() {
            assert!(line.chars().count() <= 40, "{line:?}");
        }
        assert!(text.contains('…'));
        assert_eq!(cut("a\nb", 10), "a b");
    }
}
