//! Channels between processes: the stdlib-compatible frame format and the descriptor-backed
//! byte streams of `Pipe`, `Listener` and `Client` connections, and the shared-memory message
//! ring behind `Queue`.

pub mod bundle;
pub mod connection;
pub mod framing;
pub mod lane;
pub mod pickle_ops;
pub mod pybuf;
pub mod ring;
pub mod tinypickle;
