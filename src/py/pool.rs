//! A compact encoding of a pool batch's outcomes when every chunk succeeded with a list of
//! exact `int`s (each fitting 64 bits) or of exact `float`s: what `map` of a numeric
//! function returns. The pickler writes an `int` of 32 bits or more through a byte-array
//! conversion (`LONG1`) and the unpickler reads it back the same way; for a million results
//! that was about a fifth of the CPU a `map` used. Anything else keeps using the pickle.
//!
//! Layout: [`MAGIC`], the chunk count (u32 LE), then per chunk a tag (`b'i'` or `b'f'`), the
//! item count (u32 LE) and the items (i64 or f64 bits, LE). A pickle never starts with a zero
//! byte, so [`MAGIC`] tells the two apart.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyList, PyTuple};

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

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pool_pack_outcomes, m)?)?;
    m.add_function(wrap_pyfunction!(pool_is_packed, m)?)?;
    m.add_function(wrap_pyfunction!(pool_unpack_outcomes, m)?)
}
