//! Channels between processes: the shared-memory message ring behind `Queue`.

pub mod ring;
