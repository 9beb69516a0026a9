//! Latency summaries: percentiles by nearest rank, and the quantiles a CDF is drawn from.

use std::time::Duration;

use serde::Serialize;

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Percentiles {
    /// How many samples.
    pub(crate) count: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p95_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) mean_ms: f64,
}

/// Sorted samples.
#[derive(Debug, Clone, Default)]
pub(crate) struct Samples {
    sorted: Vec<Duration>,
}

impl Samples {
    pub(crate) fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self { sorted: samples }
    }

    /// The sample at quantile `q` (0..=1) by nearest rank; zero when empty.
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let n = self.sorted.len();
        // Nearest rank: the smallest sample with at least q·n samples at or below it.
        let rank = (q.clamp(0.0, 1.0) * n as f64).ceil() as usize;
        self.sorted[rank.clamp(1, n) - 1]
    }

    pub(crate) fn percentiles(&self) -> Percentiles {
        let total: Duration = self.sorted.iter().sum();
        Percentiles {
            count: self.sorted.len(),
            p50_ms: ms(self.quantile(0.50)),
            p95_ms: ms(self.quantile(0.95)),
            p99_ms: ms(self.quantile(0.99)),
            max_ms: ms(self.quantile(1.0)),
            mean_ms: if self.sorted.is_empty() {
                0.0
            } else {
                ms(total) / self.sorted.len() as f64
            },
        }
    }

    /// The CDF as `points + 1` (milliseconds, fraction) pairs at evenly spaced quantiles.
    pub(crate) fn cdf(&self, points: usize) -> Vec<(f64, f64)> {
        if self.sorted.is_empty() {
            return Vec::new();
        }
        (0..=points)
            .map(|i| {
                let q = i as f64 / points as f64;
                (ms(self.quantile(q)), q)
            })
            .collect()
    }
}

/// A duration in milliseconds.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples = Samples::new((1..=100).rev().map(Duration::from_millis).collect());
        let p = samples.percentiles();
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 50.0).abs() < 1e-9);
        assert!((p.p95_ms - 95.0).abs() < 1e-9);
        assert!((p.p99_ms - 99.0).abs() < 1e-9);
        assert!((p.max_ms - 100.0).abs() < 1e-9);
        assert!((p.mean_ms - 50.5).abs() < 1e-9);
        assert_eq!(samples.quantile(0.0), Duration::from_millis(1));
    }

    #[test]
    fn no_samples_give_zeros_and_no_cdf() {
        let samples = Samples::new(Vec::new());
        assert_eq!(samples.percentiles().p99_ms, 0.0);
        assert!(samples.cdf(10).is_empty());
    }
}
