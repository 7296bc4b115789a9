//! Bindings for `ferroproc.managers`: the manager server's per-client request loop.
//!
//! [`serve_manager_client`] is `Server.serve_client` for a native [`Connection`]: wait for a
//! request, find the object, check that the method is exposed, call it, reply, until the
//! client goes away or the server stops. Frames are read and written by the connection's own
//! Rust paths; Python runs to unpickle the request, to call the method and to pickle the
//! reply. Whatever else a request needs stays in `Server`'s Python helpers, which the loop
//! calls on the uncommon paths:
//!
//! * `_reply(conn, request)`: the whole answer to a request outside the common shape (see
//!   [`Call::parse`]): an unknown or nested-proxy id, a method not exposed (the `__str__`,
//!   `__repr__` and `#GETVALUE` stand-ins), malformed requests;
//! * `_getattr_failed(...)`: the exposed method could not be looked up;
//! * `_result_reply(...)`: the method has a `method_to_typeid` entry (a proxy as result);
//! * `_traceback_reply(exc)`: the request could not be unpickled;
//! * `_send_unserializable(conn, reply, exc)`: the reply could not be pickled or sent;
//! * `_client_gone()`: the connection ended (debug log).
//!
//! The Python loop in `Server._serve_client_py` takes the same steps for any other connection
//! type (the `xmlrpclib` serializer's wrapper), so both give the same replies.

use pyo3::exceptions::{PyEOFError, PyException, PyOSError, PyTypeError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFrozenSet, PySet, PyString, PyTuple};

use super::connection::Connection;

/// A request in the common shape, its object found and its method exposed.
struct Call<'py> {
    ident: Bound<'py, PyAny>,
    obj: Bound<'py, PyAny>,
    methodname: Bound<'py, PyString>,
    args: Bound<'py, PyTuple>,
    /// What the method is called with: a copy of the keywords, `None` when there are none.
    kwds: Option<Bound<'py, PyDict>>,
    /// The keywords as received (what the Python helpers take).
    kwds_given: Bound<'py, PyDict>,
    /// The object's `method_to_typeid` dict, or `None`.
    gettypeid: Bound<'py, PyAny>,
}

impl<'py> Call<'py> {
    /// The request as a [`Call`] when each step up to the method lookup would go exactly as
    /// in the Python loop without running any Python code: `(ident, methodname, args, kwds)`
    /// as an exact tuple of an exact `str` id found in `id_to_obj` (an exact dict) with an
    /// entry `(obj, exposed, gettypeid)` (an exact tuple), an exact `str` method name present
    /// in `exposed` (an exact `set` or `frozenset`), exact `tuple` args, exact `dict` keywords
    /// with `str` keys, and `gettypeid` `None` or an exact dict. Anything else is `None`: the
    /// Python helper then answers, from the start (nothing before this point has effects).
    fn parse(id_to_obj: &Bound<'py, PyDict>, request: &Bound<'py, PyAny>) -> Option<Self> {
        let request = request.cast_exact::<PyTuple>().ok()?;
        if request.len() != 4 {
            return None;
        }
        let ident = request.get_item(0).ok()?;
        if !ident.is_exact_instance_of::<PyString>() {
            return None;
        }
        let entry = id_to_obj.get_item(&ident).ok()??;
        let entry = entry.cast_exact::<PyTuple>().ok()?;
        if entry.len() != 3 {
            return None;
        }
        let methodname = request
            .get_item(1)
            .ok()?
            .cast_exact::<PyString>()
            .ok()?
            .clone();
        let exposed = entry.get_item(1).ok()?;
        let is_exposed = if let Ok(set) = exposed.cast_exact::<PySet>() {
            set.contains(&methodname).ok()?
        } else {
            exposed
                .cast_exact::<PyFrozenSet>()
                .ok()?
                .contains(&methodname)
                .ok()?
        };
        if !is_exposed {
            return None;
        }
        let args = request
            .get_item(2)
            .ok()?
            .cast_exact::<PyTuple>()
            .ok()?
            .clone();
        let kwds_given = request
            .get_item(3)
            .ok()?
            .cast_exact::<PyDict>()
            .ok()?
            .clone();
        let kwds = if kwds_given.is_empty() {
            None
        } else {
            if !kwds_given
                .iter()
                .all(|(k, _)| k.is_exact_instance_of::<PyString>())
            {
                return None;
            }
            // `f(**kwds)` hands the callee a copy.
            Some(kwds_given.copy().ok()?)
        };
        let gettypeid = entry.get_item(2).ok()?;
        if !gettypeid.is_none() && !gettypeid.is_exact_instance_of::<PyDict>() {
            return None;
        }
        Some(Self {
            ident,
            obj: entry.get_item(0).ok()?,
            methodname,
            args,
            kwds,
            kwds_given,
            gettypeid,
        })
    }

    /// The request's own values, as the Python helpers take them after `conn`.
    fn context(&self) -> [Bound<'py, PyAny>; 5] {
        [
            self.ident.clone(),
            self.obj.clone(),
            self.methodname.clone().into_any(),
            self.args.clone().into_any(),
            self.kwds_given.clone().into_any(),
        ]
    }
}

/// `(kind, payload)`.
fn reply<'py>(
    kind: &Bound<'py, PyString>,
    payload: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(kind.py(), [kind.clone().into_any(), payload])
}

/// The reply to one received request: the native steps for a [`Call`], else `server._reply`.
fn answer<'py>(
    server: &Bound<'py, PyAny>,
    conn: &Bound<'py, PyAny>,
    id_to_obj: &Bound<'py, PyDict>,
    request: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = server.py();
    let Some(call) = Call::parse(id_to_obj, request) else {
        return server.call_method1(intern!(py, "_reply"), (conn, request));
    };
    let function = match call.obj.getattr(&call.methodname) {
        Ok(f) => f,
        Err(e) if e.is_instance_of::<PyException>(py) => {
            let [ident, obj, methodname, args, kwds] = call.context();
            return server.call_method1(
                intern!(py, "_getattr_failed"),
                (conn, ident, obj, methodname, args, kwds, e.into_value(py)),
            );
        }
        Err(e) => return Err(e),
    };
    let res = match function.call(&call.args, call.kwds.as_ref()) {
        Ok(res) => res,
        Err(e) if e.is_instance_of::<PyException>(py) => {
            return Ok(reply(
                intern!(py, "#ERROR"),
                e.into_value(py).into_bound(py).into_any(),
            )?
            .into_any());
        }
        Err(e) => return Err(e),
    };
    if let Ok(table) = call.gettypeid.cast_exact::<PyDict>() {
        // An entry (or a failed look-up): the helper decides, and makes the proxy.
        if !matches!(table.get_item(&call.methodname), Ok(None)) {
            let [ident, obj, methodname, args, kwds] = call.context();
            return server.call_method1(
                intern!(py, "_result_reply"),
                (
                    conn,
                    ident,
                    obj,
                    methodname,
                    args,
                    kwds,
                    call.gettypeid.clone(),
                    res,
                ),
            );
        }
    }
    Ok(reply(intern!(py, "#RETURN"), res)?.into_any())
}

/// Serves the method calls of one client on `conn` (a native `Connection`) until the client
/// goes away, `stop.is_set()`, or a reply cannot be sent; `server` is the manager's `Server`
/// and `id_to_obj` its dict of shared objects.
///
/// # Errors
/// What the Python loop lets through: an exception that is not an `Exception`
/// (`KeyboardInterrupt`, `SystemExit`) raised by a method or a helper, or an error of
/// `stop.is_set()`; a `TypeError` if `conn` is not exactly a native `Connection` or
/// `id_to_obj` not exactly a dict.
#[pyfunction]
fn serve_manager_client(
    server: &Bound<'_, PyAny>,
    conn: &Bound<'_, PyAny>,
    id_to_obj: &Bound<'_, PyAny>,
    stop: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let py = server.py();
    let native = conn
        .cast_exact::<Connection>()
        .map_err(|_| PyTypeError::new_err("conn must be a native Connection"))?
        .get();
    let id_to_obj = id_to_obj
        .cast_exact::<PyDict>()
        .map_err(|_| PyTypeError::new_err("id_to_obj must be a dict"))?;
    while !stop.call_method0(intern!(py, "is_set"))?.is_truthy()? {
        let reply = match native.recv_object(py) {
            Ok(request) => answer(server, conn, id_to_obj, &request)?,
            Err(e) if e.is_instance_of::<PyEOFError>(py) || e.is_instance_of::<PyOSError>(py) => {
                // Gone, possibly in the middle of a message: nothing left to answer.
                server.call_method0(intern!(py, "_client_gone"))?;
                return Ok(());
            }
            Err(e) if e.is_instance_of::<PyException>(py) => {
                server.call_method1(intern!(py, "_traceback_reply"), (e.into_value(py),))?
            }
            Err(e) => return Err(e),
        };
        match native.send_object(py, &reply) {
            Ok(()) => {}
            Err(e) if e.is_instance_of::<PyException>(py) => {
                let sent = server.call_method1(
                    intern!(py, "_send_unserializable"),
                    (conn, &reply, e.into_value(py)),
                )?;
                if !sent.is_truthy()? {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(serve_manager_client, m)?)
}
