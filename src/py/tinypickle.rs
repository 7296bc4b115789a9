//! Python objects to and from [`crate::channel::tinypickle`]: the native fast path for
//! messages made only of exact `None`/`bool`/`int`/`float`/`str`/`bytes` and tuples of them.
//!
//! An object outside the subset (a subclass, an `int` beyond 64 bits, a `str` with lone
//! surrogates, too many items, too deep, or a `str`/`bytes`/`tuple` object that appears twice,
//! which pickle would share through its memo) makes [`encode`] return `false`, and the caller
//! pickles it as usual.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyString, PyTuple};

use crate::channel::tinypickle::{self as tp, Atom};

/// Most values (scalars and tuples) one message may hold on the fast path.
const MAX_VALUES: usize = 64;

/// Longest `str`/`bytes` taken on the fast path; longer ones keep the pickler's zero-copy
/// hand-over of large buffers.
const MAX_SCALAR_BYTES: usize = 16 << 10;

/// Appends the pickle of `obj` to `out` when `obj` is in the subset; `false` (with `out`
/// left as it was) when it is not.
pub(crate) fn encode(obj: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> bool {
    let mark = out.len();
    let mut seen = Vec::new();
    tp::begin(out);
    if encode_value(obj, out, 0, &mut seen) {
        tp::end(out);
        true
    } else {
        out.truncate(mark);
        false
    }
}

/// `seen` holds the addresses of the memoizable objects (str, bytes, tuple) written so far.
fn encode_value(
    obj: &Bound<'_, PyAny>,
    out: &mut Vec<u8>,
    depth: usize,
    seen: &mut Vec<usize>,
) -> bool {
    if seen.len() >= MAX_VALUES {
        return false;
    }
    if obj.is_none() {
        tp::none(out);
        return true;
    }
    if let Ok(b) = obj.cast_exact::<PyBool>() {
        tp::boolean(b.is_true(), out);
        return true;
    }
    if obj.is_exact_instance_of::<PyInt>() {
        return match obj.extract::<i64>() {
            Ok(v) => {
                tp::int(v, out);
                seen.push(0);
                true
            }
            Err(_) => false,
        };
    }
    if let Ok(f) = obj.cast_exact::<PyFloat>() {
        tp::float(f.value(), out);
        seen.push(0);
        return true;
    }
    let addr = obj.as_ptr() as usize;
    let memoizable = |seen: &mut Vec<usize>| {
        if seen.contains(&addr) {
            return false;
        }
        seen.push(addr);
        true
    };
    if let Ok(s) = obj.cast_exact::<PyString>() {
        return match s.to_str() {
            Ok(text) if text.len() <= MAX_SCALAR_BYTES && memoizable(seen) => {
                tp::string(text, out);
                true
            }
            _ => false,
        };
    }
    if let Ok(b) = obj.cast_exact::<PyBytes>() {
        let data = b.as_bytes();
        if data.len() > MAX_SCALAR_BYTES || !memoizable(seen) {
            return false;
        }
        tp::bytes(data, out);
        return true;
    }
    if let Ok(t) = obj.cast_exact::<PyTuple>() {
        let len = t.len();
        if depth >= tp::MAX_DEPTH || len > MAX_VALUES || !memoizable(seen) {
            return false;
        }
        tp::tuple_start(len, out);
        for item in t.iter_borrowed() {
            if !encode_value(&item, out, depth + 1, seen) {
                return false;
            }
        }
        tp::tuple_end(len, out);
        return true;
    }
    false
}

/// The object a message in the subset stands for; `None` when `data` is outside it (the
/// caller then unpickles `data` as usual).
pub(crate) fn decode<'py>(py: Python<'py>, data: &[u8]) -> Option<PyResult<Bound<'py, PyAny>>> {
    tp::decode(data).map(|atom| to_object(py, &atom))
}

pub(crate) fn to_object<'py>(py: Python<'py>, atom: &Atom<'_>) -> PyResult<Bound<'py, PyAny>> {
    Ok(match atom {
        Atom::None => py.None().into_bound(py),
        Atom::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Atom::Int(v) => v.into_pyobject(py)?.into_any(),
        Atom::Float(f) => PyFloat::new(py, *f).into_any(),
        Atom::Str(s) => PyString::new(py, s).into_any(),
        Atom::Bytes(b) => PyBytes::new(py, b).into_any(),
        Atom::Tuple(items) => {
            let objs = items
                .iter()
                .map(|a| to_object(py, a))
                .collect::<PyResult<Vec<_>>>()?;
            PyTuple::new(py, objs)?.into_any()
        }
    })
}
