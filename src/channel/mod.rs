//! Connections: the stdlib-compatible frame format and the descriptor-backed byte streams that
//! `Pipe`, `Listener` and `Client` connections read and write.

pub mod connection;
pub mod framing;
pub mod pybuf;
