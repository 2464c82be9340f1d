"""bench/crash_safe_queue.py --variant no_sqlite: the staging log is written, SQLite never (not crash-safe once the
log is full; a measurement of the floor: what the staging copies and the journal thread's Python alone cost the
accept rate). Every write of accepted prompts, starts and history entries is ``Journal.write_batch``."""

from comfy_parallel.durability import journal


def write_batch(self, rows, starts, finishes, evicted=()):  # type: ignore[no-untyped-def]
    return None


journal.Journal.write_batch = write_batch  # type: ignore[method-assign]
