//! Loading a plain pickle (see [`crate::channel::pickle_ops`]) without the `_pickle` module:
//! what a spawned child does with its preparation data and process object, so that it does
//! not import `_pickle`, `functools` and `collections` only for that.
//!
//! The instructions do what the C unpickler's do: module-level names are found by importing
//! the module and following the dotted name (after a `pickle.find_class` audit event),
//! `REDUCE` calls, `NEWOBJ` calls `cls.__new__(cls, *args)`, and `BUILD` calls `__setstate__`
//! or updates the instance's `__dict__` (interning `str` keys) and sets slot attributes.

use pyo3::exceptions::PyAttributeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use super::tinypickle::to_object;
use crate::channel::pickle_ops::{self, Op};

/// Loads the pickle at `pos` of `data`: `(object, position after it)`, or `None` when it is
/// not a plain pickle (nothing has run then; load it with `_pickle`).
#[pyfunction]
fn load_plain_pickle<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyBytes>,
    pos: usize,
) -> PyResult<Option<(Bound<'py, PyAny>, usize)>> {
    let Some((ops, end)) = pickle_ops::scan(data.as_bytes(), pos) else {
        return Ok(None);
    };
    Ok(Some((run(py, &ops)?, end)))
}

fn unpickling_error(py: Python<'_>, msg: &str) -> PyErr {
    // Only on a malformed pickle: importing `_pickle` is then no longer a cost worth saving.
    match py
        .import("_pickle")
        .and_then(|m| m.getattr("UnpicklingError"))
        .and_then(|cls| cls.call1((msg,)))
    {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

struct Machine<'py> {
    py: Python<'py>,
    stack: Vec<Bound<'py, PyAny>>,
    marks: Vec<usize>,
    memo: Vec<Option<Bound<'py, PyAny>>>,
}

impl<'py> Machine<'py> {
    fn pop(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let mut top = self.top_n(1)?;
        top.pop()
            .ok_or_else(|| unpickling_error(self.py, "unpickling stack underflow"))
    }

    /// Pops an argument tuple and what it is for (a callable, a class); `not_tuple` is the
    /// error when the arguments are not a tuple.
    fn pop_with_args(
        &mut self,
        not_tuple: &str,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let args = self.pop()?;
        let target = self.pop()?;
        let args = args
            .cast_into::<PyTuple>()
            .map_err(|_| unpickling_error(self.py, not_tuple))?;
        Ok((target, args))
    }

    fn top(&self) -> PyResult<&Bound<'py, PyAny>> {
        self.stack
            .last()
            .ok_or_else(|| unpickling_error(self.py, "unpickling stack underflow"))
    }

    /// The items above the last mark, which is dropped.
    fn pop_mark(&mut self) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let start = self
            .marks
            .pop()
            .ok_or_else(|| unpickling_error(self.py, "could not find MARK"))?;
        Ok(self.stack.split_off(start))
    }

    fn top_n(&mut self, n: usize) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let floor = self.marks.last().copied().unwrap_or(0);
        let start = self
            .stack
            .len()
            .checked_sub(n)
            .filter(|s| *s >= floor)
            .ok_or_else(|| unpickling_error(self.py, "unpickling stack underflow"))?;
        Ok(self.stack.split_off(start))
    }

    fn memo_put(&mut self, at: usize) -> PyResult<()> {
        let value = self.top()?.clone();
        if self.memo.len() <= at {
            self.memo.resize(at + 1, None);
        }
        self.memo[at] = Some(value);
        Ok(())
    }

    fn step(&mut self, op: &Op<'_>) -> PyResult<()> {
        let py = self.py;
        match op {
            Op::Mark => self.marks.push(self.stack.len()),
            Op::EmptyDict => self.stack.push(PyDict::new(py).into_any()),
            Op::EmptyList => self.stack.push(PyList::empty(py).into_any()),
            Op::Tuple(n) => {
                let items = self.top_n(*n)?;
                self.stack.push(PyTuple::new(py, items)?.into_any());
            }
            Op::TupleFromMark => {
                let items = self.pop_mark()?;
                self.stack.push(PyTuple::new(py, items)?.into_any());
            }
            Op::SetItem => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.top()?.set_item(key, value)?;
            }
            Op::SetItems => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err(unpickling_error(py, "odd number of items for SETITEMS"));
                }
                let target = self.top()?;
                for pair in items.chunks_exact(2) {
                    target.set_item(&pair[0], &pair[1])?;
                }
            }
            Op::Append => {
                let value = self.pop()?;
                append(self.top()?, value)?;
            }
            Op::Appends => {
                let items = self.pop_mark()?;
                let target = self.top()?;
                for item in items {
                    append(target, item)?;
                }
            }
            Op::Atom(atom) => self.stack.push(to_object(py, atom)?),
            Op::Memoize => {
                let at = self.memo.len();
                self.memo_put(at)?;
            }
            Op::Put(at) => self.memo_put(*at)?,
            Op::Get(at) => {
                let value = self
                    .memo
                    .get(*at)
                    .and_then(Option::as_ref)
                    .ok_or_else(|| {
                        unpickling_error(py, &format!("Memo value not found at index {at}"))
                    })?
                    .clone();
                self.stack.push(value);
            }
            Op::StackGlobal => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Ok(module), Ok(name)) = (module.cast::<PyString>(), name.cast::<PyString>())
                else {
                    return Err(unpickling_error(py, "STACK_GLOBAL requires str"));
                };
                let found = find_class(py, module, name)?;
                self.stack.push(found);
            }
            Op::Reduce => {
                let (func, args) = self.pop_with_args("REDUCE arguments must be a tuple")?;
                self.stack.push(func.call1(args)?);
            }
            Op::NewObj => {
                let (cls, args) = self.pop_with_args("NEWOBJ expected an arg tuple.")?;
                if !cls.is_instance_of::<pyo3::types::PyType>() {
                    return Err(unpickling_error(
                        py,
                        "NEWOBJ class argument isn't a type object",
                    ));
                }
                let mut full = Vec::with_capacity(args.len() + 1);
                full.push(cls.clone());
                full.extend(args.iter());
                let obj = cls.getattr("__new__")?.call1(PyTuple::new(py, full)?)?;
                self.stack.push(obj);
            }
            Op::Build => {
                let state = self.pop()?;
                build(py, self.top()?, state)?;
            }
        }
        Ok(())
    }
}

fn append(target: &Bound<'_, PyAny>, item: Bound<'_, PyAny>) -> PyResult<()> {
    match target.cast::<PyList>() {
        Ok(list) if list.is_exact_instance_of::<PyList>() => list.append(item),
        _ => target.call_method1("append", (item,)).map(drop),
    }
}

/// `BUILD`: as the C unpickler's `load_build`.
fn build<'py>(py: Python<'py>, inst: &Bound<'py, PyAny>, state: Bound<'py, PyAny>) -> PyResult<()> {
    if let Some(setstate) = inst.getattr_opt("__setstate__")? {
        setstate.call1((state,))?;
        return Ok(());
    }
    let (state, slotstate) = match state.cast::<PyTuple>() {
        Ok(t) if t.len() == 2 => (t.get_item(0)?, Some(t.get_item(1)?)),
        _ => (state, None),
    };
    if !state.is_none() {
        let state = state
            .cast::<PyDict>()
            .map_err(|_| unpickling_error(py, "state is not a dictionary"))?;
        let dict = inst.getattr("__dict__")?;
        for (key, value) in state.iter() {
            match key.cast_exact::<PyString>() {
                Ok(s) => dict.set_item(PyString::intern(py, s.to_str()?), value)?,
                Err(_) => dict.set_item(key, value)?,
            }
        }
    }
    if let Some(slotstate) = slotstate.filter(|s| !s.is_none()) {
        let slotstate = slotstate
            .cast::<PyDict>()
            .map_err(|_| unpickling_error(py, "slot state is not a dictionary"))?;
        for (key, value) in slotstate.iter() {
            inst.setattr(key.cast::<PyString>()?, value)?;
        }
    }
    Ok(())
}

/// The object `module.name` (a dotted path for protocol 4), as `Unpickler.find_class`.
fn find_class<'py>(
    py: Python<'py>,
    module: &Bound<'py, PyString>,
    name: &Bound<'py, PyString>,
) -> PyResult<Bound<'py, PyAny>> {
    py.import("sys")?
        .call_method1("audit", ("pickle.find_class", module, name))?;
    let py_module = py.import(module.to_str()?)?;
    let mut obj = py_module.clone().into_any();
    for part in name.to_str()?.split('.') {
        if part == "<locals>" {
            return Err(PyAttributeError::new_err(format!(
                "Can't pickle local attribute {} on {}",
                name.repr()?,
                py_module.repr()?
            )));
        }
        obj = obj.getattr(part).map_err(|_| {
            let msg = match (name.repr(), py_module.repr()) {
                (Ok(n), Ok(m)) => format!("Can't get attribute {n} on {m}"),
                _ => "Can't get attribute".to_owned(),
            };
            PyAttributeError::new_err(msg)
        })?;
    }
    Ok(obj)
}

fn run<'py>(py: Python<'py>, ops: &[Op<'_>]) -> PyResult<Bound<'py, PyAny>> {
    let mut m = Machine {
        py,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Vec::new(),
    };
    for op in ops {
        m.step(op)?;
    }
    if m.stack.len() != 1 || !m.marks.is_empty() {
        return Err(unpickling_error(py, "unpickling stack not empty at STOP"));
    }
    m.pop()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(load_plain_pickle, m)?)
}
