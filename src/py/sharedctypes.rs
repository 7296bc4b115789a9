//! Bindings for `ferroproc.heap`/`ferroproc.sharedctypes`: `ShmChunk`, one arena chunk, and
//! the lock-free integer operations of the atomic-`Value` extension.

use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyString;

use super::synchronize::PySemLock;

use crate::shm::{AtomicOp, Chunk, IntKind};
use crate::sys::fd;

/// One memfd-backed chunk that `ferroproc.heap` divides into blocks.
#[pyclass(module = "ferroproc._ferroproc", name = "ShmChunk", frozen)]
pub(crate) struct PyShmChunk {
    chunk: Chunk,
}

impl PyShmChunk {
    fn kind_at(&self, offset: usize, width: usize, signed: bool) -> PyResult<IntKind> {
        let kind = IntKind::new(width, signed).map_err(|e| PyValueError::new_err(e.to_string()))?;
        if offset % width != 0 {
            return Err(PyValueError::new_err(format!(
                "a {width}-byte atomic needs {width}-byte alignment (offset {offset})"
            )));
        }
        if offset
            .checked_add(width)
            .map_or(true, |e| e > self.chunk.payload_len())
        {
            return Err(PyValueError::new_err("offset outside the arena chunk"));
        }
        Ok(kind)
    }

    fn operand(kind: IntKind, value: i128) -> PyResult<i64> {
        if kind.fits(value) {
            Ok(kind.encode(value))
        } else {
            Err(PyOverflowError::new_err(format!(
                "{value} does not fit a {}{}-bit integer",
                if kind.signed { "signed " } else { "unsigned " },
                kind.width * 8
            )))
        }
    }

    fn run(&self, offset: usize, kind: IntKind, op: AtomicOp) -> PyResult<i128> {
        Ok(kind.decode(self.chunk.atomic(offset, kind, op)?))
    }
}

#[pymethods]
impl PyShmChunk {
    /// `ShmChunk(size)` creates a zeroed chunk of `size` usable bytes; `ShmChunk(fd=n)` maps
    /// the chunk behind a descriptor received from another process (the caller keeps `n`).
    #[new]
    #[pyo3(signature = (size=0, *, fd=None))]
    fn new(size: usize, fd: Option<i32>) -> PyResult<Self> {
        let chunk = match fd {
            Some(n) => Chunk::attach(fd::dup_cloexec(fd::borrow_raw(n)?)?)?,
            None => Chunk::create(size)?,
        };
        Ok(Self { chunk })
    }

    /// The memfd (owned by this object; duplicate it to keep it).
    #[getter]
    fn handle(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.chunk.fd().as_raw_fd()
    }

    /// Usable bytes.
    #[getter]
    fn size(&self) -> usize {
        self.chunk.payload_len()
    }

    /// Address of usable byte 0, valid while this object lives.
    #[getter]
    fn address(&self) -> usize {
        self.chunk.payload_address()
    }

    /// The integer at `offset` (`width` bytes, `signed`), read atomically.
    fn load(&self, offset: usize, width: usize, signed: bool) -> PyResult<i128> {
        let kind = self.kind_at(offset, width, signed)?;
        self.run(offset, kind, AtomicOp::Load)
    }

    /// Stores `value` atomically; returns the previous value.
    fn swap(&self, offset: usize, width: usize, signed: bool, value: i128) -> PyResult<i128> {
        let kind = self.kind_at(offset, width, signed)?;
        let v = Self::operand(kind, value)?;
        self.run(offset, kind, AtomicOp::Swap(v))
    }

    /// Adds `delta` atomically (wrapping at the integer's width); returns the previous value.
    fn fetch_add(&self, offset: usize, width: usize, signed: bool, delta: i128) -> PyResult<i128> {
        let kind = self.kind_at(offset, width, signed)?;
        // Any delta works modulo 2**bits; reduce it instead of refusing large negatives.
        let v = kind.encode(delta);
        self.run(offset, kind, AtomicOp::FetchAdd(v))
    }

    /// Stores `new` if the value is `expected`; returns `(swapped, previous value)`.
    fn compare_exchange(
        &self,
        offset: usize,
        width: usize,
        signed: bool,
        expected: i128,
        new: i128,
    ) -> PyResult<(bool, i128)> {
        let kind = self.kind_at(offset, width, signed)?;
        let new = Self::operand(kind, new)?;
        if !kind.fits(expected) {
            // It can never match; report the current value.
            return Ok((false, self.run(offset, kind, AtomicOp::Load)?));
        }
        let exp = kind.encode(expected);
        let old = self.run(
            offset,
            kind,
            AtomicOp::CompareExchange { expected: exp, new },
        )?;
        Ok((old == expected, old))
    }
}

/// Runs `f` holding `lock` (`with lock:`): straight through the native lock when it is one of
/// ferroproc's, else through its `__enter__`/`__exit__`.
fn with_lock<R>(lock: &Bound<'_, PyAny>, f: impl FnOnce() -> PyResult<R>) -> PyResult<R> {
    let py = lock.py();
    if let Ok(sem) = lock.cast::<PySemLock>() {
        let sem = sem.get();
        sem.enter(py)?;
        let result = f();
        let released = sem.exit();
        return match (result, released) {
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            (Ok(r), Ok(())) => Ok(r),
        };
    }
    lock.call_method0(intern!(py, "__enter__"))?;
    let result = f();
    let none = py.None();
    let released = lock.call_method1(intern!(py, "__exit__"), (&none, &none, &none));
    match (result, released) {
        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        (Ok(r), Ok(_)) => Ok(r),
    }
}

/// A class attribute of the `Synchronized*` wrappers: reads and writes attribute `name` of
/// the instance's `_obj` while holding its `_lock`, with no Python frame in between.
#[pyclass(module = "ferroproc._ferroproc", name = "LockedAttr", frozen)]
pub(crate) struct PyLockedAttr {
    name: Py<PyString>,
}

#[pymethods]
impl PyLockedAttr {
    #[new]
    fn new(name: Bound<'_, PyString>) -> Self {
        Self {
            name: name.unbind(),
        }
    }

    /// The attribute it guards.
    #[getter]
    fn name(&self, py: Python<'_>) -> Py<PyString> {
        self.name.clone_ref(py)
    }

    fn __get__(
        slf: &Bound<'_, Self>,
        instance: Option<&Bound<'_, PyAny>>,
        _owner: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let Some(inst) = instance.filter(|i| !i.is_none()) else {
            // Looked up on the class: the descriptor itself, as a property would be.
            return Ok(slf.clone().into_any().unbind());
        };
        let py = slf.py();
        let lock = inst.getattr(intern!(py, "_lock"))?;
        let obj = inst.getattr(intern!(py, "_obj"))?;
        let name = slf.get().name.bind(py);
        with_lock(&lock, || Ok(obj.getattr(name)?.unbind()))
    }

    fn __set__(&self, instance: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = instance.py();
        let lock = instance.getattr(intern!(py, "_lock"))?;
        let obj = instance.getattr(intern!(py, "_obj"))?;
        with_lock(&lock, || obj.setattr(self.name.bind(py), value))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyShmChunk>()?;
    m.add_class::<PyLockedAttr>()
}
