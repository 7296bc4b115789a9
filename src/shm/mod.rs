//! Shared-memory segments: memfd-backed mappings with a validated header.
//!
//! Each synchronization primitive currently owns one small segment (one page and one fd).
//! `Value`/`Array` blocks are carved out of arena [`Chunk`]s by `ferroproc.heap`.

pub mod arena;
pub mod layout;
pub mod segment;

pub use arena::{AtomicOp, Chunk, IntKind};
pub use layout::{Header, SharedLayout};
pub use segment::Segment;
