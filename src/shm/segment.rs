//! [`Segment`]: one memfd + one mapping holding a header and a `T`.

use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::layout::{segment_size, Header, SharedLayout, PAYLOAD_OFFSET};
use crate::error::{Error, Result};
use crate::sys::shm::{self, Mapping};

/// A shared segment holding one `T` after a [`Header`]. The mapping is unmapped and the fd
/// closed on drop; the memory goes away when the last process does the same.
pub struct Segment<T: SharedLayout> {
    map: Mapping,
    fd: OwnedFd,
    _payload: PhantomData<T>,
}

impl<T: SharedLayout> std::fmt::Debug for Segment<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("fd", &self.fd)
            .field("len", &self.map.len())
            .finish()
    }
}

impl<T: SharedLayout> Segment<T> {
    /// Creates a zeroed segment for a `T` (the all-zero `T` is valid by [`SharedLayout`]).
    ///
    /// # Errors
    /// The memfd/mmap errno (EMFILE, ENOMEM).
    pub fn create(name: &str) -> Result<Self> {
        let size = segment_size::<T>();
        let fd = shm::create(name, size)?;
        let map = Mapping::new(&fd, size)?;
        let header = Header::new::<T>(size);
        // SAFETY: the mapping is `size` ≥ 32 bytes long, page aligned (so aligned for Header),
        // and not yet visible to any other process or Rust reference: we are its only user.
        unsafe { map.as_ptr().cast::<Header>().write(header) };
        Ok(Self {
            map,
            fd,
            _payload: PhantomData,
        })
    }

    /// Maps the segment behind `fd` (received from another process) after validating its header.
    ///
    /// # Errors
    /// `Error::Protocol` for a descriptor that does not hold a compatible `T` segment; the
    /// fstat/mmap errno.
    pub fn attach(fd: OwnedFd) -> Result<Self> {
        let size = shm::size(fd.as_fd())?;
        if size < segment_size::<T>() {
            return Err(Error::Protocol(format!(
                "shared segment too small ({size} bytes)"
            )));
        }
        let map = Mapping::new(&fd, size)?;
        // SAFETY: the mapping is at least `segment_size::<T>()` > 32 bytes and page aligned;
        // the header is plain integers written once by the creator before the fd was shared, so
        // a plain read sees the complete value (any bit pattern is a valid Header).
        let header = unsafe { map.as_ptr().cast::<Header>().read() };
        header.validate::<T>(size).map_err(Error::Protocol)?;
        Ok(Self {
            map,
            fd,
            _payload: PhantomData,
        })
    }

    /// The shared `T`.
    #[must_use]
    #[inline]
    pub fn get(&self) -> &T {
        let payload = self.map.as_ptr().wrapping_add(PAYLOAD_OFFSET).cast::<T>();
        // SAFETY: the mapping holds `segment_size::<T>()` bytes, so PAYLOAD_OFFSET + size_of::<T>
        // is in range; the offset is 64-byte aligned within a page-aligned base, enough for
        // any SharedLayout (alignment ≤ 64). The bytes are a valid T (zeroed at creation or
        // written through atomics since), and the borrow is tied to `self`, which keeps the
        // mapping alive.
        unsafe { &*payload }
    }

    /// The memfd backing the segment (to hand to a child).
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::sys::fd::dup_cloexec;

    #[repr(C)]
    struct Probe {
        a: AtomicU32,
        b: AtomicU32,
    }
    // SAFETY: repr(C), two atomics, zero is a valid value.
    unsafe impl SharedLayout for Probe {
        const KIND: u32 = 0xFFFF_0001;
    }

    #[repr(C)]
    struct Other {
        a: AtomicU32,
    }
    // SAFETY: as above.
    unsafe impl SharedLayout for Other {
        const KIND: u32 = 0xFFFF_0002;
    }

    #[test]
    fn attach_sees_the_same_memory() {
        let s = Segment::<Probe>::create("t").unwrap();
        s.get().a.store(7, Ordering::SeqCst);
        let t = Segment::<Probe>::attach(dup_cloexec(s.fd()).unwrap()).unwrap();
        assert_eq!(t.get().a.load(Ordering::SeqCst), 7);
        t.get().b.store(9, Ordering::SeqCst);
        assert_eq!(s.get().b.load(Ordering::SeqCst), 9);
    }

    #[test]
    fn attach_rejects_other_kinds_and_foreign_files() {
        let s = Segment::<Probe>::create("t").unwrap();
        let e = Segment::<Other>::attach(dup_cloexec(s.fd()).unwrap()).unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{e:?}");
        let raw = shm::create("raw", 4096).unwrap();
        assert!(matches!(
            Segment::<Probe>::attach(raw),
            Err(Error::Protocol(_))
        ));
    }
}
