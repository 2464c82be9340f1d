"""bench/crash_safe_queue.py --variant mmap_stage: the POST handler appends each accepted prompt to a memory-mapped
file (a copy into the page cache: no system call, so the event loop keeps the GIL; the kernel keeps the page when
the process dies, as it keeps a WAL write with synchronous=NORMAL) and answers at once; the journal writer's thread
then writes it to SQLite and queues it. The throughput side of a staging-log design (no replay at start here)."""

import asyncio
import json
import mmap
import os
import struct
from concurrent.futures import Future

from comfy_parallel.durability import journal, journal_writer

SIZE = 64 << 20
_state: dict = {}


def _stage(self) -> mmap.mmap:
    staged = _state.get("map")
    if staged is None:
        path = str(self.journal.path) + ".stage"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, SIZE)
        staged = _state["map"] = mmap.mmap(fd, SIZE)
        _state["offset"] = 0
        os.close(fd)
    return staged


def _accept_staged(self, route, item, place):  # type: ignore[no-untyped-def]
    staged = _stage(self)
    fields, dropped = journal.public_fields(item)
    record = json.dumps([route, fields, dropped]).encode()
    offset = _state["offset"]
    if offset + 8 + len(record) > SIZE:
        offset = 0
    staged[offset:offset + 8 + len(record)] = struct.pack("<II", len(record), 0) + record
    _state["offset"] = offset + 8 + len(record)
    with self.cond:
        self.pending.append((route, item, place, Future()))
        self.cond.notify_all()
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


journal_writer.JournalWriter.accept = _accept_staged
