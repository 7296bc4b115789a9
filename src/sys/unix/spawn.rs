//! `posix_spawn` of a new program with a chosen set of inherited descriptors.

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;
use std::ptr;

use nix::errno::Errno;

use crate::error::Result;

/// RAII owner of an initialised `posix_spawn_file_actions_t`.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> Result<Self> {
        // SAFETY: an all-zero `posix_spawn_file_actions_t` is a valid place to initialise; glibc
        // overwrites every field in `posix_spawn_file_actions_init`.
        let mut fa: libc::posix_spawn_file_actions_t = unsafe { std::mem::zeroed() };
        // SAFETY: `fa` is a valid, writable `posix_spawn_file_actions_t`.
        Errno::result(unsafe { libc::posix_spawn_file_actions_init(&mut fa) }).map(|_| ())?;
        Ok(Self(fa))
    }

    /// Keeps `fd` open in the child at the same number. glibc (since 2.29, like musl and POSIX
    /// 2024) clears `FD_CLOEXEC` for a `dup2` onto itself, so the parent's copy can stay
    /// close-on-exec and concurrent spawns by other threads do not inherit it.
    fn keep(&mut self, fd: RawFd) -> Result<()> {
        // SAFETY: `self.0` was initialised in `new` and is not yet destroyed.
        let rc = unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, fd, fd) };
        if rc != 0 {
            return Err(Errno::from_raw(rc).into());
        }
        Ok(())
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: `self.0` was initialised in `new` and is destroyed exactly once, here.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// Starts `path` with `argv` and `env`, keeping exactly the descriptors in `keep` (at the same
/// numbers) besides stdin/stdout/stderr and other non-close-on-exec descriptors. Returns the pid.
///
/// # Errors
/// The `posix_spawn` error: ENOENT/EACCES for a bad executable, EAGAIN/ENOMEM under pressure.
pub fn spawn(path: &CStr, argv: &[CString], env: &[CString], keep: &[RawFd]) -> Result<i32> {
    let mut fa = FileActions::new()?;
    for &fd in keep {
        fa.keep(fd)?;
    }
    let mut argv_p: Vec<*mut libc::c_char> = argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_p.push(ptr::null_mut());
    let mut env_p: Vec<*mut libc::c_char> = env.iter().map(|a| a.as_ptr().cast_mut()).collect();
    env_p.push(ptr::null_mut());
    let mut pid: libc::pid_t = 0;
    // SAFETY: `path` is NUL-terminated; `argv_p` and `env_p` are NULL-terminated arrays of
    // pointers into `CString`s that outlive this call; `fa` is initialised; a null attribute
    // pointer means defaults. posix_spawn does not retain any of these pointers.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &fa.0,
            ptr::null(),
            argv_p.as_ptr(),
            env_p.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(Errno::from_raw(rc).into());
    }
    Ok(pid)
}
