"""bench/crash_safe_queue.py --variant no_sqlite: the staging log is written, SQLite never (not crash-safe once the
log is full; a measurement of the floor: what the staging copies alone cost the accept rate)."""

from comfy_parallel.durability import journal_writer
from comfy_parallel.scheduling import queues


def _store_staged(self, rows, starts, seq):  # type: ignore[no-untyped-def]
    if seq and self.staging is not None:
        self.staging.moved(seq)
    if rows:
        with self.stored:
            self.unstored.difference_update(e.row[0] for e in rows)
            self.stored.notify_all()


journal_writer.JournalWriter._store_staged = _store_staged  # type: ignore[method-assign]
queues.History.write = lambda self, prompt_id, entry, evicted: None  # type: ignore[method-assign]
