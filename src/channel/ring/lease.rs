//! Blobs handed to a reader as they are: the memory of a large out-of-band buffer that a
//! reader received without copying it out of the queue's memfd.
//!
//! A [`BlobLease`] holds one blob for the Python object (a `RecvBuffer`) that exposes its
//! bytes through a shared mapping; dropping the lease frees the blob (to the queue's spares,
//! with the mapping kept for when it comes back), so the writer's copy in is the only copy.
//!
//! Fork is what makes this more than a pointer. A forked child inherits the object and the
//! mapping, and both processes could then free the blob, or write into the other's array. So
//! before every fork (`os.register_at_fork(before=...)`, which also runs for ferroproc's own
//! fork start method) each lease of this process:
//! - turns its mapping private in place ([`Mapping::make_private`]): the bytes stay, but a
//!   write from now on goes to a copy-on-write page of the process that makes it, as with any
//!   other memory across a fork, never to the blob;
//! - counts holders in the first word of the blob's first page (shared, mapped on first need;
//!   the blob's bytes start past it): one more, for the child.
//!
//! The last holder to drop its lease frees the blob. Leases made between the `before` hook
//! and the fork (by another thread, while another hook runs) are counted for the child when
//! made; a lease dropped in that window is still counted for the child, which finds it gone
//! after the fork and gives its count back. A fork that fails keeps its counts: the blob then
//! stays allocated until the queue's memfd is closed, as for a reader killed holding it.
//!
//! Everything here runs with the GIL held (a lease is made while loading a message, dropped
//! with its Python object, and the fork hooks run under the GIL), so at a fork no other
//! thread holds the registry's locks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

#[derive(Debug, Default)]
struct State {
    /// The blob's first page, mapped shared, once a fork made the count matter; `None` while
    /// this process is the only holder.
    head: Option<Mapping>,
    /// The mapping was made private (at a fork): it is no longer a view of the blob to copy
    /// through, so it is not given back to the ring's kept mappings.
    private: bool,
    /// The count could not be kept (mapping the head failed at a fork): the blob is never
    /// freed, so no holder can free it under another.
    pinned: bool,
}

/// Leases alive in this process.
static LIVE: Mutex<Vec<Arc<BlobLease>>> = Mutex::new(Vec::new());
/// Leases counted for the child of the fork in progress (set by the `before` hook).
static COUNTED: Mutex<Vec<Arc<BlobLease>>> = Mutex::new(Vec::new());
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
            state: Mutex::new(State::default()),
        });
        ring.blob_taken(len);
        if FORKING.load(Ordering::Relaxed) {
            lease.count_for_child();
            locked(&COUNTED).push(Arc::clone(&lease));
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

    /// Ends this process's hold (the Python object is gone): frees the blob if no other
    /// process holds it. Call once per lease, with the GIL held.
    pub(crate) fn end(self: &Arc<Self>) {
        locked(&LIVE).retain(|l| !Arc::ptr_eq(l, self));
        if self.give_back() && !locked(&self.state).private {
            self.ring.blob_keep_map(self.at, Arc::clone(&self.map));
        }
    }

    /// Drops one holder's count; frees the blob when it was the last. True if it was.
    fn give_back(&self) -> bool {
        let state = locked(&self.state);
        let last = match (&state.head, state.pinned) {
            (_, true) => false,
            (None, false) => true,
            (Some(head), false) => head_count(head).fetch_sub(1, Ordering::AcqRel) == 1,
        };
        if last {
            self.ring.blob_release(self.at, self.len);
        }
        last
    }

    /// Before a fork: one more holder (the child), and the mapping made private.
    fn count_for_child(&self) {
        let mut state = locked(&self.state);
        if !state.pinned {
            if state.head.is_none() {
                match self.ring.blob_head_map(self.at) {
                    Ok(head) => {
                        head_count(&head).store(1, Ordering::Release);
                        state.head = Some(head);
                    }
                    Err(_) => state.pinned = true,
                }
            }
            if let Some(head) = &state.head {
                head_count(head).fetch_add(1, Ordering::AcqRel);
            }
        }
        if !state.private {
            // If this fails the mapping stays shared: parent and child then see each other's
            // writes to the array, but the counts keep the blob theirs.
            state.private = self
                .map
                .make_private(self.ring.fd(), BLOB_BASE + self.at)
                .is_ok();
        }
    }
}

/// The count in the first word of a blob's head page.
fn head_count(head: &Mapping) -> &AtomicU64 {
    // SAFETY: the head mapping is a whole page, page aligned (so aligned for AtomicU64), and
    // stays mapped while the returned reference borrows it. Its first word is used only as
    // this atomic, by every process holding the blob (the blob's bytes start DATA_SHIFT bytes
    // in, and its writer wrote them before any reader could count).
    unsafe { &*head.as_ptr().cast::<AtomicU64>() }
}

/// `os.register_at_fork(before=...)`: counts every lease of this process for the child.
pub(crate) fn before_fork() {
    FORKING.store(true, Ordering::Relaxed);
    let live = locked(&LIVE).clone();
    for lease in &live {
        lease.count_for_child();
    }
    *locked(&COUNTED) = live;
}

/// `os.register_at_fork(after_in_parent=...)`.
pub(crate) fn after_fork_in_parent() {
    FORKING.store(false, Ordering::Relaxed);
    locked(&COUNTED).clear();
}

/// `os.register_at_fork(after_in_child=...)`: gives back the counts of leases that were
/// dropped in the parent after they were counted, before the fork.
pub(crate) fn after_fork_in_child() {
    FORKING.store(false, Ordering::Relaxed);
    let counted = std::mem::take(&mut *locked(&COUNTED));
    let live = locked(&LIVE).clone();
    for lease in counted {
        if !live.iter().any(|l| Arc::ptr_eq(l, &lease)) {
            lease.give_back();
        }
    }
}

/// Ends every lease of this process (it is about to exit, and will run no more Python code
/// that could use them): their blobs go back to their queues for the processes that use them
/// on. An object still alive keeps its mapping until the process ends, but no longer frees
/// anything when it is dropped.
pub(crate) fn end_all() {
    let live = std::mem::take(&mut *locked(&LIVE));
    for lease in live {
        lease.give_back();
        locked(&lease.state).pinned = true;
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
    fn a_blob_is_freed_by_its_last_holder() {
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

        // Across a fork: the parent's drop leaves the child's count, which frees it.
        let (ring, at) = ring_with_blob(len);
        let lease = BlobLease::take(&ring, at, len).unwrap();
        before_fork();
        after_fork_in_parent();
        assert!(locked(&lease.state).private);
        lease.end();
        assert!(!ring.blob_alloc(len).unwrap().reused);
        assert!(lease.give_back()); // what the child's drop does
        assert_eq!(ring.blob_alloc(len).unwrap().at, at);

        // Dropped between the count and the fork: the child gives the count back.
        let (ring, at) = ring_with_blob(len);
        let lease = BlobLease::take(&ring, at, len).unwrap();
        before_fork();
        lease.end();
        after_fork_in_child();
        assert_eq!(ring.blob_alloc(len).unwrap().at, at);

        // Made between the count and the fork: counted for the child when made.
        let (ring, at) = ring_with_blob(len);
        before_fork();
        let lease = BlobLease::take(&ring, at, len).unwrap();
        after_fork_in_parent();
        lease.end();
        assert!(!ring.blob_alloc(len).unwrap().reused);

        // At exit: given back at once, and not again when the object goes.
        let (ring, at) = ring_with_blob(len);
        let lease = BlobLease::take(&ring, at, len).unwrap();
        end_all();
        lease.end();
        assert_eq!(ring.blob_alloc(len).unwrap().at, at);
        assert!(!ring.blob_alloc(len).unwrap().reused);
    }
}
