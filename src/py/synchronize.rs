//! Bindings for `ferroproc.synchronize`: `SemLock` (Lock, RLock, Semaphore, BoundedSemaphore),
//! `CondVar` (Condition, Barrier) and `EventFlag` (Event), each over one shared segment.
//!
//! The uncontended `acquire`/`release`/`__enter__`/`__exit__` are one CAS each plus the
//! stdlib's per-process bookkeeping (acquire count and last thread), with no syscall and no
//! GIL release; only a wait goes through `blocking::wait_until`.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use pyo3::exceptions::{PyAssertionError, PyIndexError, PyValueError};
use pyo3::prelude::*;

use super::blocking::wait_until;
use crate::deadline::Deadline;
use crate::shm::Segment;
use crate::sync::{Acquired, Condition, Event, Mode, SemLockShared, SEM_VALUE_MAX};
use crate::sys::fd;
use crate::sys::futex;

const SEGMENT_NAME: &str = "ferroproc-sync";

thread_local! {
    static THREAD_MARK: u8 = const { 0 };
}

/// A per-thread identity: the address of a thread-local (unique among live threads).
#[inline]
fn thread_id() -> usize {
    THREAD_MARK.with(|m| std::ptr::from_ref(m) as usize)
}

#[cold]
fn released_too_many_times() -> PyErr {
    PyValueError::new_err("semaphore or lock released too many times")
}

/// Attaches a segment from a descriptor the caller keeps owning (we keep a duplicate).
fn attach<T: crate::shm::SharedLayout>(fd_num: i32) -> PyResult<Segment<T>> {
    let owned = fd::dup_cloexec(fd::borrow_raw(fd_num)?)?;
    Ok(Segment::attach(owned)?)
}

/// The segment behind `fd` (a child attaching to a parent's object), or a new one.
fn attach_or_create<T: crate::shm::SharedLayout>(fd: Option<i32>) -> PyResult<Segment<T>> {
    match fd {
        Some(f) => attach::<T>(f),
        None => Ok(Segment::create(SEGMENT_NAME)?),
    }
}

/// The native semaphore/lock. `kind`: 0 recursive mutex (RLock), 1 semaphore, 2 mutex (Lock).
#[pyclass(module = "ferroproc._ferroproc", name = "SemLock", subclass, frozen)]
pub(crate) struct PySemLock {
    seg: Segment<SemLockShared>,
    mode: Mode,
    maxvalue: u32,
    fork_ctx: bool,
    /// This process's acquires minus releases (the stdlib's `count`); valid for `generation`.
    count: AtomicI32,
    /// Thread of the last acquire in this process.
    last_tid: AtomicUsize,
    /// `futex::fork_generation()` the bookkeeping belongs to: a forked child starts at 0.
    generation: AtomicU32,
    /// Condition wake-ups granted while this lock was held, to issue once it is released.
    deferred: Mutex<Vec<(Arc<Segment<Condition>>, u32)>>,
    has_deferred: AtomicBool,
    /// When a failed non-blocking acquire last checked the holder's liveness.
    last_probe: Mutex<Option<Instant>>,
}

impl PySemLock {
    fn shared(&self) -> &SemLockShared {
        self.seg.get()
    }

    /// The acquire count for this process, reset after a fork.
    #[inline]
    fn local_count(&self) -> i32 {
        let g = futex::fork_generation();
        if self.generation.load(Ordering::Relaxed) != g {
            self.generation.store(g, Ordering::Relaxed);
            self.count.store(0, Ordering::Relaxed);
            return 0;
        }
        self.count.load(Ordering::Relaxed)
    }

    #[inline]
    fn is_mine(&self) -> bool {
        self.local_count() > 0 && self.last_tid.load(Ordering::Relaxed) == thread_id()
    }

    #[inline]
    fn note_acquired(&self) {
        // Plain load/store: all bookkeeping happens with the GIL held.
        let c = self.local_count();
        self.count.store(c.wrapping_add(1), Ordering::Relaxed);
        self.last_tid.store(thread_id(), Ordering::Relaxed);
    }

    /// The non-blocking attempt: one CAS (or a recursion count bump).
    #[inline]
    fn try_acquire(&self) -> bool {
        let sh = self.shared();
        let ok = match self.mode {
            Mode::Mutex => sh.mutex.try_lock(futex::pid()),
            Mode::Semaphore => sh.sem.try_acquire(),
            Mode::RecursiveMutex => {
                if self.is_mine() {
                    self.count
                        .store(self.local_count().wrapping_add(1), Ordering::Relaxed);
                    return true;
                }
                sh.mutex.try_lock(futex::pid())
            }
        };
        if ok {
            self.note_acquired();
        }
        ok
    }

    /// The waiting path, detached in slices; logs a recovery from a dead holder.
    fn acquire_blocking(&self, py: Python<'_>, deadline: Deadline) -> PyResult<bool> {
        let sh = self.shared();
        let got = if self.mode == Mode::Semaphore {
            wait_until(py, deadline, |s| {
                Ok(sh.sem.acquire_slice(s)?.then_some(Acquired::Normally))
            })?
        } else {
            let me = futex::pid();
            wait_until(py, deadline, |s| sh.mutex.lock_slice(me, s))?
        };
        match got {
            None => Ok(false),
            Some(how) => {
                self.log_recovery(how);
                self.note_acquired();
                Ok(true)
            }
        }
    }

    fn acquire_impl(&self, py: Python<'_>, block: bool, timeout: Option<f64>) -> PyResult<bool> {
        if self.try_acquire() {
            return Ok(true);
        }
        if !block {
            return Ok(self.probe_dead_holder());
        }
        // As semaphore.c: a negative timeout counts as zero (one more attempt, then False).
        self.acquire_blocking(py, Deadline::after_secs(timeout.map(|t| t.max(0.0))))
    }

    /// After a failed non-blocking acquire of a Lock/RLock: at most once per wait slice,
    /// checks whether the holder is dead and, if so, recovers the lock.
    #[cold]
    fn probe_dead_holder(&self) -> bool {
        if !self.mode.is_mutex() {
            return false;
        }
        {
            let mut last = self
                .last_probe
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            if last.is_some_and(|t| now.duration_since(t) < super::blocking::SLICE) {
                return false;
            }
            *last = Some(now);
        }
        match self.shared().mutex.try_recover(futex::pid()) {
            None => false,
            Some(how) => {
                self.log_recovery(how);
                self.note_acquired();
                true
            }
        }
    }

    fn log_recovery(&self, how: Acquired) {
        if let Acquired::Recovered { dead_pid } = how {
            log::warn!(
                target: "ferroproc::synchronize",
                "lock recovered from process {dead_pid}, which died holding it; the data it \
                 protected may be inconsistent"
            );
        }
    }

    #[inline]
    /// `with lock:`'s acquire, for native callers (the locked `Value` attributes).
    pub(crate) fn enter(&self, py: Python<'_>) -> PyResult<bool> {
        if self.try_acquire() {
            return Ok(true);
        }
        self.acquire_impl(py, true, None)
    }

    /// `with lock:`'s release, for native callers.
    pub(crate) fn exit(&self) -> PyResult<()> {
        self.release_impl()
    }

    fn release_impl(&self) -> PyResult<()> {
        let sh = self.shared();
        match self.mode {
            Mode::RecursiveMutex => {
                if !self.is_mine() {
                    return Err(PyAssertionError::new_err(
                        "attempt to release recursive lock not owned by thread",
                    ));
                }
                let c = self.local_count();
                if c > 1 {
                    self.count.store(c - 1, Ordering::Relaxed);
                    return Ok(());
                }
                sh.mutex.unlock().map_err(|_| released_too_many_times())?;
            }
            Mode::Mutex => sh.mutex.unlock().map_err(|_| released_too_many_times())?,
            Mode::Semaphore => sh
                .sem
                .release(self.maxvalue)
                .map_err(|_| released_too_many_times())?,
        }
        self.count
            .store(self.local_count().wrapping_sub(1), Ordering::Relaxed);
        if self.has_deferred.load(Ordering::Relaxed) {
            self.flush_deferred();
        }
        Ok(())
    }

    /// Records condition wake-ups to issue at the next release of this lock.
    fn defer_wake(&self, cv: &Arc<Segment<Condition>>, n: u32) {
        let mut d = self.deferred.lock().unwrap_or_else(PoisonError::into_inner);
        d.push((Arc::clone(cv), n));
        self.has_deferred.store(true, Ordering::Relaxed);
    }

    /// Issues the wake-ups recorded by `defer_wake` (the lock was just released).
    #[cold]
    fn flush_deferred(&self) {
        let pending = {
            let mut d = self.deferred.lock().unwrap_or_else(PoisonError::into_inner);
            self.has_deferred.store(false, Ordering::Relaxed);
            std::mem::take(&mut *d)
        };
        for (cv, n) in pending {
            cv.get().wake(n);
        }
    }
}

fn truthy(block: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
    block.map_or(Ok(true), PyAnyMethods::is_truthy)
}

#[pymethods]
impl PySemLock {
    /// `SemLock(kind, value, maxvalue, *, fork_ctx=False, fd=None)`: a new semaphore, or (with
    /// `fd`) the one behind that descriptor, which the caller keeps owning.
    #[new]
    #[pyo3(signature = (kind, value, maxvalue, *, fork_ctx = false, fd = None))]
    fn new(
        kind: i32,
        value: i64,
        maxvalue: i64,
        fork_ctx: bool,
        fd: Option<i32>,
    ) -> PyResult<Self> {
        let seg = if let Some(fd_num) = fd {
            attach::<SemLockShared>(fd_num)?
        } else {
            let mode = u32::try_from(kind)
                .ok()
                .and_then(Mode::from_u32)
                .ok_or_else(|| PyValueError::new_err("unrecognized kind"))?;
            // A negative or too large value: EINVAL, as the stdlib's sem_open reports it.
            let max = u32::try_from(maxvalue).ok().filter(|m| *m <= SEM_VALUE_MAX);
            let val = u32::try_from(value).ok().filter(|v| *v <= SEM_VALUE_MAX);
            let (Some(max), Some(val)) = (max, val) else {
                return Err(crate::error::Error::Os(nix::errno::Errno::EINVAL).into());
            };
            let seg = Segment::<SemLockShared>::create(SEGMENT_NAME)?;
            seg.get().init(mode, val, max);
            seg
        };
        let sh = seg.get();
        let mode = sh
            .mode()
            .ok_or_else(|| PyValueError::new_err("corrupted semaphore segment"))?;
        let maxvalue = sh.maxvalue.load(Ordering::Relaxed);
        Ok(Self {
            seg,
            mode,
            maxvalue,
            fork_ctx,
            count: AtomicI32::new(0),
            last_tid: AtomicUsize::new(0),
            generation: AtomicU32::new(futex::fork_generation()),
            deferred: Mutex::new(Vec::new()),
            has_deferred: AtomicBool::new(false),
            last_probe: Mutex::new(None),
        })
    }

    /// Acquires (see `ferroproc.synchronize.Lock.acquire`).
    #[pyo3(signature = (block = None, timeout = None), text_signature = "($self, block=True, timeout=None)")]
    fn acquire(
        &self,
        py: Python<'_>,
        block: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<bool> {
        if self.try_acquire() {
            return Ok(true);
        }
        self.acquire_impl(py, truthy(block)?, timeout)
    }

    /// Releases one acquire.
    fn release(&self) -> PyResult<()> {
        self.release_impl()
    }

    fn __enter__(&self, py: Python<'_>) -> PyResult<bool> {
        if self.try_acquire() {
            return Ok(true);
        }
        self.acquire_impl(py, true, None)
    }

    fn __exit__(
        &self,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.release_impl()
    }

    /// Acquires minus releases made by this process.
    fn _count(&self) -> i32 {
        self.local_count()
    }

    /// Whether the calling thread holds it.
    fn _is_mine(&self) -> bool {
        self.is_mine()
    }

    /// The semaphore value (1 for a free lock, 0 for a held one).
    fn _get_value(&self) -> u32 {
        let sh = self.shared();
        match self.mode {
            Mode::Semaphore => sh.sem.value(),
            _ => u32::from(sh.mutex.owner().is_none()),
        }
    }

    fn _is_zero(&self) -> bool {
        self._get_value() == 0
    }

    /// Resets this process's bookkeeping (done automatically after `fork`).
    fn _after_fork(&self) {
        self.count.store(0, Ordering::Relaxed);
    }

    /// The pid holding a Lock/RLock, `None` when free or for a semaphore (ferroproc extension).
    fn _owner_pid(&self) -> Option<u32> {
        if self.mode.is_mutex() {
            self.shared().mutex.owner()
        } else {
            None
        }
    }

    /// The memfd behind the shared state.
    #[getter]
    fn handle(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(&self.seg.fd())
    }

    /// The stdlib's kind: 0 (RECURSIVE_MUTEX) for RLock, 1 (SEMAPHORE) otherwise.
    #[getter]
    fn kind(&self) -> i32 {
        i32::from(self.mode != Mode::RecursiveMutex)
    }

    /// ferroproc's kind, as passed to the constructor (2 for Lock).
    #[getter]
    fn _mode(&self) -> u32 {
        self.mode as u32
    }

    #[getter]
    fn maxvalue(&self) -> u32 {
        self.maxvalue
    }

    /// Always `None`: the backing memory has no name.
    #[getter]
    fn name(&self) -> Option<String> {
        None
    }

    /// Whether it was created for a fork context (the stdlib refuses to send those to spawn
    /// children; we keep that rule).
    #[getter]
    fn _is_fork_ctx(&self) -> bool {
        self.fork_ctx
    }

    #[classattr]
    #[allow(non_snake_case)]
    fn SEM_VALUE_MAX() -> u32 {
        SEM_VALUE_MAX
    }
}

/// The shared words of a condition variable; `wait`/`notify` take the associated `SemLock`.
#[pyclass(module = "ferroproc._ferroproc", name = "CondVar", frozen)]
pub(crate) struct PyCondVar {
    seg: Arc<Segment<Condition>>,
}

#[pymethods]
impl PyCondVar {
    #[new]
    #[pyo3(signature = (*, fd = None))]
    fn new(fd: Option<i32>) -> PyResult<Self> {
        let seg = attach_or_create::<Condition>(fd)?;
        Ok(Self { seg: Arc::new(seg) })
    }

    /// Releases `lock` completely, waits for a notify or `timeout`, re-acquires `lock` as many
    /// times as it was held; returns whether it was notified.
    #[pyo3(signature = (lock, timeout = None))]
    fn wait(
        &self,
        py: Python<'_>,
        lock: &Bound<'_, PySemLock>,
        timeout: Option<f64>,
    ) -> PyResult<bool> {
        let l = lock.get();
        if !l.is_mine() {
            return Err(PyAssertionError::new_err(
                "must acquire() condition before using wait()",
            ));
        }
        let cv = self.seg.get();
        let ticket = cv.register();
        let count = l.local_count();
        for _ in 0..count {
            l.release_impl()?;
        }
        let deadline = Deadline::after_secs(timeout);
        let waited = wait_until(py, deadline, |s| {
            Ok(cv.wait_slice(ticket, s)?.then_some(()))
        });
        let result = match waited {
            Ok(Some(())) => Ok(true),
            Ok(None) => Ok(cv.withdraw(ticket)),
            Err(e) => {
                cv.withdraw(ticket);
                Err(e)
            }
        };
        for _ in 0..count {
            if !l.try_acquire() {
                l.acquire_blocking(py, Deadline::never())?;
            }
        }
        result
    }

    /// Wakes up to `n` waiters (`notify(lock, n=1)`). The wake-up itself is issued when
    /// `lock` is next released, so the woken find it free.
    #[pyo3(signature = (lock, n = 1))]
    fn notify(&self, lock: &Bound<'_, PySemLock>, n: i64) -> PyResult<()> {
        let l = lock.get();
        if !l.is_mine() {
            return Err(PyAssertionError::new_err("lock is not owned"));
        }
        let granted = self
            .seg
            .get()
            .grant(u32::try_from(n.max(0)).unwrap_or(u32::MAX));
        if granted > 0 {
            l.defer_wake(&self.seg, granted);
        }
        Ok(())
    }

    /// Registered waiters not yet woken.
    fn waiters(&self) -> u32 {
        self.seg.get().waiters()
    }

    /// Wake-ups granted but not yet taken.
    fn unconsumed(&self) -> u32 {
        self.seg.get().unconsumed()
    }

    /// Reads user word `i` (0..4).
    fn get_word(&self, i: usize) -> PyResult<i32> {
        let w = self
            .seg
            .get()
            .user
            .get(i)
            .ok_or_else(|| PyIndexError::new_err("word index out of range"))?;
        Ok(w.load(Ordering::SeqCst))
    }

    /// Writes user word `i` (0..4).
    fn set_word(&self, i: usize, v: i32) -> PyResult<()> {
        let w = self
            .seg
            .get()
            .user
            .get(i)
            .ok_or_else(|| PyIndexError::new_err("word index out of range"))?;
        w.store(v, Ordering::SeqCst);
        Ok(())
    }

    #[getter]
    fn handle(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(&self.seg.fd())
    }
}

/// A shared event flag (`ferroproc.synchronize.Event` subclasses it).
#[pyclass(module = "ferroproc._ferroproc", name = "EventFlag", subclass, frozen)]
pub(crate) struct PyEventFlag {
    seg: Segment<Event>,
}

#[pymethods]
impl PyEventFlag {
    #[new]
    #[pyo3(signature = (*, fd = None))]
    fn new(fd: Option<i32>) -> PyResult<Self> {
        let seg = attach_or_create::<Event>(fd)?;
        Ok(Self { seg })
    }

    fn is_set(&self) -> bool {
        self.seg.get().is_set()
    }

    fn set(&self) {
        self.seg.get().set();
    }

    fn clear(&self) {
        self.seg.get().clear();
    }

    /// Waits until set or `timeout` (negative counts as zero); returns whether it is set.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let ev = self.seg.get();
        if ev.is_set() {
            return Ok(true);
        }
        let deadline = Deadline::after_secs(timeout);
        Ok(wait_until(py, deadline, |s| Ok(ev.wait_slice(s)?.then_some(())))?.is_some())
    }

    #[getter]
    fn handle(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(&self.seg.fd())
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    futex::install_fork_hook();
    m.add_class::<PySemLock>()?;
    m.add_class::<PyCondVar>()?;
    m.add_class::<PyEventFlag>()?;
    Ok(())
}
