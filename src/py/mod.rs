//! The only modules with `#[pyclass]`/`#[pyfunction]`: one file per Python module they serve.

#![forbid(unsafe_code)]

pub(crate) mod blocking;
mod connection;
pub(crate) mod errors;
pub(crate) mod logging;
mod managers;
mod oob;
mod plainpickle;
mod pool;
mod process;
mod queues;
mod sharedctypes;
mod synchronize;
mod tinypickle;

use pyo3::prelude::*;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    process::register(m)?;
    plainpickle::register(m)?;
    connection::register(m)?;
    managers::register(m)?;
    pool::register(m)?;
    queues::register(m)?;
    sharedctypes::register(m)?;
    synchronize::register(m)
}
