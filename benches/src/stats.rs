//! The bench's arithmetic: percentiles of latencies, rates and ratios.

use serde::Serialize;

/// The `p`-th percentile (0 < p <= 100) of `sorted` by the nearest-rank method: the smallest value such that at
/// least p % of the samples are at or below it. `None` for no samples or a `p` outside (0, 100].
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() || !(p > 0.0 && p <= 100.0) {
        return None;
    }
    let n = sorted.len();
    // Rank in 1..=n; the small epsilon keeps p = 90 of 10 samples at rank 9 despite float rounding.
    let rank = ((p / 100.0) * n as f64 - 1e-9).ceil().max(1.0) as usize;
    sorted.get(rank.min(n) - 1).copied()
}

/// `part / whole`, or `None` when the whole is not a positive rate.
pub fn ratio(part: f64, whole: f64) -> Option<f64> {
    (whole.is_finite() && whole > 0.0 && part.is_finite()).then(|| part / whole)
}

/// Events per second, or 0 for an empty interval.
pub fn per_second(events: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        events as f64 / seconds
    } else {
        0.0
    }
}

/// Latency percentiles of a run, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Requests measured.
    pub samples: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// The slowest request.
    pub max_ms: f64,
    /// Arithmetic mean.
    pub mean_ms: f64,
}

impl LatencySummary {
    /// Summarises latencies given in microseconds (sorted in place).
    pub fn from_micros(lat: &mut [u64]) -> Self {
        lat.sort_unstable();
        let ms = |p: f64| percentile(lat, p).map_or(0.0, |us| us as f64 / 1000.0);
        let sum: u128 = lat.iter().map(|&v| u128::from(v)).sum();
        LatencySummary {
            samples: lat.len() as u64,
            p50_ms: ms(50.0),
            p90_ms: ms(90.0),
            p99_ms: ms(99.0),
            p999_ms: ms(99.9),
            max_ms: lat.last().map_or(0.0, |&v| v as f64 / 1000.0),
            mean_ms: if lat.is_empty() {
                0.0
            } else {
                sum as f64 / lat.len() as f64 / 1000.0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 50.0), Some(5));
        assert_eq!(percentile(&v, 90.0), Some(9));
        assert_eq!(percentile(&v, 91.0), Some(10));
        assert_eq!(percentile(&v, 99.0), Some(10));
        assert_eq!(percentile(&v, 100.0), Some(10));
        assert_eq!(percentile(&v, 0.1), Some(1));
        let thousand: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&thousand, 99.9), Some(999));
        assert_eq!(percentile(&thousand, 99.0), Some(990));
        assert_eq!(percentile(&[7], 99.9), Some(7));
    }

    #[test]
    fn percentiles_refuse_nonsense() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1, 2], 0.0), None);
        assert_eq!(percentile(&[1, 2], 100.5), None);
        assert_eq!(percentile(&[1, 2], f64::NAN), None);
    }

    #[test]
    fn summary_in_milliseconds() {
        let mut us: Vec<u64> = (1..=1000).rev().map(|i| i * 1000).collect();
        let s = LatencySummary::from_micros(&mut us);
        assert_eq!(s.samples, 1000);
        assert_eq!(s.p50_ms, 500.0);
        assert_eq!(s.p90_ms, 900.0);
        assert_eq!(s.p99_ms, 990.0);
        assert_eq!(s.p999_ms, 999.0);
        assert_eq!(s.max_ms, 1000.0);
        assert!((s.mean_ms - 500.5).abs() < 1e-9);
        assert_eq!(
            LatencySummary::from_micros(&mut []),
            LatencySummary::default()
        );
    }

    #[test]
    fn ratios_and_rates() {
        assert_eq!(ratio(4_600.0, 9_200.0), Some(0.5));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(1.0, -3.0), None);
        assert_eq!(ratio(f64::NAN, 2.0), None);
        assert_eq!(per_second(6_400, 2.0), 3_200.0);
        assert_eq!(per_second(5, 0.0), 0.0);
    }
}
