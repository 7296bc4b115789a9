//! Bindings for process start and supervision (`ferroproc.popen_*`, `ferroproc.forkserver`).

use std::ffi::CString;
use std::os::fd::IntoRawFd;
use std::sync::Mutex;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::deadline::Deadline;
use crate::error::Error;
use crate::process::forkserver;
use crate::sys::{comm, fd, spawn as sys_spawn, wait};

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

/// The signal mask of the calling thread from before [`hold_signals`].
#[pyclass(module = "ferroproc._ferroproc", frozen)]
struct HeldSignals {
    old: nix::sys::signal::SigSet,
}

#[pymethods]
impl HeldSignals {
    /// Sets the calling thread's mask back to what it was (in a forked child too): pending
    /// signals are delivered now.
    fn release(&self) -> PyResult<()> {
        use nix::sys::signal::{pthread_sigmask, SigmaskHow};
        pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None).map_err(Error::from)?;
        Ok(())
    }
}

/// Blocks every signal the calling thread can block, until `release()` of the returned
/// object: a fork and the recording of its child happen without a Python signal handler
/// (KeyboardInterrupt) running in between.
#[pyfunction]
fn hold_signals() -> PyResult<HeldSignals> {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old))
        .map_err(Error::from)?;
    Ok(HeldSignals { old })
}

/// Client side of the forkserver protocol: sends `payload` and `fds` over `ctl` (and `hint`,
/// which the server gets from `ForkServer.take_imports`), returns the pid.
#[pyfunction]
#[pyo3(signature = (ctl, payload, fds, hint=0))]
fn forkserver_request(
    py: Python<'_>,
    ctl: i32,
    payload: &Bound<'_, PyBytes>,
    fds: Vec<i32>,
    hint: u32,
) -> PyResult<i32> {
    let data = payload.as_bytes().to_vec();
    let ctl = fd::borrow_raw(ctl)?;
    Ok(py.detach(|| forkserver::request(ctl, &data, &fds, hint))?)
}

/// Server side of the forkserver. Python forks (so the at-fork protocol runs) a spare ahead of
/// each request and reports it with `spare_forked`; the spare calls `take` and becomes the
/// child; the server `wait`s for the spare to be used and forks the next.
#[pyclass(module = "ferroproc._ferroproc", frozen)]
struct ForkServer {
    inner: Mutex<Option<forkserver::Server>>,
}

/// Name of a spare while it waits (`/proc/<pid>/comm`, at most 15 bytes): tells it apart from
/// the children in `ps`/`top` and in leak checks.
const SPARE_NAME: &std::ffi::CStr = c"ferroproc-spare";

impl ForkServer {
    fn with<T>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut forkserver::Server) -> Result<T, Error> + Send,
    ) -> PyResult<T>
    where
        T: Send,
    {
        // Taken out of the mutex while blocked: `detach` needs the closure to own it.
        let mut server = self.lock()?.take().ok_or_else(closed)?;
        let out = py.detach(|| f(&mut server));
        *self.lock()? = Some(server);
        Ok(out?)
    }

    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Option<forkserver::Server>>> {
        self.inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("forkserver poisoned"))
    }
}

fn closed() -> PyErr {
    PyRuntimeError::new_err("forkserver is closed")
}

#[pymethods]
impl ForkServer {
    /// Takes a duplicate of the control socket `ctl` (the caller may close its own).
    #[new]
    fn new(ctl: i32) -> PyResult<Self> {
        let owned = fd::dup_cloexec(fd::borrow_raw(ctl)?)?;
        Ok(Self {
            inner: Mutex::new(Some(forkserver::Server::new(owned)?)),
        })
    }

    /// In the server right before forking a spare.
    fn before_fork(&self) -> PyResult<()> {
        Ok(self.lock()?.as_mut().ok_or_else(closed)?.before_fork()?)
    }

    /// In the server after forking `pid` as a spare: True when another spare should be
    /// forked before waiting.
    fn spare_forked(&self, pid: i32) -> PyResult<bool> {
        Ok(self
            .lock()?
            .as_mut()
            .ok_or_else(closed)?
            .spare_forked(pid)?)
    }

    /// Blocks until the spare is used (True: fork the next) or the client has gone (False).
    fn wait(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.with(py, forkserver::Server::wait)? == forkserver::Wake::SpareUsed)
    }

    /// The union of the hints of the requests taken since the last call (and clears it).
    fn take_imports(&self) -> PyResult<u32> {
        Ok(self.lock()?.as_mut().ok_or_else(closed)?.take_imports())
    }

    /// After a failed fork: answers the next request with `-errno`. False if the client went.
    fn refuse_next(&self, py: Python<'_>, errno: i32) -> PyResult<bool> {
        self.with(py, |s| s.refuse_next(errno))
    }

    /// In the spare (a fork of the server whose pid is `server_pid`): waits for the next
    /// request, answers the client with this process's pid and returns `(payload, fds)`,
    /// the fds now owned by the caller; `None` when the client has gone or the server died.
    /// Closes every server descriptor first. The spare dies with the server while it waits.
    fn take<'py>(
        &self,
        py: Python<'py>,
        server_pid: i32,
    ) -> PyResult<Option<(Bound<'py, PyBytes>, Vec<i32>)>> {
        use nix::sys::{prctl, signal::Signal};
        let spare = {
            let mut server = self.lock()?.take().ok_or_else(closed)?;
            server.spare()?
        };
        prctl::set_pdeathsig(Signal::SIGKILL).map_err(Error::from)?;
        if nix::unistd::getppid().as_raw() != server_pid {
            return Ok(None);
        }
        let own_name = comm::get().ok();
        let _ = comm::set(SPARE_NAME);
        let me = nix::unistd::getpid().as_raw();
        // The parent-death signal goes before the client gets the pid (see `take_with`).
        let req =
            py.detach(|| spare.take_with(me, || prctl::set_pdeathsig(None).map_err(Error::from)));
        if let Some(name) = own_name {
            let _ = comm::set(&name);
        }
        Ok(match req? {
            None => None,
            Some(req) => {
                let raw = req.fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
                Some((PyBytes::new(py, &req.payload), raw))
            }
        })
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
    m.add_class::<HeldSignals>()?;
    m.add_function(wrap_pyfunction!(hold_signals, m)?)?;
    m.add("FORKSERVER_PROTOCOL", forkserver::PROTOCOL)?;
    Ok(())
}
