//! Blobs handed to a reader as they are: the memory of a large out-of-band buffer that a
//! reader received without copying it out of the queue's memfd.
//!
//! A [`BlobLease`] holds one blob for the Python object (a `RecvBuffer`) that exposes its
//! bytes through a shared mapping; dropping the lease frees the blob (to the queue's spares,
//! with the mapping kept for when it comes back), so the writer's copy in is the only copy.
//!
//! Fork is what makes this more than a pointer. A forked child would inherit a shared mapping
//! of the blob: parent and child would see each other's writes, and the first to drop the
//! array would free the blob under the other. So before every fork
//! (`os.register_at_fork(before=...)`, which also runs for ferroproc's own fork start method)
//! each lease of this process is *detached*: its mapping is made private in place
//! ([`Mapping::make_private`]) and every page of it copied into this process's own memory
//! ([`Mapping::populate_write`]), then the blob is freed. The array's bytes stay where they
//! were, now ordinary private memory, which the child shares copy-on-write as it shares any
//! other: nothing of the queue is held across the fork, so nothing can leak when a child is
//! killed. The cost, one copy of the array, is paid once, and only by a process that forks
//! while it holds a received array.
//!
//! A lease made between the `before` hook and the fork (by another thread, while another hook
//! runs) is detached when it is made. If a lease cannot be detached (no memory for the
//! copy), its blob is kept until the queue's memfd is closed (*pinned*): the mapping, private
//! by then, still reads the blob's unchanging pages in both processes.
//!
//! Everything here runs with the GIL held (a lease is made while loading a message, dropped
//! with its Python object, and the fork hooks run under the GIL), so at a fork no other
//! thread holds the registry's locks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::blob::DATA_SHIFT;
use super::{RingBuffer, BLOB_BASE};
use crate::sys::shm::Mapping;

/// One reader's hold on a blob of a queue.
#[derive(Debug)]
pub(crate) struct BlobLease {
    ring: Arc<RingBuffer>,
    at: u64,
    len: usize,
    map: Arc<Mapping>,
    state: Mutex<State>,
}

/// What became of a lease's blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The mapping is the blob's, shared; dropping the lease frees the blob.
    Held,
    /// The bytes were copied into private memory and the blob freed.
    Detached,
    /// The blob stays taken until the queue is gone (see the module documentation).
    Pinned,
}

/// Leases alive in this process.
static LIVE: Mutex<Vec<Arc<BlobLease>>> = Mutex::new(Vec::new());
/// A fork is in progress: between the `before` hook and the `after` hooks.
static FORKING: AtomicBool = AtomicBool::new(false);

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl BlobLease {
    /// Takes the blob of `len` bytes at `at` (of a message just read) for this process, or
    /// `None` if it cannot be mapped (the caller then copies it out and frees it). Call with
    /// the GIL held.
    pub(crate) fn take(ring: &Arc<RingBuffer>, at: u64, len: usize) -> Option<Arc<Self>> {
        let map = ring.blob_lease_map(at, len)?;
        let lease = Arc::new(Self {
            ring: Arc::clone(ring),
            at,
            len,
            map,
            state: Mutex::new(State::Held),
        });
        ring.blob_taken(len);
        if FORKING.load(Ordering::Relaxed) {
            lease.detach();
        }
        locked(&LIVE).push(Arc::clone(&lease));
        Some(lease)
    }

    /// The address of the blob's bytes (`len` of them).
    pub(crate) fn data(&self) -> *mut u8 {
        self.map.as_ptr().wrapping_add(DATA_SHIFT as usize)
    }

    /// The number of bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Ends this process's hold (the Python object is gone): frees the blob, unless it was
    /// detached or pinned. Call once per lease, with the GIL held.
    pub(crate) fn end(self: &Arc<Self>) {
        locked(&LIVE).retain(|l| !Arc::ptr_eq(l, self));
        if *locked(&self.state) == State::Held {
            self.ring.blob_release(self.at, self.len);
            self.ring.blob_keep_map(self.at, Arc::clone(&self.map));
        }
    }

    /// Makes the bytes this process's own and frees the blob (see the module documentation).
    fn detach(&self) {
        let mut state = locked(&self.state);
        if *state != State::Held {
            return;
        }
        let fd = self.ring.fd();
        *state = match self.map.make_private(fd, BLOB_BASE + self.at) {
            Ok(()) if self.map.populate_write().is_ok() => {
                self.ring.blob_release(self.at, self.len);
                State::Detached
            }
            // Private, or (if that failed) still shared: either way the blob must stay.
            _ => State::Pinned,
        };
    }
}

/// `os.register_at_fork(before=...)`: detaches every lease of this process.
pub(crate) fn before_fork() {
    FORKING.store(true, Ordering::Relaxed);
    let live = locked(&LIVE).clone();
    for lease in &live {
        lease.detach();
    }
}

/// `os.register_at_fork(after_in_parent=..., after_in_child=...)`.
pub(crate) fn after_fork() {
    FORKING.store(false, Ordering::Relaxed);
}

/// Gives back the blobs of every lease of this process (it is about to exit, and will run
/// no more Python code that should use them): they go back to their queues for the processes
/// that use them on. An object still alive keeps its mapping, made private first so that a
/// write to it can no longer reach the queue, until the process ends.
pub(crate) fn end_all() {
    let live = std::mem::take(&mut *locked(&LIVE));
    for lease in live {
        let mut state = locked(&lease.state);
        if *state == State::Held {
            if lease
                .map
                .make_private(lease.ring.fd(), BLOB_BASE + lease.at)
                .is_ok()
            {
                lease.ring.blob_release(lease.at, lease.len);
            }
            *state = State::Pinned;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring with one written blob of `len` bytes; its position.
    fn ring_with_blob(len: usize) -> (Arc<RingBuffer>, u64) {
        let ring = Arc::new(RingBuffer::create(4096, u32::MAX, 0).unwrap());
        let blob = ring.blob_alloc(len).unwrap();
        ring.blob_write(blob, &[&vec![7u8; len]]).unwrap();
        (ring, blob.at)
    }

    /// The registry is process-wide: one test walks through every case in turn.
    #[test]
    fn a_blob_is_freed_once_whatever_happens_to_its_lease() {
        let len = 1 << 20;

        // Alone: the bytes are the blob's, and dropping frees it for the next writer.
        let (ring, at) = ring_with_blob(len);
        let lease = BlobLease::take(&ring, at, len).unwrap();
        // SAFETY: the lease maps `len` bytes at `data()` and is alive.
        let bytes = unsafe { std::slice::from_raw_parts(lease.data(), len) };
        assert!(bytes.iter().all(|&b| b == 7));
        lease.end();
        let again = ring.blob_alloc(len).unwrap();
        assert_eq!((again.at, again.reused), (at, true));

        // A fork: the bytes become this process's own and the blob is free at once; it is
        // not freed again when the lease ends.
        let (ring, at) = ring_with_blob(len);
        let lease = BlobLease::take(&ring, at, len).unwrap();
        before_fork();
        after_fork();
        assert_eq!(*locked(&lease.state), State::Detached);
        let next = ring.blob_alloc(len).unwrap();
        assert_eq!((next.at, next.reused), (at, true));
        ring.blob_write(next, &[&vec![9u8; len]]).unwrap();
        // SAFETY: as above; the mapping is private memory now, still `len` bytes at data().
        let bytes = unsafe { std::slice::from_raw_parts(lease.data(), len) };
        assert!(
            bytes.iter().all(|&b| b == 7),
            "the new message shows through"
        );
        lease.end();
        assert!(!ring.blob_alloc(len).unwrap().reused);

        // Made while a fork is in progress: detached at once.
        let (ring, at) = ring_with_blob(len);
        before_fork();
        let lease = BlobLease::take(&ring, at, len).unwrap();
        after_fork();
        assert_eq!(*locked(&lease.state), State::Detached);
        lease.end();

        // At exit: given back at once, and not again when the object goes.
        let (ring, at) = ring_with_blob(len);
        let lease = BlobLease::take(&ring, at, len).unwrap();
        end_all();
        lease.end();
        assert_eq!(ring.blob_alloc(len).unwrap().at, at);
        assert!(!ring.blob_alloc(len).unwrap().reused);
    }
}
