//! Terminal output: tables drawn by [`comfy_table`] and a progress bar by
//! [`indicatif`].
//!
//! Tables are plain text without borders, one line per row, sized to the terminal
//! (`COLUMNS`, else 120 characters): each column but the last is capped, the last takes
//! the room left, and a cell too long for its column is cut with `…`. Control
//! characters (newlines in error chains) become spaces.
//!
//! The progress bar goes to stderr, and only when both stdout and stderr are
//! terminals: scripts, pipes and logs get nothing.

use std::io::{self, IsTerminal, Write};

use comfy_table::{presets, ColumnConstraint, ContentArrangement, Width};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The terminal width: `COLUMNS` if set to a number (at least 20), else 120.
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
    let clean = one_line(s);
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

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A table whose last column takes the room left on the line.
#[derive(Debug)]
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
        let mut t = comfy_table::Table::new();
        t.load_preset(presets::NOTHING)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_truncation_indicator("…")
            .set_width(u16::try_from(width).unwrap_or(u16::MAX))
            .set_header(self.header.iter().map(|h| one_line(h)));
        for row in &self.rows {
            let cells = (0..n).map(|i| one_line(row.get(i).map_or("", String::as_str)));
            t.add_row(cells);
        }
        for row in t.row_iter_mut() {
            row.max_height(1);
        }
        // Each column but the last keeps its content up to its cap; the last one gets
        // what is left of the line (at least 10 characters).
        for i in 0..n.saturating_sub(1) {
            let longest = self
                .rows
                .iter()
                .filter_map(|r| r.get(i))
                .chain(std::iter::once(&self.header[i]))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0);
            let cap = self.max.get(i).copied().unwrap_or(usize::MAX);
            if let Some(column) = t.column_mut(i) {
                // + 2: the column's padding.
                let w = u16::try_from(longest.min(cap) + 2).unwrap_or(u16::MAX);
                column.set_constraint(ColumnConstraint::Absolute(Width::Fixed(w)));
            }
        }
        for line in t.lines() {
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// A progress bar on stderr (see the [module docs](self) for when it shows).
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    verb: &'static str,
}

impl Progress {
    /// Progress of `verb` over `total` messages.
    pub fn new(verb: &'static str, total: u64) -> Self {
        let shown = total > 0 && io::stdout().is_terminal() && io::stderr().is_terminal();
        let target = if shown {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        if let Ok(style) = ProgressStyle::with_template("[{bar:20}] {pos}/{len} scanned, {msg}") {
            bar.set_style(style.progress_chars("#>."));
        }
        Progress { bar, verb }
    }

    /// Updates the bar: `scanned` messages read, `moved` of them handled.
    pub fn update(&mut self, scanned: u64, moved: u64) {
        self.bar.set_position(scanned);
        self.bar.set_message(format!("{moved} {}", self.verb));
    }

    /// Ends the bar, leaving its last state on the line.
    pub fn finish(&mut self) {
        self.bar.finish();
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

    #[test]
    fn one_line_per_row_and_capped_columns() {
        let mut t = Table::new(&["ID", "KIND", "ERROR"], &[5, 8]);
        t.row(vec![
            "abcdefghij".into(),
            "transient".into(),
            "a\nmultiline error".into(),
        ]);
        t.row(vec!["b".into(), "x".into(), "short".into()]);
        let mut out = Vec::new();
        t.write(&mut out, 60).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].contains("ID") && lines[0].contains("ERROR"),
            "{text}"
        );
        assert!(lines[1].contains("abcd…"), "{text}");
        assert!(!lines[1].contains("abcdefghij"), "{text}");
        assert!(lines[1].contains("a multiline error"), "{text}");
    }
}
