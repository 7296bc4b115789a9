//! Rust `log` records → Python `logging`, under the `ferroproc` logger (pyo3-log).

use std::sync::OnceLock;

use pyo3_log::ResetHandle;

static HANDLE: OnceLock<Option<ResetHandle>> = OnceLock::new();

/// Installs pyo3-log once per process. Loggers and levels are cached, so disabled log calls
/// never touch the interpreter.
pub(crate) fn init() {
    HANDLE.get_or_init(|| pyo3_log::try_init().ok());
}

/// Drops pyo3-log's cache after Python logging was reconfigured.
#[pyo3::pyfunction]
pub(crate) fn reset_logging() {
    if let Some(Some(h)) = HANDLE.get() {
        h.reset();
    }
}
