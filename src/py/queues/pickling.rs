//! How queue messages are pickled and unpickled: the native subset ([`tinypickle`]), the
//! reusable `ForkingPickler` with its out-of-band buffer callback, bundles ([`oob`]), and the
//! fresh pickler used when the reusable one is busy.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{IntoPyDict, PyByteArray, PyBytes, PyDict, PyList};

use super::Core;
use crate::channel::bundle;
use crate::channel::ring::RingBuffer;
use crate::py::{oob, tinypickle};

pub(super) struct Globals {
    bytesio: Py<PyAny>,
    namespace: Py<PyAny>,
    pickler: Py<PyAny>,
    loads: Py<PyAny>,
    buffer_pickler: Py<PyAny>,
    copyreg_table: Py<PyDict>,
    our_extras: Py<PyDict>,
    sys_modules: Py<PyDict>,
}

pub(super) static GLOBALS: PyOnceLock<Globals> = PyOnceLock::new();
pub(super) static STD_EXTRAS: PyOnceLock<Py<PyDict>> = PyOnceLock::new();

pub(super) fn globals(py: Python<'_>) -> PyResult<&Globals> {
    GLOBALS.get_or_try_init(py, || {
        let reduction = py.import("ferroproc.reduction")?;
        let pickler = reduction.getattr("ForkingPickler")?;
        let our_extras = pickler.getattr("_extra_reducers")?.cast_into::<PyDict>()?;
        Ok::<_, PyErr>(Globals {
            bytesio: py.import("io")?.getattr("BytesIO")?.unbind(),
            namespace: py.import("types")?.getattr("SimpleNamespace")?.unbind(),
            loads: py.import("_pickle")?.getattr("loads")?.unbind(),
            buffer_pickler: reduction.getattr("_BufferPickler")?.unbind(),
            copyreg_table: py
                .import("copyreg")?
                .getattr("dispatch_table")?
                .cast_into::<PyDict>()?
                .unbind(),
            sys_modules: py
                .import("sys")?
                .getattr("modules")?
                .cast_into::<PyDict>()?
                .unbind(),
            pickler: pickler.unbind(),
            our_extras: our_extras.unbind(),
        })
    })
}

/// The sizes of the tables a `ForkingPickler`'s dispatch table is merged from: when they
/// change, a registration happened and the reusable pickler is rebuilt.
pub(super) fn reducer_signature(py: Python<'_>, g: &Globals) -> PyResult<(usize, usize, usize)> {
    let std_len = match STD_EXTRAS.get(py) {
        Some(d) => d.bind(py).len(),
        None => match g
            .sys_modules
            .bind(py)
            .get_item("multiprocessing.reduction")?
        {
            Some(m) => {
                let d = m
                    .getattr("ForkingPickler")?
                    .getattr("_extra_reducers")?
                    .cast_into::<PyDict>()?;
                let n = d.len();
                let _ = STD_EXTRAS.set(py, d.unbind());
                n
            }
            None => usize::MAX,
        },
    };
    Ok((
        g.copyreg_table.bind(py).len(),
        g.our_extras.bind(py).len(),
        std_len,
    ))
}

/// A `ForkingPickler` reused message after message. Its file is a namespace whose `write` is
/// `list.append`: the C pickler hands over its whole output buffer at the end of `dump` (one
/// `bytes` for a small object), so no `BytesIO` is involved.
pub(super) struct Pickler {
    dump: Py<PyAny>,
    clear_memo: Py<PyAny>,
    chunks: Py<PyList>,
    collector: Py<oob::Collector>,
    signature: (usize, usize, usize),
}

impl Pickler {
    /// With `oob`, buffers that qualify go out-of-band (see [`oob::Collector`]).
    fn new(
        py: Python<'_>,
        g: &Globals,
        signature: (usize, usize, usize),
        oob: bool,
    ) -> PyResult<Self> {
        let chunks = PyList::empty(py);
        let sink = g.namespace.bind(py).call(
            (),
            Some(&[("write", chunks.getattr("append")?)].into_py_dict(py)?),
        )?;
        let collector = Py::new(py, oob::Collector::new())?;
        // `ForkingPickler.__init__` takes positional arguments only, as the stdlib's does;
        // `_BufferPickler` is the same pickler at protocol 5 with a `buffer_callback`.
        let p = if oob {
            g.buffer_pickler
                .bind(py)
                .call1((&sink, collector.bind(py)))?
        } else {
            g.pickler.bind(py).call1((&sink, 5))?
        };
        Ok(Self {
            dump: p.getattr("dump")?.unbind(),
            clear_memo: p.getattr("clear_memo")?.unbind(),
            chunks: chunks.unbind(),
            collector,
            signature,
        })
    }

    /// Pickles `obj`; returns the pickle as the pieces the pickler wrote (one `bytes` for a
    /// small object; a large `bytes` payload is passed through as is, not copied), with the
    /// out-of-band buffers when there are any.
    pub(super) fn dumps<'py>(
        &self,
        py: Python<'py>,
        obj: &Bound<'py, PyAny>,
    ) -> PyResult<Pickle<'py>> {
        let chunks = self.chunks.bind(py);
        let res = self.dump.bind(py).call1((obj,)).and_then(|_| {
            let mut parts = Vec::with_capacity(chunks.len());
            for item in chunks.iter() {
                parts.push(match item.cast_into::<PyBytes>() {
                    Ok(b) => b,
                    Err(e) => {
                        let any = e.into_inner();
                        py.get_type::<PyBytes>()
                            .call1((any,))?
                            .cast_into::<PyBytes>()?
                    }
                });
            }
            Ok(parts)
        });
        chunks.del_slice(0, chunks.len())?;
        self.clear_memo.bind(py).call0()?;
        let bufs = self.collector.get().take();
        Ok((res?, bufs))
    }
}

/// A pickle as consecutive pieces.
pub(super) type Parts<'py> = Vec<Bound<'py, PyBytes>>;

/// A pickle and the buffers its pickler left out-of-band.
pub(super) type Pickle<'py> = (Parts<'py>, Vec<Py<PyAny>>);

pub(super) fn slices<'a>(parts: &'a [Bound<'_, PyBytes>]) -> Vec<&'a [u8]> {
    parts.iter().map(|b| b.as_bytes()).collect()
}

/// One message ready to write: natively encoded (see [`tinypickle`]), pickled, or pickled
/// with out-of-band buffers (see [`oob`]).
pub(super) enum Pickled<'py> {
    Native(Vec<u8>),
    Parts(Parts<'py>),
    Oob(Parts<'py>, oob::Bundle),
}

impl Pickled<'_> {
    pub(super) fn slices(&self) -> Vec<&[u8]> {
        match self {
            Pickled::Native(v) => vec![v.as_slice()],
            Pickled::Parts(p) => slices(p),
            Pickled::Oob(p, bundle) => bundle.slices(&slices(p)),
        }
    }

    /// Frees what a message that was not published holds outside the ring.
    pub(super) fn discard(&self, ring: &RingBuffer) {
        if let Pickled::Oob(_, bundle) = self {
            bundle.discard(ring);
        }
    }
}

/// A message as read: already an object (natively decoded), or a pickle (or bundle) to load.
pub(super) enum Msg<'py> {
    Obj(Bound<'py, PyAny>),
    Pickle(Bound<'py, PyBytes>),
}

impl Msg<'_> {
    /// Frees what a message that will not be loaded holds outside the ring.
    pub(super) fn discard(&self, ring: &RingBuffer) {
        if let Msg::Pickle(b) = self {
            if bundle::is_bundle(b.as_bytes()) {
                oob::discard(ring, b.as_bytes());
            }
        }
    }
}

/// Longest message the reader tries to decode natively (the fast path's messages are small).
pub(super) const NATIVE_READ_MAX: usize = 512;

pub(super) fn fresh_dumps<'py>(
    py: Python<'py>,
    g: &Globals,
    obj: &Bound<'py, PyAny>,
) -> PyResult<Parts<'py>> {
    let file = g.bytesio.bind(py).call0()?;
    // Protocol 5 as the reusable pickler, so a message does not change with which one is used
    // (a read-only buffer stays read-only, a `PickleBuffer` pickles).
    g.pickler
        .bind(py)
        .call1((&file, 5))?
        .call_method1("dump", (obj,))?;
    Ok(vec![file
        .call_method0("getvalue")?
        .cast_into::<PyBytes>()?])
}

pub(super) fn loads<'py>(
    py: Python<'py>,
    data: Bound<'py, PyBytes>,
) -> PyResult<Bound<'py, PyAny>> {
    let g = globals(py)?;
    g.loads.bind(py).call1((data,))
}

impl Core {
    pub(super) fn dumps<'py>(
        &self,
        py: Python<'py>,
        obj: &Bound<'py, PyAny>,
    ) -> PyResult<Pickled<'py>> {
        let mut native = Vec::with_capacity(32);
        if tinypickle::encode(obj, &mut native) {
            return Ok(Pickled::Native(native));
        }
        // A top-level `bytes` or `bytearray` goes as one out-of-band buffer: in the pickle it
        // would be copied into the pickler's output, into the ring, out into a scratch buffer
        // and again into the new object.
        let whole = if obj.is_exact_instance_of::<PyBytes>() {
            Some(oob::NEXT_BUFFER_PICKLE)
        } else if obj.is_exact_instance_of::<PyByteArray>() {
            Some(oob::BYTEARRAY_PICKLE)
        } else {
            None
        };
        if let Some(pickle) = whole.filter(|_| self.ring.blobs_usable()) {
            let len = obj.len()?;
            if len >= oob::OOB_MIN || len > self.ring.max_whole() {
                let buf = [obj.clone().unbind()];
                let bundle = oob::Bundle::write(py, &self.ring, pickle.len(), &buf)?;
                return Ok(Pickled::Oob(vec![PyBytes::new(py, pickle)], bundle));
            }
        }
        let (parts, bufs) = self.dumps_parts(py, obj)?;
        if !bufs.is_empty() {
            let len = parts.iter().map(|b| b.as_bytes().len()).sum();
            let bundle = oob::Bundle::write(py, &self.ring, len, &bufs)?;
            return Ok(Pickled::Oob(parts, bundle));
        }
        let total: usize = parts.iter().map(|b| b.as_bytes().len()).sum();
        if total >= oob::OOB_MIN && self.ring.blobs_usable() {
            let bundle = oob::Bundle::write_pickle(py, &self.ring, &slices(&parts))?;
            let pickle = PyBytes::new(py, oob::PICKLE_IN_BLOB);
            return Ok(Pickled::Oob(vec![pickle], bundle));
        }
        if parts.len() > 1 && total > self.ring.max_whole() {
            // Too big for one frame: it may be streamed, which needs one contiguous buffer.
            let joined = PyBytes::new(py, &[]).call_method1("join", (parts,))?;
            return Ok(Pickled::Parts(vec![joined.cast_into::<PyBytes>()?]));
        }
        Ok(Pickled::Parts(parts))
    }

    pub(super) fn dumps_parts<'py>(
        &self,
        py: Python<'py>,
        obj: &Bound<'py, PyAny>,
    ) -> PyResult<Pickle<'py>> {
        let g = globals(py)?;
        let Ok(mut slot) = self.pickler.try_lock() else {
            return Ok((fresh_dumps(py, g, obj)?, Vec::new()));
        };
        let sig = reducer_signature(py, g)?;
        if !matches!(slot.as_ref(), Some(p) if p.signature == sig) {
            *slot = Some(Pickler::new(py, g, sig, self.ring.blobs_usable())?);
        }
        let res = slot.as_ref().map(|p| p.dumps(py, obj));
        match res {
            Some(Ok(b)) => Ok(b),
            Some(Err(e)) => {
                // The pickler's memo may hold a partial message: start afresh next time.
                *slot = None;
                Err(e)
            }
            None => Ok((fresh_dumps(py, g, obj)?, Vec::new())),
        }
    }

    /// The object a message stands for.
    pub(super) fn load<'py>(&self, py: Python<'py>, m: Msg<'py>) -> PyResult<Bound<'py, PyAny>> {
        match m {
            Msg::Obj(o) => Ok(o),
            Msg::Pickle(b) if bundle::is_bundle(b.as_bytes()) => {
                let loads = globals(py)?.loads.bind(py);
                oob::load(py, &self.ring, loads, b.as_bytes())
            }
            Msg::Pickle(b) => loads(py, b),
        }
    }
}
