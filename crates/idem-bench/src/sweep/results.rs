//! The measured cells of a sweep, the memory bound fitted on them, and what is made of
//! them: the Markdown table and the SVG chart.

use super::CellStore;
use crate::chart::{self, Line, Panel};

/// One measured cell.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Cell {
    pub(crate) store: CellStore,
    pub(crate) size: usize,
    pub(crate) prefetch: u16,
    /// The batch size of a cell run with a batch handler; `None`: per-message handler.
    pub(crate) batch: Option<usize>,
    pub(crate) messages: u64,
    pub(crate) rate: f64,
    /// Peak RSS of the child process, KiB.
    pub(crate) peak_kib: u64,
    /// Most deliveries seen at once between handler start and settlement.
    pub(crate) max_in_flight: u64,
}

impl Cell {
    fn in_flight(&self) -> u64 {
        u64::from(self.prefetch).min(self.messages)
    }
}

/// The fitted bound of one store: `F` and `M` of the module docs, in KiB.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Bound {
    pub(crate) fixed_kib: f64,
    pub(crate) per_delivery_kib: f64,
}

impl Bound {
    /// Fits `F` and `M` on the per-message cells among `cells`, all of one store (see
    /// the module docs); `None` if there are none. Batch cells never take part: they
    /// only check the bound.
    pub(crate) fn fit(cells: &[&Cell]) -> Option<Bound> {
        let per_message: Vec<&Cell> = cells
            .iter()
            .copied()
            .filter(|c| c.batch.is_none())
            .collect();
        let smallest_size = per_message.iter().map(|c| c.size).min()?;
        let smallest = per_message
            .iter()
            .filter(|c| c.size == smallest_size)
            .min_by_key(|c| c.prefetch)?;
        // 10 % on top of the one reading: the same cell run twice peaks about 1 MiB
        // apart (allocator and runtime start-up), and this is what the others inherit.
        let fixed = smallest.peak_kib as f64 * 1.1;
        let per_delivery = per_message
            .iter()
            .filter(|c| c.size == smallest_size)
            .map(|c| (c.peak_kib as f64 - fixed).max(0.0) / c.in_flight().max(1) as f64)
            .fold(0.0, f64::max);
        Some(Bound {
            fixed_kib: fixed,
            per_delivery_kib: per_delivery,
        })
    }

    /// The bound for `cell`, KiB.
    pub(crate) fn kib(&self, cell: &Cell) -> f64 {
        self.fixed_kib
            + cell.in_flight() as f64 * (2.0 * cell.size as f64 / 1024.0 + self.per_delivery_kib)
    }
}

pub(crate) fn size_label(size: usize) -> String {
    match size {
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

/// `-` for a per-message cell, else the batch size.
fn batch_label(batch: Option<usize>) -> String {
    batch.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// The Markdown table of the sweep (and the fitted bound of each store): per store,
/// the per-message cells, then the batch cells.
pub(crate) fn table(cells: &[Cell]) -> String {
    let mut out = String::from(
        "| store | size | batch | prefetch | messages | msgs/s | MiB/s | most in handlers | peak RSS MiB | bound MiB | holds |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    let mut notes = String::new();
    for store in [CellStore::Noop, CellStore::Redis] {
        let mut mine: Vec<&Cell> = cells.iter().filter(|c| c.store == store).collect();
        let Some(bound) = Bound::fit(&mine) else {
            continue;
        };
        notes.push_str(&format!(
            "\n{}: bound = F + min(prefetch, messages) x (2 x size + M), F = {:.1} MiB (measured: peak of the smallest cell + 10 %), M = {:.1} KiB per delivery (measured on the smallest size of the per-message cells, which say \"yes (fit)\": they set the bound, the others, batch cells included, check it)\n",
            store.name(),
            bound.fixed_kib / 1024.0,
            bound.per_delivery_kib
        ));
        let smallest = mine
            .iter()
            .filter(|c| c.batch.is_none())
            .map(|c| c.size)
            .min()
            .unwrap_or(0);
        // Stable: within each group the cells keep the order they were measured in.
        mine.sort_by_key(|c| c.batch.is_some());
        for c in mine {
            let limit = bound.kib(c);
            let fit = c.batch.is_none() && c.size == smallest;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.0} | {:.1} | {} | {:.1} | {:.1} | {} |\n",
                store.name(),
                size_label(c.size),
                batch_label(c.batch),
                c.prefetch,
                c.messages,
                c.rate,
                c.rate * c.size as f64 / f64::from(1 << 20),
                c.max_in_flight,
                c.peak_kib as f64 / 1024.0,
                limit / 1024.0,
                match (c.peak_kib as f64 <= limit, fit) {
                    (true, false) => "yes",
                    (true, true) => "yes (fit)",
                    (false, _) => "**no**",
                }
            ));
        }
    }
    out + &notes
}

/// The chart: msgs/s (left) and peak RSS with its bound (middle) over prefetch for the
/// per-message cells, one colour per store and size; and, if batch cells were run,
/// their peak RSS next to the per-message cell of the same size and the bound (right).
pub(crate) fn chart_svg(cells: &[Cell]) -> Result<String, String> {
    let mut prefetches: Vec<u16> = cells.iter().map(|c| c.prefetch).collect();
    prefetches.sort_unstable();
    prefetches.dedup();
    let at = |store: CellStore, size: usize, batch: Option<usize>, p: u16| {
        cells
            .iter()
            .find(|c| c.store == store && c.size == size && c.batch == batch && c.prefetch == p)
    };
    let bound_of = |store: CellStore| {
        let mine: Vec<&Cell> = cells.iter().filter(|c| c.store == store).collect();
        Bound::fit(&mine)
    };
    let mut groups: Vec<(CellStore, usize)> = cells
        .iter()
        .filter(|c| c.batch.is_none())
        .map(|c| (c.store, c.size))
        .collect();
    groups.sort_by_key(|(st, sz)| (st.name(), *sz));
    groups.dedup();
    let mut rate_lines = Vec::new();
    let mut memory_lines = Vec::new();
    for (colour, (store, size)) in groups.iter().enumerate() {
        let cell_at = |p: &u16| at(*store, *size, None, *p);
        let label = format!("{} {}", store.name(), size_label(*size));
        rate_lines.push(Line {
            label: label.clone(),
            values: prefetches
                .iter()
                .map(|p| cell_at(p).map(|c| c.rate))
                .collect(),
            limit: false,
            colour,
        });
        memory_lines.push(Line {
            label: format!("{label} peak"),
            values: prefetches
                .iter()
                .map(|p| cell_at(p).map(|c| c.peak_kib as f64 / 1024.0))
                .collect(),
            limit: false,
            colour,
        });
        if let Some(bound) = bound_of(*store) {
            memory_lines.push(Line {
                label: format!("{label} bound"),
                values: prefetches
                    .iter()
                    .map(|p| cell_at(p).map(|c| bound.kib(c) / 1024.0))
                    .collect(),
                limit: true,
                colour,
            });
        }
    }
    let categories: Vec<String> = prefetches.iter().map(u16::to_string).collect();
    let mut panels = vec![
        Panel {
            title: "idem worker throughput".into(),
            y_desc: "msgs/s (log)".into(),
            log: true,
            legend_upper_left: false,
            lines: rate_lines,
        },
        Panel {
            title: "peak RSS and its bound".into(),
            y_desc: "MiB (log)".into(),
            log: true,
            legend_upper_left: true,
            lines: memory_lines,
        },
    ];
    if let Some(panel) = batch_panel(cells, &prefetches, &bound_of) {
        panels.push(panel);
    }
    chart::svg("prefetch", &categories, &panels, (760, 520))
}

/// The batch panel: per store, at each batch cell's message size, the per-message
/// peak (if that cell was run), one peak line per batch size, and the bound.
fn batch_panel(
    cells: &[Cell],
    prefetches: &[u16],
    bound_of: &dyn Fn(CellStore) -> Option<Bound>,
) -> Option<Panel> {
    let mut series: Vec<(CellStore, usize, Option<usize>)> = cells
        .iter()
        .filter(|c| c.batch.is_some())
        .map(|c| (c.store, c.size, c.batch))
        .collect();
    if series.is_empty() {
        return None;
    }
    let sizes: Vec<(CellStore, usize)> = series.iter().map(|(st, sz, _)| (*st, *sz)).collect();
    series.extend(sizes.iter().map(|(st, sz)| (*st, *sz, None)));
    series.sort_by_key(|(st, sz, b)| (st.name(), *sz, *b));
    series.dedup();
    let peak = |store, size, batch, p: &u16| {
        cells
            .iter()
            .find(|c| c.store == store && c.size == size && c.batch == batch && c.prefetch == *p)
    };
    let mut lines = Vec::new();
    for (colour, (store, size, batch)) in series.iter().enumerate() {
        let values: Vec<Option<f64>> = prefetches
            .iter()
            .map(|p| peak(*store, *size, *batch, p).map(|c| c.peak_kib as f64 / 1024.0))
            .collect();
        if values.iter().all(Option::is_none) {
            continue;
        }
        let kind = batch.map_or_else(|| "per-message".to_owned(), |n| format!("batch {n}"));
        lines.push(Line {
            label: format!("{} {} {kind}", store.name(), size_label(*size)),
            values,
            limit: false,
            colour,
        });
    }
    let mut bounds: Vec<(CellStore, usize)> = sizes;
    bounds.sort_by_key(|(st, sz)| (st.name(), *sz));
    bounds.dedup();
    for (i, (store, size)) in bounds.iter().enumerate() {
        let Some(bound) = bound_of(*store) else {
            continue;
        };
        // The bound depends on prefetch, messages and size only: any batch cell of
        // this store and size at that prefetch gives it.
        let values = prefetches
            .iter()
            .map(|p| {
                cells
                    .iter()
                    .find(|c| {
                        c.store == *store
                            && c.size == *size
                            && c.batch.is_some()
                            && c.prefetch == *p
                    })
                    .map(|c| bound.kib(c) / 1024.0)
            })
            .collect();
        lines.push(Line {
            label: format!("{} {} bound", store.name(), size_label(*size)),
            values,
            limit: true,
            colour: series.len() + i,
        });
    }
    Some(Panel {
        title: "batch handlers: peak RSS and the bound".into(),
        y_desc: "MiB (log)".into(),
        log: true,
        legend_upper_left: true,
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(store: CellStore, size: usize, prefetch: u16, peak_mib: f64) -> Cell {
        Cell {
            store,
            size,
            prefetch,
            batch: None,
            messages: 5000,
            rate: 1000.0,
            peak_kib: (peak_mib * 1024.0) as u64,
            max_in_flight: u64::from(prefetch),
        }
    }

    fn batch_cell(store: CellStore, size: usize, batch: usize, prefetch: u16, peak: f64) -> Cell {
        Cell {
            batch: Some(batch),
            ..cell(store, size, prefetch, peak)
        }
    }

    #[test]
    fn bound_is_fitted_on_the_small_cells_and_checks_the_big_ones() {
        let cells = [
            cell(CellStore::Noop, 256, 10, 20.0),
            cell(CellStore::Noop, 256, 1000, 30.0),
            // 100 x 1 MiB in flight: bound 20 + 100 x (2 MiB + 10 KiB) ~ 221 MiB.
            cell(CellStore::Noop, 1 << 20, 100, 150.0),
            cell(CellStore::Noop, 1 << 20, 200, 900.0),
        ];
        let refs: Vec<&Cell> = cells.iter().collect();
        let bound = Bound::fit(&refs).unwrap();
        assert_eq!(bound.fixed_kib, 22.0 * 1024.0);
        // (30 - 22) MiB over 1000 deliveries = 8.192 KiB each.
        assert!((bound.per_delivery_kib - 8.192).abs() < 1e-9, "{bound:?}");
        assert!(cells[2].peak_kib as f64 <= bound.kib(&cells[2]));
        assert!(cells[3].peak_kib as f64 > bound.kib(&cells[3]));
        let table = table(&cells);
        assert_eq!(table.matches("| yes (fit) |").count(), 2, "{table}");
        assert_eq!(table.matches("| yes |").count(), 1, "{table}");
        assert_eq!(table.matches("| **no** |").count(), 1, "{table}");
        assert!(
            table.contains("| noop | 1 MiB | - | 200 | 5000 |"),
            "{table}"
        );
        assert!(table.contains("F = 22.0 MiB"), "{table}");
    }

    #[test]
    fn batch_cells_check_the_bound_of_the_per_message_cells_and_never_fit_it() {
        let cells = [
            // A batch cell at the smallest size and prefetch, much higher: were it
            // taken into the fit, F would be 110 MiB and every cell would hold.
            batch_cell(CellStore::Redis, 256, 10, 10, 100.0),
            cell(CellStore::Redis, 256, 10, 20.0),
            cell(CellStore::Redis, 256, 200, 22.0),
            // 200 x 64 KiB: bound 22 + 200 x (128 + ~10) KiB ~ 49 MiB.
            batch_cell(CellStore::Redis, 64 << 10, 50, 200, 40.0),
            batch_cell(CellStore::Redis, 64 << 10, 10, 200, 60.0),
        ];
        let refs: Vec<&Cell> = cells.iter().collect();
        assert_eq!(Bound::fit(&refs).unwrap().fixed_kib, 22.0 * 1024.0);
        let table = table(&cells);
        assert_eq!(table.matches("| yes (fit) |").count(), 2, "{table}");
        assert_eq!(table.matches("| **no** |").count(), 2, "{table}");
        // Per-message rows first, then the batch rows in the order they were run.
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| redis")).collect();
        assert!(rows[0].starts_with("| redis | 256 B | - |"), "{table}");
        assert!(rows[1].starts_with("| redis | 256 B | - |"), "{table}");
        assert!(rows[2].starts_with("| redis | 256 B | 10 |"), "{table}");
        assert!(
            rows[3].starts_with("| redis | 64 KiB | 50 | 200 | 5000 |"),
            "{table}"
        );
        assert!(rows[3].ends_with("| yes |"), "{table}");
        assert!(rows[4].starts_with("| redis | 64 KiB | 10 |"), "{table}");
        assert!(rows[4].ends_with("| **no** |"), "{table}");
    }

    fn texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).unwrap();
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_owned()))
            .collect()
    }

    #[test]
    fn sweep_chart_has_both_panels_and_every_line() {
        let cells = [
            cell(CellStore::Noop, 256, 10, 20.0),
            cell(CellStore::Noop, 256, 200, 22.0),
            cell(CellStore::Redis, 1 << 20, 10, 40.0),
            cell(CellStore::Redis, 1 << 20, 200, 300.0),
        ];
        let texts = texts(&chart_svg(&cells).unwrap());
        for want in [
            "idem worker throughput",
            "peak RSS and its bound",
            "noop 256 B",
            "redis 1 MiB",
            "redis 1 MiB peak",
            "redis 1 MiB bound",
            "200",
        ] {
            assert!(texts.iter().any(|t| t == want), "{want:?} not in {texts:?}");
        }
        assert!(!texts.iter().any(|t| t.starts_with("batch handlers")));
    }

    #[test]
    fn sweep_chart_gets_a_batch_panel_when_batch_cells_ran() {
        let cells = [
            cell(CellStore::Redis, 256, 10, 20.0),
            cell(CellStore::Redis, 64 << 10, 10, 22.0),
            cell(CellStore::Redis, 64 << 10, 200, 40.0),
            batch_cell(CellStore::Redis, 64 << 10, 1, 10, 22.0),
            batch_cell(CellStore::Redis, 64 << 10, 50, 10, 23.0),
            batch_cell(CellStore::Redis, 64 << 10, 50, 200, 41.0),
        ];
        let texts = texts(&chart_svg(&cells).unwrap());
        for want in [
            "batch handlers: peak RSS and the bound",
            "redis 64 KiB per-message",
            "redis 64 KiB batch 1",
            "redis 64 KiB batch 50",
            "redis 64 KiB bound",
        ] {
            assert!(texts.iter().any(|t| t == want), "{want:?} not in {texts:?}");
        }
        // Batch cells stay out of the per-message panels.
        assert!(!texts.iter().any(|t| t == "redis 64 KiB batch 50 peak"));
    }
}
