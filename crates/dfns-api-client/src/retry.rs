//! [`Backoff`]: jittered exponential backoff between attempts.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter.
///
/// Attempt `n` (counting from 0) waits a uniformly random duration in
/// `[0, min(max, initial × multiplierⁿ)]` ("full jitter": clients that failed together spread
/// out instead of retrying in lockstep). [`Backoff::ceiling`] is that upper bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The ceiling of the first delay.
    pub initial: Duration,
    /// The largest ceiling.
    pub max: Duration,
    /// How much the ceiling grows per attempt (values below 1 are treated as 1).
    pub multiplier: f64,
    /// How many times an idempotent request is retried before its error is returned.
    pub max_retries: u32,
}

impl Default for Backoff {
    /// 100 ms, doubling, capped at 10 s; 5 retries.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            max_retries: 5,
        }
    }
}

impl Backoff {
    /// The upper bound of the delay before retry `attempt` (0 for the first retry).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let multiplier = if self.multiplier.is_finite() {
            self.multiplier.max(1.0)
        } else {
            1.0
        };
        // Beyond 2^64 every sensible cap is reached; clamp the exponent so powi stays finite.
        let exponent = i32::try_from(attempt.min(64)).unwrap_or(64);
        let ceiling = self.initial.as_secs_f64() * multiplier.powi(exponent);
        match Duration::try_from_secs_f64(ceiling) {
            Ok(d) => d.min(self.max),
            Err(_) => self.max,
        }
    }

    /// A random delay in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        if ceiling.is_zero() {
            return ceiling;
        }
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::thread_rng().gen_range(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_grow_then_cap() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(7), Duration::from_secs(10));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(10));
        for n in 0..100 {
            assert!(b.ceiling(n) <= b.ceiling(n + 1));
        }
    }

    #[test]
    fn delays_stay_under_the_ceiling_and_grow() {
        let b = Backoff::default();
        for attempt in [0, 1, 5, 20, 1000] {
            for _ in 0..200 {
                assert!(b.delay(attempt) <= b.ceiling(attempt));
            }
        }
        // With full jitter a single draw may be small; the largest of many draws tracks the ceiling.
        let largest = |attempt| (0..200).map(|_| b.delay(attempt)).max().unwrap();
        assert!(largest(0) <= Duration::from_millis(100));
        assert!(largest(6) > Duration::from_millis(100));
    }

    #[test]
    fn odd_parameters_do_not_panic() {
        for multiplier in [f64::NAN, f64::INFINITY, -3.0, 0.0, 1e300] {
            let b = Backoff {
                multiplier,
                ..Backoff::default()
            };
            for attempt in [0, 1, 64, u32::MAX] {
                assert!(b.delay(attempt) <= b.max);
            }
        }
        let zero = Backoff {
            initial: Duration::ZERO,
            ..Backoff::default()
        };
        assert_eq!(zero.delay(3), Duration::ZERO);
    }
}
