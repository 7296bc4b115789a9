//! The crate's error type. No pyo3 here: `py::errors` maps it to Python exceptions.

use std::fmt;

use nix::errno::Errno;

/// Everything the core can fail with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A system call failed.
    Os(Errno),
    /// A deadline passed before the operation could complete.
    Timeout,
    /// The peer closed its end.
    Eof,
    /// The peer broke a protocol (a malformed message, a missing fd).
    Protocol(String),
    /// The object's handle was already closed (`OSError("handle is closed")`).
    Closed,
}

impl From<Errno> for Error {
    fn from(e: Errno) -> Self {
        Self::Os(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Os(e) => write!(f, "{}", e.desc()),
            Self::Timeout => f.write_str("timed out"),
            Self::Eof => f.write_str("end of file"),
            Self::Protocol(m) => f.write_str(m),
            Self::Closed => f.write_str("handle is closed"),
        }
    }
}

impl std::error::Error for Error {}

/// The crate's result alias.
pub type Result<T> = std::result::Result<T, Error>;
