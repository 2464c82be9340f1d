"""bench/crash_safe_queue.py --variant batches_50ms: the journal thread as it was until 2026-12-01: it gathers for
50 ms instead of 250 ms and writes a batch as up to three statements of at most 100 rows each (accepted prompts,
starts, history entries) instead of one (``Journal.write_batch``), so it takes the GIL back several times per batch,
five times as many batches."""

from comfy_parallel.durability import journal, journal_writer

journal_writer.GATHER_S = 0.05


def write_batch(self, rows, starts, finishes, evicted=()):  # type: ignore[no-untyped-def]
    for start in range(0, len(rows), journal.MAX_ROWS_PER_STATEMENT):
        self.accepted_rows(rows[start:start + journal.MAX_ROWS_PER_STATEMENT])
    if starts:
        self.started_many(starts)
    if finishes:
        self.finished_many(finishes, evicted)


journal.Journal.write_batch = write_batch  # type: ignore[method-assign]
