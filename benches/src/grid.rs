//! The one place that turns measured cells into a report: the standard
//! table (requests/s, p50, p99, p99.9, a ratio column per baseline, Redis
//! commands per request, CPU), ratios to baselines of the same repeat,
//! target verdicts, and the notes every table ends with.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::Options;
use crate::cells::{Cell, Row, Sample};
use crate::cpu::{self, CpuUse};
use crate::report::{Table, Target, fixed1, fixed2, median, micros, thousands};
use crate::server::CommandStat;

/// What a table needs to know about a cell once it has run.
#[derive(Debug, Clone)]
struct Subject {
    label: String,
    short: &'static str,
    missing: Option<String>,
}

/// The samples of one table: rows (concurrencies, payloads, ...) × cells.
#[derive(Debug, Clone)]
pub(crate) struct Grid {
    /// The first column's header: `concurrency`, `payload`, ...
    key_header: &'static str,
    subjects: Vec<Subject>,
    pub(crate) rows: Vec<Row>,
}

impl Grid {
    pub(crate) fn new(key_header: &'static str, cells: &[Cell], rows: Vec<Row>) -> Self {
        let subjects = cells
            .iter()
            .map(|cell| Subject {
                label: cell.label.clone(),
                short: cell.short,
                missing: cell.missing_reason().map(str::to_owned),
            })
            .collect();
        Self {
            key_header,
            subjects,
            rows,
        }
    }

    /// Cell `of` / cell `to` for each repeat of `row` (each pair ran in the
    /// same round).
    pub(crate) fn ratios(row: &Row, of: usize, to: usize) -> Vec<f64> {
        row.samples[to]
            .iter()
            .zip(&row.samples[of])
            .map(|(b, s)| s.requests_per_sec / b.requests_per_sec)
            .collect()
    }

    /// The median of [`ratios`](Self::ratios); NaN when either is missing.
    pub(crate) fn ratio(row: &Row, of: usize, to: usize) -> f64 {
        median(&Self::ratios(row, of, to)).unwrap_or(f64::NAN)
    }

    /// The standard table, with one ratio column per `(cell, name)` baseline.
    pub(crate) fn table(&self, baselines: &[(usize, &str)]) -> Table {
        let mut headers = vec![
            self.key_header.to_owned(),
            "subject".to_owned(),
            "requests/s".to_owned(),
            "p50 µs".to_owned(),
            "p99 µs".to_owned(),
            "p99.9 µs".to_owned(),
        ];
        headers.extend(baselines.iter().map(|(_, name)| format!("ratio to {name}")));
        headers.extend([
            "Redis commands / request".to_owned(),
            "CPU µs / request: process".to_owned(),
            "CPU µs / request: Redis".to_owned(),
        ]);
        let mut table = Table::new(headers).left_aligned(2);
        for row in &self.rows {
            for (i, subject) in self.subjects.iter().enumerate() {
                let mut cells = vec![row.key.clone(), subject.label.clone()];
                let samples = &row.samples[i];
                if samples.is_empty() {
                    cells.push(
                        subject
                            .missing
                            .clone()
                            .unwrap_or_else(|| "not measured".to_owned()),
                    );
                    table.row(cells);
                    continue;
                }
                cells.extend([
                    thousands(med(samples, |s| s.requests_per_sec)),
                    micros(med(samples, |s| s.p50_us)),
                    micros(med(samples, |s| s.p99_us)),
                    micros(med(samples, |s| s.p999_us)),
                ]);
                cells.extend(
                    baselines
                        .iter()
                        .map(|(baseline, _)| fixed2(Self::ratio(row, i, *baseline))),
                );
                cells.extend([
                    fixed2(med(samples, Sample::top_level_per_request)),
                    fixed1(med(samples, Sample::process_cpu_us_per_request)),
                    fixed1(med(samples, Sample::redis_cpu_us_per_request)),
                ]);
                table.row(cells);
            }
        }
        table
    }

    /// `c=1: 0.69 (0.79/0.68/0.69) | c=16: ...`: cell `of` / cell `to`, the
    /// median and each repeat, in every row where both ran.
    pub(crate) fn spread(&self, of: usize, to: usize) -> String {
        let parts: Vec<String> = self
            .rows
            .iter()
            .filter_map(|row| {
                let each = Self::ratios(row, of, to);
                if each.is_empty() {
                    return None;
                }
                let shown: Vec<String> = each.iter().map(|r| fixed2(*r)).collect();
                Some(format!(
                    "{}: {} ({})",
                    row.name,
                    fixed2(Self::ratio(row, of, to)),
                    shown.join("/")
                ))
            })
            .collect();
        if parts.is_empty() {
            "not measured".to_owned()
        } else {
            parts.join(" | ")
        }
    }

    /// Checks `of / to ≥ min` in every row `rows` selects (named `c=64 <of>`);
    /// a row where either did not run is "not measured".
    pub(crate) fn check_ratio(
        &self,
        target: &mut Target,
        of: usize,
        to: usize,
        min: f64,
        rows: impl Fn(&Row) -> bool,
    ) {
        for row in self.rows.iter().filter(|r| rows(r)) {
            let ratio = Self::ratio(row, of, to);
            let at = format!("{} {}", row.name, self.subjects[of].short);
            if ratio.is_nan() {
                let why = self.subjects[to]
                    .missing
                    .clone()
                    .or_else(|| self.subjects[of].missing.clone())
                    .unwrap_or_else(|| "no sample".to_owned());
                target.not_measured(at, why);
            } else {
                target.at_least(at, ratio, min);
            }
        }
    }

    /// Checks that cell `of` made at most `max` top-level Redis commands per
    /// request in every repeat of every row.
    pub(crate) fn check_commands(&self, target: &mut Target, of: usize, max: f64) {
        for row in &self.rows {
            let most = row.samples[of]
                .iter()
                .map(Sample::top_level_per_request)
                .fold(f64::NAN, f64::max);
            target.at_most(
                format!("{} {}", row.name, self.subjects[of].short),
                most,
                max,
            );
        }
    }

    /// The notes every table ends with: the machine's other load during the
    /// cells, and the Redis commands of each subject by name.
    pub(crate) fn notes(&self) -> Vec<String> {
        let cells: Vec<CpuUse> = self
            .rows
            .iter()
            .flat_map(|row| row.samples.iter().flatten())
            .filter(|s| !s.external)
            .map(|s| s.cpu)
            .collect();
        let mut per_subject = Vec::new();
        for (i, subject) in self.subjects.iter().enumerate() {
            let samples: Vec<&Sample> = self.rows.iter().flat_map(|r| &r.samples[i]).collect();
            if !samples.is_empty() {
                per_subject.push(format!("{}: {}", subject.short, breakdown(&samples)));
            }
        }
        vec![
            cpu::disturbance(&cells),
            format!(
                "Redis commands per request by name, all cells (with the server time of each top-level command, `INFO commandstats` usec / calls): {}",
                per_subject.join("; ")
            ),
        ]
    }
}

/// The median of `field` over `samples`; NaN for none.
pub(crate) fn med(samples: &[Sample], field: impl Fn(&Sample) -> f64) -> f64 {
    median(&samples.iter().map(field).collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

/// `evalsha 1.00 (12.2 µs each) (inside the script: time 1.00, get 1.00)`
/// over every cell of one subject.
fn breakdown(samples: &[&Sample]) -> String {
    let calls: u64 = samples.iter().map(|s| s.calls).sum();
    let inner_names: &[&str] = samples.first().map_or(&[], |s| s.inner);
    let mut totals: BTreeMap<&str, CommandStat> = BTreeMap::new();
    for sample in samples {
        for (name, stat) in &sample.commands {
            let total = totals.entry(name.as_str()).or_default();
            total.calls += stat.calls;
            total.usec += stat.usec;
        }
    }
    let per = |n: u64| n as f64 / calls.max(1) as f64;
    let list = |inner: bool| {
        totals
            .iter()
            .filter(|(name, _)| inner_names.contains(name) == inner)
            .map(|(name, stat)| {
                if inner {
                    format!("{name} {:.2}", per(stat.calls))
                } else {
                    let usec = stat.usec as f64 / stat.calls.max(1) as f64;
                    format!("{name} {:.2} ({usec:.1} µs each)", per(stat.calls))
                }
            })
            .collect::<Vec<_>>()
    };
    let (outer, inner) = (list(false), list(true));
    let mut text = if outer.is_empty() {
        "none".to_owned()
    } else {
        outer.join(", ")
    };
    if !inner.is_empty() {
        let _ = write!(text, " (inside the script: {})", inner.join(", "));
    }
    text
}

/// How cells were timed, for the paragraph under a table's title;
/// `interleaved` for tables run by [`crate::cells::run_interleaved`].
pub(crate) fn timing(options: &Options, interleaved: bool) -> String {
    format!(
        "{:.1} s measured after {:.1} s warm-up per cell; {}each run {} time(s); medians shown; a ratio is the \
         median of the per-repeat ratios to the named cell of the same repeat",
        options.duration.as_secs_f64(),
        options.warmup.as_secs_f64(),
        if interleaved {
            "cells interleaved (order reversed every other repeat), "
        } else {
            ""
        },
        options.repeats,
    )
}

/// A markdown report section: a title, a paragraph, tables, targets and notes.
#[derive(Debug, Default)]
pub(crate) struct Section {
    out: String,
}

impl Section {
    /// `## title` and a paragraph.
    pub(crate) fn new(title: &str, intro: &str) -> Self {
        let mut out = String::new();
        let _ = writeln!(out, "## {title}\n\n{intro}\n");
        Self { out }
    }

    /// `### title` and a paragraph.
    pub(crate) fn subsection(&mut self, title: &str, intro: &str) {
        let _ = writeln!(self.out, "### {title}\n\n{intro}\n");
    }

    pub(crate) fn table(&mut self, table: &Table) {
        self.out.push_str(&table.render());
        self.out.push('\n');
    }

    pub(crate) fn target(&mut self, target: &Target) {
        let _ = writeln!(self.out, "{}", target.render());
    }

    /// `- text`.
    pub(crate) fn note(&mut self, text: impl AsRef<str>) {
        let _ = writeln!(self.out, "- {}", text.as_ref());
    }

    /// An empty line (after a list, before the next table).
    pub(crate) fn gap(&mut self) {
        self.out.push('\n');
    }

    /// Another section's text, as is.
    pub(crate) fn append(&mut self, text: &str) {
        self.out.push_str(text);
    }

    pub(crate) fn finish(self) -> String {
        self.out
    }
}
