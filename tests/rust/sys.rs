//! Multi-process tests of the system layer and the forkserver protocol, with real processes
//! started by `posix_spawn` (no fork of the test harness, so tests may run in parallel).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use _ferroproc::error::Error;
use _ferroproc::process::forkserver::{self, Server, Wake};
use _ferroproc::sys::{fd, sock, spawn, wait};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// Every wait in these tests is bounded by this.
const LIMIT: Duration = Duration::from_secs(10);

fn sh(script: &str, keep: &[i32]) -> i32 {
    let argv = ["/bin/sh", "-c", script].map(|a| CString::new(a).unwrap());
    let env = [CString::new("PATH=/usr/bin:/bin").unwrap()];
    spawn::spawn(&CString::new("/bin/sh").unwrap(), &argv, &env, keep).expect("spawn")
}

/// Waits (bounded) for `pid` to end and returns its exit code; kills it on expiry.
fn join(pid: i32) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(code) = wait::waitpid(pid, false).expect("waitpid") {
            return code;
        }
        if start.elapsed() > LIMIT {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            panic!("child {pid} did not exit within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap()
}

#[test]
fn spawn_reports_exit_status_and_signals() {
    assert_eq!(join(sh("exit 7", &[])), 7);
    assert_eq!(join(sh("kill -9 $$", &[])), -9);
}

#[test]
fn spawn_keeps_exactly_the_requested_fds() {
    let (r, w) = fd::pipe().unwrap();
    let (_r2, w2) = fd::pipe().unwrap();
    let script = format!(
        // Through /proc: dash's `>&N` takes single-digit descriptors only.
        "echo kept >/proc/self/fd/{}; if (echo x >/proc/self/fd/{}) 2>/dev/null; then exit 1; fi; exit 0",
        w.as_raw_fd(),
        w2.as_raw_fd()
    );
    let pid = sh(&script, &[w.as_raw_fd()]);
    drop(w);
    assert_eq!(
        join(pid),
        0,
        "a descriptor not asked for leaked into the child"
    );
    let mut buf = [0u8; 5];
    assert_eq!(fd::read_full(r.as_fd(), &mut buf).unwrap(), 5);
    assert_eq!(&buf, b"kept\n");
    // The parent's copy stays close-on-exec.
    let flags = nix::fcntl::fcntl(r.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert_ne!(flags & libc::FD_CLOEXEC, 0);
}

#[test]
fn spawn_of_a_missing_program_fails_cleanly() {
    let missing = CString::new("/nonexistent/ferroproc-test").unwrap();
    let err = spawn::spawn(&missing, std::slice::from_ref(&missing), &[], &[]).unwrap_err();
    assert_eq!(err, Error::Os(nix::errno::Errno::ENOENT));
}

#[test]
fn pidfd_becomes_readable_exactly_when_the_child_ends() {
    let pid = sh("exec sleep 30", &[]);
    let pidfd = wait::pidfd_open(pid).unwrap();
    assert!(
        wait::poll_readable(&[pidfd.as_fd()], Some(Duration::from_millis(50)))
            .unwrap()
            .is_empty()
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM).unwrap();
    let start = Instant::now();
    while wait::poll_readable(&[pidfd.as_fd()], Some(Duration::from_millis(100)))
        .unwrap()
        .is_empty()
    {
        assert!(start.elapsed() < LIMIT, "pidfd never became readable");
    }
    assert_eq!(join(pid), -15);
}

#[test]
fn poll_reports_closed_descriptors_as_ebadf() {
    let (r, w) = fd::pipe().unwrap();
    let raw = r.as_raw_fd();
    drop(r);
    drop(w);
    let bad = fd::borrow_raw(raw).unwrap();
    // The number may have been reused by a concurrent test; only assert when it is still free.
    if nix::fcntl::fcntl(bad, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        assert_eq!(
            wait::poll_readable(&[bad], Some(Duration::ZERO)).unwrap_err(),
            Error::Os(nix::errno::Errno::EBADF)
        );
    }
    assert!(fd::borrow_raw(-1).is_err());
}

#[test]
fn descriptors_cross_a_socket_with_the_message() {
    let (a, b) = pair();
    let (r, w) = fd::pipe().unwrap();
    sock::send_with_fds(a.as_fd(), b"hello", &[w.as_raw_fd()]).unwrap();
    drop(w);
    let mut buf = [0u8; 5];
    let fds = sock::recv_with_fds(b.as_fd(), &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    assert_eq!(fds.len(), 1);
    fd::write_all(fds[0].as_fd(), b"via").unwrap();
    let mut got = [0u8; 3];
    assert_eq!(fd::read_full(r.as_fd(), &mut got).unwrap(), 3);
    assert_eq!(&got, b"via");
    drop(a);
    assert_eq!(
        sock::recv_with_fds(b.as_fd(), &mut buf).unwrap_err(),
        Error::Eof
    );
}

/// Stands the process `pid` in for a spare just forked (the test cannot fork a Python child):
/// the server's steps around the fork, then a thread that takes the next request with the
/// spare's handles. Also returns `spare_forked`'s answer (whether to fork another spare).
fn stand_in_spare(
    server: &mut Server,
    pid: i32,
) -> (JoinHandle<Option<forkserver::Request>>, bool) {
    server.before_fork().unwrap();
    let spare = server.spare().unwrap();
    let more = server.spare_forked(pid).unwrap();
    (std::thread::spawn(move || spare.take(pid).unwrap()), more)
}

/// Asks for a child for the payload `p` from another thread, which gives back the answer and
/// the client's end.
fn request_in_thread(
    client: OwnedFd,
    status_w: OwnedFd,
) -> JoinHandle<(_ferroproc::error::Result<i32>, OwnedFd)> {
    std::thread::spawn(move || {
        let got = forkserver::request(client.as_fd(), b"p", &[status_w.as_raw_fd()], 0);
        (got, client)
    })
}

#[test]
fn forkserver_protocol_round_trip() {
    // Real processes stand in for the spares (the test cannot fork a Python child): a spare's
    // handles read the request in a thread, reply with the stand-in's pid and hand the status
    // pipe to the server, which reports the stand-in's exit code there once it reaps it.
    let (client, server_end) = pair();
    let mut server = Server::new(server_end).unwrap();

    let stand_in = sh("sleep 0.2; exit 42", &[]);
    let (taker, more) = stand_in_spare(&mut server, stand_in);
    assert!(more, "no standby yet");
    let (status_r, status_w) = fd::pipe().unwrap();
    let (_extra_r, extra_w) = fd::pipe().unwrap();
    let pid = forkserver::request(
        client.as_fd(),
        b"pickled process",
        &[status_w.as_raw_fd(), extra_w.as_raw_fd()],
        0b101,
    )
    .unwrap();
    assert_eq!(pid, stand_in);
    let req = taker.join().unwrap().expect("a request");
    assert_eq!(req.payload, b"pickled process");
    assert_eq!(req.fds.len(), 2);
    assert_eq!(req.hint, 0b101);
    drop((req, status_w, extra_w));
    assert_eq!(
        server.take_imports(),
        0,
        "not before the spare says it was taken"
    );
    assert_eq!(server.wait().unwrap(), Wake::SpareUsed);
    // The spare relayed the request's hint; the server hands it out once.
    assert_eq!(server.take_imports(), 0b101);
    assert_eq!(server.take_imports(), 0);

    // The next spare dies before any request, after the first child: the server reaps that
    // child meanwhile, reports its code, and asks for another spare.
    let doomed = sh("sleep 0.5", &[]);
    server.before_fork().unwrap();
    drop(server.spare().unwrap());
    server.spare_forked(doomed).unwrap();
    assert_eq!(server.wait().unwrap(), Wake::SpareUsed);
    assert!(!wait::poll_readable(&[status_r.as_fd()], Some(LIMIT))
        .unwrap()
        .is_empty());
    let mut code = [0u8; 4];
    assert_eq!(fd::read_full(status_r.as_fd(), &mut code).unwrap(), 4);
    assert_eq!(i32::from_le_bytes(code), 42);

    // The client leaves: the waiting spare says so, and the server shuts down.
    let (taker, _) = stand_in_spare(&mut server, sh("sleep 0.1", &[]));
    drop(client);
    assert!(taker.join().unwrap().is_none());
    assert_eq!(server.wait().unwrap(), Wake::Shutdown);
}

#[test]
fn forkserver_standby_reads_nothing_until_armed_and_leaves_when_dismissed() {
    let (client, server_end) = pair();
    let mut server = Server::new(server_end).unwrap();
    let (a, b) = (sh("sleep 0.2", &[]), sh("sleep 0.2", &[]));
    let (take_a, more) = stand_in_spare(&mut server, a);
    assert!(more);
    let (take_b, more) = stand_in_spare(&mut server, b);
    assert!(!more, "an armed spare and a standby are enough");
    let (_status_r, status_w) = fd::pipe().unwrap();
    let ask = |payload: &[u8]| {
        forkserver::request(client.as_fd(), payload, &[status_w.as_raw_fd()], 0).unwrap()
    };
    // The standby is already waiting, but only the armed spare may read the request.
    assert_eq!(ask(b"first"), a);
    assert_eq!(take_a.join().unwrap().expect("a request").payload, b"first");
    assert_eq!(server.wait().unwrap(), Wake::SpareUsed);
    // Armed once the first was taken: it answers the next request.
    assert_eq!(ask(b"second"), b);
    assert_eq!(
        take_b.join().unwrap().expect("a request").payload,
        b"second"
    );
    assert_eq!(server.wait().unwrap(), Wake::SpareUsed);

    // The client leaves while a spare is armed and another stands by: the standby is
    // dismissed and reaped with the armed one.
    let (take_c, more) = stand_in_spare(&mut server, sh("exit 0", &[]));
    assert!(more);
    let (take_d, more) = stand_in_spare(&mut server, sh("exit 0", &[]));
    assert!(!more);
    drop(client);
    assert!(take_c.join().unwrap().is_none());
    assert_eq!(server.wait().unwrap(), Wake::Shutdown);
    assert!(
        take_d.join().unwrap().is_none(),
        "the standby reads end of file"
    );
}

#[test]
fn forkserver_rejects_a_request_without_descriptors() {
    let (client, server_end) = pair();
    fd::write_all(client.as_fd(), &forkserver::encode_header(3, 1, 0)).unwrap();
    fd::write_all(client.as_fd(), b"abc").unwrap();
    let mut server = Server::new(server_end).unwrap();
    server.before_fork().unwrap();
    let spare = server.spare().unwrap();
    server.spare_forked(1).unwrap();
    assert!(matches!(spare.take(1), Err(Error::Protocol(_))));
}

#[test]
fn forkserver_without_a_spare_refuses_with_the_fork_errno() {
    let (client, server_end) = pair();
    let mut server = Server::new(server_end).unwrap();
    let (_status_r, status_w) = fd::pipe().unwrap();
    let requester = request_in_thread(client, status_w);
    assert!(server.refuse_next(libc::EAGAIN).unwrap());
    let (got, client) = requester.join().unwrap();
    assert_eq!(got.unwrap_err(), Error::from(nix::errno::Errno::EAGAIN));
    drop(client);
    assert!(!server.refuse_next(libc::EAGAIN).unwrap());
}

#[test]
fn forkserver_fork_failure_with_an_armed_spare_leaves_the_request_to_it() {
    // The standby's fork failed while a spare is armed: the server must not read the next
    // request itself (that would refuse it) but wait for the armed spare to take it.
    let (client, server_end) = pair();
    let mut server = Server::new(server_end).unwrap();
    let armed_pid = sh("sleep 0.2", &[]);
    let (taker, more) = stand_in_spare(&mut server, armed_pid);
    assert!(more);
    server.before_fork().unwrap(); // the standby's pipe; its fork "fails"
    let (_status_r, status_w) = fd::pipe().unwrap();
    let requester = request_in_thread(client, status_w);
    assert!(
        server.refuse_next(libc::EAGAIN).unwrap(),
        "the armed spare was used"
    );
    let (got, _client) = requester.join().unwrap();
    assert_eq!(got.unwrap(), armed_pid);
    assert_eq!(taker.join().unwrap().expect("a request").payload, b"p");
}

#[test]
fn an_anonymous_mapping_keeps_what_is_written_after_lazy_free() {
    use _ferroproc::sys::shm::Mapping;
    let len = 4 << 20;
    let region = Mapping::anonymous(len).unwrap();
    assert_eq!(region.len(), len);
    assert_eq!(region.as_ptr() as usize % 4096, 0);
    let fill = |byte: u8| {
        // SAFETY: the region is `len` bytes of this process's own memory, and nothing else
        // refers to it in this test.
        unsafe { std::ptr::write_bytes(region.as_ptr(), byte, len) };
    };
    let all = |byte: u8| {
        // SAFETY: as above; the bytes were all written before.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
        bytes.iter().all(|&b| b == byte)
    };
    fill(0x5a);
    assert!(all(0x5a));
    // After MADV_FREE the old bytes may be kept or zeroed; what is written next stays.
    region.lazy_free();
    fill(0xa5);
    assert!(all(0xa5));
    assert!(Mapping::anonymous(0).is_err());
}
