//! THE `Error` → `PyErr` mapping.

use pyo3::exceptions::{PyEOFError, PyOSError, PyTimeoutError};
use pyo3::PyErr;

use crate::error::Error;

impl From<Error> for PyErr {
    fn from(e: Error) -> Self {
        match e {
            // OSError(errno, strerror) picks the errno's subclass (BrokenPipeError, ...).
            Error::Os(errno) => PyOSError::new_err((errno as i32, errno.desc())),
            Error::Timeout => PyTimeoutError::new_err("timed out"),
            Error::Eof => PyEOFError::new_err(()),
            Error::Protocol(msg) => PyOSError::new_err(msg),
            Error::Closed => PyOSError::new_err("handle is closed"),
        }
    }
}
