"""The staging log (durability/staging.py): accepted prompts survive a process death before SQLite has them.

The POST /prompt handler copies a prompt into a memory-mapped file and answers; the journal writer's thread then
writes it to SQLite. These tests kill a real process between the two, tear a record the way a death mid-copy does,
and check that the writer keeps a worker from starting a prompt before its row is stored. The whole server under
``kill -9`` is test_crash_safety.py's (the staging log is on by default there).
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from harness import STAGED_RE

from comfy_parallel.durability import recovery
from comfy_parallel.durability.journal import RUNNING, Journal, prompt_row, row_bytes
from comfy_parallel.durability.journal_writer import JournalWriter
from comfy_parallel.durability.staging import (ACCEPT, HEADER, HOT_BYTES, MAGIC, OLD_MAGIC, RECORD_HEAD,
                                               StagingLog)

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


def test_staged_prompts_survive_kill_9_in_order_without_secrets(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A process stages prompts, a deletion, starts, history entries and a deletion of history, never writes
    SQLite, and is killed: the next start has exactly the accepted prompts that were neither deleted nor finished,
    in order, with their routes and no secret, the started one counts a crash, and the history entry that was not
    deleted is there without its secret."""
    db = tmp_path / "queue.sqlite3"
    script = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from comfy_parallel.durability.journal import Journal, finish_bytes, history_json, prompt_row, row_bytes
        from comfy_parallel.durability.staging import ACCEPT, FINISH, FORGET, FORGET_HISTORY, START, StagingLog
        Journal({str(db)!r})  # the store exists; nothing is ever written to it
        log = StagingLog({str(db)!r} + ".staging")
        for n in range(5):
            item = (n, f"p{{n}}", {{"1": {{}}}}, {{"client_id": "c"}}, ["1"], {{"api_key_comfy_org": "secret"}})
            log.append(ACCEPT, row_bytes(prompt_row(str(n % 2), item, time.time())), lambda seq: None)
        log.append(FORGET, json.dumps(["p3"]).encode(), lambda seq: None)
        log.append(START, json.dumps(["p1", 1]).encode(), lambda seq: None)
        log.append(START, json.dumps(["p2", 0]).encode(), lambda seq: None)
        entry = {{"prompt": [2, "p2", {{}}, {{"api_key_comfy_org": "secret"}}, ["1"]], "outputs": {{}}}}
        log.append(FINISH, finish_bytes("p2", history_json(entry), []), lambda seq: None)
        log.append(FINISH, finish_bytes("p4", history_json({{"outputs": {{}}}}), []), lambda seq: None)
        log.append(FORGET_HISTORY, json.dumps(["p4"]).encode(), lambda seq: None)
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
    with caplog.at_level(logging.INFO, logger="comfy_parallel"):
        journal, staging = reopen(db)
    # The line test_crash_safety.py counts what its kills left in the staging log by.
    assert [found.groups() for found in map(STAGED_RE.search, caplog.messages) if found] == [("5", "2", "1", "2", "1")]
    stored = journal.unfinished()
    assert [(p.prompt_id, p.route) for p in stored] == [("p0", "0"), ("p1", "1")]
    assert all(p.dropped_keys == ("api_key_comfy_org",) and "secret" not in json.dumps(p.item) for p in stored)
    assert [(p.prompt_id, p.state, p.device) for p in stored if p.device is not None] == [("p1", RUNNING, 1)]
    assert history(journal) == ["p2"] and "secret" not in json.dumps(journal.history_entry("p2"))
    assert staging is not None and staging.left == [] and staging.moved_seq == 11
    assert journal.count_crash() == ["p1"]
    journal.close()
    again, _ = reopen(db)  # applied once: a second start finds them in SQLite only
    assert [p.prompt_id for p in again.unfinished()] == ["p0", "p1"] and history(again) == ["p2"]


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


def test_an_accept_applied_again_keeps_the_stored_row_and_its_crashes(tmp_path: Path) -> None:
    """A death after SQLite has a record but before the log says so applies it again at the next start: a prompt
    stored already keeps its row, so its crash count survives (else a poisonous prompt would crash-loop)."""
    journal = Journal(tmp_path / "queue.sqlite3")
    row = prompt_row("1", item(1), time.time())
    journal.write_batch([row], {"p1": 1}, [])
    assert journal.count_crash() == ["p1"]
    journal.apply_staged([(ACCEPT, row), (ACCEPT, prompt_row("0", item(2), time.time()))])
    assert [(p.prompt_id, p.route, p.crashes) for p in journal.unfinished()] == [("p1", "1", 1), ("p2", "0", 0)]


def test_a_batch_holding_an_infinite_queue_number_is_written_whole(tmp_path: Path) -> None:
    """JSON has no infinity and a batch is one statement, all or none: a client's ``"number": 1e999`` must not
    fail the batch, and the prompt comes back with a number ComfyUI's queue can compare, behind the others."""
    journal = Journal(tmp_path / "queue.sqlite3")
    huge = (float("inf"), *item(2)[1:])
    journal.write_batch([prompt_row("0", huge, time.time()), prompt_row("0", item(1), time.time())], {}, [])
    stored = journal.unfinished()
    assert [p.prompt_id for p in stored] == ["p1", "p2"] and stored[0].item[0] == 1
    assert stored[1].item[0] == sys.float_info.max


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


def test_a_full_region_goes_on_in_the_other_once_sqlite_has_it_and_a_start_reads_both(tmp_path: Path) -> None:
    """Under a steady load some record is nearly always waiting, so the log never starts over at the front: the
    records go on in the other region, never over a record SQLite lacks, and a start reads them in order."""
    path = tmp_path / "s"
    log = StagingLog(path, size=4096)
    (front0, end0), (front1, end1) = log.regions
    seqs = []
    while log.region == 0:  # region 1 holds nothing unmoved: the records go on there
        seqs.append(log.append(ACCEPT, b"x" * 300, lambda seq: None))
    assert log.offset <= end1 and log.offset - 320 == front1
    log.moved(2)  # SQLite has 1 and 2, not 3.. in region 0
    while (seq := log.append(ACCEPT, b"y" * 300, lambda seq: None)) is not None:
        seqs.append(seq)
    assert log.region == 1  # region 0 still holds records SQLite lacks: refused, not written over
    assert [r.seq for r in StagingLog(path, size=4096).left] == seqs[2:]
    log.moved(seqs[-1] - 1)  # region 0 is all in SQLite now: the next record goes to its front
    seqs.append(log.append(ACCEPT, b"z" * 300, lambda seq: None))
    assert log.region == 0 and log.offset == front0 + 320
    left = StagingLog(path).left  # grown to the default size: read as it was laid out
    assert [(r.seq, r.payload[:1]) for r in left] == [(seqs[-2], b"y"), (seqs[-1], b"z")]


def test_under_a_steady_load_the_log_keeps_to_the_first_pages_of_its_regions(tmp_path: Path) -> None:
    """Some record always waiting: past ``HOT_BYTES`` a region goes on at the other's front as soon as SQLite has
    all of that one, so appends keep to pages already mapped instead of running through the whole file."""
    path = tmp_path / "s"
    log = StagingLog(path)
    (front0, _), (front1, _) = log.regions
    need = RECORD_HEAD.size + 1000
    seqs = []
    while log.region == 0:
        seqs.append(log.append(ACCEPT, b"a" * 1000, lambda seq: None))
    last_in_0 = seqs[-2]  # the last one went to region 1, as soon as region 0 held HOT_BYTES
    assert log.offset == front1 + need and (last_in_0 - 1) * need < HOT_BYTES <= last_in_0 * need
    while log.offset - front1 < HOT_BYTES + 10 * need:  # region 0 still waits for SQLite: region 1 goes on
        seqs.append(log.append(ACCEPT, b"b" * 1000, lambda seq: None))
    assert log.region == 1
    assert [r.seq for r in StagingLog(path).left] == seqs  # read in order across both regions
    log.moved(last_in_0)  # SQLite has region 0: the next record goes to its front
    seqs.append(log.append(ACCEPT, b"c" * 1000, lambda seq: None))
    assert log.region == 0 and log.offset == front0 + need
    assert [r.seq for r in StagingLog(path).left] == seqs[seqs.index(last_in_0) + 1:]


def test_a_log_of_the_one_region_layout_is_read_then_laid_out_anew(tmp_path: Path) -> None:
    """A log written before the two regions (``CPSTAGE1``, one chain from the front that may run past the middle) is
    applied at the start; the first new record lays the file out anew, so nothing of the old chain comes back."""
    db = tmp_path / "queue.sqlite3"
    path = Path(f"{db}.staging")
    old = StagingLog(path, size=1024)
    old.map[:8] = OLD_MAGIC
    offset = HEADER
    for n in range(4):  # past the middle of the file
        payload = row_bytes(prompt_row("0", item(n), 0.0))
        old.map[offset:offset + RECORD_HEAD.size] = RECORD_HEAD.pack(len(payload), ACCEPT, n + 1)
        old.map[offset + RECORD_HEAD.size:offset + RECORD_HEAD.size + len(payload)] = payload
        offset += RECORD_HEAD.size + ((len(payload) + 7) & ~7)
    assert offset > old.regions[1][0]
    old.close()
    journal, staging = reopen(db)
    assert [p.prompt_id for p in journal.unfinished()] == [f"p{n}" for n in range(4)]
    assert staging is not None and staging.moved_seq == 4
    stage(staging, 9)
    assert staging.map[:8] == MAGIC and [r.seq for r in StagingLog(path).left] == [5]


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

    def write_batch(self, rows, starts, finishes, evicted=()) -> None:  # type: ignore[no-untyped-def]
        assert self.release.wait(30)
        super().write_batch(rows, starts, finishes, evicted)


def history(journal: Journal) -> list[str]:
    return [r[0] for r in journal.conn.execute("SELECT prompt_id FROM history ORDER BY seq")]


def test_a_prompts_whole_life_is_staged_and_written_in_order(tmp_path: Path) -> None:
    """The answer, the worker's start and its history entry need no SQLite; the thread then writes them in the
    order they happened: a prompt accepted and finished while the thread was behind never gets a row, one finished
    later loses its row with its history entry, and a deletion is never undone by a late INSERT."""
    db = tmp_path / "queue.sqlite3"
    journal = BlockingJournal(db)
    staging = recovery.open_staging(journal, "NORMAL")
    writer = JournalWriter(journal, None, staging)
    placed: list[bool] = []
    assert writer.accept("1", item(1), placed.append) is None  # durable already: the answer need not wait
    writer.started("p1", 1)  # staged too: the worker does not wait
    writer.finished("p1", {"prompt": list(item(1)), "outputs": {}, "status": None}, [])  # nor for this
    assert writer.accept("0", item(2), placed.append) is None
    writer.started("p2", 0)
    assert placed == [True, True] and journal.count() == 0 and history(journal) == []
    journal.release.set()
    assert writer.flush()
    assert [(p.prompt_id, p.state, p.device) for p in journal.unfinished()] == [("p2", RUNNING, 0)]
    assert history(journal) == ["p1"]
    assert "secret" not in json.dumps(journal.history_entry("p1"))
    writer.requeued(["p2"])  # out of memory: it runs again, so it is not running now
    assert writer.flush() and [(p.prompt_id, p.state) for p in journal.unfinished()] == [("p2", "queued")]
    writer.finished("p2", {"prompt": list(item(2)), "outputs": {}, "status": None}, ["p1"])
    writer.accept("0", item(3), placed.append)
    writer.forget(["p3"])  # deleted right after it was accepted: it must not come back from the thread's insert
    writer.forget_history(["p2"])
    assert writer.flush()
    assert journal.unfinished() == [] and history(journal) == ["p1"]  # p1's eviction waits for 100 more
    assert staging is not None and staging.moved_seq == staging.last_seq == 9


def test_a_prompt_id_used_again_keeps_its_order_within_one_batch(tmp_path: Path) -> None:
    """ComfyUI lets a client send a prompt id again once it finished: the second prompt's row must survive the
    first one's history entry, though the thread writes both in one go."""
    journal = BlockingJournal(tmp_path / "queue.sqlite3")
    writer = JournalWriter(journal, None, recovery.open_staging(journal, "NORMAL"))
    placed: list[bool] = []
    writer.accept("0", item(1, "same"), placed.append)
    writer.finished("same", {"prompt": list(item(1, "same")), "outputs": {}, "status": None}, [])
    writer.accept("1", item(2, "same"), placed.append)
    journal.release.set()
    assert writer.flush()
    assert [(p.prompt_id, p.route) for p in journal.unfinished()] == [("same", "1")] and history(journal) == ["same"]


def test_a_batch_of_any_size_is_one_statement_in_the_order_it_happened(tmp_path: Path) -> None:
    """Every statement gives the GIL up and takes it back behind busy threads, so the thread writes a whole batch
    (here 300 accepts, 300 starts, 150 history entries, past the 100 rows a statement took before) as one."""
    journal = BlockingJournal(tmp_path / "queue.sqlite3")
    writer = JournalWriter(journal, None, recovery.open_staging(journal, "NORMAL"))
    placed: list[bool] = []
    for n in range(300):
        writer.accept(str(n % 3), item(n), placed.append)
        writer.started(f"p{n}", n % 3)
    for n in range(0, 300, 2):
        writer.finished(f"p{n}", {"prompt": list(item(n)), "outputs": {"1": {"n": [n]}}, "status": None}, [])
    statements: list[str] = []
    journal.conn.set_trace_callback(statements.append)
    journal.release.set()
    assert writer.flush()
    journal.conn.set_trace_callback(None)
    # The trace repeats a statement for each row its triggers handle.
    assert len(set(statements)) == 1 and statements[0].startswith("INSERT INTO staged") and placed == [True] * 300
    left = journal.unfinished()
    assert [(p.prompt_id, p.route, p.state, p.device) for p in left] == [
        (f"p{n}", str(n % 3), RUNNING, n % 3) for n in range(1, 300, 2)]
    assert left[0].item[2] == item(1)[2] and "secret" not in json.dumps([p.item for p in left])
    assert history(journal) == [f"p{n}" for n in range(0, 300, 2)]
    assert journal.history_entry("p298")["outputs"] == {"1": {"n": [298]}}


def test_a_history_entry_that_does_not_fit_is_written_before_the_worker_goes_on(tmp_path: Path) -> None:
    """No room in the staging log: the worker waits until the thread has written the entry, behind its row."""
    journal = Journal(tmp_path / "queue.sqlite3")
    writer = JournalWriter(journal, None, StagingLog(tmp_path / "queue.sqlite3.staging", size=4096))
    placed: list[bool] = []
    assert writer.accept("0", item(1), placed.append) is None
    writer.finished("p1", {"prompt": list(item(1)), "outputs": {"9": {"text": ["x" * 8000]}}, "status": None}, [])
    assert history(journal) == ["p1"] and journal.unfinished() == []


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


def test_what_the_store_encodes_reads_back_as_json_wrote_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """journal.dumps (orjson) against json.dumps: the same values after json.loads, including what orjson refuses
    (json writes it then) and what only default= can write; the one difference is NaN (null, as a browser writes
    it). Without orjson, json writes everything."""
    import dataclasses
    import datetime

    from comfy_parallel.durability import journal

    @dataclasses.dataclass
    class Box:
        size: int

    assert journal.orjson is not None  # a dependency: the fast path is the one that runs
    cases = [
        {"1": {"class_type": "KSampler", "inputs": {"seed": 2**63 - 1, "cfg": 7.5, "name": "\u00e9\u4e2d", "x": None}}},
        {7: "int key", 2.5: "float key", True: "bool key", None: "null key"},
        [("tuple", 1), ["list", -0.0, 1e300]],
        {"big": 2**70, "neg": -(2**80)},
        {"surrogate": "\ud800"},
    ]
    for obj in cases:
        assert json.loads(journal.dumps(obj)) == json.loads(json.dumps(obj)), obj
    odd = {"when": datetime.datetime(2026, 11, 30, 12, 0), "box": Box(3), "other": object}
    assert json.loads(journal.dumps(odd, default=str)) == json.loads(json.dumps(odd, default=str))
    assert json.loads(journal.dumps({"x": float("nan")})) == {"x": None}
    circular: dict = {}
    circular["self"] = [circular]
    for bad, error in ((circular, ValueError), ({(1, 2): "tuple key"}, TypeError), ({"x": object()}, TypeError)):
        with pytest.raises(error):
            journal.dumps(bad)
    monkeypatch.setattr(journal, "orjson", None)
    for obj in cases:
        assert journal.dumps(obj) == json.dumps(obj).encode()
    assert journal.dumps(odd, default=str) == json.dumps(odd, default=str).encode()
