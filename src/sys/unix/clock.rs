//! A coarse system-wide monotonic clock, comparable between processes.

use nix::time::{clock_gettime, ClockId};

/// Milliseconds on `CLOCK_MONOTONIC_COARSE` (same value in every process; ~1-4 ms resolution).
#[must_use]
pub fn coarse_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or(0, |t| {
        (t.tv_sec() as u64).saturating_mul(1000) + (t.tv_nsec() as u64) / 1_000_000
    })
}
