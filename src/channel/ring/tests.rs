use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use super::*;
use crate::sync::testing::fork_run;
use crate::sys::fd::dup_cloexec;

fn write(ring: &RingBuffer, msg: &[u8]) -> WriteStep {
    let mut st = WriteState::default();
    ring.write_step(msg, &mut st, false).unwrap()
}

fn read(ring: &RingBuffer) -> Option<Vec<u8>> {
    let mut st = ReadState::default();
    match ring.read_step(&mut st).unwrap() {
        ReadStep::Message(m) => Some(m),
        ReadStep::Empty { .. } => None,
    }
}

#[test]
fn header_and_frame_math() {
    assert_eq!(decode_header(encode_header(END, 77)), (END, 77));
    assert_eq!(frame_len(0), 8);
    assert_eq!(frame_len(1), 16);
    assert_eq!(frame_len(8), 16);
    assert_eq!(frame_len(9), 24);
}

#[test]
fn capacity_is_a_clamped_power_of_two() {
    assert_eq!(RingBuffer::create(1000, 1, 0).unwrap().capacity(), 1024);
    assert_eq!(
        RingBuffer::create(1, 1, 0).unwrap().capacity(),
        MIN_CAPACITY
    );
}

#[test]
fn fifo_with_wrap_around() {
    let ring = RingBuffer::create(256, u32::MAX, 0).unwrap();
    for round in 0..200u32 {
        let a = vec![round as u8; (round % 50) as usize];
        let b = round.to_le_bytes().to_vec();
        assert_eq!(write(&ring, &a), WriteStep::Done);
        assert_eq!(write(&ring, &b), WriteStep::Done);
        assert_eq!(ring.len(), 2);
        assert_eq!(read(&ring).unwrap(), a);
        assert_eq!(read(&ring).unwrap(), b);
        assert!(ring.is_empty());
    }
    assert_eq!(read(&ring), None);
}

#[test]
fn full_by_bytes_and_by_maxsize() {
    let ring = RingBuffer::create(256, 3, 0).unwrap();
    for _ in 0..3 {
        assert_eq!(write(&ring, b"x"), WriteStep::Done);
    }
    assert!(matches!(write(&ring, b"x"), WriteStep::Full { .. }));
    for _ in 0..3 {
        read(&ring).unwrap();
    }
    let ring = RingBuffer::create(256, u32::MAX, 0).unwrap();
    let big = [7u8; 56]; // max whole frame: 64 bytes in a 256-byte ring
    for i in 0..10u8 {
        // The first four fill the ring, the rest go to the overflow log.
        assert_eq!(write(&ring, &[i; 56]), WriteStep::Done);
    }
    assert_eq!(ring.len(), 10);
    assert_eq!(
        read(&ring).unwrap(),
        big.to_vec().iter().map(|_| 0u8).collect::<Vec<_>>()
    );
    // While the log holds messages, new ones queue behind them (FIFO across ring and log).
    assert_eq!(write(&ring, b"tail"), WriteStep::Done);
    for i in 1..10u8 {
        assert_eq!(read(&ring).unwrap(), vec![i; 56]);
    }
    assert_eq!(read(&ring).unwrap(), b"tail");
    assert!(ring.is_empty());
    // Back to the ring once the log drained.
    assert_eq!(write(&ring, b"ring"), WriteStep::Done);
    assert_eq!(
        ring.shared().w.log_w.load(Ordering::Relaxed),
        ring.shared().r.log_r.load(Ordering::Relaxed)
    );
    assert_eq!(read(&ring).unwrap(), b"ring");
}

#[test]
fn large_messages_without_a_waiting_reader_use_the_log() {
    let ring = RingBuffer::create(256, u32::MAX, 0).unwrap();
    let msg: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    for _ in 0..3 {
        assert_eq!(write(&ring, &msg), WriteStep::Done);
    }
    for _ in 0..3 {
        assert_eq!(read(&ring).unwrap(), msg);
    }
    assert!(ring.is_empty());
}

/// Takes the reader lock, so that large writes stream.
fn with_waiting_reader(ring: &RingBuffer) {
    assert!(ring.shared().ctl.rlock.try_lock(futex::pid()));
}

#[test]
fn streamed_message_between_threads() {
    let ring = std::sync::Arc::new(RingBuffer::create(256, u32::MAX, 0).unwrap());
    let msg: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let r2 = std::sync::Arc::clone(&ring);
    let m2 = msg.clone();
    let h = std::thread::spawn(move || {
        let mut st = WriteState::default();
        loop {
            match r2.write_step(&m2, &mut st, false).unwrap() {
                WriteStep::Done => break,
                WriteStep::Full { seen } => r2.wait_space(seen, Duration::from_millis(50)).unwrap(),
            }
        }
    });
    let mut st = ReadState::default();
    let got = loop {
        match ring.read_step(&mut st).unwrap() {
            ReadStep::Message(m) => break m,
            ReadStep::Empty { seen } => ring.wait_data(seen, Duration::from_millis(50)).unwrap(),
        }
    };
    h.join().unwrap();
    assert_eq!(got, msg);
    assert_eq!(ring.len(), 0);
}

#[test]
fn nonblocking_write_never_starts_a_stream() {
    let ring = RingBuffer::create(256, u32::MAX, 0).unwrap();
    with_waiting_reader(&ring);
    let mut st = WriteState::default();
    assert_eq!(
        ring.write_step(&[1; 1000], &mut st, true).unwrap(),
        WriteStep::Done
    );
    assert!(!st.streaming);
    assert_eq!(read(&ring).unwrap(), vec![1; 1000]);
}

#[test]
fn an_aborted_stream_is_dropped_by_the_reader() {
    let ring = RingBuffer::create(256, u32::MAX, 0).unwrap();
    with_waiting_reader(&ring);
    let mut st = WriteState::default();
    assert!(matches!(
        ring.write_step(&[1; 1000], &mut st, false),
        Ok(WriteStep::Full { .. })
    ));
    assert!(st.streaming);
    let mut rs = ReadState::default();
    assert!(matches!(
        ring.read_step(&mut rs).unwrap(),
        ReadStep::Empty { .. }
    ));
    assert!(rs.in_stream());
    ring.abort_stream(&mut st);
    assert_eq!(write(&ring, b"next"), WriteStep::Done);
    assert_eq!(
        ring.read_step(&mut rs).unwrap(),
        ReadStep::Message(b"next".to_vec())
    );
    assert_eq!(ring.len(), 0);
}

#[test]
fn orphan_chunks_of_a_dead_reader_are_skipped() {
    let ring = RingBuffer::create(256, u32::MAX, 0).unwrap();
    with_waiting_reader(&ring);
    let mut st = WriteState::default();
    let msg = [3u8; 300];
    assert!(matches!(
        ring.write_step(&msg, &mut st, false).unwrap(),
        WriteStep::Full { .. }
    ));
    let mut rs = ReadState::default();
    let _ = ring.read_step(&mut rs).unwrap(); // takes START, then "dies"
    drop(rs);
    loop {
        if ring.write_step(&msg, &mut st, false).unwrap() == WriteStep::Done {
            break;
        }
        let mut other = ReadState::default();
        let _ = ring.read_step(&mut other).unwrap();
    }
    assert_eq!(write(&ring, b"after"), WriteStep::Done);
    assert_eq!(read(&ring).unwrap(), b"after");
    assert_eq!(ring.len(), 0);
}

#[test]
fn attach_validates() {
    let ring = RingBuffer::create(4096, 5, FLAG_JOINABLE).unwrap();
    let other = RingBuffer::attach(dup_cloexec(ring.fd()).unwrap()).unwrap();
    assert_eq!(other.capacity(), 4096);
    assert_eq!(other.maxsize(), 5);
    assert!(other.joinable());
    let raw = crate::sys::shm::create("raw", 8192).unwrap();
    assert!(matches!(RingBuffer::attach(raw), Err(Error::Protocol(_))));
}

#[test]
fn writer_killed_mid_stream_is_dropped_across_processes() {
    let ring = RingBuffer::create(256, u32::MAX, 0).unwrap();
    let child = fork_run(Duration::from_secs(10), || {
        let me = futex::pid();
        assert!(ring.shared().ctl.wlock.try_lock(me));
        with_waiting_reader(&ring);
        let mut st = WriteState::default();
        // Starts a stream that cannot finish (nobody reads), then dies holding the lock.
        let _ = ring.write_step(&[9u8; 5000], &mut st, false);
        0
    });
    assert_eq!(child.join(), 0);
    let mut rs = ReadState::default();
    let t = Instant::now();
    // The reader takes the published pieces, then finds the owner dead and drops them.
    loop {
        match ring.read_step(&mut rs).unwrap() {
            ReadStep::Message(m) => panic!("partial message delivered ({} bytes)", m.len()),
            ReadStep::Empty { .. } if !rs.in_stream() => break,
            ReadStep::Empty { .. } => assert!(t.elapsed() < Duration::from_secs(5)),
        }
    }
    // The next writer recovers the lock and the queue works.
    let me = futex::pid();
    let got = ring
        .shared()
        .ctl
        .wlock
        .lock_deadline(me, crate::deadline::Deadline::after_secs(Some(5.0)))
        .unwrap();
    assert!(matches!(got, Some(crate::sync::Acquired::Recovered { .. })));
    assert_eq!(write(&ring, b"ok"), WriteStep::Done);
    ring.shared().ctl.wlock.unlock().unwrap();
    assert_eq!(read(&ring).unwrap(), b"ok");
}

#[test]
fn producer_and_consumer_processes() {
    let ring = RingBuffer::create(1024, u32::MAX, 0).unwrap();
    let n = 20_000u32;
    let child = fork_run(Duration::from_secs(20), || {
        for i in 0..n {
            let msg = vec![(i % 251) as u8; (i % 700) as usize];
            let mut st = WriteState::default();
            loop {
                match ring.write_step(&msg, &mut st, false).unwrap() {
                    WriteStep::Done => break,
                    WriteStep::Full { seen } => {
                        ring.wait_space(seen, Duration::from_millis(50)).unwrap();
                    }
                }
            }
        }
        0
    });
    // Hold the reader lock like a blocked `get`: large messages then stream.
    with_waiting_reader(&ring);
    for i in 0..n {
        let mut st = ReadState::default();
        let m = loop {
            match ring.read_step(&mut st).unwrap() {
                ReadStep::Message(m) => break m,
                ReadStep::Empty { seen } => {
                    ring.wait_data(seen, Duration::from_millis(50)).unwrap();
                }
            }
        };
        assert_eq!(m, vec![(i % 251) as u8; (i % 700) as usize], "message {i}");
    }
    assert_eq!(child.join(), 0);
}

#[test]
fn peek_and_take_into_cover_ring_and_log() {
    let ring = RingBuffer::create(256, u32::MAX, 0).unwrap();
    assert_eq!(ring.peek().unwrap(), Next::Empty);
    // A message in two parts fits the ring as one frame.
    let mut st = WriteState::default();
    assert_eq!(
        ring.write_parts_step(&[b"ab", b"cde"], &mut st, false)
            .unwrap(),
        WriteStep::Done
    );
    // A large one in parts goes to the log (no reader), still in one record.
    let big = vec![4u8; 1000];
    let mut st = WriteState::default();
    assert_eq!(
        ring.write_parts_step(&[b"hdr", &big], &mut st, false)
            .unwrap(),
        WriteStep::Done
    );
    let n = ring.peek().unwrap();
    assert_eq!(n, Next::Whole(5));
    let mut buf = vec![0u8; 5];
    ring.take_into(n, &mut buf).unwrap();
    assert_eq!(buf, b"abcde");
    let n = ring.peek().unwrap();
    assert_eq!(n, Next::Log(1003));
    assert!(ring.take_into(Next::Log(7), &mut [0u8; 7]).is_err());
    let mut buf = vec![0u8; 1003];
    ring.take_into(n, &mut buf).unwrap();
    assert_eq!(&buf[..3], b"hdr");
    assert_eq!(&buf[3..], &big[..]);
    assert_eq!(ring.peek().unwrap(), Next::Empty);
    assert_eq!(ring.len(), 0);
}

#[test]
fn a_writer_waits_for_an_active_reader_instead_of_logging() {
    let ring = RingBuffer::create(256, u32::MAX, 0).unwrap();
    for _ in 0..4 {
        assert_eq!(write(&ring, &[1; 56]), WriteStep::Done);
    }
    // A reader holds the reader lock: backpressure instead of the log.
    assert!(ring.shared().ctl.rlock.try_lock(futex::pid()));
    assert!(matches!(write(&ring, &[2; 56]), WriteStep::Full { .. }));
    // Non-blocking writers never wait for bytes.
    let mut st = WriteState::default();
    assert_eq!(
        ring.write_step(&[3; 56], &mut st, true).unwrap(),
        WriteStep::Done
    );
    ring.shared().ctl.rlock.unlock().unwrap();
}

/// Bytes of memory the ring's memfd holds.
fn held(ring: &RingBuffer) -> u64 {
    nix::sys::stat::fstat(ring.fd.as_fd()).unwrap().st_blocks as u64 * 512
}

const MIB: usize = 1 << 20;

#[test]
fn blob_round_trip_starts_off_the_page_boundary() {
    let ring = RingBuffer::create(4096, u32::MAX, 0).unwrap();
    let data: Vec<u8> = (0..3 * MIB + 5).map(|i| (i % 251) as u8).collect();
    let blob = ring.blob_alloc(data.len()).unwrap();
    assert!(!blob.reused);
    assert_eq!(blob.at % PAGE, 0);
    assert_eq!(RingBuffer::blob_offset(blob.at) % PAGE, blob::DATA_SHIFT);
    ring.blob_write(blob, &[&data[..10], &data[10..]]).unwrap();
    let mut back = vec![0; data.len()];
    ring.blob_read(blob, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn a_freed_blob_is_reused_and_trimmed_to_the_next_message() {
    let ring = RingBuffer::create(4096, u32::MAX, 0).unwrap();
    let base = held(&ring);
    let big = vec![7u8; 8 * MIB];
    let blob = ring.blob_alloc(big.len()).unwrap();
    ring.blob_write(blob, &[&big]).unwrap();
    ring.blob_free(blob.at, big.len());
    // Kept as a spare: the memory stays, and the next allocation gets the same blob.
    assert!(held(&ring) >= base + 8 * MIB as u64);
    let again = ring.blob_alloc(MIB).unwrap();
    assert_eq!(again.at, blob.at);
    assert!(again.reused);
    // ... trimmed to what the smaller message needs.
    assert!(held(&ring) <= base + 2 * MIB as u64);
    let small = vec![9u8; MIB];
    ring.blob_write(again, &[&small]).unwrap();
    let mut back = vec![0; MIB];
    ring.blob_read(again, &mut back).unwrap();
    assert_eq!(back, small);
    // A spare too small for the next message is not taken: a fresh blob is.
    ring.blob_free(again.at, MIB);
    let fresh = ring.blob_alloc(2 * MIB).unwrap();
    assert!(fresh.at > blob.at && !fresh.reused);
}

#[test]
fn a_reused_blob_is_copied_through_a_kept_mapping_that_agrees_with_the_file() {
    let ring = RingBuffer::create(4096, u32::MAX, 0).unwrap();
    let first: Vec<u8> = (0..MIB + 77).map(|i| (i % 253) as u8).collect();
    let blob = ring.blob_alloc(first.len()).unwrap();
    ring.blob_write(blob, &[&first]).unwrap();
    ring.blob_free(blob.at, first.len());
    let mut mapped_before = None;
    for round in 0..4u8 {
        let again = ring.blob_alloc(MIB).unwrap();
        assert!(again.reused && again.at == blob.at);
        let data: Vec<u8> = (0..MIB).map(|i| (i % 241) as u8 ^ round).collect();
        ring.blob_write(again, &[&data[..5], &data[5..]]).unwrap();
        // The file holds what the mapping was given (a positional read sees it) ...
        let mut positional = vec![0; MIB];
        let plain = Blob {
            reused: false,
            ..again
        };
        ring.blob_read(plain, &mut positional).unwrap();
        assert!(
            positional == data,
            "round {round}: file differs from the write"
        );
        // ... and a read through the mapping sees the same bytes.
        let mut mapped = vec![0; MIB];
        ring.blob_read(again, &mut mapped).unwrap();
        assert!(mapped == data, "round {round}: mapped read differs");
        // The first copy of the reused blob (the write of round 0) is positional; meeting it
        // again (the read) maps it, and the mapping is kept from then on.
        let lists = ring.maps.0.lock().unwrap();
        assert_eq!(lists.maps.len(), 1);
        let addr = lists.maps[0].1.as_ptr() as usize;
        assert_eq!(*mapped_before.get_or_insert(addr), addr);
        drop(lists);
        ring.blob_free(again.at, MIB);
    }
}

#[test]
fn a_reused_blob_past_the_end_of_the_file_is_read_positionally() {
    // A corrupted message may name a "reused" blob the file does not hold: no mapping is
    // made (touching it would raise SIGBUS) and the read fails as a positional one does.
    let ring = RingBuffer::create(4096, u32::MAX, 0).unwrap();
    let bogus = Blob {
        at: 1 << 40,
        reused: true,
    };
    let mut buf = vec![0; MIB];
    assert!(matches!(ring.blob_read(bogus, &mut buf), Err(Error::Eof)));
    assert!(ring.maps.0.lock().unwrap().maps.is_empty());
}

#[test]
fn spares_are_bounded_in_number_and_size() {
    let ring = RingBuffer::create(4096, u32::MAX, 0).unwrap();
    let base = held(&ring);
    let one = vec![1u8; MIB];
    let blobs: Vec<Blob> = (0..blob::SPARES + 2)
        .map(|_| {
            let blob = ring.blob_alloc(MIB).unwrap();
            ring.blob_write(blob, &[&one]).unwrap();
            blob
        })
        .collect();
    for blob in &blobs {
        ring.blob_free(blob.at, MIB);
    }
    // Only SPARES blobs keep their memory; the others were punched out.
    let per_blob = (MIB as u64 + blob::DATA_SHIFT).next_multiple_of(PAGE);
    assert_eq!(held(&ring), base + blob::SPARES as u64 * per_blob);
    // A larger freed blob replaces the smallest spare.
    let two = vec![2u8; 2 * MIB];
    let blob = ring.blob_alloc(two.len()).unwrap();
    ring.blob_write(blob, &[&two]).unwrap();
    ring.blob_free(blob.at, two.len());
    let per_big = (2 * MIB as u64 + blob::DATA_SHIFT).next_multiple_of(PAGE);
    assert_eq!(
        held(&ring),
        base + (blob::SPARES as u64 - 1) * per_blob + per_big
    );
    // A blob over the size bound is never kept.
    let huge = usize::try_from(blob::SPARE_MAX).unwrap() + 1;
    let blob = ring.blob_alloc(huge).unwrap();
    ring.blob_write(blob, &[&vec![3u8; huge]]).unwrap();
    ring.blob_free(blob.at, huge);
    assert_eq!(
        held(&ring),
        base + (blob::SPARES as u64 - 1) * per_blob + per_big
    );
}

#[test]
fn spares_are_bounded_in_bytes() {
    // Spare bookkeeping needs no pages: blobs are freed unwritten (the file stays sparse).
    let ring = RingBuffer::create(4096, u32::MAX, 0).unwrap();
    let len = usize::try_from(blob::SPARE_MAX).unwrap() - 2 * PAGE as usize;
    let kept = usize::try_from(blob::SPARE_BYTES / blob::SPARE_MAX).unwrap();
    let blobs: Vec<Blob> = (0..=kept).map(|_| ring.blob_alloc(len).unwrap()).collect();
    for b in &blobs {
        ring.blob_free(b.at, len);
    }
    // Only as many as the byte bound allows come back, though slots were free.
    assert!(kept < blob::SPARES);
    let again: Vec<Blob> = (0..=kept).map(|_| ring.blob_alloc(len).unwrap()).collect();
    assert_eq!(again.iter().filter(|b| b.reused).count(), kept);
    assert!(!again[kept].reused);
}
