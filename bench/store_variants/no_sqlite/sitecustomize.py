"""bench/crash_safe_queue.py --variant no_sqlite: the staging log is written, SQLite never (not crash-safe once the
log is full; a measurement of the floor: what the staging copies alone cost the accept rate)."""

from comfy_parallel.durability import journal_writer


def _store_staged(self, rows, starts, finishes, seq):  # type: ignore[no-untyped-def]
    if seq and self.staging is not None:
        self.staging.moved(seq)
    for f in finishes:
        if f.done is not None:
            f.done.set()


journal_writer.JournalWriter._store_staged = _store_staged  # type: ignore[method-assign]
