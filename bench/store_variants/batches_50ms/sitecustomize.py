"""bench/crash_safe_queue.py --variant batches_50ms: the journal thread as it was until 2026-12-01 (commit a9f6f26):
it gathers for 50 ms instead of 250 ms and writes a batch as up to three statements of at most 100 rows each
(accepted prompts, starts, history entries, with SQL texts that vary with the row count) instead of one
(``Journal.write_batch``), so it takes the GIL back several times per batch, five times as many batches."""

from comfy_parallel.durability import journal, journal_writer

journal_writer.GATHER_S = 0.05
_write_batch = journal.Journal.write_batch
N = journal.MAX_ROWS_PER_STATEMENT


def write_batch(self, rows, starts, finishes, evicted=()):  # type: ignore[no-untyped-def]
    for at in range(0, len(rows), N):
        chunk = rows[at:at + N]
        self._write(f"INSERT OR REPLACE INTO prompts {journal._PROMPT_COLUMNS} VALUES "
                    + ", ".join([journal._PROMPT_ROW] * len(chunk)), [v for row in chunk for v in row])
    ids = list(starts)
    for at in range(0, len(ids), N):
        chunk = ids[at:at + N]
        self._write(f"UPDATE prompts SET state = ?, device = CASE prompt_id {' '.join(['WHEN ? THEN ?'] * len(chunk))}"
                    f" END WHERE prompt_id IN ({', '.join('?' * len(chunk))})",
                    [journal.RUNNING, *(v for pid in chunk for v in (pid, starts[pid])), *chunk])
    for at in range(0, len(finishes), N):
        chunk = finishes[at:at + N]
        self._write("INSERT OR REPLACE INTO history (prompt_id, entry) VALUES " + ", ".join(["(?, ?)"] * len(chunk)),
                    [v for row in chunk for v in row])
    _write_batch(self, [], {}, [], evicted)  # the evictions, as the store makes them


journal.Journal.write_batch = write_batch  # type: ignore[method-assign]
