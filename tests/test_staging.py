"""The staging log (durability/staging.py): accepted prompts survive a process death before SQLite has them.

The POST /prompt handler copies a prompt into a memory-mapped file and answers; the journal writer's thread then
writes it to SQLite. These tests kill a real process between the two, tear a record the way a death mid-copy does,
and check that the writer keeps a worker from starting a prompt before its row is stored. The whole server under
``kill -9`` is test_crash_safety.py's (the staging log is on by default there).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from comfy_parallel.durability import recovery
from comfy_parallel.durability.journal import RUNNING, Journal, prompt_row, row_bytes
from comfy_parallel.durability.journal_writer import JournalWriter
from comfy_parallel.durability.staging import ACCEPT, HEADER, RECORD_HEAD, StagingLog

REPO = Path(__file__).resolve().parent.parent


def item(n: int, prompt_id: str | None = None) -> tuple:
    return (n, prompt_id or f"p{n}", {"1": {"class_type": "CPSleep", "inputs": {"seconds": 0}}},
            {"client_id": "c"}, ["1"], {"api_key_comfy_org": "secret"})


def stage(log: StagingLog, n: int, route: str = "0") -> int:
    seq = log.append(ACCEPT, row_bytes(prompt_row(route, item(n), time.time())), lambda seq: None)
    assert seq is not None
    return seq


def reopen(path: Path, synchronous: str = "NORMAL") -> tuple[Journal, StagingLog | None]:
    journal = Journal(path)
    return journal, recovery.open_staging(journal, synchronous)


def test_staged_prompts_survive_kill_9_in_order_without_secrets(tmp_path: Path) -> None:
    """A process stages prompts, a deletion and a start, never writes SQLite, and is killed: the next start has
    exactly the accepted prompts that were not deleted, in order, with their routes and no secret, and the started
    one counts a crash."""
    db = tmp_path / "queue.sqlite3"
    script = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from comfy_parallel.durability.journal import RUNNING, Journal, prompt_row, row_bytes
        from comfy_parallel.durability.staging import ACCEPT, FORGET, START, StagingLog
        Journal({str(db)!r})  # the store exists; nothing is ever written to it
        log = StagingLog({str(db)!r} + ".staging")
        for n in range(5):
            item = (n, f"p{{n}}", {{"1": {{}}}}, {{"client_id": "c"}}, ["1"], {{"api_key_comfy_org": "secret"}})
            log.append(ACCEPT, row_bytes(prompt_row(str(n % 2), item, time.time())), lambda seq: None)
        log.append(FORGET, json.dumps(["p3"]).encode(), lambda seq: None)
        log.append(START, json.dumps(["p1", 1]).encode(), lambda seq: None)
        print("staged", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "staged"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    journal, staging = reopen(db)
    stored = journal.unfinished()
    assert [(p.prompt_id, p.route) for p in stored] == [("p0", "0"), ("p1", "1"), ("p2", "0"), ("p4", "0")]
    assert all(p.dropped_keys == ("api_key_comfy_org",) and "secret" not in json.dumps(p.item) for p in stored)
    assert [(p.prompt_id, p.state, p.device) for p in stored if p.device is not None] == [("p1", RUNNING, 1)]
    assert staging is not None and staging.left == [] and staging.moved_seq == 7
    assert journal.count_crash() == ["p1"]
    journal.close()
    again, _ = reopen(db)  # applied once: a second start finds them in SQLite only
    assert [p.prompt_id for p in again.unfinished()] == ["p0", "p1", "p2", "p4"]


def test_a_record_torn_by_a_death_mid_copy_is_never_read(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3.staging"
    log = StagingLog(path)
    for n in range(3):
        stage(log, n)
    torn_at = log.offset
    log.map[torn_at:torn_at + RECORD_HEAD.size] = RECORD_HEAD.pack(40, ACCEPT, 0)  # head copied, number not yet
    log.map[torn_at + RECORD_HEAD.size:torn_at + RECORD_HEAD.size + 7] = b'["p9", '
    log.map.flush()
    assert [r.seq for r in StagingLog(path).left] == [1, 2, 3]


def test_records_already_in_sqlite_are_not_applied_again(tmp_path: Path) -> None:
    """The writer marks what it wrote; a start applies only the rest (a finished prompt must not come back)."""
    path = tmp_path / "queue.sqlite3.staging"
    log = StagingLog(path)
    for n in range(4):
        stage(log, n)
    log.moved(3)
    assert [r.seq for r in StagingLog(path).left] == [4]


def test_the_log_starts_over_once_everything_is_in_sqlite_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    log = StagingLog(tmp_path / "s", size=4096)
    stage(log, 0)
    assert log.offset > HEADER
    log.moved(1)
    stage(log, 1)  # everything was moved: back at the front
    first_end = log.offset
    assert first_end - HEADER < 4096 // 4
    while log.append(ACCEPT, b"x" * 500, lambda seq: None) is not None:
        pass
    assert log.offset <= 4096 and log.append(ACCEPT, b"x" * 8000, lambda seq: None) is None
    assert [r.seq for r in StagingLog(tmp_path / "s").left][0] == 2  # seq 1 moved; 2.. the chain


def test_full_mode_applies_a_left_log_then_does_without_it(tmp_path: Path) -> None:
    """synchronous=FULL answers after SQLite's fsync, so it uses no staging log; one a NORMAL run left is applied
    and removed."""
    db = tmp_path / "queue.sqlite3"
    log = StagingLog(Path(f"{db}.staging"))
    stage(log, 7)
    log.close()
    journal, staging = reopen(db, "FULL")
    assert staging is None and not Path(f"{db}.staging").exists()
    assert [p.prompt_id for p in journal.unfinished()] == ["p7"]


class BlockingJournal(Journal):
    """SQLite writes of accepted prompts wait for ``release``: the journal thread is behind."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.release = threading.Event()

    def accepted_rows(self, rows, keep_existing: bool = False) -> None:  # type: ignore[no-untyped-def]
        assert self.release.wait(30)
        super().accepted_rows(rows, keep_existing)


def test_a_staged_prompt_is_queued_at_once_and_its_history_entry_waits_for_its_row(tmp_path: Path) -> None:
    """The answer and the worker's start need no SQLite; the history entry (which ends the prompt's row) waits
    until the row is there, or the thread's late INSERT would bring a finished prompt back."""
    db = tmp_path / "queue.sqlite3"
    journal = BlockingJournal(db)
    staging = recovery.open_staging(journal, "NORMAL")
    writer = JournalWriter(journal, None, staging)
    placed: list[bool] = []
    assert writer.accept("1", item(1), placed.append) is None  # durable already: the answer need not wait
    writer.started("p1", 1)  # staged too: the worker does not wait
    assert placed == [True] and journal.count() == 0
    assert writer.wait_stored("p1", timeout=0.05) is False  # its history entry would find no row
    waiter = threading.Thread(target=writer.wait_stored, args=("p1",))
    waiter.start()
    journal.release.set()
    waiter.join(30)
    assert not waiter.is_alive() and writer.wait_stored("p1", timeout=0) is True
    assert writer.flush()
    assert [(p.prompt_id, p.state, p.device) for p in journal.unfinished()] == [("p1", RUNNING, 1)]
    writer.requeued(["p1"])  # out of memory: it runs again, so it is not running now
    writer.accept("0", item(2), placed.append)
    writer.forget(["p2"])  # deleted right after it was accepted: it must not come back from the thread's insert
    assert writer.flush()
    assert [(p.prompt_id, p.state) for p in journal.unfinished()] == [("p1", "queued")] and staging is not None
    assert staging.moved_seq == staging.last_seq == 4


def test_a_prompt_that_cannot_be_stored_is_refused_and_not_queued(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "queue.sqlite3")
    writer = JournalWriter(journal, None, recovery.open_staging(journal, "NORMAL"))
    placed: list[bool] = []
    future = writer.accept("0", (1, "bad", {"1": {"x": object()}}, {}, ["1"]), placed.append)
    assert placed == [False] and future is not None
    with pytest.raises(TypeError, match="prompt bad cannot be stored as JSON"):
        future.result(0)
    assert writer.flush() and journal.count() == 0


def test_a_prompt_larger_than_the_log_is_written_through_before_it_is_queued(tmp_path: Path) -> None:
    """No room in the staging log: the prompt is queued only once SQLite has it, and the caller gets a future."""
    journal = BlockingJournal(tmp_path / "queue.sqlite3")
    writer = JournalWriter(journal, None, StagingLog(tmp_path / "queue.sqlite3.staging", size=4096))
    placed: list[bool] = []
    big = (1, "big", {"1": {"class_type": "CPSleep", "inputs": {"tag": "x" * 8000}}}, {}, ["1"], {})
    future = writer.accept("0", big, placed.append)
    assert future is not None and placed == []  # waits for SQLite: not queued yet
    journal.release.set()
    future.result(30)
    assert placed == [True] and [p.prompt_id for p in journal.unfinished()] == ["big"]


def test_a_record_the_kernel_did_not_keep_whole_is_left_out(tmp_path: Path) -> None:
    """A power loss can write back the page holding a record's number but not its payload: the start applies the
    other records, logs, and leaves that one out instead of storing garbage."""
    db = tmp_path / "queue.sqlite3"
    log = StagingLog(Path(f"{db}.staging"))
    stage(log, 1)
    log.append(ACCEPT, b'["p2", "0", 2, "[]", 0.0]\n{"not json', lambda seq: None)
    stage(log, 3)
    log.close()
    journal, staging = reopen(db)
    assert [p.prompt_id for p in journal.unfinished()] == ["p1", "p3"]
    assert staging is not None and staging.moved_seq == 3  # not applied again at the next start either
