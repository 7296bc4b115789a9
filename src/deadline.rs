//! Absolute monotonic deadlines: a Python `timeout` is turned into one once, at entry.

use std::time::{Duration, Instant};

/// A point on the monotonic clock after which a blocking call gives up, or none (wait forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Option<Instant>,
}

impl Deadline {
    /// A deadline that never expires.
    #[must_use]
    pub const fn never() -> Self {
        Self { at: None }
    }

    /// Builds a deadline `timeout` seconds from now; `None` waits forever. Negative, NaN and zero
    /// timeouts expire at once (callers validate per-API rules before getting here).
    #[must_use]
    pub fn after_secs(timeout: Option<f64>) -> Self {
        match timeout {
            None => Self::never(),
            Some(t) if t.is_nan() || t <= 0.0 => Self {
                at: Some(Instant::now()),
            },
            Some(t) => Self {
                // Durations beyond ~584 years saturate to "forever".
                at: Duration::try_from_secs_f64(t)
                    .ok()
                    .and_then(|d| Instant::now().checked_add(d)),
            },
        }
    }

    /// Time left, `None` for a deadline that never expires; zero once expired.
    #[must_use]
    pub fn remaining(&self) -> Option<Duration> {
        self.at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Whether the deadline has passed.
    #[must_use]
    pub fn is_expired(&self) -> bool {
        self.remaining().is_some_and(|d| d.is_zero())
    }

    /// The next wait slice: the remaining time capped at `slice`.
    #[must_use]
    pub fn slice(&self, slice: Duration) -> Duration {
        self.remaining().map_or(slice, |r| r.min(slice))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_never_expires() {
        let d = Deadline::after_secs(None);
        assert!(!d.is_expired());
        assert_eq!(d.remaining(), None);
        assert_eq!(
            d.slice(Duration::from_millis(50)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn negative_zero_and_nan_expire_at_once() {
        for t in [-1.0, 0.0, f64::NAN] {
            assert!(Deadline::after_secs(Some(t)).is_expired(), "{t}");
        }
    }

    #[test]
    fn huge_timeouts_saturate_to_forever() {
        assert_eq!(Deadline::after_secs(Some(1e300)).remaining(), None);
        assert_eq!(Deadline::after_secs(Some(f64::INFINITY)).remaining(), None);
    }

    #[test]
    fn slice_is_capped_by_remaining() {
        let d = Deadline::after_secs(Some(0.01));
        assert!(d.slice(Duration::from_secs(5)) <= Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(15));
        assert!(d.is_expired());
    }
}
