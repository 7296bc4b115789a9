//! The only home of libc/nix calls. One module per platform family behind a common API.

#[cfg(target_os = "linux")]
mod unix;
#[cfg(target_os = "linux")]
pub use unix::*;

#[cfg(not(target_os = "linux"))]
compile_error!(
    "ferroproc currently supports Linux only: it relies on pidfd, SCM_RIGHTS and posix_spawn \
     semantics of glibc/musl. Other platforms need their own `sys` module."
);
