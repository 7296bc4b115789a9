//! Raw views of exported Python buffers, for reading and writing them with the GIL released.
//!
//! This is the one module outside `src/py/` that names a pyo3 type. Turning a buffer export
//! into a Rust slice, filling a new `bytes`/`bytearray` before it is zeroed, and exporting
//! the memory of a [`RecvBuffer`] need `unsafe`, which `src/py/` forbids; they are kept here,
//! next to the I/O that uses them. The only Python calls made here are the C-API allocation,
//! data-pointer and buffer-filling calls of [`new_filled`] and [`RecvBuffer`].

use std::ffi::c_int;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyTuple};

use crate::channel::ring::BlobLease;
use crate::error;
use crate::sys::shm::Mapping;
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
    /// Bytes to fill.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty buffers are not made through `new_filled`'s copy.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills the whole buffer with the `len` bytes at `src`.
    ///
    /// # Safety
    /// `src` must be valid for reads of `self.len()` bytes that nothing writes during the call.
    pub unsafe fn fill_from_memory(&mut self, src: *const u8) {
        // SAFETY: `new_filled` made `ptr` point at the `len` data bytes of a fresh object that
        // nothing else references (see `fill_from`); the caller vouches for the source, which
        // cannot overlap memory Python just allocated for that object.
        unsafe { std::ptr::copy_nonoverlapping(src, self.ptr.as_ptr(), self.len) };
    }

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

/// Calls `f` with a read-only `memoryview` of `data` (no copy), then releases the view. The
/// second value says whether the release worked: if `f` left something holding an export of
/// the view (nothing `pickle.loads` does), it did not, and the caller must then keep `data`
/// alive and unchanged for the rest of the process.
///
/// # Errors
/// `f`'s error; creating the view fails only for lack of memory.
pub fn with_view<'py, T>(
    py: Python<'py>,
    data: &[u8],
    f: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<T>,
) -> (PyResult<T>, bool) {
    let Ok(len) = ffi::Py_ssize_t::try_from(data.len()) else {
        return (
            Err(pyo3::exceptions::PyOverflowError::new_err(
                "buffer too large",
            )),
            true,
        );
    };
    // SAFETY: the view reads `len` bytes at `data`'s address, which the caller keeps alive and
    // unchanged until the view is released below, or, if that fails, for good (see above). It
    // is created read-only (PyBUF_READ), so nothing writes through it.
    let ptr = unsafe {
        ffi::PyMemoryView_FromMemory(data.as_ptr().cast_mut().cast(), len, ffi::PyBUF_READ)
    };
    // SAFETY: `ptr` is a new reference (or null with an exception set), owned from here on.
    let view = unsafe { Bound::from_owned_ptr_or_err(py, ptr) };
    let view = match view {
        Ok(v) => v,
        Err(e) => return (Err(e), true),
    };
    let out = f(&view);
    let released = view.call_method0("release").is_ok();
    (out, released)
}

/// Smallest writable out-of-band queue buffer received into a [`RecvBuffer`] (below it, the
/// allocator's recycled memory serves a `bytearray` as well).
pub const RECV_BUFFER_MIN: usize = 4 << 20;

/// Most freed [`RecvBuffer`] regions a process keeps, and most bytes they may hold together.
const POOL_REGIONS: usize = 4;
const POOL_BYTES: usize = 256 << 20;

/// Regions of dropped [`RecvBuffer`]s, oldest first, their pages lazily freed.
static POOL: Mutex<Vec<Mapping>> = Mutex::new(Vec::new());

/// A kept region of `len` to `2 * len` bytes, if there is one (and the pool is not busy).
fn pooled(len: usize) -> Option<Mapping> {
    let mut pool = POOL.try_lock().ok()?;
    let i = pool
        .iter()
        .position(|r| r.len() >= len && r.len() / 2 <= len)?;
    Some(pool.remove(i))
}

/// Keeps `region` for a later buffer (dropping the oldest beyond the pool's bounds), its pages
/// left to the kernel to take back if memory runs short; unmaps it if the pool is busy.
fn repool(region: Mapping) {
    let Ok(mut pool) = POOL.try_lock() else {
        return;
    };
    region.lazy_free();
    pool.push(region);
    while pool.len() > POOL_REGIONS || pool.iter().map(Mapping::len).sum::<usize>() > POOL_BYTES {
        pool.remove(0);
    }
}

/// The writable memory a large out-of-band buffer of a queue message is received into (an
/// extension: the stdlib gives a `bytearray`). It supports the buffer protocol, `len()`, and
/// pickles as a `bytearray`; numpy arrays and the like made from it use its memory directly.
///
/// Its memory is, where it can be, the queue's blob itself, mapped ([`RecvBuffer::leased`],
/// see `channel/ring/lease.rs`): the writer's copy in is then the only one. When the blob
/// cannot be mapped, the bytes are copied into private memory, kept from buffers dropped
/// before: a fresh `bytearray` of 64 MiB is a fresh mapping, and writing it costs a page
/// fault per 4 KiB page (on this project's test machine, about 35 ms of the 41 it takes to
/// fill one, against 6 ms for pages already mapped). Such a `RecvBuffer`'s memory is a private mapping that
/// goes back to a small per-process pool when the buffer is dropped, marked `MADV_FREE` (the
/// kernel takes the pages back only if it needs memory), so a process that receives large
/// arrays one after another fills the same pages each time.
#[pyclass(module = "ferroproc._ferroproc", name = "RecvBuffer", frozen)]
#[derive(Debug)]
pub struct RecvBuffer {
    region: Option<Region>,
    len: usize,
}

/// Where a [`RecvBuffer`]'s bytes are.
#[derive(Debug)]
enum Region {
    /// Private memory of this process, from the pool.
    Own(Mapping),
    /// The queue blob the message came in.
    Blob(Arc<BlobLease>),
}

impl Region {
    fn as_ptr(&self) -> *mut u8 {
        match self {
            Self::Own(m) => m.as_ptr(),
            Self::Blob(lease) => lease.data(),
        }
    }
}

impl RecvBuffer {
    /// A new buffer of `len` bytes, written by `fill` with the GIL released.
    ///
    /// # Errors
    /// `MemoryError` if no memory can be mapped; `fill`'s error (the region then goes back to
    /// the pool).
    pub fn new_filled<F>(py: Python<'_>, len: usize, fill: F) -> PyResult<Self>
    where
        F: FnOnce(&mut Unfilled) -> error::Result<()> + Send,
    {
        let region = match pooled(len) {
            Some(r) => r,
            None => Mapping::anonymous(len)
                .map_err(|_| pyo3::exceptions::PyMemoryError::new_err("cannot map a buffer"))?,
        };
        let Some(ptr) = NonNull::new(region.as_ptr()) else {
            return Err(pyo3::exceptions::PyMemoryError::new_err(
                "cannot map a buffer",
            ));
        };
        let mut dest = Unfilled { ptr, len };
        match py.detach(|| fill(&mut dest)) {
            Ok(()) => Ok(Self {
                region: Some(Region::Own(region)),
                len,
            }),
            Err(e) => {
                repool(region);
                Err(e.into())
            }
        }
    }
}

impl RecvBuffer {
    /// A buffer whose memory is the leased blob itself.
    pub(crate) fn leased(lease: Arc<BlobLease>) -> Self {
        let len = lease.len();
        Self {
            region: Some(Region::Blob(lease)),
            len,
        }
    }
}

impl Drop for RecvBuffer {
    fn drop(&mut self) {
        match self.region.take() {
            Some(Region::Own(region)) => repool(region),
            Some(Region::Blob(lease)) => lease.end(),
            None => {}
        }
    }
}

#[pymethods]
impl RecvBuffer {
    /// # Safety
    /// Called by Python's buffer protocol with a view to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        let Some(region) = this.region.as_ref() else {
            return Err(pyo3::exceptions::PyBufferError::new_err(
                "buffer is released",
            ));
        };
        let len = ffi::Py_ssize_t::try_from(this.len)
            .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("buffer too large"))?;
        // SAFETY: `view` is the caller's Py_buffer to fill (the buffer protocol's contract).
        // The region holds `len` bytes from `as_ptr` and stays mapped while the view lives: the
        // view takes a reference to `slf` (FillInfo sets `view.obj`), and the region is only
        // unmapped or reused when this object is dropped (a blob region is this process's
        // alone until then: its lease keeps the blob from being reused, and turns it into this
        // process's own memory, in place, before a fork). The memory is plain bytes, writable.
        let r = unsafe {
            ffi::PyBuffer_FillInfo(view, slf.as_ptr(), region.as_ptr().cast(), len, 0, flags)
        };
        if r == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        format!("<ferroproc RecvBuffer of {} bytes>", self.len)
    }

    /// Pickles as a `bytearray` of the same bytes.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let data = PyBytes::new(py, &[]).call_method1("join", ((slf,),))?;
        PyTuple::new(
            py,
            [
                py.get_type::<PyByteArray>().into_any(),
                PyTuple::new(py, [data])?.into_any(),
            ],
        )
    }
}
