//! The figures collected over rounds, and the markdown table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use crate::scrape::Scrapes;
use crate::stats::Spread;
use crate::targets::Target;

/// One row of the table.
pub struct Metric {
    pub key: String,
    pub label: String,
    /// `Some(true)`: higher is better; `Some(false)`: lower is better; `None`: neither.
    pub better: Option<bool>,
    /// Ratios between targets mean something (not for a difference near zero, such as
    /// a memory growth).
    pub ratios: bool,
}

/// Every figure of every round, by metric and target, and notes for the reader.
#[derive(Default)]
pub struct Results {
    values: BTreeMap<String, BTreeMap<Target, Vec<f64>>>,
    /// Free-form observations, deduplicated (e.g. what the backend received).
    pub observations: BTreeSet<String>,
    /// Problems: errors during a run, skipped runs.
    pub problems: Vec<String>,
    /// Scrapes of each wsgate's `/metrics`, over all its runs.
    pub scrapes: BTreeMap<Target, Scrapes>,
}

impl Results {
    pub fn record(&mut self, key: &str, target: Target, value: f64) {
        if value.is_finite() {
            self.values
                .entry(key.to_string())
                .or_default()
                .entry(target)
                .or_default()
                .push(value);
        }
    }

    fn spread(&self, key: &str, target: Target) -> Option<Spread> {
        self.values
            .get(key)
            .and_then(|by| by.get(&target))
            .and_then(|v| Spread::of(v))
    }
}

/// A number with three significant digits or so.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        // Thin grouping keeps large rates readable: 123 456.
        let s = format!("{:.0}", v);
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push('\u{202f}');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A ratio with two decimals, or two significant digits below 0.1 (0.00014, not 0.00).
pub fn ratio(v: f64) -> String {
    if v >= 0.1 || v <= 0.0 || !v.is_finite() {
        format!("{v:.2}")
    } else {
        let decimals = (-v.log10()).ceil() as usize + 1;
        format!("{v:.decimals$}")
    }
}

fn cell(s: Option<Spread>) -> String {
    match s {
        None => "—".to_string(),
        Some(s) if s.n == 1 => num(s.median),
        Some(s) => format!("{} ({}–{})", num(s.median), num(s.min), num(s.max)),
    }
}

/// The markdown table: one row per metric, one column per target, then the ratios of
/// each wsgate configuration's median to each baseline's median; the one-worker
/// anchors (nginx-1, HAProxy-1) are compared with `wsgate-1` only.
pub fn table(metrics: &[Metric], targets: &[Target], results: &Results) -> String {
    let (ours, others): (Vec<Target>, Vec<Target>) =
        targets.iter().copied().partition(|t| t.is_wsgate());
    let pairs: Vec<(Target, Target)> = ours
        .iter()
        .flat_map(|a| others.iter().map(move |b| (*a, *b)))
        .filter(|(a, b)| !b.is_single_worker_anchor() || *a == Target::Wsgate1)
        .collect();
    let mut out = String::new();
    let _ = write!(out, "| measurement | better |");
    for t in targets {
        let _ = write!(out, " {} |", t.name());
    }
    for (a, b) in &pairs {
        let _ = write!(out, " {} ÷ {} |", a.name(), b.name());
    }
    out.push('\n');
    let _ = write!(out, "|---|:-:|");
    for _ in 0..targets.len() + pairs.len() {
        out.push_str("---:|");
    }
    out.push('\n');
    for m in metrics {
        if targets.iter().all(|t| results.spread(&m.key, *t).is_none()) {
            continue;
        }
        let arrow = match m.better {
            Some(true) => "↑",
            Some(false) => "↓",
            None => "·",
        };
        let _ = write!(out, "| {} | {arrow} |", m.label);
        for t in targets {
            let _ = write!(out, " {} |", cell(results.spread(&m.key, *t)));
        }
        for (a, b) in &pairs {
            let ratio = match (results.spread(&m.key, *a), results.spread(&m.key, *b)) {
                (Some(a), Some(b)) if m.ratios && b.median != 0.0 => ratio(a.median / b.median),
                _ => "—".to_string(),
            };
            let _ = write!(out, " {ratio} |");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_three_digits() {
        assert_eq!(num(123_456.4), "123\u{202f}456");
        assert_eq!(num(512.3), "512");
        assert_eq!(num(51.23), "51.2");
        assert_eq!(num(5.123), "5.12");
        assert_eq!(num(0.5123), "0.512");
    }

    #[test]
    fn small_ratios_keep_two_significant_digits() {
        assert_eq!(ratio(1.234), "1.23");
        assert_eq!(ratio(0.1), "0.10");
        assert_eq!(ratio(0.04), "0.040");
        assert_eq!(ratio(0.000_141), "0.00014");
        assert_eq!(ratio(0.0), "0.00");
    }

    /// One metric with ratios, keyed "k".
    fn metric(label: &str, better: bool) -> [Metric; 1] {
        [Metric {
            key: "k".to_string(),
            label: label.to_string(),
            better: Some(better),
            ratios: true,
        }]
    }

    #[test]
    fn table_has_ratios_of_medians() {
        let metrics = metric("rate", true);
        let mut r = Results::default();
        for v in [10.0, 12.0, 11.0] {
            r.record("k", Target::Wsgate, v);
        }
        r.record("k", Target::Direct, 22.0);
        let t = table(&metrics, &[Target::Direct, Target::Wsgate], &r);
        assert!(
            t.contains("| rate | ↑ | 22.0 | 11.0 (10.0–12.0) | 0.50 |"),
            "{t}"
        );
    }

    #[test]
    fn one_worker_anchors_are_compared_with_one_wsgate_thread_only() {
        let metrics = metric("rate", true);
        let mut r = Results::default();
        r.record("k", Target::Wsgate, 20.0);
        r.record("k", Target::Wsgate1, 12.0);
        r.record("k", Target::Nginx, 16.0);
        r.record("k", Target::Nginx1, 10.0);
        let targets = [
            Target::Wsgate,
            Target::Wsgate1,
            Target::Nginx,
            Target::Nginx1,
        ];
        let t = table(&metrics, &targets, &r);
        assert!(
            t.contains(
                "| wsgate ÷ nginx | wsgate 1 thread ÷ nginx | wsgate 1 thread ÷ nginx 1 worker |\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("| rate | ↑ | 20.0 | 12.0 | 16.0 | 10.0 | 1.25 | 0.75 | 1.20 |"),
            "{t}"
        );
    }

    #[test]
    fn each_wsgate_configuration_gets_ratios_to_each_baseline() {
        let metrics = metric("cpu", false);
        let mut r = Results::default();
        r.record("k", Target::Wsgate, 12.0);
        r.record("k", Target::Wsgate1, 9.0);
        r.record("k", Target::Nginx, 10.0);
        let targets = [Target::Wsgate, Target::Wsgate1, Target::Nginx];
        let t = table(&metrics, &targets, &r);
        assert!(
            t.contains("| wsgate ÷ nginx | wsgate 1 thread ÷ nginx |"),
            "{t}"
        );
        assert!(
            t.contains("| cpu | ↓ | 12.0 | 9.00 | 10.0 | 1.20 | 0.90 |"),
            "{t}"
        );
    }
}
