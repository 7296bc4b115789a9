//! Process start strategies that need native code: the forkserver's request loop and protocol.
//! Fork itself happens attached, through `os.fork()`, so CPython's at-fork protocol runs.

#![forbid(unsafe_code)]

pub mod forkserver;
