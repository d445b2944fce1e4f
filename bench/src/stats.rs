//! Percentiles of raw samples, and the median/min/max over rounds.

use serde::{Deserialize, Serialize};

/// Percentiles of a set of durations, in microseconds (nearest-rank method).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub n: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Summary {
    /// Summarises samples given in nanoseconds; `None` without samples.
    pub fn from_nanos(samples: &mut [u64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let n = samples.len();
        let at = |p: f64| {
            let rank = (p * n as f64).ceil() as usize;
            samples[rank.clamp(1, n) - 1] as f64 / 1e3
        };
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Some(Summary {
            n: n as u64,
            mean: sum as f64 / n as f64 / 1e3,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: samples[n - 1] as f64 / 1e3,
        })
    }
}

/// Median, minimum and maximum of per-round values.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut s: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        let sum = Summary::from_nanos(&mut s).expect("samples");
        assert_eq!(sum.p50, 50.0);
        assert_eq!(sum.p99, 99.0);
        assert_eq!(sum.max, 100.0);
        assert_eq!(sum.n, 100);
    }

    #[test]
    fn median_of_even_count() {
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
    }
}
