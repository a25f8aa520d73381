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

/// `123456.7` → `123,457`.
pub(crate) fn thousands(value: f64) -> String {
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

/// Microseconds with one decimal below 100 µs and none above.
pub(crate) fn micros(value: f64) -> String {
    if value < 100.0 {
        format!("{value:.1}")
    } else {
        thousands(value)
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
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
