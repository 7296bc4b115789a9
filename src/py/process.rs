//! Bindings for process start and supervision (`ferroproc.popen_*`, `ferroproc.forkserver`).

use std::ffi::CString;
use std::os::fd::IntoRawFd;
use std::sync::Mutex;

use pyo3::exceptions::{PyAttributeError, PyOSError, PyRuntimeError, PySystemExit, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyList, PySet, PyString, PyTuple};

use crate::deadline::Deadline;
use crate::error::Error;
use crate::process::forkserver;
use crate::sys::{comm, fd, fork as sys_fork, spawn as sys_spawn, wait};

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

/// A fork child's entry, made once in the parent (`popen_fork`) so that a child has nothing
/// to look up or allocate: every page a fork child writes is a copy-on-write fault (about 3 µs
/// here), and running `BaseProcess._run_child` in Python writes the pages of each code object,
/// function, method descriptor and name it touches, besides the data it changes. In the common
/// case (decided by `process._fork_entry` in the parent, and after `run()` by `plain_exit`) the
/// child runs no Python code of ferroproc's; otherwise it goes through `_run_child`.
#[pyclass(module = "ferroproc._ferroproc", frozen)]
struct ForkChild {
    /// `ferroproc.process.__dict__`, `ferroproc.util.__dict__`, `sys.modules`, `sys`.
    process_globals: Py<PyDict>,
    util_globals: Py<PyDict>,
    modules: Py<PyDict>,
    sys: Py<PyModule>,
    /// `ferroproc.context._default_context` and `_concrete_contexts`.
    default_context: Py<PyAny>,
    concrete_contexts: Py<PyDict>,
    /// `process._LoggingImport`.
    log_hook: Py<PyAny>,
    /// `_pickle.loads` and `itertools.count`, for a forkserver's child (`ForkChild.serve`).
    loads: Py<PyAny>,
    count: Py<PyAny>,
    /// Attribute and global names, interned here so the child finds them made.
    names: ChildNames,
}

/// The names a [`ForkChild`] uses.
struct ChildNames {
    start_method: Py<PyString>,
    actual_context: Py<PyString>,
    process_counter: Py<PyString>,
    children: Py<PyString>,
    parent_process: Py<PyString>,
    current_process: Py<PyString>,
    stdlib_modules: Py<PyString>,
    close_stdin: Py<PyString>,
    spare_stdin: Py<PyString>,
    fd0_stdin: Py<PyString>,
    devnull_fd: Py<PyString>,
    finalizer_registry: Py<PyString>,
    logger: Py<PyString>,
    exiting: Py<PyString>,
    stdin: Py<PyString>,
    stdout: Py<PyString>,
    stderr: Py<PyString>,
    close: Py<PyString>,
    flush: Py<PyString>,
    meta_path: Py<PyString>,
    insert: Py<PyString>,
    threading: Py<PyString>,
    stdlib_util: Py<PyString>,
    run: Py<PyString>,
    code: Py<PyString>,
    enter_hooks: Py<PyString>,
    run_child: Py<PyString>,
    inheriting: Py<PyString>,
    name: Py<PyString>,
    parent_name: Py<PyString>,
    parent_pid: Py<PyString>,
    parent_class: Py<PyString>,
    inherited_fds: Py<PyString>,
    afterfork_registry: Py<PyString>,
    data: Py<PyString>,
    logging: Py<PyString>,
    devnull_stdin: Py<PyString>,
    stdlib_process: Py<PyString>,
    stdlib_module: Py<PyString>,
    process: Py<PyString>,
    util: Py<PyString>,
    closed: Py<PyString>,
}

impl ChildNames {
    fn new(py: Python<'_>) -> Self {
        let n = |s: &str| PyString::intern(py, s).unbind();
        Self {
            start_method: n("_start_method"),
            actual_context: n("_actual_context"),
            process_counter: n("_process_counter"),
            children: n("_children"),
            parent_process: n("_parent_process"),
            current_process: n("_current_process"),
            stdlib_modules: n("_stdlib_modules"),
            close_stdin: n("_close_stdin"),
            spare_stdin: n("_spare_stdin"),
            fd0_stdin: n("_fd0_stdin"),
            devnull_fd: n("_devnull_fd"),
            finalizer_registry: n("_finalizer_registry"),
            logger: n("_logger"),
            exiting: n("_exiting"),
            stdin: n("stdin"),
            stdout: n("stdout"),
            stderr: n("stderr"),
            close: n("close"),
            flush: n("flush"),
            meta_path: n("meta_path"),
            insert: n("insert"),
            threading: n("threading"),
            stdlib_util: n("multiprocessing.util"),
            run: n("run"),
            code: n("code"),
            enter_hooks: n("_enter_child_hooks"),
            run_child: n("_run_child"),
            inheriting: n("_inheriting"),
            name: n("_name"),
            parent_name: n("_parent_name"),
            parent_pid: n("_parent_pid"),
            parent_class: n("_ParentProcess"),
            inherited_fds: n("_inherited_fds"),
            afterfork_registry: n("_afterfork_registry"),
            data: n("data"),
            logging: n("logging"),
            devnull_stdin: n("_devnull_stdin"),
            stdlib_process: n("multiprocessing.process"),
            stdlib_module: n("_stdlib_module"),
            process: n("process"),
            util: n("util"),
            closed: n("closed"),
        }
    }
}

/// `process._fork_entry` flags (exported as `ENTRY_*`): what a child's entry does besides
/// its assignments.
/// `_enter_child_hooks` runs (threading, logging, the stdlib or registries are loaded).
const ENTRY_HOOKS: u8 = 1;
/// `process._LoggingImport` goes into `sys.meta_path` (when there are no hooks to run).
const ENTRY_LOG_HOOK: u8 = 2;
/// `sys.stdin` is the one `util._prepare_fork_stdin` made a spare for.
const ENTRY_SPARE_STDIN: u8 = 4;
/// `util._finalizer_registry` is cleared (when there are no hooks to run, which would).
const ENTRY_CLEAR_FINALIZERS: u8 = 8;
/// `sys.stdin` is the /dev/null a forkserver opened for itself: kept as it is, unchecked.
const ENTRY_STDIN_KEPT: u8 = 16;

impl ForkChild {
    /// `BaseProcess._enter_child`, natively (keep the two in step): the start method, a fresh
    /// process tree, /dev/null as stdin, this process as the current one, then the hooks.
    fn enter(
        &self,
        py: Python<'_>,
        process: &Bound<'_, PyAny>,
        prepared: &Bound<'_, PyAny>,
        entry: u8,
    ) -> PyResult<()> {
        let n = &self.names;
        let method = process.getattr(n.start_method.bind(py))?;
        if !method.is_none() {
            let context = self
                .concrete_contexts
                .bind(py)
                .get_item(&method)?
                .ok_or_else(|| {
                    PyValueError::new_err(format!("cannot find context for {method}"))
                })?;
            self.default_context
                .bind(py)
                .setattr(n.actual_context.bind(py), context)?;
        }
        let (counter, children, parent): (Bound<'_, PyAny>, Bound<'_, PyAny>, Bound<'_, PyAny>) =
            prepared.extract()?;
        let globals = self.process_globals.bind(py);
        globals.set_item(n.process_counter.bind(py), counter)?;
        globals.set_item(n.children.bind(py), children)?;
        globals.set_item(n.parent_process.bind(py), parent)?;
        if entry & ENTRY_STDIN_KEPT == 0 {
            self.close_stdin(py, entry & ENTRY_SPARE_STDIN != 0)?;
        }
        let previous = globals.get_item(n.current_process.bind(py))?;
        globals.set_item(n.current_process.bind(py), process)?;
        // The parent's process object stays referenced: freeing it would write its pages (and
        // its name's and authkey's), for an object this process never uses again.
        std::mem::forget(previous);
        if entry & ENTRY_HOOKS != 0 {
            return process.call_method0(n.enter_hooks.bind(py)).map(drop);
        }
        if entry & ENTRY_LOG_HOOK != 0 {
            let meta_path = self.sys.bind(py).getattr(n.meta_path.bind(py))?;
            meta_path.call_method1(n.insert.bind(py), (0, self.log_hook.bind(py)))?;
        }
        if entry & ENTRY_CLEAR_FINALIZERS != 0 {
            // The parent's finalizers are not this process's (`BaseProcess._after_fork`).
            let registry = self
                .util_globals
                .bind(py)
                .get_item(n.finalizer_registry.bind(py))?;
            if let Some(registry) = registry {
                registry.cast_into::<PyDict>()?.clear();
            }
        }
        Ok(())
    }

    /// `util._close_stdin`; natively for the stdin `util._prepare_fork_stdin` made a spare for
    /// (keep the two in step): closed, descriptor 0 onto /dev/null, the spare in its place.
    fn close_stdin(&self, py: Python<'_>, spare: bool) -> PyResult<()> {
        let n = &self.names;
        let util = self.util_globals.bind(py);
        if spare {
            let sys = self.sys.bind(py);
            if let Err(e) = sys
                .getattr(n.stdin.bind(py))?
                .call_method0(n.close.bind(py))
            {
                // What `util._close_stdin` ignores.
                if !(e.is_instance_of::<PyOSError>(py) || e.is_instance_of::<PyValueError>(py)) {
                    return Err(e);
                }
            }
            let spare_stdin = util.get_item(n.spare_stdin.bind(py))?;
            util.set_item(n.spare_stdin.bind(py), py.None())?;
            util.set_item(n.fd0_stdin.bind(py), py.None())?;
            let devnull = util.get_item(n.devnull_fd.bind(py))?;
            let devnull: Option<i32> = devnull.map(|d| d.extract()).transpose()?;
            if let (Some(stdin), Some(devnull)) = (spare_stdin, devnull) {
                if fd::dup_onto(fd::borrow_raw(devnull)?, 0).is_ok() {
                    return sys.setattr(n.stdin.bind(py), stdin);
                }
            }
            // No spare after all, or no /dev/null on descriptor 0: `_close_stdin` opens one
            // (the stdin is closed already, and no longer taken for descriptor 0's).
        }
        if let Some(close_stdin) = util.get_item(n.close_stdin.bind(py))? {
            close_stdin.call0()?;
        }
        Ok(())
    }

    /// Whether the stdlib's `multiprocessing.process` or `.util` is loaded, as
    /// `process._stdlib_module` finds them; that function runs only when `sys.modules` has
    /// one of the names (it tells the stdlib's from ferroproc's under the stdlib's name).
    fn stdlib_loaded(&self, py: Python<'_>) -> PyResult<bool> {
        let n = &self.names;
        let process = self.process_globals.bind(py);
        if let Some(seen) = process.get_item(n.stdlib_modules.bind(py))? {
            let seen = seen.cast_into::<PyDict>()?;
            if seen.contains(n.process.bind(py))? || seen.contains(n.util.bind(py))? {
                return Ok(true);
            }
        }
        let modules = self.modules.bind(py);
        if !modules.contains(n.stdlib_process.bind(py))?
            && !modules.contains(n.stdlib_util.bind(py))?
        {
            return Ok(false);
        }
        let Some(find) = process.get_item(n.stdlib_module.bind(py))? else {
            return Ok(false);
        };
        Ok(!find.call1((n.process.bind(py),))?.is_none()
            || !find.call1((n.util.bind(py),))?.is_none())
    }

    /// A forkserver child's process object, unpickled from `prep` (the preparation data, or
    /// a 1-tuple of the child's name) and `pickled`, as `spawn._main` would: the preparation
    /// is applied first (`prepare`, with `unapplied` when only the name came), with the
    /// current process marked inheriting meanwhile. A rehearsal applies nothing it would have
    /// to undo but the name. The flag says whether a preparation was applied (which may have
    /// run the main script).
    #[allow(clippy::too_many_arguments)]
    fn load_child<'py>(
        &self,
        py: Python<'py>,
        current: &Bound<'py, PyAny>,
        prep: &[u8],
        pickled: &[u8],
        prepare: &Bound<'py, PyAny>,
        unapplied: &Bound<'py, PyAny>,
        rehearse: bool,
    ) -> PyResult<(Bound<'py, PyAny>, bool)> {
        let n = &self.names;
        let loads = self.loads.bind(py);
        let prep = loads.call1((PyBytes::new(py, prep),))?;
        let mut prepared = false;
        if let Ok(only_name) = prep.cast_exact::<PyTuple>() {
            current.setattr(n.name.bind(py), only_name.get_item(0)?)?;
            if !unapplied.is_none() && !rehearse {
                prepare.call1((unapplied,))?;
                prepared = true;
            }
        } else if !rehearse {
            prepare.call1((prep,))?;
            prepared = true;
        }
        Ok((loads.call1((PyBytes::new(py, pickled),))?, prepared))
    }

    /// True when `_run_child` would do nothing after `run()` (which returned, or called
    /// `sys.exit()` with None or an int) but mark the process exiting, flush stdout and
    /// stderr and give back received buffers: no finalizers, children or logger, neither
    /// `threading` nor the stdlib's `multiprocessing.util` loaded.
    fn plain_exit(&self, py: Python<'_>) -> PyResult<bool> {
        let n = &self.names;
        let util = self.util_globals.bind(py);
        let process = self.process_globals.bind(py);
        let modules = self.modules.bind(py);
        let truthy = |d: &Bound<'_, PyDict>, k: &Py<PyString>| -> PyResult<bool> {
            Ok(match d.get_item(k.bind(py))? {
                Some(v) => v.is_truthy()?,
                None => false,
            })
        };
        Ok(!truthy(util, &n.finalizer_registry)?
            && !truthy(process, &n.children)?
            && !truthy(util, &n.logger)?
            && !truthy(process, &n.stdlib_modules)?
            && !modules.contains(n.threading.bind(py))?
            && !modules.contains(n.stdlib_util.bind(py))?)
    }

    /// `_run_child`'s work after `run()`, for a [`ForkChild::plain_exit`].
    fn exit_plainly(&self, py: Python<'_>) -> PyResult<()> {
        let n = &self.names;
        self.util_globals
            .bind(py)
            .set_item(n.exiting.bind(py), true)?;
        let sys = self.sys.bind(py);
        for name in [&n.stdout, &n.stderr] {
            let flushed = sys
                .getattr(name.bind(py))
                .and_then(|s| s.call_method0(n.flush.bind(py)));
            if let Err(e) = flushed {
                // What `util._flush_std_streams` ignores.
                if !(e.is_instance_of::<PyAttributeError>(py)
                    || e.is_instance_of::<PyValueError>(py))
                {
                    return Err(e);
                }
            }
        }
        crate::py::oob::_release_received_buffers();
        Ok(())
    }

    /// The child's exit code, as `_bootstrap` gives it.
    fn bootstrap(
        &self,
        py: Python<'_>,
        process: &Bound<'_, PyAny>,
        prepared: &Bound<'_, PyAny>,
        entry: u8,
    ) -> PyResult<i32> {
        let n = &self.names;
        let none = py.None();
        let run_child = |entry_error: Option<Py<PyAny>>, ran: Option<Py<PyAny>>| {
            process.call_method1(n.run_child.bind(py), (&none, &none, true, entry_error, ran))
        };
        let code = match self.enter(py, process, prepared, entry) {
            // A failure is reported by `_run_child`, as one in `_enter_child` would be.
            Err(e) => run_child(Some(e.into_value(py).into_any()), None)?,
            // A logger has `_run_child` log the run.
            Ok(())
                if self
                    .util_globals
                    .bind(py)
                    .get_item(n.logger.bind(py))?
                    .is_some_and(|l| l.is_truthy().unwrap_or(true)) =>
            {
                run_child(None, None)?
            }
            Ok(()) => {
                let ran = process.call_method0(n.run.bind(py));
                // The exit code of a `run()` that returned or called `sys.exit()` with None
                // or an int; anything else is `_run_child`'s to report.
                let plain_code = match &ran {
                    Ok(_) => Some(py.None().into_bound(py).into_any()),
                    Err(e) if e.is_instance_of::<PySystemExit>(py) => {
                        let code = e.value(py).getattr(n.code.bind(py))?;
                        (code.is_none() || code.is_instance_of::<PyInt>()).then_some(code)
                    }
                    Err(_) => None,
                };
                match plain_code {
                    Some(code) if self.plain_exit(py)? => {
                        self.exit_plainly(py)?;
                        if code.is_none() {
                            return Ok(0);
                        }
                        code
                    }
                    _ => match ran {
                        Ok(_) => run_child(
                            None,
                            Some(PyBool::new(py, true).to_owned().into_any().unbind()),
                        )?,
                        Err(e) => run_child(None, Some(e.into_value(py).into_any()))?,
                    },
                }
            }
        };
        code.bitand(0xFF)?.extract()
    }
}

#[pymethods]
impl ForkChild {
    #[new]
    fn new(
        py: Python<'_>,
        process_globals: Bound<'_, PyDict>,
        util_globals: Bound<'_, PyDict>,
        default_context: Bound<'_, PyAny>,
        concrete_contexts: Bound<'_, PyDict>,
        log_hook: Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let sys = py.import("sys")?;
        Ok(Self {
            process_globals: process_globals.unbind(),
            util_globals: util_globals.unbind(),
            modules: sys.getattr("modules")?.cast_into::<PyDict>()?.unbind(),
            sys: sys.unbind(),
            default_context: default_context.unbind(),
            concrete_contexts: concrete_contexts.unbind(),
            log_hook: log_hook.unbind(),
            loads: py.import("_pickle")?.getattr("loads")?.unbind(),
            count: py.import("itertools")?.getattr("count")?.unbind(),
            names: ChildNames::new(py),
        })
    }

    /// The entry flags of children forked now (`process._fork_entry`, which defines them in
    /// words), decided in the parent: their state is its state.
    fn entry_flags(&self, py: Python<'_>) -> PyResult<u8> {
        let n = &self.names;
        let util = self.util_globals.bind(py);
        let modules = self.modules.bind(py);
        let sys = self.sys.bind(py);
        let mut entry = 0;
        let registered = match util.get_item(n.afterfork_registry.bind(py))? {
            Some(registry) => registry.getattr(n.data.bind(py))?.is_truthy()?,
            None => false,
        };
        if modules.contains(n.threading.bind(py))?
            || modules.contains(n.logging.bind(py))?
            || registered
            || self.stdlib_loaded(py)?
        {
            entry |= ENTRY_HOOKS;
        } else {
            let meta_path = sys.getattr(n.meta_path.bind(py))?;
            if !meta_path.contains(self.log_hook.bind(py))? {
                entry |= ENTRY_LOG_HOOK;
            }
            if let Some(registry) = util.get_item(n.finalizer_registry.bind(py))? {
                if registry.is_truthy()? {
                    entry |= ENTRY_CLEAR_FINALIZERS;
                }
            }
        }
        let stdin = sys.getattr(n.stdin.bind(py))?;
        let util_is = |name: &Py<PyString>| -> PyResult<bool> {
            Ok(util.get_item(name.bind(py))?.is_some_and(|v| v.is(&stdin)))
        };
        if !stdin.is_none()
            && util_is(&n.fd0_stdin)?
            && !util_is(&n.devnull_stdin)?
            && util
                .get_item(n.spare_stdin.bind(py))?
                .is_some_and(|s| !s.is_none())
        {
            entry |= ENTRY_SPARE_STDIN;
        }
        Ok(entry)
    }

    /// In a forkserver's spare given its request (`ForkServer.run_spare`): unpickles the
    /// process object from `payload` (see `ForkServer._payload`), hands the request's
    /// inherited descriptors to `forkserver` (the `ForkServer`), and runs the child as
    /// [`ForkChild::run`] does; never returns. `fds` are the status pipe's write end, the
    /// parent sentinel, then the inherited ones. `prepare` is `spawn.prepare`, `unapplied`
    /// what the server did not apply to itself (or None).
    ///
    /// With `rehearse`, it stops short of running, and puts back the name and descriptors:
    /// a spare does this while it waits, so that the pages a child writes on its way in are
    /// written before the request (see `ForkServer.rehearse`).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (payload, fds, forkserver, prepare, unapplied, rehearse=false))]
    fn serve(
        &self,
        py: Python<'_>,
        payload: &Bound<'_, PyBytes>,
        fds: Vec<i32>,
        forkserver: &Bound<'_, PyAny>,
        prepare: &Bound<'_, PyAny>,
        unapplied: &Bound<'_, PyAny>,
        rehearse: bool,
    ) -> PyResult<()> {
        let n = &self.names;
        let [status_w, sentinel, inherited @ ..] = fds.as_slice() else {
            return Err(PyValueError::new_err(
                "a forkserver child needs its status pipe",
            ));
        };
        let globals = self.process_globals.bind(py);
        let current = globals
            .get_item(n.current_process.bind(py))?
            .ok_or_else(|| PyRuntimeError::new_err("no current process"))?;
        let old_fds = forkserver.getattr(n.inherited_fds.bind(py))?;
        let old_name = current.getattr(n.name.bind(py))?;
        let entered = (|| {
            let (prep, pickled) = split_payload(payload.as_bytes())?;
            forkserver.setattr(n.inherited_fds.bind(py), PyList::new(py, inherited)?)?;
            current.setattr(n.inheriting.bind(py), true)?;
            let loaded = self.load_child(py, &current, prep, pickled, prepare, unapplied, rehearse);
            let cleared = current.delattr(n.inheriting.bind(py));
            let (process, prepared_here) = loaded?;
            cleared?;
            // `BaseProcess._child_state` (keep the two in step).
            let parent_class = globals
                .get_item(n.parent_class.bind(py))?
                .ok_or_else(|| PyRuntimeError::new_err("no _ParentProcess"))?;
            let parent = parent_class.call1((
                process.getattr(n.parent_name.bind(py))?,
                process.getattr(n.parent_pid.bind(py))?,
                *sentinel,
            ))?;
            let prepared = PyTuple::new(
                py,
                [
                    self.count.bind(py).call1((1,))?,
                    PySet::empty(py)?.into_any(),
                    parent,
                ],
            )?;
            let mut entry = self.entry_flags(py)?;
            let stdin = self.sys.bind(py).getattr(n.stdin.bind(py))?;
            // The server's own /dev/null, opened before it forked any child, needs no check
            // (`util._close_stdin` makes one) unless code of the user's (the main script,
            // applied here) may have touched it.
            if !prepared_here
                && !stdin.is_none()
                && self
                    .util_globals
                    .bind(py)
                    .get_item(n.devnull_stdin.bind(py))?
                    .is_some_and(|d| d.is(&stdin))
                && !stdin.getattr(n.closed.bind(py))?.is_truthy()?
            {
                entry |= ENTRY_STDIN_KEPT;
            }
            Ok::<_, PyErr>((process, prepared, entry))
        })();
        if rehearse {
            current.setattr(n.name.bind(py), old_name)?;
            forkserver.setattr(n.inherited_fds.bind(py), old_fds)?;
            return entered.map(drop);
        }
        let (process, prepared, entry) = entered?;
        self.run(
            py,
            &process,
            prepared.as_any(),
            None,
            *status_w,
            None,
            entry,
        );
        Ok(())
    }

    /// In a child just forked by `popen_fork` (or a forkserver's spare given its request):
    /// restores the signal `mask` (if the parent held signals), closes `report_r` (if any),
    /// runs `process` as `_bootstrap` does (`entry`: see `process._fork_entry`), writes the
    /// exit code to `report_w` and ends the process with it. Never returns.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        py: Python<'_>,
        process: &Bound<'_, PyAny>,
        prepared: &Bound<'_, PyAny>,
        report_r: Option<i32>,
        report_w: i32,
        mask: Option<PyRef<'_, HeldSignals>>,
        entry: u8,
    ) {
        let mut code = 1;
        if mask.map_or(Ok(()), |m| m.release()).is_ok() {
            if let Some(report_r) = report_r {
                let _ = fd::close_raw(report_r);
            }
            // An exception out of `_run_child` (one raised in its last clean-up) ends the
            // child with 1, unreported, as it did through `os._exit` in Python.
            code = self.bootstrap(py, process, prepared, entry).unwrap_or(1);
        }
        write_exit_report(report_w, code);
        wait::exit_now(code)
    }
}

/// A forkserver request's payload: `[prep_len: u32 LE]`, the pickled preparation data
/// (`prep_len` bytes), the pickled process object.
fn split_payload(payload: &[u8]) -> PyResult<(&[u8], &[u8])> {
    let bad = || PyValueError::new_err("malformed forkserver payload");
    let (len, rest) = payload.split_first_chunk::<4>().ok_or_else(bad)?;
    let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| bad())?;
    if len > rest.len() {
        return Err(bad());
    }
    Ok(rest.split_at(len))
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

/// Server side of the forkserver (`forkserver.main`): `serve` forks spares ahead of the
/// requests (through CPython's fork protocol, so the at-fork callbacks run) and waits for each
/// to be used; a spare rehearses, takes a request and becomes the child (`run_spare`).
#[pyclass(module = "ferroproc._ferroproc", frozen)]
struct ForkServer {
    inner: Mutex<Option<forkserver::Server>>,
    /// What its spares run with (`configure`).
    spares: std::sync::OnceLock<SpareSetup>,
}

/// A spare's part (see `ForkServer.configure`).
struct SpareSetup {
    child: Py<ForkChild>,
    /// A request's payload for `ForkChild.serve(..., rehearse=True)`, if one could be made.
    rehearsal: Option<Py<PyBytes>>,
    forkserver: Py<PyAny>,
    prepare: Py<PyAny>,
    unapplied: Py<PyAny>,
    /// `_signal.signal`, and the SIGINT handler a child gets back, and its SIGPIPE handler
    /// when that is not SIG_IGN (the server's own).
    signal: Py<PyAny>,
    sigint: Py<PyAny>,
    sigpipe: Option<Py<PyAny>>,
}

/// Name of a spare while it waits (`/proc/<pid>/comm`, at most 15 bytes): tells it apart from
/// the children in `ps`/`top` and in leak checks.
const SPARE_NAME: &std::ffi::CStr = c"ferroproc-spare";

impl ForkServer {
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

    /// The life of a spare, in the process just forked (`server_pid` is the server): it
    /// rehearses, waits for its request (`take`), gets the child's signal handlers back and
    /// serves the request (`ForkChild.serve`). Never returns: it ends with 0 when the client
    /// went away first, with the child's exit code otherwise, or with 1 if the request could
    /// not be served (the main script or the process object failed to load: reported as the
    /// stdlib reports it).
    fn run_spare(&self, py: Python<'_>, server_pid: i32) -> ! {
        let mut code = 1;
        let mut status_w = None;
        let served = self.setup().and_then(|setup| {
            self.rehearse(py)?;
            let Some((payload, fds)) = self.take(py, server_pid)? else {
                code = 0;
                return Ok(());
            };
            status_w = fds.first().copied();
            let signal = setup.signal.bind(py);
            signal.call1((nix::libc::SIGINT, setup.sigint.bind(py)))?;
            if let Some(sigpipe) = &setup.sigpipe {
                signal.call1((nix::libc::SIGPIPE, sigpipe.bind(py)))?;
            }
            setup.child.get().serve(
                py,
                &payload,
                fds,
                setup.forkserver.bind(py),
                setup.prepare.bind(py),
                setup.unapplied.bind(py),
                false,
            )
        });
        if let Err(e) = served {
            // Before the process object runs (its own errors are reported by its bootstrap).
            // Only an `Exception`, as `except Exception` would: a `SystemExit` ends quietly.
            if e.is_instance_of::<pyo3::exceptions::PyException>(py) {
                let _ = report_exception(py, &e);
            }
        }
        if let Some(w) = status_w {
            write_exit_report(w, code & 0xFF);
        }
        wait::exit_now(code)
    }

    fn setup(&self) -> PyResult<&SpareSetup> {
        self.spares
            .get()
            .ok_or_else(|| PyRuntimeError::new_err("forkserver spares not configured"))
    }

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

/// `sys.excepthook(type, value, traceback)` for `e`, then stdout and stderr flushed
/// (`util._flush_std_streams`, whose errors it ignores too).
fn report_exception(py: Python<'_>, e: &PyErr) -> PyResult<()> {
    let sys = py.import("sys")?;
    sys.getattr("excepthook")?
        .call1((e.get_type(py), e.value(py), e.traceback(py)))?;
    py.import("ferroproc.util")?
        .getattr("_flush_std_streams")?
        .call0()?;
    Ok(())
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
            spares: std::sync::OnceLock::new(),
        })
    }

    /// Sets, once, what the spares run: `child` (`process._native_entry()`) serves the
    /// requests, with `forkserver`, `prepare` and `unapplied` (see `ForkChild.serve`);
    /// `rehearsal` (or None) is the payload of `rehearse`; `sigint` and `sigpipe` are the
    /// handlers a child gets back (the server ignores both).
    #[allow(clippy::too_many_arguments)]
    fn configure(
        &self,
        py: Python<'_>,
        child: Py<ForkChild>,
        rehearsal: Option<Py<PyBytes>>,
        forkserver: Py<PyAny>,
        prepare: Py<PyAny>,
        unapplied: Py<PyAny>,
        sigint: Py<PyAny>,
        sigpipe: Py<PyAny>,
    ) -> PyResult<()> {
        let signals = py.import("_signal")?;
        let signal = signals.getattr("signal")?.unbind();
        let sigpipe = (!sigpipe.bind(py).is(&signals.getattr("SIG_IGN")?)).then_some(sigpipe);
        self.spares
            .set(SpareSetup {
                child,
                rehearsal,
                forkserver,
                prepare,
                unapplied,
                signal,
                sigint,
                sigpipe,
            })
            .map_err(|_| PyRuntimeError::new_err("forkserver spares configured twice"))
    }

    /// Takes the steps a child takes with its request up to running it, on the rehearsal
    /// payload, and throws the result away (`ForkChild.serve` with `rehearse`).
    ///
    /// Every page a child writes is a copy-on-write fault (about 3 µs here); unpickling and
    /// entering write the same pages in every child (allocator pools, type caches, the
    /// unpickler's own). A spare rehearses while it waits for its request, so that its child
    /// does not take those faults between the request and the target, while the client
    /// waits; the server rehearses at start-up, so that the code on that path is specialized
    /// (a cold function writes its code object on its first runs) before any spare forks.
    fn rehearse(&self, py: Python<'_>) -> PyResult<()> {
        let setup = self.setup()?;
        if let Some(payload) = &setup.rehearsal {
            let rehearsed = setup.child.get().serve(
                py,
                payload.bind(py),
                vec![-1, -1],
                setup.forkserver.bind(py),
                setup.prepare.bind(py),
                setup.unapplied.bind(py),
                true,
            );
            match rehearsed {
                // An `Exception` is the child's to report, when it meets it with its request.
                Err(e) if !e.is_instance_of::<pyo3::exceptions::PyException>(py) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// The server's loop (`forkserver.main`): forks spares ahead of the requests (attached,
    /// as `os.fork()` does, audit event included) and waits for each to be taken, until the
    /// client has gone (returns 0) or a taken request's hint names modules the server should
    /// import (returns the bits; call again after importing them). In a spare the fork does
    /// not return: the spare's life follows (`run_spare`). Natively, because every page the
    /// server writes after a fork is a copy-on-write fault, and the Python loop wrote pages
    /// of frames, bound methods and results after each.
    fn serve(&self, py: Python<'_>, server_pid: i32) -> PyResult<u32> {
        let audit = py.import("sys")?.getattr("audit")?;
        loop {
            // Python signal handlers (a preloaded module's) run here, once per request, as
            // they did between the calls of the Python loop; an exception ends the server.
            py.check_signals()?;
            audit.call1(("os.fork",))?;
            let prepared = self.lock()?.as_mut().ok_or_else(closed)?.before_fork();
            // The server runs no thread besides this one (see `fork_attached` on threads).
            match prepared.and_then(|()| sys_fork::fork_attached(py)) {
                Ok(sys_fork::Forked::Child) => self.run_spare(py, server_pid),
                Ok(sys_fork::Forked::Parent(pid)) => {
                    if self.spare_forked(pid)? {
                        continue;
                    }
                    if !self.wait(py)? {
                        return Ok(0);
                    }
                    let hint = self.take_imports()?;
                    if hint != 0 {
                        return Ok(hint);
                    }
                }
                Err(e) => {
                    // A failed pipe or fork (EMFILE, EAGAIN) refuses the next request; anything
                    // else is raised.
                    let Error::Os(errno) = e else {
                        return Err(e.into());
                    };
                    if !self.refuse_next(py, errno as i32)? {
                        return Ok(0);
                    }
                }
            }
        }
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
    m.add_class::<ForkChild>()?;
    m.add("ENTRY_HOOKS", ENTRY_HOOKS)?;
    m.add("ENTRY_LOG_HOOK", ENTRY_LOG_HOOK)?;
    m.add("ENTRY_SPARE_STDIN", ENTRY_SPARE_STDIN)?;
    m.add("ENTRY_CLEAR_FINALIZERS", ENTRY_CLEAR_FINALIZERS)?;
    m.add("ENTRY_STDIN_KEPT", ENTRY_STDIN_KEPT)?;
    m.add_function(wrap_pyfunction!(hold_signals, m)?)?;
    m.add("FORKSERVER_PROTOCOL", forkserver::PROTOCOL)?;
    Ok(())
}
