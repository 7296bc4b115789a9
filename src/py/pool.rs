//! A compact encoding of a pool batch's outcomes when every chunk succeeded with a list of
//! exact `int`s (each fitting 64 bits) or of exact `float`s: what `map` of a numeric
//! function returns. The pickler writes an `int` of 32 bits or more through a byte-array
//! conversion (`LONG1`) and the unpickler reads it back the same way; for a million results
//! that was about a fifth of the CPU a `map` used. Anything else keeps using the pickle.
//!
//! Layout: [`MAGIC`], the chunk count (u32 LE), then per chunk a tag (`b'i'` or `b'f'`), the
//! item count (u32 LE) and the items (i64 or f64 bits, LE). A pickle never starts with a zero
//! byte, so [`MAGIC`] tells the two apart.
//!
//! Also here: [`pool_worker_loop`], the loop a process pool's worker runs, and
//! [`PoolLedger`], the parent's record of the batches its workers hold
//! ([`crate::pool::Ledger`]).

use std::time::Instant;

use pyo3::exceptions::{PyEOFError, PyIndexError, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyList, PyTuple};

use super::queues::PyRingQueue;
use crate::pool::{Bid, Ledger, CREDIT, MAX_BATCH_ITEMS};

/// First bytes of a packed batch.
const MAGIC: &[u8] = b"\x00FPo1";
const INT: u8 = b'i';
const FLOAT: u8 = b'f';

/// Appends `list`'s items to `out` when they are all exact ints (i64) or all exact floats.
fn pack_list(list: &Bound<'_, PyList>, out: &mut Vec<u8>) -> Option<()> {
    let len = u32::try_from(list.len()).ok()?;
    let first = list.iter().next();
    let floats = first
        .as_ref()
        .is_some_and(|f| f.is_exact_instance_of::<PyFloat>());
    out.push(if floats { FLOAT } else { INT });
    out.extend_from_slice(&len.to_le_bytes());
    out.reserve(8 * list.len());
    for item in list.iter() {
        let bytes = if floats {
            item.cast_exact::<PyFloat>().ok()?.value().to_le_bytes()
        } else {
            if !item.is_exact_instance_of::<PyInt>() {
                return None;
            }
            item.extract::<i64>().ok()?.to_le_bytes()
        };
        out.extend_from_slice(&bytes);
    }
    Some(())
}

/// `outcomes` (a list of `(True, list)` pairs) packed, or `None` when it does not qualify.
#[pyfunction]
fn pool_pack_outcomes<'py>(
    py: Python<'py>,
    outcomes: &Bound<'py, PyAny>,
) -> Option<Bound<'py, PyBytes>> {
    let outcomes = outcomes.cast_exact::<PyList>().ok()?;
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&u32::try_from(outcomes.len()).ok()?.to_le_bytes());
    for outcome in outcomes.iter() {
        let pair = outcome.cast_exact::<PyTuple>().ok()?;
        if pair.len() != 2 {
            return None;
        }
        let ok = pair.get_item(0).ok()?;
        if !ok.cast_exact::<PyBool>().ok()?.is_true() {
            return None;
        }
        pack_list(
            pair.get_item(1).ok()?.cast_exact::<PyList>().ok()?,
            &mut out,
        )?;
    }
    Some(PyBytes::new(py, &out))
}

/// Whether `payload` is a packed batch (else it is a pickle).
#[pyfunction]
fn pool_is_packed(payload: &[u8]) -> bool {
    payload.starts_with(MAGIC)
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> PyResult<&'a [u8]> {
    if data.len() < n {
        return Err(PyValueError::new_err("truncated packed pool outcomes"));
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Ok(head)
}

fn take_u32(data: &mut &[u8]) -> PyResult<usize> {
    let b = take(data, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// The outcomes of a packed batch: a list of `(True, list)` pairs.
#[pyfunction]
fn pool_unpack_outcomes<'py>(py: Python<'py>, payload: &[u8]) -> PyResult<Bound<'py, PyList>> {
    let mut data = payload
        .strip_prefix(MAGIC)
        .ok_or_else(|| PyValueError::new_err("not packed pool outcomes"))?;
    let chunks = take_u32(&mut data)?;
    let out = PyList::empty(py);
    for _ in 0..chunks {
        let tag = take(&mut data, 1)?[0];
        let n = take_u32(&mut data)?;
        let raw = take(
            &mut data,
            n.checked_mul(8)
                .ok_or_else(|| PyValueError::new_err("packed pool outcomes too long"))?,
        )?;
        let words = raw
            .chunks_exact(8)
            .map(|w| [w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        let values = match tag {
            INT => PyList::new(py, words.map(i64::from_le_bytes))?,
            FLOAT => PyList::new(py, words.map(f64::from_le_bytes))?,
            _ => return Err(PyValueError::new_err("bad packed pool outcome tag")),
        };
        out.append((true, values))?;
    }
    if !data.is_empty() {
        return Err(PyValueError::new_err(
            "trailing bytes after packed pool outcomes",
        ));
    }
    Ok(out)
}

/// The Python pieces a worker's loop calls: unpickling, running and (when packing does not
/// apply) pickling are Python's; receiving, timing, packing and sending are native.
struct Hooks<'py> {
    /// `loads(blob)`: the batch's list of chunks `(kind, func, args, kwds)`.
    loads: Bound<'py, PyAny>,
    /// `run_chunk(kind, func, args, kwds, wrap)`: one chunk's outcome.
    run_chunk: Bound<'py, PyAny>,
    /// `pickle_outcomes(outcomes, kinds)`: the batch's outcomes pickled (`bytes`, or the
    /// pickle and its out-of-band buffers).
    pickle_outcomes: Bound<'py, PyAny>,
    /// `error_blob(exc)`: a batch-wide failure, pickled.
    error_blob: Bound<'py, PyAny>,
    /// `parent_gone()`: whether the pool's owner has ended.
    parent_gone: Bound<'py, PyAny>,
}

impl<'py> Hooks<'py> {
    fn new(hooks: &Bound<'py, PyTuple>) -> PyResult<Self> {
        if hooks.len() != 5 {
            return Err(PyTypeError::new_err(
                "pool worker hooks: expected 5 callables",
            ));
        }
        Ok(Self {
            loads: hooks.get_item(0)?,
            run_chunk: hooks.get_item(1)?,
            pickle_outcomes: hooks.get_item(2)?,
            error_blob: hooks.get_item(3)?,
            parent_gone: hooks.get_item(4)?,
        })
    }
}

/// Whether a failed `get` means the worker's queue is gone (closed, unmapped, torn down):
/// the worker then ends quietly, as the stdlib's does on a broken pipe.
fn queue_gone(py: Python<'_>, e: &PyErr) -> bool {
    e.is_instance_of::<PyEOFError>(py)
        || e.is_instance_of::<PyOSError>(py)
        || e.is_instance_of::<PyValueError>(py)
}

/// Runs one batch; `Ok(Err(exc))` when the batch as a whole failed (could not be unpickled,
/// or its outcomes could not be pickled), which fails its tasks in the parent. Returns the
/// number of chunks run with the payload.
fn run_batch<'py>(
    hooks: &Hooks<'py>,
    blob: Bound<'py, PyAny>,
    wrap: bool,
) -> PyResult<(usize, Result<Bound<'py, PyAny>, PyErr>)> {
    let py = blob.py();
    let chunks = match hooks.loads.call1((blob,)) {
        Ok(c) => c,
        Err(e) => return Ok((0, Err(e))),
    };
    let chunks = chunks.cast_into::<PyList>()?;
    let n = chunks.len();
    let kinds = PyList::empty(py);
    let outcomes = PyList::empty(py);
    for chunk in chunks.iter() {
        let chunk = chunk.cast_into::<PyTuple>()?;
        let kind = chunk.get_item(0)?;
        let args = (
            &kind,
            chunk.get_item(1)?,
            chunk.get_item(2)?,
            chunk.get_item(3)?,
        );
        outcomes.append(
            hooks
                .run_chunk
                .call1((args.0, args.1, args.2, args.3, wrap))?,
        )?;
        kinds.append(kind)?;
    }
    // The arguments go before the outcomes are encoded (a large batch holds both otherwise).
    drop(chunks);
    let payload = match pool_pack_outcomes(py, outcomes.as_any()) {
        Some(p) => Ok(p.into_any()),
        None => hooks.pickle_outcomes.call1((outcomes, kinds)),
    };
    Ok((n, payload))
}

/// A process pool worker's loop: takes `(batch_id, blob)` messages from `taskq`, runs each
/// batch and puts `(batch_id, seconds, payload)` on `resultq` (`(batch_id, seconds, None,
/// error)` when the batch failed as a whole), until `None` arrives, `maxtasks` chunks have
/// run, the queue goes away, or `hooks.parent_gone()` says so after `check_seconds` idle.
/// An exception a chunk lets escape (a `BaseException` such as `SystemExit`) ends the loop
/// and propagates, as it ends the stdlib's worker.
#[pyfunction]
#[pyo3(signature = (taskq, resultq, hooks, maxtasks = None, wrap_exception = true, check_seconds = 1.0))]
fn pool_worker_loop(
    taskq: &Bound<'_, PyRingQueue>,
    resultq: &Bound<'_, PyRingQueue>,
    hooks: &Bound<'_, PyTuple>,
    maxtasks: Option<u64>,
    wrap_exception: bool,
    check_seconds: f64,
) -> PyResult<()> {
    let py = taskq.py();
    let hooks = Hooks::new(hooks)?;
    let mut done: u64 = 0;
    while maxtasks.map_or(true, |m| done < m) {
        let msg = match PyRingQueue::recv_within(taskq, check_seconds) {
            Ok(Some(msg)) => msg,
            // A ring never reports end-of-file as the stdlib's pipe does: look at the pool's
            // owner instead, so a worker does not outlive it (after kill -9 of the parent).
            Ok(None) if hooks.parent_gone.call0()?.is_truthy()? => break,
            Ok(None) => continue,
            Err(e) if queue_gone(py, &e) => break,
            Err(e) => return Err(e),
        };
        if msg.is_none() {
            break;
        }
        let msg = msg.cast_into::<PyTuple>()?;
        let (bid, blob) = (msg.get_item(0)?, msg.get_item(1)?);
        drop(msg);
        let start = Instant::now();
        let (n, payload) = run_batch(&hooks, blob, wrap_exception)?;
        done += n as u64;
        let seconds = start.elapsed().as_secs_f64();
        let reply = match payload {
            Ok(p) => PyTuple::new(py, [bid, seconds.into_pyobject(py)?.into_any(), p])?,
            Err(e) => {
                let err = hooks.error_blob.call1((e.into_value(py),))?;
                PyTuple::new(
                    py,
                    [
                        bid,
                        seconds.into_pyobject(py)?.into_any(),
                        py.None().into_bound(py),
                        err,
                    ],
                )?
            }
        };
        PyRingQueue::send(resultq, reply.as_any())?;
    }
    Ok(())
}

/// The parent's ledger of a pool's batches (see [`crate::pool`]); each batch carries the
/// caller's task records (a Python object) to deliver its results with. Used under the pool's
/// own lock.
#[pyclass(module = "ferroproc._ferroproc", name = "PoolLedger")]
struct PoolLedger {
    inner: Ledger<Py<PyAny>>,
}

#[pymethods]
impl PoolLedger {
    /// `PoolLedger(slots, single)`: `single` keeps batches to one item (`maxtasksperchild`).
    #[new]
    fn new(slots: usize, single: bool) -> Self {
        Self {
            inner: Ledger::new(slots, single),
        }
    }

    /// Batches a worker may hold at once.
    #[classattr]
    fn credit() -> usize {
        CREDIT
    }

    /// Most items in one batch.
    #[classattr]
    fn max_batch_items() -> usize {
        MAX_BATCH_ITEMS
    }

    /// Items for the next batch.
    fn budget(&self) -> usize {
        self.inner.budget()
    }

    /// Seconds per item measured by the latest batch, or None.
    #[getter]
    fn item_cost(&self) -> Option<f64> {
        self.inner.item_cost()
    }

    /// The slot, among `live`, that gets the next batch; None when all hold their credit.
    fn next_slot(&self, live: Vec<usize>) -> Option<usize> {
        self.inner.next_slot(live)
    }

    /// Records a batch of `items` items with `recs` queued to `slot`; returns its id.
    fn record(&mut self, slot: usize, items: usize, recs: Py<PyAny>) -> PyResult<Bid> {
        if slot >= self.inner.slots() {
            return Err(PyIndexError::new_err("pool slot out of range"));
        }
        Ok(self.inner.record(slot, items, recs))
    }

    /// `(items, recs)` of batch `bid`, answered after `seconds`, now out of the ledger; None
    /// when it was not outstanding.
    fn complete(&mut self, bid: Bid, seconds: f64) -> Option<(usize, Py<PyAny>)> {
        self.inner.complete(bid, seconds).map(|b| (b.items, b.recs))
    }

    /// The records of the batches the dead worker of `slot` had taken (all but the newest
    /// `queued`), oldest first, now out of the ledger.
    fn lost(&mut self, slot: usize, queued: usize) -> Vec<Py<PyAny>> {
        self.inner
            .lost(slot, queued)
            .into_iter()
            .map(|b| b.recs)
            .collect()
    }

    /// The records of every outstanding batch, now out of the ledger.
    fn clear(&mut self) -> Vec<Py<PyAny>> {
        self.inner.clear().into_iter().map(|b| b.recs).collect()
    }

    /// How many batches `slot` holds.
    fn held(&self, slot: usize) -> usize {
        self.inner.held(slot)
    }

    /// The records of the batches `slot` holds, oldest first.
    fn batches(&self, py: Python<'_>, slot: usize) -> Vec<Py<PyAny>> {
        self.inner
            .batches(slot)
            .map(|b| b.recs.clone_ref(py))
            .collect()
    }

    /// Whether no batch is outstanding.
    #[getter]
    fn idle(&self) -> bool {
        self.inner.is_idle()
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PoolLedger>()?;
    m.add_function(wrap_pyfunction!(pool_worker_loop, m)?)?;
    m.add_function(wrap_pyfunction!(pool_pack_outcomes, m)?)?;
    m.add_function(wrap_pyfunction!(pool_is_packed, m)?)?;
    m.add_function(wrap_pyfunction!(pool_unpack_outcomes, m)?)
}
