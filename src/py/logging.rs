//! Rust `log` records → Python `logging`, under the `ferroproc` logger (pyo3-log).

use std::sync::OnceLock;

use pyo3_log::ResetHandle;

static HANDLE: OnceLock<Option<ResetHandle>> = OnceLock::new();

/// Installs pyo3-log once per process. Loggers and levels are cached, so disabled log calls
/// never touch the interpreter.
#[pyo3::pyfunction]
pub(crate) fn init_logging() {
    HANDLE.get_or_init(|| pyo3_log::try_init().ok());
}

/// Module-init hook: bridges Rust `log` records to Python `logging` at once if `logging` is
/// already imported; otherwise `ferroproc.util.get_logger()` does it on first use, so a
/// spawned child does not pay for importing `logging` at start-up.
pub(crate) fn init(py: pyo3::Python<'_>) {
    use pyo3::types::PyAnyMethods;
    let loaded = py
        .import("sys")
        .and_then(|sys| sys.getattr("modules"))
        .and_then(|m| m.contains("logging"))
        .unwrap_or(false);
    if loaded {
        init_logging();
    }
}

/// Drops pyo3-log's cache after Python logging was reconfigured.
#[pyo3::pyfunction]
pub(crate) fn reset_logging() {
    if let Some(Some(h)) = HANDLE.get() {
        h.reset();
    }
}
