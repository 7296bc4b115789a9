//! Bindings for process start and supervision (`ferroproc.popen_*`, `ferroproc.forkserver`).

use std::ffi::CString;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::Mutex;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::deadline::Deadline;
use crate::error::Error;
use crate::process::forkserver;
use crate::sys::{fd, spawn as sys_spawn, wait};

fn cstring(s: Vec<u8>, what: &str) -> PyResult<CString> {
    CString::new(s).map_err(|_| PyValueError::new_err(format!("embedded null byte in {what}")))
}

/// Starts `path` with `argv` and `env` (`b"KEY=value"` entries), keeping the descriptors in
/// `keep` open in the child at the same numbers. Returns the pid.
#[pyfunction]
fn spawn(path: Vec<u8>, argv: Vec<Vec<u8>>, env: Vec<Vec<u8>>, keep: Vec<i32>) -> PyResult<i32> {
    let path = cstring(path, "executable path")?;
    let argv = argv
        .into_iter()
        .map(|a| cstring(a, "argument"))
        .collect::<PyResult<Vec<_>>>()?;
    let env = env
        .into_iter()
        .map(|a| cstring(a, "environment"))
        .collect::<PyResult<Vec<_>>>()?;
    let pid = sys_spawn::spawn(&path, &argv, &env, &keep)?;
    log::debug!(target: "ferroproc", "posix_spawn {path:?} keeping fds {keep:?}: pid {pid}");
    Ok(pid)
}

/// Waits until any of `fds` is readable (or closed by its peer), for at most `timeout` seconds
/// (`None`: forever). Returns the indices of the ready descriptors, empty on timeout. The GIL is
/// released while waiting; signal handlers run every slice, so Ctrl-C interrupts the wait.
#[pyfunction]
#[pyo3(signature = (fds, timeout=None))]
fn wait_readable(py: Python<'_>, fds: Vec<i32>, timeout: Option<f64>) -> PyResult<Vec<usize>> {
    // Validate once, attached: a closed/negative fd is EBADF like select() gives.
    for &f in &fds {
        fd::borrow_raw(f)?;
    }
    let deadline = Deadline::after_secs(timeout);
    let ready = crate::py::blocking::wait_until(py, deadline, |slice| {
        let borrowed = fds
            .iter()
            .map(|&f| fd::borrow_raw(f))
            .collect::<Result<Vec<_>, Error>>()?;
        let r = wait::poll_readable(&borrowed, Some(slice))?;
        Ok((!r.is_empty()).then_some(r))
    })?;
    Ok(ready.unwrap_or_default())
}

/// Reads a child's exit report (an `i32 LE`) from its status pipe without blocking. Returns
/// the code, `None` if nothing is there yet, or raises `EOFError` when the pipe closed without a
/// report (the child died before reporting).
#[pyfunction]
fn read_exit_report(fd_num: i32) -> PyResult<Option<i32>> {
    let f = fd::borrow_raw(fd_num)?;
    if wait::poll_readable(&[f], Some(std::time::Duration::ZERO))?.is_empty() {
        return Ok(None);
    }
    let mut buf = [0u8; 4];
    match fd::read_full(f, &mut buf)? {
        4 => Ok(Some(i32::from_le_bytes(buf))),
        _ => Err(Error::Eof.into()),
    }
}

/// Writes the exit report `code` to a status pipe (the child's last act before `_exit`).
/// Errors are ignored: a parent that stopped listening still gets the exit status by waitpid.
#[pyfunction]
fn write_exit_report(fd_num: i32, code: i32) {
    if let Ok(f) = fd::borrow_raw(fd_num) {
        let _ = fd::write_all(f, &code.to_le_bytes());
    }
}

/// `waitpid(pid)` decoded to the stdlib's exitcode convention; `None` while still running
/// (only when `block` is false). Raises `ChildProcessError` if `pid` is not our child.
#[pyfunction]
#[pyo3(signature = (pid, block=false))]
fn waitpid(py: Python<'_>, pid: i32, block: bool) -> PyResult<Option<i32>> {
    if block {
        Ok(py.detach(|| wait::waitpid(pid, true))?)
    } else {
        Ok(wait::waitpid(pid, false)?)
    }
}

/// Client side of the forkserver protocol: sends `payload` and `fds` over `ctl`, returns the pid.
#[pyfunction]
fn forkserver_request(
    py: Python<'_>,
    ctl: i32,
    payload: &Bound<'_, PyBytes>,
    fds: Vec<i32>,
) -> PyResult<i32> {
    let data = payload.as_bytes().to_vec();
    let ctl = fd::borrow_raw(ctl)?;
    Ok(py.detach(|| forkserver::request(ctl, &data, &fds))?)
}

/// Server side of the forkserver: the native request loop. Python forks (so the at-fork
/// protocol runs) and reports back with `forked`/`fork_failed`, or `child_after_fork` in the
/// child.
#[pyclass(module = "ferroproc._ferroproc", frozen)]
struct ForkServer {
    inner: Mutex<Option<forkserver::Server>>,
    pending: Mutex<Vec<OwnedFd>>,
}

impl ForkServer {
    fn with<T>(&self, f: impl FnOnce(&mut forkserver::Server) -> PyResult<T>) -> PyResult<T> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("forkserver poisoned"))?;
        let s = g
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("forkserver is closed"))?;
        f(s)
    }
}

#[pymethods]
impl ForkServer {
    /// Takes a duplicate of the control socket `ctl` (the caller may close its own).
    #[new]
    fn new(ctl: i32) -> PyResult<Self> {
        let owned = fd::dup_cloexec(fd::borrow_raw(ctl)?)?;
        Ok(Self {
            inner: Mutex::new(Some(forkserver::Server::new(owned))),
            pending: Mutex::new(Vec::new()),
        })
    }

    /// Blocks for the next request: `(payload, fds)`, or `None` when the client has gone.
    /// The returned fds stay owned by the server until `forked`/`child_after_fork`.
    fn next_event<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Option<(Bound<'py, PyBytes>, Vec<i32>)>> {
        let mut taken = self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("forkserver poisoned"))?
            .take();
        let server = taken
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("forkserver is closed"))?;
        let ev = py.detach(|| server.next_event());
        *self
            .inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("forkserver poisoned"))? = taken;
        match ev? {
            forkserver::Event::Shutdown => Ok(None),
            forkserver::Event::Request(req) => {
                let raw = req
                    .fds
                    .iter()
                    .map(std::os::fd::AsRawFd::as_raw_fd)
                    .collect();
                *self
                    .pending
                    .lock()
                    .map_err(|_| PyRuntimeError::new_err("forkserver poisoned"))? = req.fds;
                Ok(Some((PyBytes::new(py, &req.payload), raw)))
            }
        }
    }

    /// In the server after a successful fork: remember the child and reply with its pid.
    fn forked(&self, pid: i32) -> PyResult<()> {
        let fds = std::mem::take(
            &mut *self
                .pending
                .lock()
                .map_err(|_| PyRuntimeError::new_err("forkserver poisoned"))?,
        );
        self.with(|s| Ok(s.forked(pid, fds)?))
    }

    /// In the server after a failed fork: reply with the errno and drop the request's fds.
    fn fork_failed(&self, errno: i32) -> PyResult<()> {
        self.pending
            .lock()
            .map_err(|_| PyRuntimeError::new_err("forkserver poisoned"))?
            .clear();
        self.with(|s| Ok(s.fork_failed(errno)?))
    }

    /// In the child: close every server descriptor and hand the request's fds to Python, which
    /// owns them from now on.
    fn child_after_fork(&self) -> PyResult<Vec<i32>> {
        self.inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("forkserver poisoned"))?
            .take();
        let fds = std::mem::take(
            &mut *self
                .pending
                .lock()
                .map_err(|_| PyRuntimeError::new_err("forkserver poisoned"))?,
        );
        Ok(fds.into_iter().map(IntoRawFd::into_raw_fd).collect())
    }

    /// The control socket's number (for diagnostics).
    fn ctl_fd(&self) -> PyResult<i32> {
        self.with(|s| Ok(s.ctl_fd()))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(spawn, m)?)?;
    m.add_function(wrap_pyfunction!(wait_readable, m)?)?;
    m.add_function(wrap_pyfunction!(read_exit_report, m)?)?;
    m.add_function(wrap_pyfunction!(write_exit_report, m)?)?;
    m.add_function(wrap_pyfunction!(waitpid, m)?)?;
    m.add_function(wrap_pyfunction!(forkserver_request, m)?)?;
    m.add_function(wrap_pyfunction!(crate::py::logging::reset_logging, m)?)?;
    m.add_function(wrap_pyfunction!(crate::py::logging::init_logging, m)?)?;
    m.add_class::<ForkServer>()?;
    Ok(())
}
