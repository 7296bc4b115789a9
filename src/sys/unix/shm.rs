//! Anonymous shared memory: memfd creation, sizing and `MAP_SHARED` mappings.
//!
//! A memfd has no name in any filesystem, so nothing can outlive the last descriptor and the
//! last mapping: a crash (even `kill -9`) leaks nothing.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::error::Result;

/// Creates a close-on-exec memfd of `len` zero bytes. `name` shows up in `/proc/<pid>/fd` and
/// `/proc/<pid>/maps` (as `/memfd:<name> (deleted)`) for debugging only.
///
/// # Errors
/// The `memfd_create`/`ftruncate` errno (EMFILE, ENOMEM).
pub fn create(name: &str, len: usize) -> Result<OwnedFd> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC)?;
    let len = libc::off_t::try_from(len).map_err(|_| Errno::EINVAL)?;
    nix::unistd::ftruncate(&fd, len)?;
    Ok(fd)
}

/// The current size in bytes of the file behind `fd`.
///
/// # Errors
/// The `fstat` errno (EBADF).
pub fn size(fd: BorrowedFd<'_>) -> Result<usize> {
    let st = nix::sys::stat::fstat(fd)?;
    usize::try_from(st.st_size).map_err(|_| Errno::EOVERFLOW.into())
}

/// Size of a transparent huge page on x86-64 and arm64 (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the whole 2 MiB pages inside `[ptr, ptr + len)` of this process's
/// private memory with transparent huge pages when they are first touched (`MADV_HUGEPAGE`),
/// as numpy does for its large arrays: filling a fresh 64 MiB buffer then takes 32 page faults
/// instead of 16384. A hint only; failures (no THP support, THP disabled) are ignored.
pub fn advise_huge_pages(ptr: *mut u8, len: usize) {
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize).saturating_add(len) / HUGE_PAGE * HUGE_PAGE;
    if end <= start {
        return;
    }
    let Some(addr) = NonNull::new(start as *mut c_void) else {
        return;
    };
    // SAFETY: `[start, end)` lies inside the caller's allocation (rounded inward), so it is
    // mapped memory of this process. MADV_HUGEPAGE only sets a flag on the mapping: it neither
    // changes nor frees any byte, so no Rust object can observe it.
    let _ = unsafe {
        nix::sys::mman::madvise(addr, end - start, nix::sys::mman::MmapAdvise::MADV_HUGEPAGE)
    };
}

/// A read-write mapping owned by this value: `MAP_SHARED` of a file ([`Mapping::new`],
/// [`Mapping::range`]), or private anonymous memory ([`Mapping::anonymous`]). Unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<c_void>,
    len: NonZeroUsize,
}

// SAFETY: a Mapping is an address range owned by this value alone; it has no thread affinity,
// and moving it to another thread moves the duty to unmap with it.
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` only hands out the base address and length; what is stored in the range
// is accessed through atomics by the layers above (shm::segment enforces that) or, for private
// memory, by whoever the owner grants exclusive access (see `channel::pybuf::RecvBuffer`).
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `fd` shared and read-write.
    ///
    /// # Errors
    /// EINVAL for `len == 0`; the `mmap` errno (ENOMEM, EACCES).
    pub fn new(fd: impl AsFd, len: usize) -> Result<Self> {
        Self::range(fd, 0, len, false)
    }

    /// Maps `len` bytes of fresh private memory of this process (ordinary memory: copied on
    /// write in a fork child; pages are allocated when first touched).
    ///
    /// # Errors
    /// EINVAL for `len == 0`; the `mmap` errno (ENOMEM).
    pub fn anonymous(len: usize) -> Result<Self> {
        let len = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        // SAFETY: a fresh anonymous range at an address of the kernel's choosing: nothing else
        // is aliased or overwritten; the result is owned by the returned Mapping.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }?;
        Ok(Self { ptr, len })
    }

    /// Maps `len` bytes of `fd` from file offset `offset` (page aligned) shared and
    /// read-write; with `populate`, maps every page the file has there at once
    /// (`MAP_POPULATE`: one call instead of a fault per page on first access).
    ///
    /// The range may extend past the end of the file, but touching a page that lies wholly
    /// beyond it raises SIGBUS: callers check the file's size first.
    ///
    /// # Errors
    /// EINVAL for `len == 0` or an unaligned or too large `offset`; the `mmap` errno.
    pub fn range(fd: impl AsFd, offset: u64, len: usize, populate: bool) -> Result<Self> {
        let len = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        let offset = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let mut flags = MapFlags::MAP_SHARED;
        if populate {
            flags |= MapFlags::MAP_POPULATE;
        }
        // SAFETY: we ask the kernel for a fresh range (no fixed address), so no existing Rust
        // object is aliased or overwritten; the result is owned by the returned Mapping.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        }?;
        Ok(Self { ptr, len })
    }

    /// Turns this shared mapping of `fd` (made by [`Mapping::range`] at `offset`) into a
    /// private one of the same file range, in place: the bytes read the same, but from now on
    /// a write goes to a copy-on-write page of this process (and, after a fork, of the process
    /// that makes it), never to the file. The address and length stay the same.
    ///
    /// # Errors
    /// The `mmap` errno; Linux 6.12 and later then leave the mapping as it was, shared (older
    /// kernels may have unmapped it).
    pub fn make_private(&self, fd: impl AsFd, offset: u64) -> Result<()> {
        let offset = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let addr = NonZeroUsize::new(self.ptr.as_ptr() as usize).ok_or(Errno::EINVAL)?;
        // SAFETY: MAP_FIXED replaces exactly this mapping's own range, which this value owns,
        // with a mapping of the same file range and protection: every byte reads as it did
        // (the shared pages are the file's, and the private mapping starts as a view of them),
        // so pointers into the range handed out before stay valid and see the same contents.
        // On failure (ENOMEM for the private mapping's commit charge, or too many mappings)
        // Linux 6.12 and later put the old mapping back before returning.
        unsafe {
            mmap(
                Some(addr),
                self.len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_FIXED,
                fd,
                offset,
            )
        }?;
        Ok(())
    }

    /// Writes to every page of this private mapping once, without changing a byte
    /// (`MADV_POPULATE_WRITE`): each page of a private file mapping becomes this process's
    /// own copy, so the mapping no longer depends on the file's pages (they may be reused),
    /// and a fork child shares the copies copy-on-write like any private memory.
    ///
    /// # Errors
    /// The `madvise` errno: EINVAL before Linux 5.14, ENOMEM, EFAULT.
    pub fn populate_write(&self) -> Result<()> {
        // SAFETY: the range is exactly this mapping. MADV_POPULATE_WRITE faults each page in
        // for writing without storing anything: every byte keeps its value, so no Rust view
        // of them (or a view handed to Python) can observe it, beyond the pages becoming
        // private copies.
        unsafe {
            nix::sys::mman::madvise(
                self.ptr,
                self.len.get(),
                nix::sys::mman::MmapAdvise::MADV_POPULATE_WRITE,
            )
        }?;
        Ok(())
    }

    /// The base address (page aligned).
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr().cast()
    }

    /// The mapped length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len.get()
    }

    /// Always false: mappings are never empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// For a mapping made by [`Mapping::anonymous`] whose contents are no longer needed: lets
    /// the kernel take the pages back when it needs memory (`MADV_FREE`). Until it does, the
    /// next write to a page costs no fault; after, the page reads as zeros. Best effort (a
    /// file mapping is refused, and left as it is).
    pub fn lazy_free(&self) {
        // SAFETY: the range is exactly this mapping. Its bytes may become zeros at any time
        // after this call: callers keep no view of them, and any later user writes the bytes it
        // reads (see RecvBuffer).
        let _ = unsafe {
            nix::sys::mman::madvise(
                self.ptr,
                self.len.get(),
                nix::sys::mman::MmapAdvise::MADV_FREE,
            )
        };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe exactly the range mmap returned when this value was made,
        // mapped once and unmapped only here; borrows handed out by `shm::Segment` (and views
        // of a RecvBuffer) cannot outlive `self`.
        let r = unsafe { munmap(self.ptr, self.len.get()) };
        debug_assert!(r.is_ok(), "munmap of our own mapping cannot fail");
    }
}
