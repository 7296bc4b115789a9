//! Physical floors under ferroproc's process and pipe costs.
//!
//! These numbers are what no Python-level implementation can beat on this machine: a bare
//! `fork()` + `_exit()` + `waitpid()` from a small Rust process, and a 64-byte round trip over
//! a pair of pipes between two processes. `python -m ferroproc.bench` compares the stdlib and
//! ferroproc against each other; this file says how far both are from the kernel.
//!
//! Run with `CARGO_TARGET_DIR=/tmp/bench-target cargo bench --bench sys_floor`; pass a word after
//! `--` to run only the floors whose name contains it. No criterion: each floor runs a fixed
//! number of iterations per repeat, timed with `Instant`, and the median of the repeats is
//! printed together with the fastest and slowest repeat.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

/// Timed repeats per floor; the median of these is reported.
const REPEATS: usize = 7;
/// Children forked per repeat of the fork floor.
const FORK_ITERS: u32 = 400;
/// Round trips per repeat of the ping-pong floor.
const PINGPONG_ITERS: u32 = 20_000;
/// Round trips run before timing starts, so both processes are scheduled and paged in.
const PINGPONG_WARMUP: u32 = 2_000;
/// Payload of one ping-pong message.
const MSG_LEN: usize = 64;

/// One floor: a name and a function that runs `iters` operations and returns seconds per op.
struct Floor {
    name: &'static str,
    unit: &'static str,
    iters: u32,
    run: fn(u32) -> io::Result<f64>,
}

fn main() -> io::Result<()> {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let floors = [
        Floor {
            name: "fork+_exit+waitpid",
            unit: "process",
            iters: FORK_ITERS,
            run: fork_floor,
        },
        Floor {
            name: "pipe ping-pong 64 B",
            unit: "round trip",
            iters: PINGPONG_ITERS,
            run: pingpong_floor,
        },
    ];

    let mut out = io::stdout().lock();
    writeln!(
        out,
        "sys_floor: median of {REPEATS} repeats per floor, [fastest .. slowest repeat]"
    )?;
    for floor in &floors {
        if !filters.is_empty() && !filters.iter().any(|f| floor.name.contains(f.as_str())) {
            continue;
        }
        let mut samples = Vec::with_capacity(REPEATS);
        for _ in 0..REPEATS {
            samples.push((floor.run)(floor.iters)?);
        }
        samples.sort_by(f64::total_cmp);
        let median = median_of_sorted(&samples);
        writeln!(
            out,
            "{:<24} {:>10} per {:<10} [{} .. {}]  ({} ops/repeat)",
            floor.name,
            format_seconds(median),
            floor.unit,
            format_seconds(samples[0]),
            format_seconds(samples[samples.len() - 1]),
            floor.iters,
        )?;
    }
    Ok(())
}

/// Median of an already sorted, non-empty slice.
fn median_of_sorted(sorted: &[f64]) -> f64 {
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// Seconds rendered with a unit that keeps three or four significant digits.
fn format_seconds(secs: f64) -> String {
    if secs >= 1.0 {
        format!("{secs:.3} s")
    } else if secs >= 1e-3 {
        format!("{:.3} ms", secs * 1e3)
    } else if secs >= 1e-6 {
        format!("{:.2} us", secs * 1e6)
    } else {
        format!("{:.0} ns", secs * 1e9)
    }
}

/// Forks `iters` children that exit at once, reaping each before forking the next.
fn fork_floor(iters: u32) -> io::Result<f64> {
    let start = Instant::now();
    for _ in 0..iters {
        let pid = fork_checked()?;
        if pid == 0 {
            exit_child(0);
        }
        wait_for_clean_exit(pid)?;
    }
    Ok(start.elapsed().as_secs_f64() / f64::from(iters))
}

/// Times `iters` 64-byte round trips between this process and a forked echo child.
fn pingpong_floor(iters: u32) -> io::Result<f64> {
    let (to_child_rx, to_child_tx) = pipe_cloexec()?;
    let (to_parent_rx, to_parent_tx) = pipe_cloexec()?;
    let pid = fork_checked()?;
    if pid == 0 {
        // The child keeps only its two ends. Closing the parent's write end matters: without
        // it the child would never see end-of-file when the parent is done.
        close_in_child(to_child_tx.as_raw_fd());
        close_in_child(to_parent_rx.as_raw_fd());
        echo_child(to_child_rx.as_raw_fd(), to_parent_tx.as_raw_fd());
    }
    drop(to_child_rx);
    drop(to_parent_tx);

    let mut msg = [0u8; MSG_LEN];
    let mut reply = [0u8; MSG_LEN];
    let mut round_trip = |seq: u32| -> io::Result<()> {
        msg[..4].copy_from_slice(&seq.to_le_bytes());
        write_full(to_child_tx.as_raw_fd(), &msg)?;
        if !read_full(to_parent_rx.as_raw_fd(), &mut reply)? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "echo child closed its pipe",
            ));
        }
        if reply != msg {
            return Err(io::Error::other("echo child returned different bytes"));
        }
        Ok(())
    };
    for seq in 0..PINGPONG_WARMUP {
        round_trip(seq)?;
    }
    let start = Instant::now();
    for seq in 0..iters {
        round_trip(seq)?;
    }
    let per_op = start.elapsed().as_secs_f64() / f64::from(iters);

    // End-of-file on its input tells the child to exit.
    drop(to_child_tx);
    wait_for_clean_exit(pid)?;
    Ok(per_op)
}

/// Body of the echo child: copies each 64-byte message back until end-of-file, then exits.
/// Only `read`, `write` and `_exit` run here, all async-signal-safe.
fn echo_child(rx: RawFd, tx: RawFd) -> ! {
    let mut buf = [0u8; MSG_LEN];
    let code = loop {
        match read_full(rx, &mut buf) {
            Ok(true) => {}
            Ok(false) => break 0,
            Err(_) => break 1,
        }
        if write_full(tx, &buf).is_err() {
            break 2;
        }
    };
    exit_child(code)
}

/// `fork()`, with -1 turned into the OS error. Returns 0 in the child, the child's pid in the
/// parent.
fn fork_checked() -> io::Result<libc::pid_t> {
    // SAFETY: this bench runs on a single thread, so no other thread can hold a lock (allocator,
    // stdout) at the moment of the fork; and every child branch in this file calls only
    // async-signal-safe functions (`read`, `write`, `close`, `_exit`) before it exits.
    let pid = unsafe { libc::fork() };
    if pid == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pid)
    }
}

/// Ends a forked child without running the parent's atexit handlers or destructors.
fn exit_child(code: libc::c_int) -> ! {
    // SAFETY: `_exit` takes no pointers and never returns; it is only called from forked
    // children, whose copies of the parent's state must not be cleaned up twice.
    unsafe { libc::_exit(code) }
}

/// Closes a descriptor in a forked child that will `_exit` without dropping the owning
/// `OwnedFd`, so the descriptor is closed exactly once in this process.
fn close_in_child(fd: RawFd) {
    // SAFETY: `fd` is open in this child (inherited across fork), and the `OwnedFd` owning it is
    // never dropped here because the child leaves through `_exit`; nothing else uses `fd` after.
    unsafe { libc::close(fd) };
}

/// Waits for `pid` (our own child) and checks that it exited with status 0.
fn wait_for_clean_exit(pid: libc::pid_t) -> io::Result<()> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a live, writable `c_int` for the whole call and `pid` is a child of
        // this process that has not been reaped yet.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "child {pid} did not exit cleanly (wait status {status:#x})"
        )))
    }
}

/// A close-on-exec pipe as (read end, write end).
fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds: [libc::c_int; 2] = [-1; 2];
    // SAFETY: `fds` is a writable array of exactly two `c_int`s, which is what `pipe2` fills in.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `pipe2` succeeded, so `fds[0]` is a fresh descriptor that nothing else owns.
    let rx = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above, for the write end `fds[1]`.
    let tx = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((rx, tx))
}

/// Reads exactly `buf.len()` bytes. Returns `Ok(false)` on end-of-file before the first byte and
/// an error on end-of-file in the middle. Retries on `EINTR`. Async-signal-safe.
fn read_full(fd: RawFd, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a live, writable slice and `read` writes at most `rest.len()` bytes
        // into it; `fd` is an open descriptor owned by the caller.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        match n {
            0 if done == 0 => return Ok(false),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            -1 => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
            // `n` is positive and at most `rest.len()` here.
            n => done += n.unsigned_abs(),
        }
    }
    Ok(true)
}

/// Writes all of `buf`, retrying on `EINTR` and short writes. Async-signal-safe.
fn write_full(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: `rest` is a live slice and `write` reads at most `rest.len()` bytes from it;
        // `fd` is an open descriptor owned by the caller.
        let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if n == -1 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        } else {
            done += n.unsigned_abs();
        }
    }
    Ok(())
}
