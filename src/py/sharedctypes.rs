//! Bindings for `ferroproc.heap`/`ferroproc.sharedctypes`: `ShmChunk`, one arena chunk, and
//! the lock-free integer operations of the atomic-`Value` extension.

use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::prelude::*;

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

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyShmChunk>()
}
