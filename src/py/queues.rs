//! Bindings for `ferroproc.queues`: `RingQueue` (Queue, JoinableQueue) and `SimpleRing`
//! (SimpleQueue) over one [`RingBuffer`] each.
//!
//! `put` pickles and writes in one native call: the object is pickled while attached (with a
//! per-queue reusable `ForkingPickler`, rebuilt when `copyreg` or the reducer registries
//! change), then copied into the ring; only a wait (full ring, `maxsize`, a contended lock)
//! detaches, in slices, through `blocking::wait_until`. `get` copies the message out under the
//! reader lock and unpickles it after releasing the lock, as the stdlib does.
//!
//! Small messages in the subset of [`tinypickle`] skip the pickler both ways; large buffers go
//! out-of-band through blobs (see [`oob`]).
//!
//! The reusable pickler sits behind a `Mutex` that is only ever `try_lock`ed: a thread that
//! finds it busy (another thread is pickling through it) pickles with a fresh `ForkingPickler`
//! instead, so holding it while Python code runs cannot deadlock.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple, PyType};

use super::blocking::wait_until;
use super::oob;
use super::tinypickle;
use crate::channel::bundle;
use crate::channel::ring::{
    Next, ReadState, ReadStep, RingBuffer, WriteState, WriteStep, FLAG_JOINABLE,
};
use crate::deadline::Deadline;
use crate::sync::Acquired;
use crate::sys::{eventfd, fd, futex};

mod pickling;

/// A message of a `put_many` batch: natively encoded into the batch's buffer (this range of
/// it), or pickled on its own.
enum Batched<'py> {
    Native(usize, usize),
    Other(Pickled<'py>),
}

use pickling::{fresh_dumps, globals, slices, Msg, Pickled, Pickler, NATIVE_READ_MAX};

// `queue.Empty` is `_queue.Empty`; taking it from `_queue` spares importing `queue`, and with it
// `threading`, whose at-fork hook every later forked child would run. `Full` is only in `queue`.
pyo3::import_exception!(_queue, Empty);
pyo3::import_exception!(queue, Full);

/// How long a non-blocking `put` waits for the writer lock held by another writer.
const NONBLOCKING_LOCK_WAIT: f64 = 0.01;

fn log_recovered(how: Acquired, which: &str) {
    if let Acquired::Recovered { dead_pid } = how {
        log::warn!(
            target: "ferroproc::queues",
            "queue {which} lock recovered from process {dead_pid}, which died holding it"
        );
    }
}

/// The process-local side of one ring: the mapping, the eventfd, and local state.
struct Core {
    ring: Arc<RingBuffer>,
    efd: OwnedFd,
    closed: AtomicBool,
    pickler: Mutex<Option<Pickler>>,
}

impl Core {
    fn new(capacity: usize, maxsize: u32, flags: u32, fds: Option<(i32, i32)>) -> PyResult<Self> {
        let (ring, efd) = match fds {
            Some((rfd, efd)) => (
                RingBuffer::attach(fd::dup_cloexec(fd::borrow_raw(rfd)?)?)?,
                fd::dup_cloexec(fd::borrow_raw(efd)?)?,
            ),
            None => (
                RingBuffer::create(capacity, maxsize, flags)?,
                eventfd::create()?,
            ),
        };
        Ok(Self {
            ring: Arc::new(ring),
            efd,
            closed: AtomicBool::new(false),
            pickler: Mutex::new(None),
        })
    }

    /// Takes the writer lock. `Ok(false)`: not within the deadline.
    fn lock_writer(&self, py: Python<'_>, block: bool, deadline: Deadline) -> PyResult<bool> {
        let me = futex::pid();
        let lock = &self.ring.shared().ctl.wlock;
        if lock.try_lock(me) {
            return Ok(true);
        }
        let deadline = if block {
            deadline
        } else {
            Deadline::after_secs(Some(NONBLOCKING_LOCK_WAIT))
        };
        match wait_until(py, deadline, |s| lock.lock_slice(me, s))? {
            Some(how) => {
                log_recovered(how, "writer");
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn unlock_writer(&self) {
        let _ = self.ring.shared().ctl.wlock.unlock();
    }

    /// Writes one message with the writer lock held. `Ok(false)`: full until the deadline.
    fn write_locked(
        &self,
        py: Python<'_>,
        data: &[&[u8]],
        block: bool,
        deadline: Deadline,
    ) -> PyResult<bool> {
        let ring = &self.ring;
        let mut st = WriteState::default();
        let mut seen = match ring.write_parts_step(data, &mut st, !block)? {
            WriteStep::Done => return Ok(true),
            WriteStep::Full { seen } => seen,
        };
        if !block {
            return Ok(false);
        }
        let res = wait_until(py, deadline, |slice| {
            ring.wait_space(seen, slice)?;
            Ok(match ring.write_parts_step(data, &mut st, false)? {
                WriteStep::Done => Some(()),
                WriteStep::Full { seen: s } => {
                    let below_max = ring.len() < ring.maxsize();
                    if s == seen && below_max && !ring.reader_present(true) {
                        // Waiting for bytes (not `maxsize`), no progress for a whole slice
                        // and no live reader: log it.
                        ring.divert(data, &mut st)?;
                        return Ok(Some(()));
                    }
                    seen = s;
                    None
                }
            })
        });
        match res {
            Ok(Some(())) => Ok(true),
            Ok(None) if ring.len() < ring.maxsize() => {
                // The deadline passed waiting for bytes, not for `maxsize`: the stdlib's put
                // would have buffered it, so log it rather than raise Full.
                ring.divert(data, &mut st)?;
                Ok(true)
            }
            Ok(None) => {
                ring.abort_stream(&mut st);
                Ok(false)
            }
            Err(e) => {
                ring.abort_stream(&mut st);
                Err(e)
            }
        }
    }

    fn signal_pollers(&self) {
        if self.ring.has_pollers() {
            eventfd::signal(std::os::fd::AsFd::as_fd(&self.efd));
        }
    }

    /// Pickles and writes `obj`. `Ok(false)`: full (Full to raise).
    fn put(
        &self,
        py: Python<'_>,
        obj: &Bound<'_, PyAny>,
        block: bool,
        deadline: Deadline,
    ) -> PyResult<bool> {
        let data = self.dumps(py, obj)?;
        let res = self.lock_writer(py, block, deadline).and_then(|locked| {
            if !locked {
                return Ok(false);
            }
            let res = self.write_locked(py, &data.slices(), block, deadline);
            self.unlock_writer();
            res
        });
        if matches!(res, Ok(true)) {
            self.signal_pollers();
        } else {
            data.discard(&self.ring);
        }
        res
    }

    /// Pickles all of `objs`, then writes them in order; returns how many were written.
    fn put_many(
        &self,
        py: Python<'_>,
        objs: &Bound<'_, PyAny>,
        block: bool,
        deadline: Deadline,
    ) -> PyResult<(usize, usize)> {
        // Messages of the native subset are encoded one after another into one buffer (no
        // allocation per message: with batches of small ints, the producer's mallocs and frees
        // were a tenth of its time); the others are pickled on their own.
        let mut arena = Vec::new();
        let mut datas = Vec::new();
        let pickled = objs.try_iter().and_then(|mut it| {
            datas.reserve(it.size_hint().0);
            it.try_for_each(|obj| {
                let obj = obj?;
                let start = arena.len();
                datas.push(if tinypickle::encode(&obj, &mut arena) {
                    Batched::Native(start, arena.len())
                } else {
                    Batched::Other(self.dumps(py, &obj)?)
                });
                Ok(())
            })
        });
        let discard = |datas: &[Batched<'_>]| {
            for d in datas {
                if let Batched::Other(p) = d {
                    p.discard(&self.ring);
                }
            }
        };
        if let Err(e) = pickled {
            discard(&datas);
            return Err(e);
        }
        let total = datas.len();
        if total == 0 {
            return Ok((0, 0));
        }
        match self.lock_writer(py, block, deadline) {
            Ok(true) => {}
            other => {
                discard(&datas);
                return other.map(|_| (0, total));
            }
        }
        let mut done = 0;
        let mut res = Ok(());
        for d in &datas {
            let written = match d {
                Batched::Native(a, b) => self.write_locked(py, &[&arena[*a..*b]], block, deadline),
                Batched::Other(p) => self.write_locked(py, &p.slices(), block, deadline),
            };
            match written {
                Ok(true) => done += 1,
                Ok(false) => break,
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        self.unlock_writer();
        if done > 0 {
            self.signal_pollers();
        }
        discard(&datas[done..]);
        res.map(|()| (done, total))
    }

    /// Takes the reader lock. `Ok(false)`: not within the deadline (or busy, non-blocking).
    fn lock_reader(&self, py: Python<'_>, block: bool, deadline: Deadline) -> PyResult<bool> {
        let me = futex::pid();
        let lock = &self.ring.shared().ctl.rlock;
        if lock.try_lock(me) {
            return Ok(true);
        }
        if !block {
            return Ok(false);
        }
        match wait_until(py, deadline, |s| lock.lock_slice(me, s))? {
            Some(how) => {
                log_recovered(how, "reader");
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn unlock_reader(&self) {
        let _ = self.ring.shared().ctl.rlock.unlock();
        if self.ring.has_pollers() {
            // Keep the eventfd readable exactly while data is waiting.
            let efd = std::os::fd::AsFd::as_fd(&self.efd);
            eventfd::drain(efd);
            if !self.ring.is_empty() {
                eventfd::signal(efd);
            }
        }
    }

    /// Reads one message with the reader lock held. `Ok(None)`: empty until the deadline. A
    /// streamed message that has begun is read to its end whatever the deadline.
    fn read_locked(
        &self,
        py: Python<'_>,
        block: bool,
        deadline: Deadline,
    ) -> PyResult<Option<Vec<u8>>> {
        let ring = &self.ring;
        let mut st = ReadState::default();
        let mut seen = match ring.read_step(&mut st)? {
            ReadStep::Message(m) => return Ok(Some(m)),
            ReadStep::Empty { seen } => seen,
        };
        let mut deadline = if block {
            deadline
        } else {
            Deadline::after_secs(Some(0.0))
        };
        loop {
            if !block && !st.in_stream() {
                return Ok(None);
            }
            let got = wait_until(py, deadline, |slice| {
                ring.wait_data(seen, slice)?;
                Ok(match ring.read_step(&mut st)? {
                    ReadStep::Message(m) => Some(m),
                    ReadStep::Empty { seen: s } => {
                        seen = s;
                        None
                    }
                })
            })?;
            match got {
                Some(m) => return Ok(Some(m)),
                None if st.in_stream() => deadline = Deadline::never(),
                None => return Ok(None),
            }
        }
    }

    /// Reads the next message with the reader lock held, straight into a new `bytes` when it
    /// is a complete frame or log record, else through `read_locked` (streams). With
    /// `native`, a small message in the native subset comes back as its object.
    fn read_obj<'py>(
        &self,
        py: Python<'py>,
        block: bool,
        deadline: Deadline,
        native: bool,
    ) -> PyResult<Option<Msg<'py>>> {
        let ring = &self.ring;
        loop {
            match ring.peek()? {
                n @ (Next::Whole(len) | Next::Log(len)) if native && len <= NATIVE_READ_MAX => {
                    let mut buf = [0u8; NATIVE_READ_MAX];
                    let data = &mut buf[..len];
                    ring.take_into(n, data)?;
                    return Ok(Some(match tinypickle::decode(py, data) {
                        Some(obj) => Msg::Obj(obj?),
                        None => Msg::Pickle(PyBytes::new(py, data)),
                    }));
                }
                n @ (Next::Whole(len) | Next::Log(len)) => {
                    let b = PyBytes::new_with(py, len, |buf| Ok(ring.take_into(n, buf)?))?;
                    return Ok(Some(Msg::Pickle(b)));
                }
                Next::Other => {
                    return Ok(self
                        .read_locked(py, block, deadline)?
                        .map(|v| Msg::Pickle(PyBytes::new(py, &v))));
                }
                Next::Empty => {
                    if !block {
                        return Ok(None);
                    }
                    let got = wait_until(py, deadline, |slice| {
                        let seen = ring.shared().w.data_seq.load(Ordering::SeqCst);
                        if !ring.is_empty() {
                            return Ok(Some(()));
                        }
                        ring.wait_data(seen, slice)?;
                        Ok((!ring.is_empty()).then_some(()))
                    })?;
                    if got.is_none() {
                        return Ok(None);
                    }
                }
            }
        }
    }

    fn get_bytes<'py>(
        &self,
        py: Python<'py>,
        block: bool,
        deadline: Deadline,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let Some(m) = self.get_msg(py, block, deadline, false)? else {
            return Ok(None);
        };
        if let Msg::Pickle(b) = &m {
            if !bundle::is_bundle(b.as_bytes()) {
                return Ok(Some(b.clone()));
            }
            // A large pickle sent in a blob: that pickle.
            if let Some(piece) = oob::pickle_blob(b.as_bytes()) {
                return oob::read_pickle_blob(py, &self.ring, piece).map(Some);
            }
        }
        // Another bundle, which a plain pickle reader cannot load: pickle it again in-band.
        let obj = self.load(py, m)?;
        let parts = fresh_dumps(py, globals(py)?, &obj)?;
        Ok(Some(PyBytes::new(py, &slices(&parts).concat())))
    }

    fn get_msg<'py>(
        &self,
        py: Python<'py>,
        block: bool,
        deadline: Deadline,
        native: bool,
    ) -> PyResult<Option<Msg<'py>>> {
        if !self.lock_reader(py, block, deadline)? {
            return Ok(None);
        }
        let res = self.read_obj(py, block, deadline, native);
        self.unlock_reader();
        res
    }

    /// The next message's pickled bytes; `queue.Empty` when none came in time.
    fn get_bytes_or_empty<'py>(
        &self,
        py: Python<'py>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.get_bytes(py, block, deadline_of(block, timeout))?
            .ok_or_else(|| Empty::new_err(()))
    }

    /// The next object, waited for without a deadline.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.get(py, true, Deadline::never())?
            .ok_or_else(|| Empty::new_err(()))
    }

    /// The ring's memfd and the eventfd, to hand to a child.
    fn handles<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, [self.ring.fd().as_raw_fd(), self.efd.as_raw_fd()])
    }

    fn get<'py>(
        &self,
        py: Python<'py>,
        block: bool,
        deadline: Deadline,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        match self.get_msg(py, block, deadline, true)? {
            Some(m) => self.load(py, m).map(Some),
            None => Ok(None),
        }
    }

    fn get_many<'py>(
        &self,
        py: Python<'py>,
        max: usize,
        block: bool,
        deadline: Deadline,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        if max == 0 {
            return Ok(Some(PyList::empty(py)));
        }
        if !self.lock_reader(py, block, deadline)? {
            return Ok(None);
        }
        let mut msgs = Vec::new();
        let mut res = self.read_obj(py, block, deadline, true);
        if let Ok(Some(b)) = res {
            msgs.push(b);
            res = Ok(None);
            while msgs.len() < max {
                match self.read_obj(py, false, deadline, true) {
                    Ok(Some(b)) => msgs.push(b),
                    Ok(None) => break,
                    Err(e) => {
                        res = Err(e);
                        break;
                    }
                }
            }
        }
        self.unlock_reader();
        // Messages taken but not returned (an error after them) are lost, as with `get`;
        // what they hold outside the ring is freed.
        let drop_all = |rest: &mut dyn Iterator<Item = Msg<'py>>| {
            rest.for_each(|m| m.discard(&self.ring));
        };
        if let Err(e) = res {
            drop_all(&mut msgs.into_iter());
            return Err(e);
        }
        if msgs.is_empty() {
            return Ok(None);
        }
        let out = PyList::empty(py);
        let mut rest = msgs.into_iter();
        while let Some(m) = rest.next() {
            if let Err(e) = self.load(py, m).and_then(|o| out.append(o)) {
                drop_all(&mut rest);
                return Err(e);
            }
        }
        Ok(Some(out))
    }

    fn poll(&self, py: Python<'_>, deadline: Deadline) -> PyResult<bool> {
        let ring = &self.ring;
        if !ring.is_empty() {
            return Ok(true);
        }
        let got = wait_until(py, deadline, |slice| {
            let seen = ring.shared().w.data_seq.load(Ordering::SeqCst);
            if !ring.is_empty() {
                return Ok(Some(()));
            }
            ring.wait_data(seen, slice)?;
            Ok((!ring.is_empty()).then_some(()))
        })?;
        Ok(got.is_some())
    }

    fn reader_fileno(&self) -> i32 {
        self.ring.enable_pollers();
        if !self.ring.is_empty() {
            eventfd::signal(std::os::fd::AsFd::as_fd(&self.efd));
        }
        self.efd.as_raw_fd()
    }
}

fn truthy(block: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
    block.map_or(Ok(true), PyAnyMethods::is_truthy)
}

/// The stdlib's `Queue.get(timeout=...)`/`put` rule: a blocking call with a timeout waits at
/// most that long (negative counts as zero); `None` waits forever.
fn deadline_of(block: bool, timeout: Option<f64>) -> Deadline {
    if block {
        Deadline::after_secs(timeout.map(|t| t.max(0.0)))
    } else {
        Deadline::after_secs(Some(0.0))
    }
}

fn fd_pair(fd: Option<i32>, efd: Option<i32>) -> PyResult<Option<(i32, i32)>> {
    match (fd, efd) {
        (Some(a), Some(b)) => Ok(Some((a, b))),
        (None, None) => Ok(None),
        _ => Err(PyValueError::new_err("fd and efd go together")),
    }
}

/// `(cls._ring_bytes, cls._joinable)`, defaulting to 1 MiB and False.
fn class_config(cls: &Bound<'_, PyType>) -> PyResult<(usize, bool)> {
    let capacity = match cls.getattr("_ring_bytes") {
        Ok(v) => v.extract()?,
        Err(_) => 1 << 20,
    };
    let joinable = match cls.getattr("_joinable") {
        Ok(v) => v.is_truthy()?,
        Err(_) => false,
    };
    Ok((capacity, joinable))
}

fn maxsize_of(maxsize: i64) -> u32 {
    if maxsize <= 0 {
        crate::sync::SEM_VALUE_MAX
    } else {
        u32::try_from(maxsize)
            .unwrap_or(u32::MAX)
            .min(crate::sync::SEM_VALUE_MAX)
    }
}

/// The native side of `Queue` and `JoinableQueue`.
#[pyclass(module = "ferroproc._ferroproc", name = "RingQueue", subclass, frozen)]
pub(crate) struct PyRingQueue {
    core: Core,
}

impl PyRingQueue {
    fn check_open(slf: &Bound<'_, Self>) -> PyResult<()> {
        if slf.get().core.closed.load(Ordering::Relaxed) {
            return Err(closed_error(slf));
        }
        Ok(())
    }

    /// `get(timeout=timeout)` for a native loop (the pool worker's): `Ok(None)` instead of
    /// `queue.Empty` when nothing came in time.
    pub(crate) fn recv_within<'py>(
        slf: &Bound<'py, Self>,
        timeout: f64,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        Self::check_open(slf)?;
        slf.get()
            .core
            .get(slf.py(), true, Deadline::after_secs(Some(timeout.max(0.0))))
    }

    /// `put(obj)` for a native loop: blocks while the queue is full.
    pub(crate) fn send(slf: &Bound<'_, Self>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        Self::check_open(slf)?;
        slf.get().core.put(slf.py(), obj, true, Deadline::never())?;
        Ok(())
    }
}

#[cold]
fn closed_error(slf: &Bound<'_, PyRingQueue>) -> PyErr {
    match slf.repr() {
        Ok(r) => PyValueError::new_err(format!("Queue {r} is closed")),
        Err(e) => e,
    }
}

#[pymethods]
impl PyRingQueue {
    /// `RingQueue(maxsize=0, ...)`: a new ring (other arguments, such as `ctx`, are left to
    /// the subclass's `__init__`), or with `fd`/`efd` the ring behind those descriptors (the
    /// caller keeps owning them). The class attributes `_ring_bytes` (data bytes) and
    /// `_joinable` (count unfinished tasks) configure a new ring.
    #[new]
    #[classmethod]
    #[pyo3(signature = (*args, fd = None, efd = None, **kwargs))]
    fn new(
        cls: &Bound<'_, PyType>,
        args: &Bound<'_, PyTuple>,
        fd: Option<i32>,
        efd: Option<i32>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let maxsize = match args.get_item(0) {
            Ok(m) => Some(m),
            Err(_) => match kwargs {
                Some(k) => k.get_item("maxsize")?,
                None => None,
            },
        };
        let maxsize: i64 = match maxsize {
            Some(m) => m.extract()?,
            None => 0,
        };
        let (capacity, joinable) = class_config(cls)?;
        let flags = if joinable { FLAG_JOINABLE } else { 0 };
        Ok(Self {
            core: Core::new(capacity, maxsize_of(maxsize), flags, fd_pair(fd, efd)?)?,
        })
    }

    /// Puts `obj` (see `ferroproc.queues.Queue`).
    #[pyo3(signature = (obj, block = None, timeout = None), text_signature = "($self, obj, block=True, timeout=None)")]
    fn put(
        slf: &Bound<'_, Self>,
        obj: &Bound<'_, PyAny>,
        block: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        Self::check_open(slf)?;
        let block = truthy(block)?;
        if slf
            .get()
            .core
            .put(slf.py(), obj, block, deadline_of(block, timeout))?
        {
            Ok(())
        } else {
            Err(Full::new_err(()))
        }
    }

    /// Takes the next object (see `ferroproc.queues.Queue`).
    #[pyo3(signature = (block = None, timeout = None), text_signature = "($self, block=True, timeout=None)")]
    fn get<'py>(
        slf: &Bound<'py, Self>,
        block: Option<&Bound<'py, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Self::check_open(slf)?;
        let block = truthy(block)?;
        slf.get()
            .core
            .get(slf.py(), block, deadline_of(block, timeout))?
            .ok_or_else(|| Empty::new_err(()))
    }

    #[pyo3(text_signature = "($self, obj)")]
    fn put_nowait(slf: &Bound<'_, Self>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        Self::check_open(slf)?;
        if slf
            .get()
            .core
            .put(slf.py(), obj, false, Deadline::after_secs(Some(0.0)))?
        {
            Ok(())
        } else {
            Err(Full::new_err(()))
        }
    }

    #[pyo3(text_signature = "($self)")]
    fn get_nowait<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Self::check_open(slf)?;
        slf.get()
            .core
            .get(slf.py(), false, Deadline::after_secs(Some(0.0)))?
            .ok_or_else(|| Empty::new_err(()))
    }

    /// ferroproc extension: pickles every object of `objs`, then puts them in order under one
    /// lock acquisition. Returns None; `queue.Full` if the queue stays full (the objects
    /// before it were put: the exception's `args[0]` is their count).
    #[pyo3(signature = (objs, block = None, timeout = None), text_signature = "($self, objs, block=True, timeout=None)")]
    fn put_many(
        slf: &Bound<'_, Self>,
        objs: &Bound<'_, PyAny>,
        block: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        Self::check_open(slf)?;
        let block = truthy(block)?;
        let (done, total) =
            slf.get()
                .core
                .put_many(slf.py(), objs, block, deadline_of(block, timeout))?;
        if done == total {
            Ok(())
        } else {
            Err(Full::new_err((done,)))
        }
    }

    /// ferroproc extension: waits like `get` for one object, then also takes whatever else is
    /// ready, up to `max_messages`; returns a list (never empty: `queue.Empty` instead).
    #[pyo3(signature = (max_messages, block = None, timeout = None), text_signature = "($self, max_messages, block=True, timeout=None)")]
    fn get_many<'py>(
        slf: &Bound<'py, Self>,
        max_messages: usize,
        block: Option<&Bound<'py, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyList>> {
        Self::check_open(slf)?;
        let block = truthy(block)?;
        slf.get()
            .core
            .get_many(slf.py(), max_messages, block, deadline_of(block, timeout))?
            .ok_or_else(|| Empty::new_err(()))
    }

    /// Messages put and not yet taken.
    fn qsize(&self) -> u32 {
        self.core.ring.len()
    }

    fn empty(&self) -> bool {
        self.core.ring.is_empty()
    }

    fn full(&self) -> bool {
        self.core.ring.len() >= self.core.ring.maxsize()
    }

    /// Marks this handle closed (other handles and processes are not affected).
    fn close(&self) {
        self.core.closed.store(true, Ordering::Relaxed);
    }

    #[getter]
    fn _closed(&self) -> bool {
        self.core.closed.load(Ordering::Relaxed)
    }

    #[getter]
    fn _maxsize(&self) -> u32 {
        self.core.ring.maxsize()
    }

    /// Marks one task done; False when there is none (the caller raises ValueError).
    fn _task_done(&self) -> bool {
        self.core.ring.task_done()
    }

    /// Waits until every task put was marked done.
    fn _join(&self, py: Python<'_>) -> PyResult<()> {
        let ring = &self.core.ring;
        wait_until(py, Deadline::never(), |s| {
            Ok(ring.join_slice(s)?.then_some(()))
        })?;
        Ok(())
    }

    fn _unfinished(&self) -> u32 {
        self.core.ring.unfinished()
    }

    /// Whether a message is (or, within `timeout`, becomes) available; doesn't take it.
    #[pyo3(signature = (timeout = 0.0))]
    fn _poll(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        self.core
            .poll(py, Deadline::after_secs(timeout.map(|t| t.max(0.0))))
    }

    /// The eventfd that polls readable while messages wait (enables signalling).
    fn _reader_fileno(&self) -> i32 {
        self.core.reader_fileno()
    }

    /// Takes the next object, waiting for it (what `_reader.recv()` gives).
    fn _recv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.core.recv(py)
    }

    /// Takes the next message's pickled bytes.
    #[pyo3(signature = (block = true, timeout = None))]
    fn _get_bytes<'py>(
        &self,
        py: Python<'py>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.core.get_bytes_or_empty(py, block, timeout)
    }

    /// Bytes of the shared data area.
    #[getter]
    fn _capacity(&self) -> usize {
        self.core.ring.capacity()
    }

    /// The ring's memfd and the eventfd, to hand to a child.
    #[getter]
    fn _handles<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        self.core.handles(py)
    }
}

/// The native side of `SimpleQueue`: blocking `put`/`get` only.
#[pyclass(module = "ferroproc._ferroproc", name = "SimpleRing", subclass, frozen)]
pub(crate) struct PySimpleRing {
    core: Core,
}

impl PySimpleRing {
    fn check_open(&self) -> PyResult<()> {
        if self.core.closed.load(Ordering::Relaxed) {
            return Err(PyOSError::new_err("handle is closed"));
        }
        Ok(())
    }
}

#[pymethods]
impl PySimpleRing {
    /// `SimpleRing(...)`: a new ring of `_ring_bytes` (class attribute) bytes, or with
    /// `fd`/`efd` the ring behind those descriptors.
    #[new]
    #[classmethod]
    #[pyo3(signature = (*_args, fd = None, efd = None, **_kwargs))]
    fn new(
        cls: &Bound<'_, PyType>,
        _args: &Bound<'_, PyTuple>,
        fd: Option<i32>,
        efd: Option<i32>,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let (capacity, _) = class_config(cls)?;
        Ok(Self {
            core: Core::new(capacity, crate::sync::SEM_VALUE_MAX, 0, fd_pair(fd, efd)?)?,
        })
    }

    /// Puts `obj`, waiting while the ring is full.
    #[pyo3(text_signature = "($self, obj)")]
    fn put(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        self.check_open()?;
        self.core.put(py, obj, true, Deadline::never())?;
        Ok(())
    }

    /// Takes the next object, waiting for one.
    #[pyo3(text_signature = "($self)")]
    fn get<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.check_open()?;
        self.core.recv(py)
    }

    #[pyo3(text_signature = "($self)")]
    fn empty(&self) -> PyResult<bool> {
        self.check_open()?;
        Ok(self.core.ring.is_empty())
    }

    #[pyo3(text_signature = "($self)")]
    fn close(&self) {
        self.core.closed.store(true, Ordering::Relaxed);
    }

    /// ferroproc extension: see `RingQueue.put_many` (blocking).
    #[pyo3(text_signature = "($self, objs)")]
    fn put_many(&self, py: Python<'_>, objs: &Bound<'_, PyAny>) -> PyResult<()> {
        self.check_open()?;
        self.core.put_many(py, objs, true, Deadline::never())?;
        Ok(())
    }

    /// ferroproc extension: see `RingQueue.get_many` (blocking).
    #[pyo3(text_signature = "($self, max_messages)")]
    fn get_many<'py>(&self, py: Python<'py>, max_messages: usize) -> PyResult<Bound<'py, PyList>> {
        self.check_open()?;
        self.core
            .get_many(py, max_messages, true, Deadline::never())?
            .ok_or_else(|| Empty::new_err(()))
    }

    #[getter]
    fn _closed(&self) -> bool {
        self.core.closed.load(Ordering::Relaxed)
    }

    #[pyo3(signature = (timeout = 0.0))]
    fn _poll(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        self.check_open()?;
        self.core
            .poll(py, Deadline::after_secs(timeout.map(|t| t.max(0.0))))
    }

    fn _reader_fileno(&self) -> PyResult<i32> {
        self.check_open()?;
        Ok(self.core.reader_fileno())
    }

    /// Takes the next object, waiting for it (what `_reader.recv()` gives).
    fn _recv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.get(py)
    }

    #[pyo3(signature = (block = true, timeout = None))]
    fn _get_bytes<'py>(
        &self,
        py: Python<'py>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.check_open()?;
        self.core.get_bytes_or_empty(py, block, timeout)
    }

    #[getter]
    fn _capacity(&self) -> usize {
        self.core.ring.capacity()
    }

    #[getter]
    fn _handles<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        self.core.handles(py)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    futex::install_fork_hook();
    m.add_class::<crate::channel::pybuf::RecvBuffer>()?;
    m.add_class::<PyRingQueue>()?;
    m.add_class::<PySimpleRing>()?;
    m.add_function(wrap_pyfunction!(super::oob::_release_received_buffers, m)?)?;
    Ok(())
}
