#![doc = "ferroproc's native core: the `ferroproc._ferroproc` extension module.\n\n\
Layers: `sys` (the only libc/nix calls), `process` (start strategies, forkserver protocol), \
`py` (the only pyo3 code). See the repository README for the Python API."]
#![warn(missing_docs)]

pub mod channel;
pub mod deadline;
pub mod error;
pub mod pool;
pub mod process;
pub mod shm;
pub mod sync;
pub mod sys;

mod py;

use pyo3::prelude::*;

/// The `ferroproc._ferroproc` module: registration and init only.
#[pymodule(gil_used = true)]
fn _ferroproc(m: &Bound<'_, PyModule>) -> PyResult<()> {
    py::logging::init(m.py());
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    py::register(m)
}
