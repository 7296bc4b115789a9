//! The calling thread's name (`/proc/self/comm`).
//!
//! Not `nix::sys::prctl::get_name`: nix 0.31.3 hands `PR_GET_NAME` a buffer it declared
//! immutable, so an optimised build may read back the zeroes it started with (here it always
//! returned `""`, and every forkserver child came out unnamed).

use std::ffi::{CStr, CString};

use nix::errno::Errno;

/// `TASK_COMM_LEN` in `linux/sched.h`: 15 bytes of name and the NUL.
const TASK_COMM_LEN: usize = 16;

/// The calling thread's name, as `PR_GET_NAME` gives it.
pub fn get() -> nix::Result<CString> {
    let mut buf = [0u8; TASK_COMM_LEN];
    // SAFETY: PR_GET_NAME writes at most TASK_COMM_LEN bytes, NUL included, to arg2, which
    // points to a writable buffer of exactly that size that outlives the call.
    let res = unsafe { libc::prctl(libc::PR_GET_NAME, buf.as_mut_ptr(), 0, 0, 0) };
    Errno::result(res)?;
    CStr::from_bytes_until_nul(&buf)
        .map(CStr::to_owned)
        .map_err(|_| Errno::EINVAL)
}

/// Sets the calling thread's name (the kernel keeps its first 15 bytes).
pub fn set(name: &CStr) -> nix::Result<()> {
    nix::sys::prctl::set_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_was_set() {
        // A thread of its own: the test harness names (and shares) the others.
        std::thread::spawn(|| {
            set(c"fp-comm-test").unwrap();
            assert_eq!(get().unwrap().as_c_str(), c"fp-comm-test");
            set(c"a-name-longer-than-fifteen").unwrap();
            assert_eq!(get().unwrap().as_c_str(), c"a-name-longer-t");
        })
        .join()
        .unwrap();
    }
}
