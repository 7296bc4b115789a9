//! Shared-memory segments: memfd-backed mappings with a validated header.
//!
//! Each synchronization primitive currently owns one small segment (one page and one fd).
//! An arena that packs many primitives and `Value`s into shared pages is the next step.

pub mod layout;
pub mod segment;

pub use layout::{Header, SharedLayout};
pub use segment::Segment;
