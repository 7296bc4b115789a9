//! THE blocking loop: wait detached in short slices, re-attach to run signal handlers, and
//! keep going until ready or the deadline passes (PEP 475 behaviour, interruptible by Ctrl-C).

use std::time::Duration;

use pyo3::prelude::*;

use crate::deadline::Deadline;
use crate::error::Result;

/// Longest single wait before re-checking signals (a backstop for threads that get no EINTR).
pub(crate) const SLICE: Duration = Duration::from_millis(50);

/// Runs `attempt(slice)` detached until it yields a value or `deadline` passes (`Ok(None)`).
/// Between attempts, Python signal handlers run; an exception they raise propagates.
pub(crate) fn wait_until<T, F>(
    py: Python<'_>,
    deadline: Deadline,
    mut attempt: F,
) -> PyResult<Option<T>>
where
    T: Send,
    F: FnMut(Duration) -> Result<Option<T>> + Send,
{
    loop {
        let slice = deadline.slice(SLICE);
        if let Some(v) = py.detach(|| attempt(slice))? {
            return Ok(Some(v));
        }
        py.check_signals()?;
        if deadline.is_expired() {
            return Ok(None);
        }
    }
}
