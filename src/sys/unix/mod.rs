//! Linux implementation of the system layer.

pub mod fd;
pub mod sock;
pub mod spawn;
pub mod stream;
pub mod wait;
