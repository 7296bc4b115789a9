//! Raw views of exported Python buffers, for reading and writing them with the GIL released.
//!
//! This is the one module outside `src/py/` that names a pyo3 type. Turning a buffer export
//! into a Rust slice, and filling a new `bytes`/`bytearray` before it is zeroed, need
//! `unsafe`, which `src/py/` forbids; both are kept here, next to the I/O that uses them. The
//! only Python calls made here are the C-API allocation and data-pointer calls of
//! [`new_filled`].

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::error;
use crate::sys::{memfile, shm};

/// A C-contiguous buffer export, viewed as bytes. Holding it keeps the export (and so the
/// memory) alive; dropping it releases the export.
#[derive(Debug)]
pub struct ExportedBytes {
    buf: PyUntypedBuffer,
}

/// Why a buffer cannot be viewed as contiguous bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewError {
    /// The exporter's memory is not one C-contiguous block.
    NotContiguous,
    /// A writable view was asked of a read-only buffer.
    ReadOnly,
}

impl ExportedBytes {
    /// Wraps `buf` after checking that it is C-contiguous (and writable when `writable`).
    ///
    /// # Errors
    /// [`ViewError`] when the buffer does not qualify.
    pub fn new(buf: PyUntypedBuffer, writable: bool) -> Result<Self, ViewError> {
        if !buf.is_c_contiguous() {
            return Err(ViewError::NotContiguous);
        }
        if writable && buf.readonly() {
            return Err(ViewError::ReadOnly);
        }
        Ok(Self { buf })
    }

    /// Size in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.buf.len_bytes()
    }

    /// Whether the buffer is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, for sending.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        let len = self.len();
        if len == 0 {
            return &[];
        }
        // SAFETY: `self.buf` holds a live export obtained with PyObject_GetBuffer; until it is
        // released in its Drop, the buffer protocol obliges the exporter to keep `len_bytes()`
        // bytes at `buf_ptr()` allocated and in place (bytearray, array and mmap refuse to
        // resize while exported). `new` checked C-contiguity, so the bytes form one block;
        // `len > 0` rules out the dangling pointer of an empty export. Python code in other
        // threads may write the same memory concurrently, exactly as with `os.write` on a
        // bytearray: that is a race at the Python level and only affects the bytes sent.
        unsafe { std::slice::from_raw_parts(self.buf.buf_ptr().cast::<u8>(), len) }
    }

    /// The bytes, for receiving into.
    #[must_use]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len();
        if len == 0 {
            return &mut [];
        }
        // SAFETY: as in `as_slice` for validity and extent; `new` checked the export is
        // writable. Within Rust this is the only reference into the block for as long as the
        // `&mut self` borrow lasts (each call exports its own view). Other Python threads
        // touching the buffer concurrently race at the Python level, as they would with
        // `socket.recv_into`; bytes are plain data, so no invalid value can result.
        unsafe { std::slice::from_raw_parts_mut(self.buf.buf_ptr().cast::<u8>(), len) }
    }
}

/// Smallest new buffer worth a huge-page hint (numpy's threshold for the same hint).
const HUGE_HINT_MIN: usize = 4 << 20;

/// The not-yet-written contents of a new `bytes` or `bytearray` (see [`new_filled`]). Only
/// positional file reads can write it; no Rust reference to the bytes exists until they are.
#[derive(Debug)]
pub struct Unfilled {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an Unfilled names memory of a Python object that `new_filled` created and has not
// shared with anything yet; whichever thread holds the Unfilled is its only user, and it does
// not outlive that call.
unsafe impl Send for Unfilled {}

impl Unfilled {
    /// Fills the whole buffer from file offset `pos` of `fd`.
    ///
    /// # Errors
    /// `Error::Eof` if the file ends first; the `pread` errno.
    pub fn fill_from(&mut self, fd: BorrowedFd<'_>, pos: u64) -> error::Result<()> {
        // SAFETY: `new_filled` made `ptr` point at the `len` data bytes of a fresh bytes or
        // bytearray object that nothing else references yet, and keeps it alive for as long as
        // this Unfilled exists; `&mut self` makes this the only writer.
        unsafe { memfile::read_exact_at_raw(fd, self.ptr.as_ptr(), self.len, pos) }
    }
}

/// A new `bytes` (`readonly`) or `bytearray` of `len` bytes, written by `fill` with the GIL
/// released, without first zeroing it: a large buffer's pages are first touched by the copy
/// itself (and a buffer of 4 MiB or more is hinted for huge pages), so receiving 64 MiB costs
/// one copy instead of a memset, 16384 page faults and a copy.
///
/// # Errors
/// `MemoryError` if the object cannot be allocated; `fill`'s error (the object is then
/// dropped unseen).
pub fn new_filled<'py, F>(
    py: Python<'py>,
    len: usize,
    readonly: bool,
    fill: F,
) -> PyResult<Bound<'py, PyAny>>
where
    F: FnOnce(&mut Unfilled) -> error::Result<()> + Send,
{
    let size = ffi::Py_ssize_t::try_from(len)
        .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("buffer too large"))?;
    let raw = if readonly {
        // SAFETY: a null source asks CPython for a bytes object with `size` bytes of storage
        // left unset (the documented way to fill one in place); it returns a new reference,
        // or null with an exception set.
        unsafe { ffi::PyBytes_FromStringAndSize(std::ptr::null(), size) }
    } else {
        // SAFETY: as above, for a bytearray.
        unsafe { ffi::PyByteArray_FromStringAndSize(std::ptr::null(), size) }
    };
    // SAFETY: `raw` is the new reference (or null with an exception set) just returned; the
    // Bound takes ownership of it.
    let obj = unsafe { Bound::from_owned_ptr_or_err(py, raw)? };
    let data = if readonly {
        // SAFETY: `obj` is the bytes object just created; the pointer to its data stays valid
        // while `obj` lives (bytes never move their storage).
        unsafe { ffi::PyBytes_AsString(obj.as_ptr()) }
    } else {
        // SAFETY: `obj` is the bytearray just created; its storage stays in place while
        // nothing resizes it, and nothing else holds a reference to it.
        unsafe { ffi::PyByteArray_AsString(obj.as_ptr()) }
    };
    let Some(ptr) = NonNull::new(data.cast::<u8>()) else {
        return Err(PyErr::fetch(py));
    };
    if len >= HUGE_HINT_MIN {
        shm::advise_huge_pages(ptr.as_ptr(), len);
    }
    let mut dest = Unfilled { ptr, len };
    // `obj` stays owned by this frame, unshared, while `fill` runs: nothing can resize,
    // read or free it.
    py.detach(|| fill(&mut dest)).map_err(PyErr::from)?;
    Ok(obj)
}
