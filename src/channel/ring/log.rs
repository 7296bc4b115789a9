//! The overflow log: messages that do not fit the ring's free space, appended positionally to
//! the memfd after the mapped part and read back (then punched out) when the ring is empty.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use super::{RingBuffer, DATA_OFFSET, LOG_HEADER, PAGE};
use crate::error::{Error, Result};
use crate::sys::memfile;

impl RingBuffer {
    /// File offset of the overflow log.
    pub(super) fn log_base(&self) -> u64 {
        (DATA_OFFSET + self.capacity) as u64
    }

    /// Appends `msg` to the overflow log and publishes it (writer lock held).
    pub(super) fn append_log(&self, parts: &[&[u8]]) -> Result<()> {
        let w = &self.shared().w;
        let at = w.log_w.load(Ordering::Relaxed);
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut header = [0u8; LOG_HEADER];
        header[..8].copy_from_slice(&(len as u64).to_ne_bytes());
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        all.push(&header);
        all.extend_from_slice(parts);
        memfile::write_all_at(self.fd.as_fd(), &all, self.log_base() + at)?;
        w.log_w
            .store(at + (LOG_HEADER + len) as u64, Ordering::Release);
        self.after_publish(true);
        Ok(())
    }

    /// The length of the next overflow-log record, if any (reader lock held, ring empty).
    pub(super) fn peek_log(&self) -> Result<Option<usize>> {
        let sh = self.shared();
        let at = sh.r.log_r.load(Ordering::Relaxed);
        let end = sh.w.log_w.load(Ordering::Acquire);
        if at == end {
            return Ok(None);
        }
        let mut header = [0u8; LOG_HEADER];
        memfile::read_exact_at(self.fd.as_fd(), &mut header, self.log_base() + at)?;
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&header[..8]);
        let len = u64::from_ne_bytes(len_bytes);
        if len > end - at - LOG_HEADER as u64 {
            return Err(Error::Protocol(format!(
                "corrupted queue overflow record ({len} bytes)"
            )));
        }
        usize::try_from(len)
            .map(Some)
            .map_err(|_| Error::Protocol("queue overflow record too large".to_owned()))
    }

    /// Copies the next overflow-log record (of `buf.len()` bytes, from [`Self::peek_log`])
    /// into `buf` and frees it.
    pub(super) fn take_log_into(&self, buf: &mut [u8]) -> Result<()> {
        let sh = self.shared();
        let base = self.log_base();
        let at = sh.r.log_r.load(Ordering::Relaxed);
        memfile::read_exact_at(self.fd.as_fd(), buf, base + at + LOG_HEADER as u64)?;
        let next = at + (LOG_HEADER + buf.len()) as u64;
        sh.r.log_r.store(next, Ordering::Release);
        sh.r.consumed.fetch_add(1, Ordering::SeqCst);
        // Free the whole pages this record was the last user of.
        let (from, to) = ((base + at) / PAGE * PAGE, (base + next) / PAGE * PAGE);
        if to > from {
            memfile::punch_hole(self.fd.as_fd(), from, to - from);
        }
        self.free_space_signal();
        Ok(())
    }

    /// Takes the next overflow-log message, if any (reader lock held, ring empty).
    pub(super) fn take_log(&self) -> Result<Option<Vec<u8>>> {
        match self.peek_log()? {
            None => Ok(None),
            Some(len) => {
                let mut v = vec![0u8; len];
                self.take_log_into(&mut v)?;
                Ok(Some(v))
            }
        }
    }
}
