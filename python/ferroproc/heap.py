"""The per-process arena that `Value`, `Array`, `RawValue` and `RawArray` allocate from.

Same role and interface as `multiprocessing.heap`: `BufferWrapper(size)` reserves a block of
shared memory and gives it back when the wrapper is garbage-collected; `Heap` is the allocator
behind it (one per process, in `BufferWrapper._heap`).

Each `Arena` is one anonymous memfd chunk (`_ferroproc.ShmChunk`): nothing appears in
``/dev/shm`` and a crash leaks nothing. Many small objects share one chunk, so a thousand
`Value`s cost a handful of descriptors and mappings, not a thousand. A chunk travels to a
forked child with the address space and to a spawn/forkserver child as a descriptor handed
over while the child is being started.

Allocation is best fit over free blocks kept by length; a freed block merges with free
neighbours, and a chunk that becomes entirely free is released (keeping one spare below
``_DISCARD_FREE_SPACE_LARGER_THAN`` bytes for reuse). Frees that arrive while the heap is busy
(from the garbage collector, possibly in the middle of a ``malloc``) are queued and applied by
the next allocation, so a collection never deadlocks the heap.

Differences:
    Arenas are memfd chunks rather than unlinked files in ``/dev/shm``, and a wholly free
    arena below the release threshold is released when another free one exists (the stdlib
    keeps every such arena for the life of the process). `Arena` has no ``_choose_dir``.
"""

from __future__ import annotations

import _thread
import bisect
import ctypes
import os

from . import _ferroproc, util

__all__ = ["Arena", "BufferWrapper", "Heap"]

_PAGE = os.sysconf("SC_PAGESIZE")


def _rebuild_arena(size, dupfd):
    from .synchronize import _detach

    fd = _detach(dupfd)
    try:
        return Arena(size, _chunk=_ferroproc.ShmChunk(fd=fd))
    finally:
        os.close(fd)


class Arena:
    """One shared chunk of `size` bytes. Picklable only while a child is being started."""

    def __init__(self, size, fd=-1, *, _chunk=None):
        if _chunk is None:
            if fd != -1:
                _chunk = _ferroproc.ShmChunk(fd=fd)
            else:
                _chunk = _ferroproc.ShmChunk(size)
        self._chunk = _chunk
        self.size = size
        self.fd = _chunk.handle
        # The bytes as a ctypes array; it holds the chunk, so memoryviews over it (and ctypes
        # objects built on those) keep the mapping alive. No reference back: no cycle, so a
        # released arena is unmapped as soon as nothing uses it.
        self.buffer = (ctypes.c_char * size).from_address(_chunk.address)
        self.buffer._chunk = _chunk

    def __reduce__(self):
        from .synchronize import _dup_for_child

        return _rebuild_arena, (self.size, _dup_for_child(self, self.fd))

    def __repr__(self):
        return f"<{type(self).__name__} size={self.size} fd={self.fd}>"


class Heap:
    """Allocator of blocks ``(arena, start, stop)`` from this process's arenas."""

    _alignment = 8
    # A wholly free arena at least this large is released; smaller ones are kept as a spare.
    _DISCARD_FREE_SPACE_LARGER_THAN = 4 * 1024 * 1024
    _MIN_ARENA = 256 * 1024
    _MAX_ARENA = 16 * 1024 * 1024

    def __init__(self, size=_PAGE):
        self._lastpid = os.getpid()
        self._lock = _thread.allocate_lock()
        self._size = max(size, self._MIN_ARENA)
        self._arenas = []
        # length -> list of free blocks of that length; `_lengths` is its sorted key list.
        self._len_to_seq = {}
        self._lengths = []
        # Free blocks by their edges, for merging with neighbours.
        self._start_to_block = {}
        self._stop_to_block = {}
        # arena -> set of (start, stop) handed out
        self._allocated_blocks = {}
        # Frees that could not take the lock (garbage collection during malloc).
        self._pending_free_blocks = []
        self._n_mallocs = 0
        self._n_frees = 0

    @staticmethod
    def _roundup(n, alignment):
        return (n + alignment - 1) & ~(alignment - 1)

    def _new_arena(self, size):
        length = self._roundup(max(self._size, size), _PAGE)
        if self._size < self._MAX_ARENA:
            self._size *= 2
        util.info("allocating a new arena of %d bytes", length)
        arena = Arena(length)
        self._arenas.append(arena)
        return (arena, 0, length)

    def _add_free(self, block):
        arena, start, stop = block
        length = stop - start
        seq = self._len_to_seq.get(length)
        if seq is None:
            seq = self._len_to_seq[length] = []
            bisect.insort(self._lengths, length)
        seq.append(block)
        self._start_to_block[(arena, start)] = block
        self._stop_to_block[(arena, stop)] = block

    def _remove_free(self, block):
        arena, start, stop = block
        length = stop - start
        seq = self._len_to_seq[length]
        seq.remove(block)
        if not seq:
            del self._len_to_seq[length]
            del self._lengths[bisect.bisect_left(self._lengths, length)]
        del self._start_to_block[(arena, start)]
        del self._stop_to_block[(arena, stop)]

    def _take(self, size):
        """A free block of at least `size` bytes (best fit), removed from the free lists."""
        i = bisect.bisect_left(self._lengths, size)
        if i == len(self._lengths):
            return self._new_arena(size)
        block = self._len_to_seq[self._lengths[i]][-1]
        self._remove_free(block)
        return block

    def _release(self, block):
        """Returns a block to the free lists, merged with free neighbours."""
        arena, start, stop = block
        before = self._stop_to_block.get((arena, start))
        if before is not None:
            self._remove_free(before)
            start = before[1]
        after = self._start_to_block.get((arena, stop))
        if after is not None:
            self._remove_free(after)
            stop = after[2]
        if start == 0 and stop == arena.size and self._discardable(arena):
            self._arenas.remove(arena)
            return
        self._add_free((arena, start, stop))

    def _discardable(self, arena):
        if arena.size >= self._DISCARD_FREE_SPACE_LARGER_THAN:
            return True
        # Keep one wholly free small arena as a spare; release any other.
        return any(
            other is not arena
            and (other, 0) in self._start_to_block
            and self._start_to_block[(other, 0)][2] == other.size
            for other in self._arenas
        )

    def _free_pending_blocks(self):
        while self._pending_free_blocks:
            self._free_locked(self._pending_free_blocks.pop())

    def _free_locked(self, block):
        arena, start, stop = block
        blocks = self._allocated_blocks.get(arena)
        if blocks is None or (start, stop) not in blocks:
            # Not ours: a block inherited through fork, after this process started afresh.
            return
        blocks.remove((start, stop))
        if not blocks:
            del self._allocated_blocks[arena]
        self._n_frees += 1
        self._release(block)

    def free(self, block):
        """Gives `block` back (called when its `BufferWrapper` is collected)."""
        if os.getpid() != self._lastpid:
            # A block inherited through fork belongs to the parent's bookkeeping.
            return
        # Never wait here: the garbage collector may call us in the middle of malloc.
        if not self._lock.acquire(False):
            self._pending_free_blocks.append(block)
            return
        try:
            self._free_pending_blocks()
            self._free_locked(block)
        finally:
            self._lock.release()

    def malloc(self, size):
        """A block ``(arena, start, stop)`` of at least `size` bytes (8-byte aligned)."""
        if size < 0:
            raise ValueError(f"Size {size} out of range")
        if os.getpid() != self._lastpid:
            # A forked child: the parent's blocks stay mapped for the objects that use them,
            # but this process starts a bookkeeping of its own.
            self.__init__()
        with self._lock:
            self._n_mallocs += 1
            self._free_pending_blocks()
            size = self._roundup(max(size, 1), self._alignment)
            arena, start, stop = self._take(size)
            real_stop = start + size
            if real_stop < stop:
                self._add_free((arena, real_stop, stop))
            self._allocated_blocks.setdefault(arena, set()).add((start, real_stop))
            return (arena, start, real_stop)


class BufferWrapper:
    """A block of shared memory of `size` bytes, freed when this object is collected."""

    _heap = Heap()

    def __init__(self, size):
        if size < 0:
            raise ValueError(f"Size {size} out of range")
        if size >= (1 << 63):
            raise OverflowError(f"Size {size} too large")
        block = BufferWrapper._heap.malloc(size)
        self._state = (block, size)
        util.Finalize(self, BufferWrapper._heap.free, args=(block,))

    def create_memoryview(self):
        """A writable byte memoryview of the block."""
        (arena, start, _stop), size = self._state
        return memoryview(arena.buffer).cast("B")[start : start + size]

    def _address(self):
        (arena, start, _stop), _size = self._state
        return arena._chunk.address + start

    def _chunk_offset(self):
        (arena, start, _stop), _size = self._state
        return arena._chunk, start
