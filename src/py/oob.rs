//! Pickle protocol 5 out-of-band buffers for queue messages (an extension).
//!
//! The queue's reusable pickler runs with protocol 5 and a [`Collector`] as its
//! `buffer_callback`: a C-contiguous buffer of at least [`OOB_MIN`] bytes (a numpy array, a
//! `PickleBuffer`) is left out of the pickle. A top-level `bytes` object of that size, or too
//! large for one ring frame, is sent the same way, as a one-buffer message: through the ring it
//! would be copied into the ring, out into a scratch buffer and again into the new object.
//! Each such buffer is written once, with the GIL released, from the object's own memory into
//! a blob of the queue's memfd (see `channel/ring/blob.rs`); the message itself is a small
//! [`bundle`] naming the blobs.
//!
//! The reader copies each blob, again with the GIL released, straight into the new, unzeroed
//! object that `pickle.loads(..., buffers=...)` hands to the reconstructor, and frees the blob
//! at once (to the queue's spares, for the next large message): `bytes` for a read-only buffer
//! (what unpickling the same buffer in-band gives), a `bytearray` for a writable one, or for a
//! writable one of [`RECV_BUFFER_MIN`] bytes or more a [`RecvBuffer`], whose memory is reused
//! from buffers this process dropped (see there). One copy on each side, against the stdlib's
//! half-dozen, and the received object is ordinary private memory (fork, copy-on-write and
//! lifetime as for any other object).

use std::sync::Mutex;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::channel::bundle::{self, Piece};
use crate::channel::pybuf::{self, ExportedBytes, RecvBuffer, RECV_BUFFER_MIN};
use crate::channel::ring::RingBuffer;

/// Smallest buffer the pickler's callback sends out-of-band (below it, copies through the
/// ring's warm memory cost less than positional I/O on fresh pages).
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
    /// Writes each of `bufs` to a new blob of `ring`. `pickle_len` is the length of the pickle
    /// that will follow the header. On error, nothing stays allocated.
    pub(crate) fn write(
        py: Python<'_>,
        ring: &RingBuffer,
        pickle_len: usize,
        bufs: &[Py<PyAny>],
    ) -> PyResult<Self> {
        let mut bundle = Self {
            header: Vec::new(),
            pieces: Vec::with_capacity(bufs.len()),
        };
        if let Err(e) = bufs.iter().try_for_each(|b| bundle.write_one(py, ring, b)) {
            bundle.discard(ring);
            return Err(e);
        }
        bundle.header = bundle::header(pickle_len, &bundle.pieces);
        Ok(bundle)
    }

    fn write_one(&mut self, py: Python<'_>, ring: &RingBuffer, buf: &Py<PyAny>) -> PyResult<()> {
        let raw = PyUntypedBuffer::get(buf.bind(py))?;
        // A read-only buffer comes back as `bytes`, a writable one as `bytearray`: what
        // unpickling the same buffer in-band gives.
        let readonly = raw.readonly();
        let view = ExportedBytes::new(raw, false).map_err(|_| {
            pyo3::exceptions::PyBufferError::new_err("out-of-band buffer is not contiguous")
        })?;
        let data = view.as_slice();
        // Without the GIL: allocating may wait for a reader (in this process too) to free a
        // blob.
        let blob = py.detach(|| {
            let blob = ring.blob_alloc(data.len())?;
            if let Err(e) = ring.blob_write(blob, &[data]) {
                ring.blob_free(blob.at, data.len());
                return Err(e);
            }
            Ok::<_, crate::error::Error>(blob)
        })?;
        self.pieces.push(Piece {
            len: data.len(),
            readonly,
            at: blob.at,
            reused: blob.reused,
        });
        Ok(())
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

/// A new `bytes` (read-only piece), `bytearray`, or for a large writable piece a
/// [`RecvBuffer`], holding the blob `piece`, read with the GIL released straight into the new
/// object's unzeroed memory.
fn take_blob<'py>(py: Python<'py>, ring: &RingBuffer, piece: Piece) -> PyResult<Bound<'py, PyAny>> {
    let fill = |dest: &mut pybuf::Unfilled| ring.blob_read_into(piece.blob(), dest);
    if !piece.readonly && piece.len >= RECV_BUFFER_MIN {
        let buf = RecvBuffer::new_filled(py, piece.len, fill)?;
        return Ok(Bound::new(py, buf)?.into_any());
    }
    pybuf::new_filled(py, piece.len, piece.readonly, fill)
}

/// Frees the blobs of a bundle that will not be loaded (its message was dropped).
pub(crate) fn discard(ring: &RingBuffer, msg: &[u8]) {
    if let Ok(layout) = bundle::parse(msg) {
        for p in layout.pieces {
            ring.blob_free(p.at, p.len);
        }
    }
}

/// Loads a bundle: takes its buffers out of `ring`'s blobs (freeing them), then
/// `loads(pickle, buffers=...)`.
pub(crate) fn load<'py>(
    py: Python<'py>,
    ring: &RingBuffer,
    loads: &Bound<'py, PyAny>,
    msg: &[u8],
) -> PyResult<Bound<'py, PyAny>> {
    let layout = bundle::parse(msg)?;
    let bufs = PyList::empty(py);
    let mut taken = Ok(());
    for &piece in &layout.pieces {
        // Every blob is freed, also after a failure: the message is consumed either way.
        if taken.is_ok() {
            taken = take_blob(py, ring, piece).and_then(|b| bufs.append(b));
        }
        ring.blob_free(piece.at, piece.len);
    }
    taken?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("buffers", bufs)?;
    loads.call((PyBytes::new(py, &msg[layout.pickle_at..]),), Some(&kwargs))
}
