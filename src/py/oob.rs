//! Pickle protocol 5 out-of-band buffers for queue messages (an extension).
//!
//! The queue's reusable pickler runs with protocol 5 and a [`Collector`] as its
//! `buffer_callback`: a C-contiguous buffer of at least [`OOB_MIN`] bytes (a numpy array, a
//! `PickleBuffer`) is left out of the pickle. A top-level `bytes` or `bytearray` object of that
//! size, or too large for one ring frame, is sent the same way, as a one-buffer message:
//! through the ring it would be copied into the ring, out into a scratch buffer and again into
//! the new object. A pickle of that size with no such buffer is itself sent as a one-buffer
//! message ([`Bundle::write_pickle`]), and loaded from a view of its blob.
//! Each such buffer is written once, with the GIL released, from the object's own memory into
//! a blob of the queue's memfd (see `channel/ring/blob.rs`); the message itself is a small
//! [`bundle`] naming the blobs.
//!
//! The reader takes a writable buffer of [`RECV_BUFFER_MIN`] bytes or more (a large numpy
//! array's data) as it is: the blob, mapped, becomes a [`RecvBuffer`] that
//! `pickle.loads(..., buffers=...)` hands to the reconstructor (numpy wraps it), and the blob
//! is freed when that is dropped; `channel/ring/lease.rs` says how it stays private memory
//! across a fork. The writer's copy in is the only copy. Any other buffer is copied, again
//! with the GIL released, straight into the new, unzeroed object handed to the reconstructor,
//! and its blob is freed at once (to the queue's spares, for the next large message): `bytes`
//! for a read-only buffer (what unpickling the same buffer in-band gives), a `bytearray` for
//! a writable one (a [`RecvBuffer`] of this process's memory if a large one's blob cannot be
//! mapped). One copy on each side there, against the stdlib's half-dozen.

use std::sync::{Arc, Mutex};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::channel::bundle::{self, Piece};
use crate::channel::pybuf::{self, ExportedBytes, RecvBuffer, RECV_BUFFER_MIN};
use crate::channel::ring::{fork_hooks, BlobLease, RingBuffer};

/// Smallest buffer the pickler's callback sends out-of-band (below it, copies through the
/// ring's warm memory cost less than positional I/O on fresh pages).
pub(crate) const OOB_MIN: usize = 1 << 20;

/// The pickle of "the next out-of-band buffer, as is" (PROTO 5, NEXT_BUFFER, STOP): what a
/// top-level `bytes` sent out-of-band is pickled as.
pub(crate) const NEXT_BUFFER_PICKLE: &[u8] = b"\x80\x05\x97.";

/// The pickle of "a `bytearray` of the next out-of-band buffer" (PROTO 5, the global
/// `builtins.bytearray`, NEXT_BUFFER, TUPLE1, REDUCE, STOP): what a top-level `bytearray`
/// sent out-of-band is pickled as. [`load`] fills the new `bytearray` straight from the blob
/// instead of running it.
pub(crate) const BYTEARRAY_PICKLE: &[u8] =
    b"\x80\x05\x8c\x08builtins\x8c\x09bytearray\x93\x97\x85R.";

/// The pickle of "unpickle the next out-of-band buffer" (PROTO 5, the global `_pickle.loads`,
/// NEXT_BUFFER, TUPLE1, REDUCE, STOP): the message of a large pickle sent as a blob
/// ([`Bundle::write_pickle`]). [`load`] loads the blob where it lies instead of running it.
pub(crate) const PICKLE_IN_BLOB: &[u8] = b"\x80\x05\x8c\x07_pickle\x8c\x05loads\x93\x97\x85R.";

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
        self.write_piece(py, ring, &[view.as_slice()], readonly)
    }

    /// Writes `parts`, concatenated, to a new blob of `ring` as one more buffer.
    fn write_piece(
        &mut self,
        py: Python<'_>,
        ring: &RingBuffer,
        parts: &[&[u8]],
        readonly: bool,
    ) -> PyResult<()> {
        let len = parts.iter().map(|p| p.len()).sum();
        // Without the GIL: allocating may wait for a reader (in this process too) to free a
        // blob.
        let blob = py.detach(|| {
            let blob = ring.blob_alloc(len)?;
            if let Err(e) = ring.blob_write(blob, parts) {
                ring.blob_free(blob.at, len);
                return Err(e);
            }
            Ok::<_, crate::error::Error>(blob)
        })?;
        self.pieces.push(Piece {
            len,
            readonly,
            at: blob.at,
            reused: blob.reused,
        });
        Ok(())
    }

    /// Writes a large pickle (`parts`, concatenated) to a new blob of `ring`, as the one
    /// buffer of a message whose own pickle is [`PICKLE_IN_BLOB`]: through the ring it would
    /// be joined, written to the overflow log's fresh pages and read out into a scratch buffer
    /// before being loaded; from a blob it is loaded where it lies (see [`load`]).
    pub(crate) fn write_pickle(
        py: Python<'_>,
        ring: &RingBuffer,
        parts: &[&[u8]],
    ) -> PyResult<Self> {
        let mut bundle = Self {
            header: Vec::new(),
            pieces: Vec::with_capacity(1),
        };
        bundle.write_piece(py, ring, parts, false)?;
        bundle.header = bundle::header(PICKLE_IN_BLOB.len(), &bundle.pieces);
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

/// For a large writable piece, a [`RecvBuffer`] holding the blob itself (see
/// [`lease_blob`]); otherwise a new `bytes` (read-only piece), `bytearray`, or [`RecvBuffer`]
/// of this process's memory, read with the GIL released straight into the new object's
/// unzeroed memory. The second value is whether the blob was taken, also when making the
/// object then failed (it was freed with it); otherwise the caller frees it.
fn take_blob<'py>(
    py: Python<'py>,
    ring: &Arc<RingBuffer>,
    piece: Piece,
) -> (PyResult<Bound<'py, PyAny>>, bool) {
    let large = !piece.readonly && piece.len >= RECV_BUFFER_MIN;
    if large {
        if let Some(lease) = lease_blob(py, ring, piece) {
            let buf = Bound::new(py, RecvBuffer::leased(lease)).map(Bound::into_any);
            return (buf, true);
        }
    }
    let fill = |dest: &mut pybuf::Unfilled| ring.blob_read_into(piece.blob(), dest);
    if large {
        let buf = RecvBuffer::new_filled(py, piece.len, fill)
            .and_then(|b| Bound::new(py, b))
            .map(Bound::into_any);
        return (buf, false);
    }
    (
        pybuf::new_filled(py, piece.len, piece.readonly, fill),
        false,
    )
}

/// Leases the blob of `piece` to this process (see `channel/ring/lease.rs`), once the fork
/// hook that detaches leased blobs before a fork is registered; `None` if they cannot be,
/// or the blob cannot be mapped.
fn lease_blob(py: Python<'_>, ring: &Arc<RingBuffer>, piece: Piece) -> Option<Arc<BlobLease>> {
    static HOOKS: PyOnceLock<bool> = PyOnceLock::new();
    let ready = *HOOKS.get_or_init(py, || register_fork_hooks(py).is_ok());
    ready
        .then(|| BlobLease::take(ring, piece.at, piece.len))
        .flatten()
}

fn register_fork_hooks(py: Python<'_>) -> PyResult<()> {
    let kwargs = PyDict::new(py);
    kwargs.set_item("before", wrap_pyfunction!(lease_before_fork, py)?)?;
    let after = wrap_pyfunction!(lease_after_fork, py)?;
    kwargs.set_item("after_in_parent", &after)?;
    kwargs.set_item("after_in_child", after)?;
    py.import("os")?
        .call_method("register_at_fork", (), Some(&kwargs))?;
    Ok(())
}

#[pyfunction]
fn lease_before_fork() {
    fork_hooks::before_fork();
}

#[pyfunction]
fn lease_after_fork() {
    fork_hooks::after_fork();
}

/// Gives back the queue blobs this process holds for received buffers: called when a
/// ferroproc process has run its target and is about to exit, so that buffers it still
/// references (a global, say) do not keep queue memory for the processes that go on.
#[pyfunction]
pub(crate) fn _release_received_buffers() {
    fork_hooks::end_all();
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
    ring: &Arc<RingBuffer>,
    loads: &Bound<'py, PyAny>,
    msg: &[u8],
) -> PyResult<Bound<'py, PyAny>> {
    let layout = bundle::parse(msg)?;
    if let Some(piece) = whole_buffer(&layout, msg, BYTEARRAY_PICKLE) {
        let fill = |dest: &mut pybuf::Unfilled| ring.blob_read_into(piece.blob(), dest);
        let got = pybuf::new_filled(py, piece.len, false, fill);
        ring.blob_free(piece.at, piece.len);
        return got;
    }
    if let Some(piece) = whole_buffer(&layout, msg, PICKLE_IN_BLOB) {
        return load_in_blob(py, ring, loads, piece);
    }
    let bufs = PyList::empty(py);
    let mut taken = Ok(());
    for &piece in &layout.pieces {
        // Every blob is freed, also after a failure: the message is consumed either way.
        let mut leased = false;
        if taken.is_ok() {
            let (buf, kept) = take_blob(py, ring, piece);
            leased = kept;
            taken = buf.and_then(|b| bufs.append(b));
        }
        if !leased {
            ring.blob_free(piece.at, piece.len);
        }
    }
    taken?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("buffers", bufs)?;
    loads.call((PyBytes::new(py, &msg[layout.pickle_at..]),), Some(&kwargs))
}

/// Loads a pickle that lies in the blob of `piece`: from a view of the blob itself when it
/// can be leased (the unpickler copies what it keeps, so the view, and with it the blob, is
/// released when `loads` returns), or else from a copy; then frees the blob.
fn load_in_blob<'py>(
    py: Python<'py>,
    ring: &Arc<RingBuffer>,
    loads: &Bound<'py, PyAny>,
    piece: Piece,
) -> PyResult<Bound<'py, PyAny>> {
    if let Some(lease) = lease_blob(py, ring, piece) {
        let view = Bound::new(py, RecvBuffer::leased(lease))?;
        return loads.call1((view,));
    }
    loads.call1((read_pickle_blob(py, ring, piece)?,))
}

/// The blob of a bundle that carries a pickle in a blob ([`Bundle::write_pickle`]); `None`
/// for any other message.
pub(crate) fn pickle_blob(msg: &[u8]) -> Option<Piece> {
    whole_buffer(&bundle::parse(msg).ok()?, msg, PICKLE_IN_BLOB)
}

/// The one writable buffer of a bundle whose pickle is exactly `stub` (one of the pickles
/// that say what to make of a message that is a single buffer), if it is such a bundle.
fn whole_buffer(layout: &bundle::Layout, msg: &[u8], stub: &[u8]) -> Option<Piece> {
    match layout.pieces[..] {
        [piece] if !piece.readonly && &msg[layout.pickle_at..] == stub => Some(piece),
        _ => None,
    }
}

/// The pickle in the blob `piece` (see [`pickle_blob`]), read into a new `bytes`; the blob is
/// then freed.
pub(crate) fn read_pickle_blob<'py>(
    py: Python<'py>,
    ring: &RingBuffer,
    piece: Piece,
) -> PyResult<Bound<'py, PyBytes>> {
    let fill = |dest: &mut pybuf::Unfilled| ring.blob_read_into(piece.blob(), dest);
    let data = pybuf::new_filled(py, piece.len, true, fill);
    ring.blob_free(piece.at, piece.len);
    Ok(data?.cast_into::<PyBytes>()?)
}
