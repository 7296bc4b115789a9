//! Bindings for `ferroproc.connection`: the native `Connection` class, `Pipe` and `wait`.
//!
//! Hot paths stay in Rust: framing, the non-blocking first attempt (no GIL release when the
//! kernel can answer at once), and the detached wait loop that runs signal handlers every slice.

use std::cell::Cell;
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyBufferError, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString,
    PyTuple,
};

use crate::channel::connection::{self as conn, FdSource, Head, RecvHead, INLINE_MAX};
use crate::channel::framing::{encode_lane_header, FrameWriter, Progress, SliceFill};
use crate::channel::lane::{self, Lane};
use crate::channel::pybuf::{self, ExportedBytes, ViewError};
use crate::deadline::Deadline;
use crate::error::Error;
use crate::py::blocking::wait_until;
use crate::sys::stream::{self, NoWait};
use crate::sys::wait as sys_wait;
use crate::sys::{fd, sock};

/// How `Connection::drive` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The start of a receive: attached first unless this connection usually has to wait.
    Learn,
    /// A small continuation: attached first.
    Attached,
    /// Large: straight to the detached loop.
    Detached,
}

/// Send buffer asked for on `Pipe()` socketpairs (the kernel default is ~208 KiB).
const PIPE_SEND_BUFFER: usize = 1 << 20;

/// How long a receiver that expects to wait polls without sleeping first.
const SPIN_WINDOW: Duration = Duration::from_micros(25);
/// Consecutive fruitless spins after which a connection stops spinning...
const SPIN_GIVE_UP: u8 = 8;
/// ...until a wait ends within this (the answer would nearly have been caught).
const SPIN_RETRY: Duration = Duration::from_micros(100);

/// Whether spinning can help: with one CPU the peer cannot answer while we spin.
fn multi_cpu() -> bool {
    static MULTI: OnceLock<bool> = OnceLock::new();
    *MULTI.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// A wait shorter than this means the data was already there.
const READY_AT_ONCE: Duration = Duration::from_micros(20);
/// Largest scratch buffer a thread keeps between receives.
const SCRATCH_KEEP: usize = 32 << 20;

thread_local! {
    /// Per-thread receive buffer for payloads above `INLINE_MAX`.
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Nodes the plain-data check visits before giving up (and taking the general path).
const PLAIN_BUDGET: usize = 512;
/// Nesting depth the plain-data check follows.
const PLAIN_DEPTH: usize = 16;

static PICKLE_DUMPS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static PICKLE_LOADS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static SLOW_DUMPS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static BUFFER_TOO_SHORT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn cached<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyAny>>,
    module: &str,
    attr: &str,
) -> PyResult<&'py Bound<'py, PyAny>> {
    let obj = cell.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import(module)?.getattr(attr)?.unbind())
    })?;
    Ok(obj.bind(py))
}

fn bad_fd(e: Error) -> PyErr {
    e.into()
}

fn borrow(fd_num: RawFd) -> PyResult<BorrowedFd<'static>> {
    fd::borrow_raw(fd_num).map_err(bad_fd)
}

/// A connection over a socket or pipe descriptor, speaking the stdlib's frame format.
#[pyclass(
    module = "ferroproc.connection",
    name = "Connection",
    subclass,
    weakref,
    dict,
    frozen
)]
pub(crate) struct Connection {
    /// The descriptor, or -1 once closed.
    fd: AtomicI32,
    /// `NoWait` as `u8`: how to do non-blocking I/O on `fd`.
    how: AtomicU8,
    readable: AtomicBool,
    writable: bool,
    /// Learnt: the last receive found no data and had to wait.
    expect_wait: AtomicBool,
    /// Learnt: consecutive receives whose spin ended without data.
    spin_fails: AtomicU8,
    /// Both ends came from `Pipe()` (here or in a process this end was pickled from): large
    /// payloads may travel through shared-memory lanes (see `channel::lane`).
    lanes: bool,
    /// Set when the peer kept this end's lane slots too long: send through the socket only.
    lane_off: AtomicBool,
    /// This end's lane, made on its first large payload.
    out_lane: Mutex<Option<Arc<Lane>>>,
    /// The peer's lane, mapped on its first lane frame.
    in_lane: Mutex<Option<Arc<Lane>>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let f = self.fd.swap(-1, Ordering::AcqRel);
        if f >= 0 {
            let _ = stream::close(f);
        }
    }
}

/// Payload bytes to send: borrowed from a `bytes` object or from a buffer export.
enum Outgoing<'py> {
    Bytes(Bound<'py, PyBytes>),
    Buffer(ExportedBytes),
}

impl Outgoing<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Bytes(b) => b.as_bytes(),
            Self::Buffer(b) => b.as_slice(),
        }
    }
}

fn view_error(e: ViewError) -> PyErr {
    match e {
        ViewError::NotContiguous => {
            PyBufferError::new_err("memoryview: underlying buffer is not C-contiguous")
        }
        ViewError::ReadOnly => {
            PyTypeError::new_err("recv_bytes_into() argument must be a writable buffer")
        }
    }
}

fn outgoing<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Outgoing<'py>> {
    if let Ok(b) = obj.cast_exact::<PyBytes>() {
        return Ok(Outgoing::Bytes(b.clone()));
    }
    let buf = PyUntypedBuffer::get(obj)?;
    Ok(Outgoing::Buffer(
        ExportedBytes::new(buf, false).map_err(view_error)?,
    ))
}

/// Whether `obj` is built only from types whose pickling never consults a dispatch table
/// (exact builtins), so `pickle.dumps` gives the same bytes as `ForkingPickler.dumps`.
fn is_plain(obj: &Bound<'_, PyAny>, depth: usize, budget: &mut usize) -> bool {
    if *budget == 0 || depth > PLAIN_DEPTH {
        return false;
    }
    *budget -= 1;
    if obj.is_none()
        || obj.is_exact_instance_of::<PyInt>()
        || obj.is_exact_instance_of::<PyString>()
        || obj.is_exact_instance_of::<PyBytes>()
        || obj.is_exact_instance_of::<PyFloat>()
        || obj.is_exact_instance_of::<PyBool>()
        || obj.is_exact_instance_of::<PyByteArray>()
    {
        return true;
    }
    if let Ok(t) = obj.cast_exact::<PyTuple>() {
        return t.iter_borrowed().all(|x| is_plain(&x, depth + 1, budget));
    }
    if let Ok(l) = obj.cast_exact::<PyList>() {
        return l.iter().all(|x| is_plain(&x, depth + 1, budget));
    }
    if let Ok(d) = obj.cast_exact::<PyDict>() {
        return d
            .iter()
            .all(|(k, v)| is_plain(&k, depth + 1, budget) && is_plain(&v, depth + 1, budget));
    }
    if let Ok(s) = obj.cast_exact::<PySet>() {
        return s.iter().all(|x| is_plain(&x, depth + 1, budget));
    }
    if let Ok(s) = obj.cast_exact::<PyFrozenSet>() {
        return s.iter().all(|x| is_plain(&x, depth + 1, budget));
    }
    false
}

fn dumps<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    let mut budget = PLAIN_BUDGET;
    if is_plain(obj, 0, &mut budget) {
        cached(py, &PICKLE_DUMPS, "pickle", "dumps")?.call1((obj,))
    } else {
        cached(py, &SLOW_DUMPS, "ferroproc.connection", "_dumps")?.call1((obj,))
    }
}

fn buffer_too_short(py: Python<'_>, data: &[u8]) -> PyErr {
    let exc = cached(py, &BUFFER_TOO_SHORT, "ferroproc.context", "BufferTooShort")
        .and_then(|cls| cls.call1((PyBytes::new(py, data),)));
    match exc {
        Ok(e) => PyErr::from_value(e),
        Err(e) => e,
    }
}

fn index(obj: &Bound<'_, PyAny>) -> PyResult<i64> {
    obj.py()
        .import("operator")?
        .getattr("index")?
        .call1((obj,))?
        .extract()
}

impl Connection {
    /// An end on descriptor `fd_num` (owned from now on), read and written the way `how`
    /// says. `lanes`: its peer is a `Pipe()` end too (lanes need a socket).
    fn with_fd(fd_num: RawFd, how: NoWait, readable: bool, writable: bool, lanes: bool) -> Self {
        Self {
            fd: AtomicI32::new(fd_num),
            how: AtomicU8::new(how as u8),
            readable: AtomicBool::new(readable),
            writable,
            expect_wait: AtomicBool::new(false),
            spin_fails: AtomicU8::new(0),
            lanes: lanes && how == NoWait::Socket,
            lane_off: AtomicBool::new(false),
            out_lane: Mutex::new(None),
            in_lane: Mutex::new(None),
        }
    }

    fn from_owned(fd: OwnedFd, readable: bool, writable: bool, lanes: bool) -> Self {
        let how = stream::nowait_kind(fd.as_fd());
        Self::with_fd(fd.into_raw_fd(), how, readable, writable, lanes)
    }

    fn raw(&self) -> Result<RawFd, Error> {
        let f = self.fd.load(Ordering::Acquire);
        if f < 0 {
            Err(Error::Closed)
        } else {
            Ok(f)
        }
    }

    fn for_reading(&self) -> PyResult<RawFd> {
        let f = self.raw()?;
        if !self.readable.load(Ordering::Relaxed) {
            return Err(PyOSError::new_err("connection is write-only"));
        }
        Ok(f)
    }

    fn for_writing(&self) -> PyResult<RawFd> {
        let f = self.raw()?;
        if !self.writable {
            return Err(PyOSError::new_err("connection is read-only"));
        }
        Ok(f)
    }

    fn how(&self) -> NoWait {
        NoWait::from_u8(self.how.load(Ordering::Relaxed))
    }

    fn remember(&self, how: NoWait) {
        self.how.store(how as u8, Ordering::Relaxed);
    }

    fn close_fd(&self) -> PyResult<()> {
        for lane in [&self.out_lane, &self.in_lane] {
            if let Ok(mut l) = lane.try_lock() {
                *l = None;
            }
        }
        let f = self.fd.swap(-1, Ordering::AcqRel);
        if f >= 0 {
            stream::close(f)?;
        }
        Ok(())
    }

    /// The stdlib's reaction to an unacceptable length: the stream is out of step, so stop
    /// reading from it (or close it when it cannot be written either).
    fn bad_message_length(&self) -> PyErr {
        if self.writable {
            self.readable.store(false, Ordering::Relaxed);
        } else if let Err(e) = self.close_fd() {
            return e;
        }
        PyOSError::new_err("bad message length")
    }

    fn send_frame(&self, py: Python<'_>, fd_num: RawFd, payload: &[u8]) -> PyResult<()> {
        if self.lanes
            && (lane::LANE_MIN..=lane::SLOT_CAP).contains(&payload.len())
            && !self.lane_off.load(Ordering::Relaxed)
            && self.send_via_lane(py, fd_num, payload)?
        {
            return Ok(());
        }
        let bfd = borrow(fd_num)?;
        let mut w = FrameWriter::new(payload.len());
        let mut how = self.how();
        if payload.len() <= INLINE_MAX {
            let done = conn::write_nowait(bfd, &mut how, &mut w, payload).map_err(PyErr::from);
            if how != self.how() {
                self.remember(how);
            }
            if done? {
                return Ok(());
            }
        }
        wait_until(py, Deadline::never(), |_| {
            Ok(conn::write_blocking(bfd, how, &mut w, payload)?.then_some(()))
        })?;
        Ok(())
    }

    /// This end's lane, made on first use. `None` if one cannot be made (no memory, no more
    /// descriptors): the payload goes through the socket.
    ///
    /// Only `try_lock` is used (here and for `in_lane`): another thread of this process may be
    /// making the lane, or may have been when this process was forked, leaving the lock held
    /// for good; the payload then simply goes through the socket.
    fn out_lane(&self) -> Option<Arc<Lane>> {
        let mut slot = self.out_lane.try_lock().ok()?;
        if slot.is_none() {
            let Ok(lane) = Lane::create() else {
                self.lane_off.store(true, Ordering::Relaxed);
                return None;
            };
            *slot = Some(Arc::new(lane));
        }
        slot.clone()
    }

    /// Sends `payload` through this end's lane: `Ok(false)` when it should go through the
    /// socket instead (no lane, no free slot in time, or no room for the frame right now).
    fn send_via_lane(&self, py: Python<'_>, fd_num: RawFd, payload: &[u8]) -> PyResult<bool> {
        let Some(lane) = self.out_lane() else {
            return Ok(false);
        };
        let bfd = borrow(fd_num)?;
        let sent = py.detach(|| -> Result<Option<bool>, Error> {
            let Some(slot) = lane.acquire(lane::PATIENCE)? else {
                return Ok(None);
            };
            lane.fill(slot, payload);
            let header = encode_lane_header(slot, payload.len());
            let Some(lane_fd) = lane.fd() else {
                lane.release(slot);
                return Ok(Some(false));
            };
            match sock::send_nowait_with_fd(bfd, &header, lane_fd) {
                Ok(true) => Ok(Some(true)),
                Ok(false) => {
                    lane.release(slot);
                    Ok(Some(false))
                }
                Err(e) => {
                    lane.release(slot);
                    Err(e)
                }
            }
        })?;
        match sent {
            Some(done) => Ok(done),
            None => {
                // The peer holds both slots: it is slow, stuck or gone. The socket from now on.
                self.lane_off.store(true, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    /// The source to read this end's socket through.
    fn source<'fd>(&self, bfd: BorrowedFd<'fd>) -> FdSource<'fd> {
        if self.lanes {
            FdSource::catching(bfd, self.how())
        } else {
            FdSource::new(bfd, self.how())
        }
    }

    /// The peer's lane that a lane frame's descriptor names (mapped once, then recognised).
    fn in_lane(&self, passed: Option<OwnedFd>) -> PyResult<Arc<Lane>> {
        let Some(fd) = passed else {
            return Err(self.bad_message_length());
        };
        let id = lane::file_id(fd.as_fd())?;
        // A busy (or, after a fork, orphaned) lock: map this frame's lane without keeping it.
        let mut cached = self.in_lane.try_lock().ok();
        if let Some(l) = cached
            .as_ref()
            .and_then(|c| c.as_ref())
            .filter(|l| l.id() == id)
        {
            return Ok(Arc::clone(l));
        }
        let Ok(l) = Lane::attach(fd) else {
            return Err(self.bad_message_length());
        };
        let l = Arc::new(l);
        if let Some(c) = cached.as_mut() {
            **c = Some(Arc::clone(&l));
        }
        Ok(l)
    }

    /// Receives the payload of a lane frame into a new `bytes`, freeing the slot.
    fn recv_lane_bytes<'py>(
        &self,
        py: Python<'py>,
        src: &mut FdSource<'_>,
        slot: u32,
        len: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let lane = self.in_lane(src.take_passed())?;
        if lane.check(slot, len).is_err() {
            return Err(self.bad_message_length());
        }
        let got = pybuf::new_filled(py, len, true, |dest| lane.read_into(slot, dest));
        lane.release(slot);
        Ok(got?.cast_into::<PyBytes>()?)
    }

    /// Runs `step` to completion: once attached (non-blocking I/O only) when data is likely
    /// to be there already, else (or then) in the detached, signal-checking wait loop.
    ///
    /// `Mode::Learn` is for a step cheap enough to run attached that starts a receive: whether
    /// to try it attached first is learnt per connection. A receiver that keeps finding
    /// nothing (request/response traffic) goes straight to waiting, saving a system call per
    /// message, and first spins briefly (GIL released) since the answer often comes within
    /// microseconds; a receiver whose spins keep failing stops spinning until a wait turns
    /// out short again. One that keeps finding data (streaming) keeps the GIL.
    fn drive<T: Send>(
        &self,
        py: Python<'_>,
        src: &mut FdSource<'_>,
        mode: Mode,
        mut step: impl FnMut(&mut FdSource<'_>) -> Result<Progress<T>, Error> + Send,
    ) -> PyResult<T> {
        let mut poll_first = false;
        let learn = mode == Mode::Learn;
        if mode == Mode::Attached {
            if let Progress::Ready(v) = step(src)? {
                return Ok(v);
            }
            poll_first = true;
        } else if learn {
            if self.expect_wait.load(Ordering::Relaxed) {
                poll_first = true;
            } else if let Progress::Ready(v) = step(src)? {
                return Ok(v);
            } else {
                self.expect_wait.store(true, Ordering::Relaxed);
                poll_first = true;
            }
        }
        let fails = self.spin_fails.load(Ordering::Relaxed);
        let mut spin = learn && fails < SPIN_GIVE_UP && multi_cpu();
        let mut spun_out = false;
        // In the middle of a message the rest is usually in flight: spin before each sleep.
        let mid_spin = if learn || !multi_cpu() {
            Duration::ZERO
        } else {
            SPIN_WINDOW
        };
        let start = Instant::now();
        let got = wait_until(py, Deadline::never(), |slice| {
            if std::mem::take(&mut spin) {
                if let Some(v) = conn::spin(src, SPIN_WINDOW, &mut step)? {
                    return Ok(Some(v));
                }
                spun_out = true;
            }
            let r = conn::drive(src, slice, poll_first, mid_spin, &mut step);
            poll_first = true;
            r
        });
        if learn {
            let waited = start.elapsed();
            if waited < READY_AT_ONCE {
                // The data was there without waiting: try attached next time.
                self.expect_wait.store(false, Ordering::Relaxed);
            }
            if !spun_out && (fails < SPIN_GIVE_UP || waited < SPIN_RETRY) {
                // Spinning paid off, or the answer came soon enough that it would have.
                self.spin_fails.store(0, Ordering::Relaxed);
            } else if spun_out {
                self.spin_fails
                    .store(fails.saturating_add(1), Ordering::Relaxed);
            }
        }
        if src.how() != self.how() {
            self.remember(src.how());
        }
        got?.ok_or_else(|| Error::Timeout.into())
    }

    /// `send(obj)` for Rust callers: pickles `obj` and sends it as one message.
    pub(crate) fn send_object(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        let fd_num = self.for_writing()?;
        let data = dumps(obj)?;
        let out = outgoing(&data)?;
        self.send_frame(py, fd_num, out.as_slice())
    }

    /// `recv()` for Rust callers: receives one message and unpickles it. A large one is
    /// unpickled from a view of the receive buffer, without copying it into a `bytes` first.
    pub(crate) fn recv_object<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let fd_num = self.for_reading()?;
        let loads = cached(py, &PICKLE_LOADS, "pickle", "loads")?;
        self.recv_with(
            py,
            fd_num,
            None,
            |b| loads.call1((b,)),
            |v| pybuf::with_view(py, v, |view| loads.call1((view,))),
        )
    }

    /// Reads one frame into a new `bytes`.
    fn recv_frame<'py>(
        &self,
        py: Python<'py>,
        fd_num: RawFd,
        maxlength: Option<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.recv_with(py, fd_num, maxlength, Ok, |v| {
            (Ok(PyBytes::new(py, v)), true)
        })
    }

    /// Reads one frame and makes `R` of it: `small` of a new `bytes` for a payload that is
    /// read whole or through a lane, `large` of the payload in this thread's scratch buffer
    /// otherwise (its second value false when the buffer must never be reused or freed, see
    /// [`pybuf::with_view`]).
    fn recv_with<'py, R>(
        &self,
        py: Python<'py>,
        fd_num: RawFd,
        maxlength: Option<usize>,
        small: impl FnOnce(Bound<'py, PyBytes>) -> PyResult<R>,
        large: impl FnOnce(&[u8]) -> (PyResult<R>, bool),
    ) -> PyResult<R> {
        let bfd = borrow(fd_num)?;
        let mut src = self.source(bfd);
        let mut head = RecvHead::new();
        let lanes = self.lanes;
        let h = self.drive(py, &mut src, Mode::Learn, |s| {
            head.step(s, maxlength, INLINE_MAX, lanes)
        })?;
        match h {
            Head::Inline(v) => small(PyBytes::new(py, &v)),
            Head::TooLong | Head::Invalid => Err(self.bad_message_length()),
            Head::Lane(slot, n) => small(self.recv_lane_bytes(py, &mut src, slot, n)?),
            Head::Len(n) => {
                // Large payloads land in this thread's scratch buffer, whose capacity was
                // earned by earlier messages (so no page faults or regrowth on repeats) and
                // grows only as bytes arrive; then one copy makes the `bytes`, or none when
                // the payload is unpickled where it lies.
                let mut v = SCRATCH.take();
                v.clear();
                let got = self.drive(py, &mut src, Mode::Detached, |s| {
                    conn::step_vec(s, &mut v, n)
                });
                let (out, reusable) = match got {
                    Ok(()) => large(&v),
                    Err(e) => (Err(e), true),
                };
                if !reusable {
                    // Something still reads these bytes: they stay as they are, for good.
                    std::mem::forget(v);
                } else if v.capacity() <= SCRATCH_KEEP {
                    v.clear();
                    SCRATCH.set(v);
                }
                out
            }
        }
    }
}

#[pymethods]
impl Connection {
    /// `_lanes`: this end and its peer come from `Pipe()` (see the `_lanes` attribute); the
    /// rebuilding of a pickled connection passes it on.
    #[new]
    #[pyo3(signature = (handle, readable=true, writable=true, *, _lanes=false))]
    fn new(
        handle: &Bound<'_, PyAny>,
        readable: bool,
        writable: bool,
        _lanes: bool,
    ) -> PyResult<Self> {
        let handle = index(handle)?;
        if handle < 0 {
            return Err(PyValueError::new_err("invalid handle"));
        }
        let fd_num =
            RawFd::try_from(handle).map_err(|_| PyValueError::new_err("invalid handle"))?;
        if !readable && !writable {
            return Err(PyValueError::new_err(
                "at least one of `readable` and `writable` must be True",
            ));
        }
        let how = match fd::borrow_raw(fd_num) {
            Ok(b) => stream::nowait_kind(b),
            Err(_) => NoWait::Unsupported,
        };
        Ok(Self::with_fd(fd_num, how, readable, writable, _lanes))
    }

    /// Whether this end may use shared-memory lanes with its peer (a ferroproc extension:
    /// both ends come from `Pipe()`).
    #[getter]
    fn _lanes(&self) -> bool {
        self.lanes
    }

    /// True once `close()` has run.
    #[getter]
    fn closed(&self) -> bool {
        self.fd.load(Ordering::Acquire) < 0
    }

    /// True if this end can receive.
    #[getter]
    fn readable(&self) -> bool {
        self.readable.load(Ordering::Relaxed)
    }

    /// True if this end can send.
    #[getter]
    fn writable(&self) -> bool {
        self.writable
    }

    /// The descriptor number, or `None` once closed (the stdlib's private attribute).
    #[getter]
    fn _handle(&self) -> Option<RawFd> {
        self.raw().ok()
    }

    /// Replaces the descriptor without closing the old one; `None` disowns it (code written
    /// for the stdlib does this to stop `__del__` from closing a descriptor).
    #[setter(_handle)]
    fn set_handle(&self, handle: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let new = match handle {
            None => -1,
            Some(h) if h.is_none() => -1,
            Some(h) => {
                let v = index(h)?;
                RawFd::try_from(v)
                    .ok()
                    .filter(|f| *f >= 0)
                    .ok_or_else(|| PyValueError::new_err("invalid handle"))?
            }
        };
        self.fd.store(new, Ordering::Release);
        Ok(())
    }

    /// The connection's descriptor.
    fn fileno(&self) -> PyResult<RawFd> {
        Ok(self.raw()?)
    }

    /// Closes the descriptor; later calls do nothing.
    fn close(&self) -> PyResult<()> {
        self.close_fd()
    }

    /// Sends `size` bytes of `buf` starting at byte `offset` as one message.
    #[pyo3(signature = (buf, offset=0, size=None))]
    fn send_bytes(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: i64,
        size: Option<i64>,
    ) -> PyResult<()> {
        let fd_num = self.for_writing()?;
        let out = outgoing(buf)?;
        let data = out.as_slice();
        let n = i64::try_from(data.len()).unwrap_or(i64::MAX);
        if offset < 0 {
            return Err(PyValueError::new_err("offset is negative"));
        }
        if n < offset {
            return Err(PyValueError::new_err("buffer length < offset"));
        }
        let size = match size {
            None => n - offset,
            Some(s) if s < 0 => return Err(PyValueError::new_err("size is negative")),
            Some(s) if offset.checked_add(s).map_or(true, |end| end > n) => {
                return Err(PyValueError::new_err("buffer length < offset + size"))
            }
            Some(s) => s,
        };
        // Both fit in usize: 0 <= offset <= offset + size <= n = len.
        let start = usize::try_from(offset).unwrap_or(0);
        let end = start + usize::try_from(size).unwrap_or(0);
        self.send_frame(py, fd_num, &data[start..end])
    }

    /// Pickles `obj` and sends it as one message; nothing is sent if pickling fails.
    fn send(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        self.send_object(py, obj)
    }

    /// Receives one message as `bytes`. A message longer than `maxlength` raises
    /// `OSError("bad message length")` and the connection stops being readable.
    #[pyo3(signature = (maxlength=None))]
    fn recv_bytes<'py>(
        &self,
        py: Python<'py>,
        maxlength: Option<i64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let fd_num = self.for_reading()?;
        let maxlength = match maxlength {
            Some(m) if m < 0 => return Err(PyValueError::new_err("negative maxlength")),
            Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            None => None,
        };
        self.recv_frame(py, fd_num, maxlength)
    }

    /// Receives one message straight into `buf` at byte `offset`; returns its size. When it
    /// does not fit, `BufferTooShort` carries the whole message.
    #[pyo3(signature = (buf, offset=0))]
    fn recv_bytes_into(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: i64,
    ) -> PyResult<usize> {
        let fd_num = self.for_reading()?;
        let raw = PyUntypedBuffer::get(buf)?;
        let mut dst = ExportedBytes::new(raw, true).map_err(view_error)?;
        let cap = dst.len();
        if offset < 0 {
            return Err(PyValueError::new_err("negative offset"));
        }
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        if offset > cap {
            return Err(PyValueError::new_err("offset too large"));
        }
        let bfd = borrow(fd_num)?;
        let mut src = self.source(bfd);
        let mut head = RecvHead::new();
        let lanes = self.lanes;
        let len = match self.drive(py, &mut src, Mode::Learn, |s| head.step(s, None, 0, lanes))? {
            Head::Inline(v) => {
                // Only an empty payload is inlined with `inline_max == 0`.
                dst.as_mut_slice()[offset..offset + v.len()].copy_from_slice(&v);
                return Ok(v.len());
            }
            Head::TooLong | Head::Invalid => return Err(self.bad_message_length()),
            Head::Lane(slot, n) => {
                if cap - offset < n {
                    let whole = self.recv_lane_bytes(py, &mut src, slot, n)?;
                    return Err(buffer_too_short(py, whole.as_bytes()));
                }
                let lane = self.in_lane(src.take_passed())?;
                let target = &mut dst.as_mut_slice()[offset..offset + n];
                let got = py.detach(|| lane.read(slot, target));
                lane.release(slot);
                if got.is_err() {
                    return Err(self.bad_message_length());
                }
                return Ok(n);
            }
            Head::Len(n) => n,
        };
        if cap - offset < len {
            let mut v = Vec::new();
            self.drive(py, &mut src, Mode::Detached, |s| {
                conn::step_vec(s, &mut v, len)
            })?;
            return Err(buffer_too_short(py, &v));
        }
        let target = &mut dst.as_mut_slice()[offset..offset + len];
        let mut fill = SliceFill::new();
        let mode = if len <= INLINE_MAX {
            Mode::Attached
        } else {
            Mode::Detached
        };
        self.drive(py, &mut src, mode, |s| {
            conn::step_slice(s, &mut fill, target)
        })?;
        Ok(len)
    }

    /// Receives one message and unpickles it.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.recv_object(py)
    }

    /// Whether a message (or end of file) is waiting; waits up to `timeout` seconds
    /// (`None`: forever).
    #[pyo3(signature = (timeout=Some(0.0)), text_signature = "($self, timeout=0.0)")]
    fn poll(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let fd_num = self.for_reading()?;
        let bfd = borrow(fd_num)?;
        if !sys_wait::poll_readable(&[bfd], Some(Duration::ZERO))?.is_empty() {
            return Ok(true);
        }
        let deadline = Deadline::after_secs(timeout);
        if deadline.is_expired() {
            return Ok(false);
        }
        let got = wait_until(py, deadline, |slice| {
            Ok((!sys_wait::poll_readable(&[bfd], Some(slice))?.is_empty()).then_some(()))
        })?;
        Ok(got.is_some())
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.close_fd()
    }
}

fn fileno_of(obj: &Bound<'_, PyAny>) -> PyResult<RawFd> {
    if let Ok(c) = obj.cast::<Connection>() {
        return Ok(c.get().raw()?);
    }
    let n: i64 = if obj.is_instance_of::<PyInt>() {
        obj.extract()?
    } else {
        match obj.getattr("fileno") {
            Ok(f) => f.call0()?.extract()?,
            Err(_) => {
                return Err(PyValueError::new_err(format!(
                    "Invalid file object: {}",
                    obj.repr()?
                )))
            }
        }
    };
    if n < 0 {
        return Err(PyValueError::new_err(format!(
            "Invalid file descriptor: {n}"
        )));
    }
    RawFd::try_from(n).map_err(|_| PyValueError::new_err(format!("Invalid file descriptor: {n}")))
}

/// Waits until any object of `object_list` (connections, sockets, sentinels, descriptors) is
/// readable; returns the ready ones, in list order. `timeout=None` waits forever.
#[pyfunction]
#[pyo3(name = "wait", signature = (object_list, timeout=None))]
fn wait_objects<'py>(
    py: Python<'py>,
    object_list: &Bound<'py, PyAny>,
    timeout: Option<f64>,
) -> PyResult<Bound<'py, PyList>> {
    let deadline = Deadline::after_secs(timeout);
    let objs = object_list.try_iter()?.collect::<PyResult<Vec<_>>>()?;
    let nums = objs.iter().map(fileno_of).collect::<PyResult<Vec<_>>>()?;
    let fds = nums
        .iter()
        .map(|&n| borrow(n))
        .collect::<PyResult<Vec<_>>>()?;
    // Like the stdlib's selector: a closed descriptor is reported ready, not an error.
    let mut ready = stream::poll_any_ready(&fds, Duration::ZERO)?;
    if ready.is_empty() && !deadline.is_expired() {
        ready = wait_until(py, deadline, |slice| {
            let r = stream::poll_any_ready(&fds, slice)?;
            Ok((!r.is_empty()).then_some(r))
        })?
        .unwrap_or_default();
    }
    PyList::new(py, ready.into_iter().map(|i| &objs[i]))
}

/// Two connected ends: a socketpair when `duplex`, else a pipe `(read end, write end)`.
#[pyfunction]
#[pyo3(name = "Pipe", signature = (duplex=true))]
fn pipe(py: Python<'_>, duplex: bool) -> PyResult<(Py<Connection>, Py<Connection>)> {
    let (a, b) = if duplex {
        let (a, b) = stream::socketpair()?;
        stream::set_send_buffer(a.as_fd(), PIPE_SEND_BUFFER);
        stream::set_send_buffer(b.as_fd(), PIPE_SEND_BUFFER);
        (
            Connection::from_owned(a, true, true, true),
            Connection::from_owned(b, true, true, true),
        )
    } else {
        let (r, w) = fd::pipe()?;
        (
            Connection::from_owned(r, true, false, false),
            Connection::from_owned(w, false, true, false),
        )
    };
    Ok((Py::new(py, a)?, Py::new(py, b)?))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Connection>()?;
    m.add_function(wrap_pyfunction!(wait_objects, m)?)?;
    m.add_function(wrap_pyfunction!(pipe, m)?)?;
    Ok(())
}
