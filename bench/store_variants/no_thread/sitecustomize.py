"""bench/crash_safe_queue.py --variant no_thread: everything is staged as by the store, but the journal thread ends
at once, so it never takes the GIL (not crash-safe beyond the log; a measurement of what the producers' encoding
and staging copies alone cost). The log is made large enough (512 MiB, its pages touched once at the start, so no
page fault is counted) that it never fills during a benchmark, as nothing ever empties it."""

import mmap

from comfy_parallel.durability import journal_writer, staging

SIZE = 512 << 20
_init = staging.StagingLog.__init__


def __init__(self, path, size=SIZE):  # type: ignore[no-untyped-def]
    _init(self, path, max(size, SIZE))
    for offset in range(0, self.size, mmap.PAGESIZE):
        self.map[offset] = self.map[offset]


def _run(self):  # type: ignore[no-untyped-def]
    return None


staging.StagingLog.__init__ = __init__  # type: ignore[method-assign]
journal_writer.JournalWriter._run = _run  # type: ignore[method-assign]
