//! Raw views of exported Python buffers, for reading and writing them with the GIL released.
//!
//! This is the one module outside `src/py/` that names a pyo3 type. Turning a buffer export
//! into a Rust slice needs `unsafe`, which `src/py/` forbids; the conversion is kept here,
//! next to the I/O that uses it, and performs no Python calls.

use pyo3::buffer::PyUntypedBuffer;

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
