//! Markdown tables and the number formats the suites share.

use std::fmt::Write as _;

/// A markdown table with columns padded to line up in a terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    /// How many leading columns are text (left-aligned); the rest are numbers.
    left: usize,
}

impl Table {
    /// A table with these column headers.
    pub(crate) fn new<I, S>(headers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
            left: 1,
        }
    }

    /// Left-aligns the first `columns` columns (default 1).
    pub(crate) fn left_aligned(mut self, columns: usize) -> Self {
        self.left = columns;
        self
    }

    /// Adds a row; missing cells are left empty, extra cells are dropped.
    pub(crate) fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut row: Vec<String> = cells
            .into_iter()
            .map(Into::into)
            .take(self.headers.len())
            .collect();
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    /// The table as markdown: the first column (or the first
    /// [`left_aligned`](Self::left_aligned) ones) left-aligned, the others
    /// (numbers) right-aligned.
    pub(crate) fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|row| cell_width(&row[i]))
                    .chain([cell_width(&self.headers[i]), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let mut out = String::new();
        write_row(&mut out, &self.headers, &widths, usize::MAX);
        out.push('|');
        for (i, width) in widths.iter().enumerate() {
            let dashes = "-".repeat(width.saturating_sub(1));
            if i < self.left {
                let _ = write!(out, " :{dashes} |");
            } else {
                let _ = write!(out, " {dashes}: |");
            }
        }
        out.push('\n');
        for row in &self.rows {
            write_row(&mut out, row, &widths, self.left);
        }
        out
    }
}

fn cell_width(cell: &str) -> usize {
    cell.chars().count()
}

/// One row; cells before column `left` are left-aligned.
fn write_row(out: &mut String, cells: &[String], widths: &[usize], left: usize) {
    out.push('|');
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        let pad = " ".repeat(width - cell_width(cell));
        if i < left {
            let _ = write!(out, " {cell}{pad} |");
        } else {
            let _ = write!(out, " {pad}{cell} |");
        }
    }
    out.push('\n');
}

/// What a number that was not measured (NaN) prints as.
pub(crate) const NOT_MEASURED: &str = "–";

/// `123456.7` → `123,457`; NaN (not measured) → `–`.
pub(crate) fn thousands(value: f64) -> String {
    if value.is_nan() {
        return NOT_MEASURED.to_owned();
    }
    if !value.is_finite() {
        return value.to_string();
    }
    let digits = format!("{:.0}", value.abs());
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if value < -0.5 {
        out.push('-');
    }
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Microseconds with one decimal below 100 µs and none above; NaN → `–`.
pub(crate) fn micros(value: f64) -> String {
    if value.is_nan() {
        NOT_MEASURED.to_owned()
    } else if value < 100.0 {
        format!("{value:.1}")
    } else {
        thousands(value)
    }
}

/// A ratio with two decimals; NaN → `–`.
pub(crate) fn fixed2(value: f64) -> String {
    if value.is_nan() {
        NOT_MEASURED.to_owned()
    } else {
        format!("{value:.2}")
    }
}

/// A number with one decimal; NaN → `–`.
pub(crate) fn fixed1(value: f64) -> String {
    if value.is_nan() {
        NOT_MEASURED.to_owned()
    } else {
        format!("{value:.1}")
    }
}

/// `1024` → `1 KiB`, `1536` → `1.5 KiB`, `3_000_000` → `2.9 MiB`.
pub(crate) fn bytes(value: f64) -> String {
    if value.is_nan() {
        return NOT_MEASURED.to_owned();
    }
    let (scaled, unit) = match value.abs() {
        v if v >= (1u64 << 30) as f64 => (value / (1u64 << 30) as f64, "GiB"),
        v if v >= (1u64 << 20) as f64 => (value / (1u64 << 20) as f64, "MiB"),
        v if v >= 1024.0 => (value / 1024.0, "KiB"),
        _ => return format!("{value:.0} B"),
    };
    if (scaled - scaled.round()).abs() < 0.05 {
        format!("{scaled:.0} {unit}")
    } else {
        format!("{scaled:.1} {unit}")
    }
}

/// One target of the issue, checked at one or more places (concurrencies,
/// payloads): renders as one report line with a verdict per place and an
/// overall verdict. Every suite states its targets through this type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Target {
    what: String,
    checks: Vec<Check>,
}

#[derive(Debug, Clone, PartialEq)]
struct Check {
    at: String,
    value: String,
    met: Option<bool>,
}

/// The word for a verdict.
pub(crate) fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

impl Target {
    /// A target described as `what` (e.g. "cache hit / raw GET ≥ 0.80 at c=64").
    pub(crate) fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            checks: Vec::new(),
        }
    }

    /// `value ≥ min` at `at`; NaN counts as not measured.
    pub(crate) fn at_least(&mut self, at: impl Into<String>, value: f64, min: f64) {
        self.push(at, value, (!value.is_nan()).then_some(value >= min));
    }

    /// `value ≤ max` at `at`; NaN counts as not measured.
    pub(crate) fn at_most(&mut self, at: impl Into<String>, value: f64, max: f64) {
        self.push(at, value, (!value.is_nan()).then_some(value <= max));
    }

    /// A place where the target was missed without a number to show (e.g.
    /// "not within 30 s").
    pub(crate) fn missed(&mut self, at: impl Into<String>, why: impl Into<String>) {
        self.checks.push(Check {
            at: at.into(),
            value: why.into(),
            met: Some(false),
        });
    }

    /// A place where the target could not be measured, and why.
    pub(crate) fn not_measured(&mut self, at: impl Into<String>, why: impl Into<String>) {
        self.checks.push(Check {
            at: at.into(),
            value: why.into(),
            met: None,
        });
    }

    fn push(&mut self, at: impl Into<String>, value: f64, met: Option<bool>) {
        self.checks.push(Check {
            at: at.into(),
            value: fixed2(value),
            met,
        });
    }

    /// `Some(true)` when every measured check is met (and one was measured),
    /// `Some(false)` when one is not, `None` when nothing was measured.
    pub(crate) fn met(&self) -> Option<bool> {
        let measured: Vec<bool> = self.checks.iter().filter_map(|c| c.met).collect();
        if measured.is_empty() {
            None
        } else {
            Some(measured.iter().all(|m| *m))
        }
    }

    /// `- target <what>: **met** (c=1: met, 0.93; c=64: met, 1.02)`.
    pub(crate) fn render(&self) -> String {
        let overall = match self.met() {
            Some(met) => verdict(met),
            None => "not measured",
        };
        let checks: Vec<String> = self
            .checks
            .iter()
            .map(|c| match c.met {
                Some(met) => format!("{}: {}, {}", c.at, verdict(met), c.value),
                None => format!("{}: not measured ({})", c.at, c.value),
            })
            .collect();
        if checks.is_empty() {
            format!("- target {}: **{overall}**", self.what)
        } else {
            format!(
                "- target {}: **{overall}** ({})",
                self.what,
                checks.join("; ")
            )
        }
    }
}

/// The median; `None` for no values. The mean of the middle two for an even count.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[mid]),
        _ => Some((sorted[mid - 1] + sorted[mid]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_aligned_markdown() {
        let mut table = Table::new(["c", "ops/s"]);
        table.row(["1", "12,345"]);
        table.row(["64"]);
        assert_eq!(
            table.render(),
            "| c   | ops/s  |\n| :-- | -----: |\n| 1   | 12,345 |\n| 64  |        |\n"
        );
    }

    #[test]
    fn left_aligns_text_columns() {
        let mut table = Table::new(["c", "who", "n"]).left_aligned(2);
        table.row(["1", "a", "7"]);
        assert_eq!(
            table.render(),
            "| c   | who | n   |\n| :-- | :-- | --: |\n| 1   | a   |   7 |\n"
        );
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_000.0), "1,000");
        assert_eq!(thousands(1_234_567.6), "1,234,568");
        assert_eq!(thousands(-4_321.0), "-4,321");
        assert_eq!(micros(42.06), "42.1");
        assert_eq!(micros(1_234.4), "1,234");
    }

    #[test]
    fn formats_sizes_and_gaps() {
        assert_eq!(bytes(1024.0), "1 KiB");
        assert_eq!(bytes(65_536.0), "64 KiB");
        assert_eq!(bytes(1_048_576.0), "1 MiB");
        assert_eq!(bytes(1_572_864.0), "1.5 MiB");
        assert_eq!(bytes(87.0), "87 B");
        assert_eq!(thousands(f64::NAN), NOT_MEASURED);
        assert_eq!(micros(f64::NAN), NOT_MEASURED);
        assert_eq!(fixed2(0.834), "0.83");
    }

    #[test]
    fn targets_render_a_verdict_per_place_and_overall() {
        let mut target = Target::new("x / y ≥ 0.80");
        target.at_least("c=1", 0.9, 0.8);
        target.at_least("c=64", 0.7, 0.8);
        assert_eq!(target.met(), Some(false));
        assert_eq!(
            target.render(),
            "- target x / y ≥ 0.80: **NOT met** (c=1: met, 0.90; c=64: NOT met, 0.70)"
        );
        let mut target = Target::new("commands ≤ 1");
        target.at_most("c=1", 1.0, 1.0);
        target.not_measured("c=64", "no cell");
        assert_eq!(target.met(), Some(true));
        assert!(target.render().contains("c=64: not measured (no cell)"));
        let mut nothing = Target::new("t");
        nothing.at_least("c=1", f64::NAN, 1.0);
        assert_eq!(nothing.met(), None);
        assert!(nothing.render().starts_with("- target t: **not measured**"));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
