//! Pickle protocol 5 out-of-band buffers for queue messages (an extension).
//!
//! The queue's reusable pickler runs with protocol 5 and a [`Collector`] as its
//! `buffer_callback`: a C-contiguous buffer of at least [`OOB_MIN`] bytes (a numpy array, a
//! `PickleBuffer`) is left out of the pickle. A top-level `bytes` object too large for one ring
//! frame is sent the same way, as a one-buffer message (smaller ones are cheaper in the ring). Each such buffer is written once, positionally and
//! with the GIL released, from the object's own memory into a blob of the queue's memfd (see
//! `channel/ring/blob.rs`); the message itself is a small [`bundle`] naming the blobs.
//!
//! The reader maps each blob (no copy) and hands `pickle.loads(..., buffers=...)` a writable
//! `memoryview` of the mapping, so a numpy array arrives with one copy in all. The blob is
//! freed when the last view of the mapping goes (a `weakref.finalize` on the `mmap`). A `bytes`
//! comes back as `bytes`: it is read into a new object and freed at once.
//!
//! After a fork, the child shares the parent's mappings rather than holding a copy, so a blob
//! mapped before any fork (in either process) is not freed by its finalizer: it stays until
//! the queue's memory goes with its last handle.

use std::os::fd::OwnedFd;
use std::sync::Mutex;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{IntoPyDict, PyBytes, PyDict, PyList};

use crate::channel::bundle::{self, Piece};
use crate::channel::pybuf::ExportedBytes;
use crate::channel::ring::RingBuffer;
use crate::sys::{fd, futex, memfile};

/// Smallest buffer the pickler's callback sends out-of-band (below it, copies through the
/// ring's warm memory cost less than mapping fresh pages).
pub(crate) const OOB_MIN: usize = 1 << 20;

/// The pickle of "the next out-of-band buffer, as is" (PROTO 5, NEXT_BUFFER, STOP): what a
/// top-level `bytes` sent out-of-band is pickled as.
pub(crate) const NEXT_BUFFER_PICKLE: &[u8] = b"\x80\x05\x97.";

/// A pickler's `buffer_callback`: keeps large contiguous buffers for out-of-band sending.
#[pyclass(module = "ferroproc._ferroproc", name = "_OobCollector", frozen)]
pub(crate) struct Collector {
    bufs: Mutex<Vec<Py<PyAny>>>,
}

#[pymethods]
impl Collector {
    /// `False` (out-of-band) for a buffer kept, `True` (in-band) otherwise.
    fn __call__(&self, pb: &Bound<'_, PyAny>) -> bool {
        let Ok(buf) = PyUntypedBuffer::get(pb) else {
            return true;
        };
        if buf.len_bytes() < OOB_MIN || !buf.is_c_contiguous() {
            return true;
        }
        match self.bufs.lock() {
            Ok(mut bufs) => {
                bufs.push(pb.clone().unbind());
                false
            }
            Err(_) => true,
        }
    }
}

impl Collector {
    pub(crate) fn new() -> Self {
        Self {
            bufs: Mutex::new(Vec::new()),
        }
    }

    /// The buffers kept since the last call.
    pub(crate) fn take(&self) -> Vec<Py<PyAny>> {
        self.bufs
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default()
    }
}

/// Buffers written to blobs, and the bundle header that names them.
pub(crate) struct Bundle {
    header: Vec<u8>,
    pieces: Vec<Piece>,
}

impl Bundle {
    /// Writes each of `bufs` to a new blob of `ring`; `readonly` says how they come back.
    /// `pickle_len` is the length of the pickle that will follow the header.
    pub(crate) fn write(
        py: Python<'_>,
        ring: &RingBuffer,
        pickle_len: usize,
        bufs: &[Py<PyAny>],
        readonly: bool,
    ) -> PyResult<Self> {
        let mut bundle = Self {
            header: Vec::new(),
            pieces: Vec::with_capacity(bufs.len()),
        };
        for b in bufs {
            let view =
                ExportedBytes::new(PyUntypedBuffer::get(b.bind(py))?, false).map_err(|_| {
                    pyo3::exceptions::PyBufferError::new_err("out-of-band buffer is not contiguous")
                })?;
            let data = view.as_slice();
            let written = ring.blob_alloc(data.len()).and_then(|at| {
                bundle.pieces.push(Piece {
                    len: data.len(),
                    readonly,
                    at,
                });
                py.detach(|| ring.blob_write(at, &[data]))
            });
            if let Err(e) = written {
                bundle.discard(ring);
                return Err(e.into());
            }
        }
        bundle.header = bundle::header(pickle_len, &bundle.pieces);
        Ok(bundle)
    }

    /// The message: the header, then the pickle's pieces.
    pub(crate) fn slices<'a>(&'a self, pickle: &[&'a [u8]]) -> Vec<&'a [u8]> {
        let mut out = Vec::with_capacity(1 + pickle.len());
        out.push(self.header.as_slice());
        out.extend_from_slice(pickle);
        out
    }

    /// Frees the blobs of a message that was not published.
    pub(crate) fn discard(&self, ring: &RingBuffer) {
        for p in &self.pieces {
            ring.blob_free(p.at, p.len);
        }
    }
}

/// Frees a mapped blob once its last view is gone: the `weakref.finalize` callback.
#[pyclass(module = "ferroproc._ferroproc", name = "_BlobFreer", frozen)]
pub(crate) struct Freer {
    fd: OwnedFd,
}

#[pymethods]
impl Freer {
    /// Frees the blob of `len` bytes at `at`, mapped when [`futex::forks`] was `forks`.
    fn __call__(&self, at: u64, len: usize, forks: u32) {
        if forks == futex::forks() {
            memfile::punch_hole(
                std::os::fd::AsFd::as_fd(&self.fd),
                RingBuffer::blob_offset(at),
                (len as u64).next_multiple_of(4096),
            );
        }
    }
}

impl Freer {
    pub(crate) fn new(ring: &RingBuffer) -> PyResult<Self> {
        Ok(Self {
            fd: fd::dup_cloexec(ring.fd())?,
        })
    }
}

struct Mmap {
    mmap: Py<PyAny>,
    finalize: Py<PyAny>,
    kwargs: Py<PyDict>,
}

static MMAP: PyOnceLock<Mmap> = PyOnceLock::new();

fn mmap_globals(py: Python<'_>) -> PyResult<&Mmap> {
    MMAP.get_or_try_init(py, || {
        let m = py.import("mmap")?;
        let flags = m.getattr("MAP_SHARED")?.extract::<i64>()?
            | m.getattr("MAP_POPULATE")?.extract::<i64>()?;
        let prot = m.getattr("PROT_READ")?.extract::<i64>()?
            | m.getattr("PROT_WRITE")?.extract::<i64>()?;
        Ok::<_, PyErr>(Mmap {
            mmap: m.getattr("mmap")?.unbind(),
            finalize: py.import("weakref")?.getattr("finalize")?.unbind(),
            kwargs: [("flags", flags), ("prot", prot)]
                .into_py_dict(py)?
                .unbind(),
        })
    })
}

/// A writable view of the blob `piece`, mapped from `ring`'s memfd, freed by `freer` when the
/// mapping goes.
fn map_blob<'py>(
    py: Python<'py>,
    ring: &RingBuffer,
    freer: &Bound<'py, Freer>,
    piece: Piece,
) -> PyResult<Bound<'py, PyAny>> {
    let g = mmap_globals(py)?;
    let kwargs = g.kwargs.bind(py).copy()?;
    kwargs.set_item("offset", RingBuffer::blob_offset(piece.at))?;
    let span = (piece.len as u64).next_multiple_of(4096);
    let raw_fd = std::os::fd::AsRawFd::as_raw_fd(&ring.fd());
    let m = g.mmap.bind(py).call((raw_fd, span), Some(&kwargs))?;
    g.finalize
        .bind(py)
        .call1((&m, freer, piece.at, piece.len, futex::forks()))?;
    let view = py.get_type::<pyo3::types::PyMemoryView>().call1((&m,))?;
    view.get_item(pyo3::types::PySlice::new(py, 0, piece.len as isize, 1))
}

/// Loads a bundle: takes its buffers out of `ring`'s blobs, then `loads(pickle, buffers=...)`.
pub(crate) fn load<'py>(
    py: Python<'py>,
    ring: &RingBuffer,
    freer: &Bound<'py, Freer>,
    loads: &Bound<'py, PyAny>,
    msg: &[u8],
) -> PyResult<Bound<'py, PyAny>> {
    let layout = bundle::parse(msg)?;
    let bufs = PyList::empty(py);
    let mut pieces = layout.pieces.iter();
    let taken: PyResult<()> = pieces.by_ref().try_for_each(|&piece| {
        let buf = if piece.readonly {
            let b = PyBytes::new_with(py, piece.len, |b| Ok(ring.blob_read(piece.at, b)?));
            ring.blob_free(piece.at, piece.len);
            b?.into_any()
        } else {
            map_blob(py, ring, freer, piece).inspect_err(|_| ring.blob_free(piece.at, piece.len))?
        };
        bufs.append(buf)
    });
    if let Err(e) = taken {
        // Free the pieces after the failed one: nobody will read them.
        for p in pieces {
            ring.blob_free(p.at, p.len);
        }
        return Err(e);
    }
    let kwargs = PyDict::new(py);
    kwargs.set_item("buffers", bufs)?;
    loads.call((PyBytes::new(py, &msg[layout.pickle_at..]),), Some(&kwargs))
}
