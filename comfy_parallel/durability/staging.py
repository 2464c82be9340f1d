"""The staging log: accepted prompts in a memory-mapped file until the journal's thread has them in SQLite.

Why: every SQLite statement gives the GIL up, and the event loop then waits for it behind busy worker threads
(10-25 ms a statement beside one to three spinning threads on a 16-core host; ``bench/gil_handover.py``). Writing
each accepted prompt to SQLite before answering cost 17-59% of the accepted prompts per second there
(``bench/results/crash_safe_queue_device.md``). A copy into a page of a shared memory-mapped file is no system call,
so the loop keeps the GIL: the ``POST /prompt`` handler copies the prompt here and answers at once, and
``journal_writer.py``'s thread moves it to SQLite. The kernel keeps a written page when the process dies (``kill -9``,
a native crash, the OOM killer) exactly as it keeps a WAL write with ``synchronous=NORMAL``; only a power loss or
kernel crash loses either. So the log is used with ``synchronous=NORMAL`` (and ``OFF``); with ``FULL`` the answer
waits for SQLite's fsync as before.

Layout: a 64-byte header (``MAGIC``, then at offset 8 the highest sequence number whose record is in SQLite), then
two equal regions of records, each record a 16-byte head (payload length, kind, sequence number) and the payload,
padded to 8 bytes. Records are appended in one region; when every record is in SQLite the next one starts at that
region's front again. The journal writer's thread writes to SQLite in gathered batches (``journal_writer.py``), so
under a steady load some record is nearly always waiting; once a region holds ``HOT_BYTES`` (or is full), records go
on at the front of the other one as soon as SQLite has all of that one (a record is never written over before SQLite
has it). So the log stays in its first pages: a page touched for the first time costs a page fault, taken while
holding the GIL (~4 us per 3 KB record measured on the 2-core VM, against ~1 us in a page already mapped).
Reading at a start follows the chain from each region's front (each record's number is its predecessor's plus
one, and a 0, a record being copied when the process died, ends it) and keeps the records SQLite does not have, in
order.

The file is allocated on disk in full when it is created: writing a page of a sparse file on a full disk would kill
the process with SIGBUS. A record that does not fit (the thread is far behind, or one prompt is larger than a
region) is not staged; the caller then waits for SQLite (``journal_writer.py``).

Plain Python (stdlib), no ComfyUI imports.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


MAGIC = b"CPSTAGE2"  # CPSTAGE1: one region (until 2026-11-30), read once at a start, then laid out anew
OLD_MAGIC = b"CPSTAGE1"
HEADER = 64
RECORD_HEAD = struct.Struct("<IIQ")  # payload length, kind, sequence number (the last 8 bytes: written last)
SEQ = struct.Struct("<Q")
HOT_BYTES = 256 << 10  # past this, a region goes on at the other's front if SQLite has all of that one
DEFAULT_SIZE = 32 << 20  # a region holds at least ~80 of the largest workflows people send (~200 KB of JSON)

ACCEPT = 1  # payload: the ``prompts`` row of one accepted prompt (``journal.row_bytes``)
FORGET = 2  # payload: JSON list of prompt ids a client deleted from the queue
START = 3  # payload: JSON [prompt id, device index]: a worker took it (a crash from now on counts for it)
FINISH = 4  # payload: JSON [prompt id, evicted history ids], a newline, the history entry's JSON (``journal.py``)
FORGET_HISTORY = 5  # payload: JSON list of history entries a client deleted, or null: all of them


@dataclass(frozen=True)
class Record:
    seq: int
    kind: int
    payload: bytes


def _padded(n: int) -> int:
    return (n + 7) & ~7


class StagingLog:
    """One memory-mapped file, appended to by any thread (under a lock the GIL is never given up in), emptied into
    SQLite by the journal writer's thread."""

    def __init__(self, path: Path | str, size: int = DEFAULT_SIZE) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            existing = os.fstat(fd).st_size
            size = max(size, existing)  # a larger log of an earlier run is read (and kept) at its own size
            if existing < size:
                _allocate(fd, existing, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size
        magic = self.map[:len(MAGIC)]
        self.moved_seq = SEQ.unpack_from(self.map, 8)[0] if magic in (MAGIC, OLD_MAGIC) else 0
        # What the last run accepted and SQLite does not have yet, read as that run laid the file out.
        written_size = existing if existing > HEADER else size
        fronts = (HEADER,) if magic == OLD_MAGIC else tuple(front for front, _ in _regions(written_size))
        self.left = self._read_chains(fronts)
        self.last_seq = max([self.moved_seq] + [r.seq for r in self.left])
        self.regions = _regions(size)
        # Else laid out at the first append, once the left records are applied.
        self.laid_out = magic == MAGIC and written_size == size
        self.region = 0
        self.offset = HEADER
        # The highest sequence number written into each region: a region is written again only once SQLite has
        # every record in it. Until the left records are applied (``recovery.apply_staged``), neither is.
        self.region_last = [self.last_seq, self.last_seq]

    def _read_chains(self, fronts: tuple[int, ...]) -> list[Record]:
        """The records after ``moved_seq`` of the chains starting at ``fronts``, in sequence order, up to a gap."""
        found: dict[int, Record] = {}
        for front in fronts:
            offset, previous = front, None
            while offset + RECORD_HEAD.size <= self.size:
                length, kind, seq = RECORD_HEAD.unpack_from(self.map, offset)
                end = offset + RECORD_HEAD.size + length
                if seq == 0 or (previous is not None and seq != previous + 1) or end > self.size:
                    break
                if seq > self.moved_seq:
                    found[seq] = Record(seq, kind, bytes(self.map[offset + RECORD_HEAD.size:end]))
                previous, offset = seq, offset + RECORD_HEAD.size + _padded(length)
        records = []
        for seq in sorted(found):
            if seq != self.moved_seq + 1 + len(records):
                break
            records.append(found[seq])
        return records

    @property
    def filling(self) -> bool:
        """The current region is more than half full: the writer's thread should not wait to gather more."""
        front, end = self.regions[self.region]
        return self.offset - front > (end - front) // 2

    def append(self, kind: int, payload: bytes, then: Callable[[int], None]) -> int | None:
        """Copy one record in and call ``then(seq)`` before anyone can append the next (the writer's inbox must see
        records in sequence order); None, and no call, when it does not fit.

        The sequence number is zeroed first and written last, each an aligned 8-byte store: a process that dies
        in between leaves a 0 there, which ends the chain, so the half-written record is never read (and nobody
        was told it was accepted)."""
        need = RECORD_HEAD.size + _padded(len(payload))
        with self.lock:
            if not self.laid_out:
                self._lay_out()
            front, end = self.regions[self.region]
            offset = front if self.last_seq == self.moved_seq else self.offset
            if offset + need > end or offset - front >= HOT_BYTES:
                other = 1 - self.region
                other_front, other_end = self.regions[other]
                if self.region_last[other] <= self.moved_seq and other_front + need <= other_end:
                    self.region, offset = other, other_front
                elif offset + need > end:
                    return None
            seq = self.last_seq + 1
            head = offset + RECORD_HEAD.size
            self.map[head - SEQ.size:head] = bytes(SEQ.size)  # 0 ends the chain until the record is whole
            self.map[offset:head] = RECORD_HEAD.pack(len(payload), kind, 0)
            self.map[head:head + len(payload)] = payload
            self.map[head - SEQ.size:head] = SEQ.pack(seq)
            self.last_seq, self.offset = seq, offset + need
            self.region_last[self.region] = seq
            then(seq)
        return seq

    def _lay_out(self) -> None:
        """A new file, or one of the one-region layout: the header, and each region's chain empty."""
        self.map[:HEADER] = MAGIC + SEQ.pack(self.moved_seq) + bytes(HEADER - len(MAGIC) - SEQ.size)
        for front, _ in self.regions:
            self.map[front:front + RECORD_HEAD.size] = bytes(RECORD_HEAD.size)
        self.laid_out = True

    def moved(self, seq: int) -> None:
        """Records up to ``seq`` are in SQLite: a restart must not apply them again (only the writer's thread)."""
        if seq > self.moved_seq:
            SEQ.pack_into(self.map, 8, seq)
            self.moved_seq = seq

    def close(self) -> None:
        with self.lock:
            self.map.close()


def _regions(size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two regions' (front, end) in a log of ``size`` bytes."""
    half = ((size - HEADER) // 2) & ~7
    return (HEADER, HEADER + half), (HEADER + half, HEADER + 2 * half)


def _allocate(fd: int, start: int, size: int) -> None:
    """Real blocks from ``start`` to ``size``, so a write into the mapping can never hit a full disk."""
    try:
        os.posix_fallocate(fd, start, size - start)
    except (AttributeError, OSError):  # no fallocate (macOS, some file systems): write the zeros instead
        chunk = bytes(1 << 20)
        for at in range(start, size, len(chunk)):
            os.pwrite(fd, chunk[:min(len(chunk), size - at)], at)
