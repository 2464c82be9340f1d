"""Crash safety: the write-ahead queue and ``serve --supervise`` lose no accepted prompt when the process dies.

``kill -9`` three times under a 1,000-prompt load over every route with websocket clients; a node that calls
``os.abort()`` (crashes twice, then is recorded as an error); a CUDA error that poisons a device context ends the
process with its own exit code. The figures go to tests/results/reliability.md (see reliability_results.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import pytest
import reliability_results
from harness import ARTIFACTS, STAGED_RE, Server, prompt_id_for, sleep_prompt, tag_of

from comfy_parallel.scheduling import cuda_fatal
from comfy_parallel.durability import recovery
from comfy_parallel.durability.journal import Journal
from comfy_parallel.durability.recovery import CRASHED_TWICE_MESSAGE, RETRY_EVENT

N_PROMPTS = 1000
KILLS = 3
ROUTES = ("header", "port", "prefix", "default")  # default: no target, so the pool (the default route)
STARTED_RE = re.compile(r"\[GPU (\d+)\] prompt (\S+) started")
FINISHED_RE = re.compile(r"\[GPU \d+\] prompt (\S+) finished: ")
STORE = Path("__comfy_parallel") / "queue.sqlite3"


def starts_in_log(log: str) -> dict[str, list[int]]:
    """prompt id -> the device of every execution the server logged as started (over every restart)."""
    out: dict[str, list[int]] = {}
    for gpu, pid in STARTED_RE.findall(log):
        out.setdefault(pid, []).append(int(gpu))
    return out


def retry_flags(entry: dict) -> list[dict]:
    return [data for event, data in entry["status"]["messages"] if event == RETRY_EVENT]


def fresh_user_dir(name: str) -> Path:
    path = ARTIFACTS / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def history_through_restarts(s: Server, prompt_id: str, timeout: float = 120) -> dict:
    """``s.wait_history``, going on polling while the server is down between a crash and its restart."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            found = s.get(f"/history/{prompt_id}").json()
            if prompt_id in found:
                return found[prompt_id]
        except OSError:
            assert s.proc is not None and s.proc.poll() is None, s.log()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} not in history after {timeout}s:\n{s.log()[-3000:]}")


def ready_through_restarts(s: Server, timeout: float = 90) -> dict:
    """``/ready``'s body once it answers 200. A restarted server serves /history (the stored entries, the records
    its recovery made) before its workers have started, so /ready can still say ``starting`` then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            resp = s.get("/ready")
            if resp.status == 200:
                return resp.json()
        except OSError:
            assert s.proc is not None and s.proc.poll() is None, s.log()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"/ready not 200 after {timeout}s:\n{s.log()[-3000:]}")


def finished_in_last_run(log: str) -> set[str]:
    """Prompt ids the last server process the supervisor started logged as finished."""
    last = log.rsplit("comfy-parallel supervisor: server started", 1)[-1]
    return set(FINISHED_RE.findall(last))


def child_pid(s: Server) -> int | None:
    """The server process the supervisor runs now (None while it restarts)."""
    assert s.proc is not None
    children = psutil.Process(s.proc.pid).children()
    return children[0].pid if children else None


async def wait_ready(session: aiohttp.ClientSession, s: Server, timeout: float = 90) -> float:
    """Poll /ready until it answers 200; return when it did (time.monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(s.url + "/ready") as resp:
                if resp.status == 200:
                    return time.monotonic()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            pass
        if s.proc is not None and s.proc.poll() is not None:
            raise AssertionError(f"supervisor exited with {s.proc.returncode}:\n{s.log()[-3000:]}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"/ready not 200 after {timeout}s:\n{s.log()[-3000:]}")


# -- plain pieces ---------------------------------------------------------------------------------------------------

def test_cuda_errors_that_poison_a_context_are_told_apart() -> None:
    def status(message: str, kind: str = "RuntimeError") -> dict:
        return {"messages": [("execution_start", {}), ("execution_error", {"exception_type": kind,
                                                                            "exception_message": message})]}

    for message in ("CUDA error: an illegal memory access was encountered",
                    "CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA",
                    "CUDA error: uncorrectable ECC error encountered", "CUDA error: unspecified launch failure"):
        assert cuda_fatal.poisoning_error(status(message)) is not None, message
    for message in ("CUDA out of memory. Tried to allocate 2.00 GiB", "boom", "Expected all tensors on cuda:0",
                    "illegal memory access"):  # not a CUDA error message
        assert cuda_fatal.poisoning_error(status(message)) is None, message
    assert cuda_fatal.poisoning_error(None) is None


def test_store_is_one_process_own(tmp_path: Path) -> None:
    """Two servers on one file would run every prompt twice: the second one must not start on it."""
    from comfy_parallel.durability.recovery import JournalInUse, open_journal

    first = Journal(tmp_path / "queue.sqlite3")
    first.accepted("0", (1, "p", {}, {}, [], {}))
    with pytest.raises(JournalInUse, match="in use by another process"):
        open_journal(tmp_path / "queue.sqlite3")
    assert (tmp_path / "queue.sqlite3").exists() and first.count() == 1  # not moved aside
    first.close()
    assert [p.prompt_id for p in open_journal(tmp_path / "queue.sqlite3").unfinished()] == ["p"]


def test_a_sqlite_without_json_functions_is_refused_and_the_store_left_alone(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The store writes its batches through SQLite's JSON functions. A Python whose SQLite lacks them (here: denied
    by an authorizer) gets an error that says so, and the store file is not moved aside as if it were unreadable."""
    import sqlite3

    from comfy_parallel.durability.journal import StoreUnsupported
    from comfy_parallel.durability.recovery import open_journal

    path = tmp_path / "queue.sqlite3"
    stored = Journal(path)
    stored.accepted("0", (1, "p", {}, {}, [], {}))
    stored.close()
    connect = sqlite3.connect

    def without_json(*args, **kwargs):  # type: ignore[no-untyped-def]
        conn = connect(*args, **kwargs)
        conn.set_authorizer(lambda action, _a, name, _db, _t: sqlite3.SQLITE_DENY
                            if action == sqlite3.SQLITE_FUNCTION and name.startswith("json") else sqlite3.SQLITE_OK)
        return conn

    monkeypatch.setattr(sqlite3, "connect", without_json)
    with pytest.raises(StoreUnsupported, match="no JSON functions.*--no-persist"):
        open_journal(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["queue.sqlite3"]
    assert [p.prompt_id for p in open_journal(path).unfinished()] == ["p"]


def test_history_of_earlier_runs_answers_by_id_while_the_listing_starts_empty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one rule for every start (crash or clean stop): /history/{id} finds what finished before it; the
    /history listing, its offset and max_items start empty, as stock's; the store keeps the last N in all."""
    from comfy_parallel.durability import recovery
    from comfy_parallel.scheduling import queues

    monkeypatch.setattr(queues, "MAXIMUM_HISTORY_SIZE", 3)
    monkeypatch.setattr(recovery, "MAXIMUM_HISTORY_SIZE", 3)
    path = tmp_path / "queue.sqlite3"

    def run(finished: list[str]) -> queues.DeviceQueues:
        qs = queues.DeviceQueues(2, lambda: None)
        journal = Journal(path)
        qs.history_store.journal = journal
        recovery.load_history(qs, journal, None)
        for pid in finished:
            journal.accepted("1", (1, pid, {}, {}, [], {}))
            qs.history_store.record(pid, {"prompt": [1, pid, {}, {}, []], "outputs": {}, "gpu_id": 1})
        return qs

    first = run(["a", "b", "c"])
    assert list(first.get_history()) == ["a", "b", "c"]
    first.history_store.journal.close()
    second = run([])
    assert second.get_history() == {} and second.get_history(max_items=2, offset=0) == {}
    assert second.get_history("b")["b"]["gpu_id"] == 1 and second.get_history("nope") == {}
    assert list(second.get_history("a", map_function=lambda e: {"mapped": e["gpu_id"]}).values()) == [{"mapped": 1}]
    second.delete_history_item("b")
    second.history_store.record("d", {"prompt": [], "outputs": {}, "gpu_id": 0})
    second.history_store.record("e", {"prompt": [], "outputs": {}, "gpu_id": 0})  # 4 in all: the limit's N + 1
    assert list(second.get_history()) == ["d", "e"] and second.get_history("a") and second.get_history("c")
    second.history_store.record("f", {"prompt": [], "outputs": {}, "gpu_id": 0})  # "a", the oldest, goes
    assert second.get_history("a") == {} and list(second.get_history()) == ["d", "e", "f"]
    second.history_store.journal.close()
    third = run([])
    assert third.get_history() == {}
    assert [pid for pid in "abcdef" if third.get_history(pid)] == ["c", "d", "e", "f"]
    third.wipe_history()
    assert third.get_history("c") == {} and third.history_store.journal.history_ids(10) == []


def test_threads_write_the_store_at_once(tmp_path: Path) -> None:
    """Writes take no lock of ours (SQLite serializes a shared connection): the event loop's batches, the workers'
    starts and history entries and clients' deletes, from threads at once, all land."""
    import threading

    from comfy_parallel.durability.journal import MAX_ROWS_PER_STATEMENT

    journal = Journal(tmp_path / "queue.sqlite3")
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for n in range(0, 300, 3):
                items = [(str(w), (n + k, f"{w}-{n + k}", {"1": {}}, {}, ["1"], {})) for k in range(3)]
                journal.accepted_many(items)
                for _, item in items:
                    journal.started(item[1], w)
                    journal.finished(item[1], {"prompt": list(item[:5]), "outputs": {}, "gpu_id": w})
                journal.forget_history([f"{w}-{n}"])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert journal.count() == 0 and len(journal.history_ids(10_000)) == 4 * 200
    journal.accepted_many([("0", (i, f"x{i}", {}, {}, [], {})) for i in range(3 * MAX_ROWS_PER_STATEMENT + 1)])
    assert journal.count() == 3 * MAX_ROWS_PER_STATEMENT + 1  # any number in one statement


def test_evicted_history_leaves_the_store_in_batches(tmp_path: Path) -> None:
    """Beyond the history limit every prompt evicts one entry: they are deleted in one statement per batch, an
    entry written again meanwhile stays, and the next start trims what is left over."""
    from comfy_parallel.durability.journal import MAX_ROWS_PER_STATEMENT

    journal = Journal(tmp_path / "queue.sqlite3")
    n = MAX_ROWS_PER_STATEMENT
    for i in range(2 * n):
        journal.finished(f"p{i}", {"outputs": {}})
    for i in range(n - 1):  # one short of a batch: nothing deleted yet
        journal.finished(f"q{i}", {"outputs": {}}, evicted=[f"p{i}"])
    assert len(journal.history_ids(10 * n)) == 3 * n - 1
    journal.finished("p0", {"outputs": {"again": 1}})  # written again before its eviction went through
    journal.finished(f"q{n - 1}", {"outputs": {}}, evicted=[f"p{n - 1}", f"p{n}"])  # the batch is due
    ids = journal.history_ids(10 * n)
    assert "p0" in ids and not {f"p{i}" for i in range(1, n + 1)} & set(ids) and len(ids) == 2 * n
    assert journal.history_ids(5) == ids[-5:] and journal.history_ids(10 * n) == ids[-5:]  # trimmed at a start


def test_supervisor_restart_policy() -> None:
    from comfy_parallel.ops import supervisor

    assert [supervisor.restart_delay(n) for n in (1, 2, 3, 4, 20)] == [0.0, 1.0, 2.0, 4.0, supervisor.MAX_DELAY_S]
    assert supervisor.describe(-9) == "killed by SIGKILL" and "CUDA" in supervisor.describe(cuda_fatal.EXIT_CODE)


def test_prompts_retried_after_a_crash_run_alone() -> None:
    """So that only the prompt that crashes the server again is blamed, never one that ran beside it."""
    from comfy_parallel.scheduling.queues import DeviceQueues

    queues = DeviceQueues(2, lambda: None)
    q0, q1 = queues.devices
    q0.put((5, "new-0", {}, {}, [], {}))
    q1.put((7, "new-1", {}, {}, [], {}))
    q1.put((9, "retry-b", {}, {}, [], {}))
    q0.put((8, "retry-a", {}, {}, [], {}))
    q0.crash_retries["retry-a"] = {"retry_after_server_crash": True}
    q1.crash_retries["retry-b"] = {"retry_after_server_crash": True}
    item, a = q0.get(timeout=0.01)  # a retry first, though a prompt with a smaller number is queued before it
    assert item[1] == "retry-a"
    assert q1.get(timeout=0.01) is None  # the other retry waits until the first has ended
    q0.task_done(a, {"outputs": {}, "meta": {}}, None)
    item, b = q1.get(timeout=0.01)
    assert item[1] == "retry-b" and q0.get(timeout=0.01) is None  # new prompts wait for the last retry too
    q1.task_done(b, {"outputs": {}, "meta": {}}, None)
    assert q0.get(timeout=0.01)[0][1] == "new-0" and q1.get(timeout=0.01)[0][1] == "new-1"


def test_a_crash_retry_waits_for_the_history_write_of_a_prompt_beside_it(tmp_path: Path) -> None:
    """A prompt counts as running until its history entry is in the store: were the retry to start (and crash the
    server) while a finished neighbour's entry was still being written, the neighbour would be counted as running at
    two crashes and recorded as crashed twice (seen in test_native_crash before this rule)."""
    import threading

    from comfy_parallel.scheduling.queues import DeviceQueues

    class SlowJournal(Journal):
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self.writing = threading.Event()
            self.release = threading.Event()

        def finished(self, prompt_id: str, entry: dict, evicted=()) -> None:
            self.writing.set()
            assert self.release.wait(10)
            super().finished(prompt_id, entry, evicted)

    queues = DeviceQueues(2, lambda: None)
    journal = queues.history_store.journal = SlowJournal(tmp_path / "queue.sqlite3")
    q0, q1 = queues.devices
    for q, item in ((q0, (1, "neighbour", {}, {}, [], {})), (q1, (2, "retry", {}, {}, [], {}))):
        journal.accepted(str(q.index), item)
        q.put(item)
    queues.crash_retries["neighbour"] = {"retry_after_server_crash": True}
    queues.crash_retries["retry"] = {"retry_after_server_crash": True}
    item, n = q0.get(timeout=0.01)
    assert item[1] == "neighbour"
    done = threading.Thread(target=q0.task_done, args=(n, {"outputs": {}, "meta": {}}, None))
    done.start()
    try:
        assert journal.writing.wait(10)
        assert q1.get(timeout=0.05) is None  # the neighbour's entry is not stored yet
    finally:
        journal.release.set()
        done.join(10)
    item, _ = q1.get(timeout=1)
    assert item[1] == "retry"


# -- kill -9 under load ---------------------------------------------------------------------------------------------

@dataclass
class Planned:
    tag: str
    route: str
    device: int | None
    client: str
    prompt_id: str = ""
    assigned: int | None = None  # the device the /prompt answer named (None: pooled, bound only when it runs)
    accepted: bool = False

    def __post_init__(self) -> None:
        self.prompt_id = prompt_id_for(self.tag)


@dataclass
class WsClient:
    """A websocket client that reconnects (same client id) whenever the server goes away."""

    name: str
    client_id: str
    url: str
    events: list[tuple[str, str]] = field(default_factory=list)
    connects: int = 0


async def follow(session: aiohttp.ClientSession, c: WsClient, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with session.ws_connect(f"{c.url}?clientId={c.client_id}") as ws:
                c.connects += 1
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    data = json.loads(msg.data)
                    payload = data.get("data")
                    if isinstance(payload, dict) and payload.get("prompt_id"):
                        c.events.append((data["type"], payload["prompt_id"]))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.05)


def _request_of(s: Server, p: Planned) -> tuple[str, dict[str, str]]:
    if p.route == "header":
        return s.url + "/prompt", {"X-TARGET-GPU": str(p.device)}
    if p.route == "port":
        return s.entry_url(p.device) + "/prompt", {}  # type: ignore[arg-type]
    if p.route == "prefix":
        return f"{s.url}/gpu{p.device}/prompt", {}
    return s.url + "/prompt", {}


async def entries_by_id(session: aiohttp.ClientSession, s: Server, prompt_ids: list[str],
                        timeout: float) -> dict[str, dict]:
    """``GET /history/{id}`` of every prompt until each is there (the listing holds only what finished since the
    last start)."""
    found: dict[str, dict] = {}
    gate = asyncio.Semaphore(8)

    async def one(pid: str) -> None:
        async with gate, session.get(f"{s.url}/history/{pid}") as resp:
            entry = (await resp.json()).get(pid)
        if entry is not None:
            found[pid] = entry

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.gather(*(one(pid) for pid in prompt_ids if pid not in found))
        if len(found) == len(prompt_ids):
            break
        await asyncio.sleep(0.2)
    return found


IN_POOL = -1  # known_to_server: accepted, and waiting unbound in the pool


async def known_to_server(session: aiohttp.ClientSession, s: Server, prompt_id: str) -> int | None:
    """After a restart: the device a prompt whose POST got no answer is queued, running or recorded on, ``IN_POOL``
    when it waits in the pool, or None when the server does not have it."""
    async with session.get(f"{s.url}/history/{prompt_id}") as resp:
        entry = (await resp.json()).get(prompt_id)
    if entry is not None:
        return int(entry["gpu_id"])
    for gpu in range(s.n_devices):
        async with session.get(s.url + "/queue", headers={"X-TARGET-GPU": str(gpu)}) as resp:
            queue = await resp.json()
        if any(item[1] == prompt_id for item in queue["queue_running"] + queue["queue_pending"]):
            return gpu
    async with session.get(s.url + "/queue") as resp:  # the merged view also lists the pool
        queue = await resp.json()
    if any(item[1] == prompt_id for item in queue["queue_pending"]):
        return IN_POOL
    return None


@pytest.mark.timeout(240)
async def test_kill_9_three_times_under_load(comfy_dir: Path) -> None:
    version = comfy_dir.name
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    user_dir = fresh_user_dir(f"crash-kill-user-{version}")
    s = Server(comfy_dir, serve_args=["--supervise"], user_dir=user_dir, name=f"crash-kill-{version}").start()
    run = uuid.uuid4().hex[:8]
    clients = [WsClient(name, f"crash-{name}-{run}", url) for name, url in (
        ("plain", s.url + "/ws"), ("prefix1", s.url + "/gpu1/ws"), ("port2", s.entry_url(2) + "/ws"),
        ("prefix0", s.url + "/gpu0/ws"))]
    plan = []
    for i in range(N_PROMPTS):
        route = ROUTES[i % len(ROUTES)]
        plan.append(Planned(f"crash-{run}-{i:04d}", route, None if route == "default" else rng.randrange(s.n_devices),
                            clients[rng.randrange(len(clients))].client_id))
    kill_at = sorted(rng.sample(range(100, 900, 150), KILLS))  # accepted-prompt counts; >= 150 apart
    kills: list[dict] = []
    statuses: Counter[int] = Counter()
    ambiguous = 0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            stop = asyncio.Event()
            followers = [asyncio.create_task(follow(session, c, stop)) for c in clients]
            accepted = 0
            up = asyncio.Event()
            up.set()
            gate = asyncio.Semaphore(8)

            async def submit(p: Planned) -> None:
                nonlocal accepted, ambiguous
                url, headers = _request_of(s, p)
                body = {"prompt": {"1": {"class_type": "CPSleep", "inputs": {"seconds": 0.01, "steps": 1,
                                                                            "tag": p.tag}}},
                        "client_id": p.client, "prompt_id": p.prompt_id}
                async with gate:
                    while not p.accepted:
                        await up.wait()
                        try:
                            async with session.post(url, json=body, headers=headers) as resp:
                                statuses[resp.status] += 1
                                answer = await resp.json() if resp.status == 200 else None
                        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                            # No answer: the server died around this request. Once it is back, ask whether the
                            # prompt was accepted (it is in the write-ahead queue then) before sending it again.
                            await asyncio.sleep(0.05)
                            await up.wait()
                            gpu = await known_to_server(session, s, p.prompt_id)
                            if gpu is not None:
                                ambiguous += 1
                                p.accepted, p.assigned = True, None if gpu == IN_POOL else gpu
                                accepted += 1
                            continue
                        assert answer is not None, (p.tag, resp.status)
                        assert (answer["gpu_id"] is None) == (p.route == "default"), (p.tag, answer)
                        p.accepted, p.assigned = True, answer["gpu_id"]
                        accepted += 1

            async def killer() -> None:
                for threshold in kill_at:
                    while accepted < threshold:
                        await asyncio.sleep(0.005)
                    pid = child_pid(s)
                    assert pid is not None
                    up.clear()
                    killed = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
                    while child_pid(s) in (pid, None):
                        await asyncio.sleep(0.02)
                    ready = await wait_ready(session, s)
                    kills.append({"at_accepted": accepted, "crash_to_ready_s": ready - killed})
                    up.set()

            started = time.monotonic()
            await asyncio.gather(killer(), *(submit(p) for p in plan))
            history = await entries_by_id(session, s, [p.prompt_id for p in plan], timeout=120)
            wall_s = time.monotonic() - started
            async with session.get(s.url + "/history") as resp:
                listing = json.loads(await resp.text(), object_pairs_hook=_no_duplicate_keys)
            stop.set()
            for t in followers:
                t.cancel()
    finally:
        s.stop()
    log = s.log()
    starts = starts_in_log(log)
    lost = [p.tag for p in plan if p.prompt_id not in history]
    # A targeted prompt runs on its device; a pooled one on the device that took it first (a retry after a crash
    # goes back to the device it ran on), so every execution of a prompt is on one device, the one history names.
    ran_on = {p.prompt_id: p.assigned if p.assigned is not None else history[p.prompt_id]["gpu_id"]
              for p in plan if p.prompt_id in history}
    wrong = [p.tag for p in plan if p.prompt_id in history and (
        (p.device is not None and p.assigned != p.device) or history[p.prompt_id]["gpu_id"] != ran_on[p.prompt_id]
        or history[p.prompt_id]["outputs"]["1"]["record"][0]["thread"]
        != f"comfy-parallel-worker-{ran_on[p.prompt_id]}"
        or any(gpu != ran_on[p.prompt_id] for gpu in starts.get(p.prompt_id, [])))]
    flagged = [p for p in plan if p.prompt_id in history and retry_flags(history[p.prompt_id])]
    ran_twice = [p for p in plan if len(starts.get(p.prompt_id, [])) == 2]
    too_many = [p.tag for p in plan if len(starts.get(p.prompt_id, [])) > 2]
    unflagged_rerun = [p.tag for p in ran_twice if p not in flagged]
    not_success = [p.tag for p in plan if p.prompt_id in history
                   and history[p.prompt_id]["status"]["status_str"] != "success"]
    never_ran = [p.tag for p in plan if p.prompt_id in history and not starts.get(p.prompt_id)]
    mine = {c.client_id: c for c in clients}
    owner = {p.prompt_id: p.client for p in plan}
    misdelivered = [f"{c.name} got {kind} of {tag_of(pid)}" for c in mine.values() for kind, pid in c.events
                    if owner.get(pid) != c.client_id]
    retry_told = {pid for c in clients for kind, pid in c.events if kind == RETRY_EVENT}
    told_unflagged = [tag_of(pid) for pid in retry_told if pid not in {p.prompt_id for p in flagged}]
    http_5xx = sum(n for code, n in statuses.items() if code >= 500)
    reliability_results.record(f"crash kill -9 ({version})", {
        "section": "crash: kill -9 under load", "comfyui": version, "prompts_sent": len(plan), "lost": len(lost),
        "duplicated": len(too_many) + len(unflagged_rerun), "wrong_device": len(wrong),
        "ws_misdelivered": len(misdelivered), "http_5xx": http_5xx, "faults_injected": KILLS,
        "faults_survived": len(kills), "wall_s": round(wall_s, 1), "kills_at_accepted": "/".join(
            str(k["at_accepted"]) for k in kills), "retried_after_crash": len(flagged),
        "retry_ws_messages": len(retry_told), "posts_without_answer_found_accepted": ambiguous,
        "crash_to_ready_s_max": round(max((k["crash_to_ready_s"] for k in kills), default=0), 1), "seed": seed,
        "from_staging_log_after_kills": sum(int(found[0]) for found in STAGED_RE.findall(log)),
        "history_entries_from_staging_log_after_kills": sum(int(found[3]) for found in STAGED_RE.findall(log)),
    })
    where = f"seed {seed}, kills {kills}"
    # Accepted prompts go through the memory-mapped staging log (durability/staging.py) before SQLite; prompts a
    # kill caught there are counted above (how many depends on where the kill fell).
    assert (user_dir / STORE).with_name("queue.sqlite3.staging").is_file()
    assert len(kills) == KILLS and log.count("server crashed (killed by SIGKILL)") == KILLS, where
    assert not lost, (where, lost[:5])
    assert not wrong, (where, wrong[:5])
    assert not too_many and not unflagged_rerun, (where, too_many[:5], unflagged_rerun[:5])
    assert len(flagged) <= KILLS * s.n_devices, (where, [p.tag for p in flagged])
    assert not never_ran and not not_success, (where, never_ran[:5], not_success[:5])
    assert not misdelivered and not told_unflagged, (where, misdelivered[:5], told_unflagged[:5])
    assert http_5xx == 0, statuses
    # The listing starts empty at every start: it holds exactly what finished in the last process.
    assert set(listing) == finished_in_last_run(log), (where, len(listing), len(finished_in_last_run(log)))


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    assert not dupes, f"duplicate keys in a JSON object: {dupes[:5]}"
    return dict(pairs)


# -- kill -9 with the pool ------------------------------------------------------------------------------------------

TOOK_RE = re.compile(r"\[GPU (\d+)\] took pooled prompt (\S+) ")


def restart_after_kill(s: Server, timeout: float = 90) -> None:
    """``kill -9`` the server the supervisor runs; return once its successor answers /ready with 200."""
    pid = child_pid(s)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + timeout
    while child_pid(s) in (pid, None):
        assert time.time() < deadline and s.proc is not None and s.proc.poll() is None, s.log()[-3000:]
        time.sleep(0.05)
    ready_through_restarts(s, timeout)


@pytest.mark.timeout(180)
def test_kill_9_with_pooled_prompts(comfy_dir: Path) -> None:
    """--default-route pool: the store keeps a pooled prompt's route. A pooled prompt running at the kill runs once
    more, on the device it ran on, flagged; those waiting in the pool are pooled again and each taken once."""
    version = comfy_dir.name
    s = Server(comfy_dir, devices="cpu,cpu", serve_args=["--supervise", "--default-route", "pool"],
               user_dir=fresh_user_dir(f"crash-pool-user-{version}"), name=f"crash-pool-{version}").start()
    run = uuid.uuid4().hex[:8]
    try:
        gates = [f"crash-pool-{run}-{i}" for i in range(2)]
        held = s.submit({"1": {"class_type": "CPGate", "inputs": {"tag": gates[0], "timeout": 60}}},
                        headers={"X-TARGET-GPU": "0"})
        s.wait_running(held["prompt_id"])
        pooled_running = s.submit({"1": {"class_type": "CPGate", "inputs": {"tag": gates[1], "timeout": 60}}})
        assert pooled_running["gpu_id"] is None and pooled_running["route"] == "pool"
        s.wait_running(pooled_running["prompt_id"])  # worker 1 took it: worker 0 is held
        waiting = [s.submit(sleep_prompt(0.01, 1))["prompt_id"] for _ in range(3)]
        bound = s.submit(sleep_prompt(0.01, 1), headers={"X-TARGET-GPU": "1"})["prompt_id"]
        restart_after_kill(s)
        for gate in gates:
            assert s.get(f"/cp_test/release?tag={gate}").status == 200
        ids = [held["prompt_id"], pooled_running["prompt_id"], *waiting, bound]
        entries = {pid: history_through_restarts(s, pid) for pid in ids}
    finally:
        s.stop()
    last = s.log().rsplit("comfy-parallel supervisor: server started", 1)[-1]
    assert entries[pooled_running["prompt_id"]]["gpu_id"] == 1 and entries[held["prompt_id"]]["gpu_id"] == 0
    assert retry_flags(entries[pooled_running["prompt_id"]]) and retry_flags(entries[held["prompt_id"]])
    assert entries[bound]["gpu_id"] == 1 and not any(retry_flags(entries[pid]) for pid in [*waiting, bound])
    assert all(e["status"]["status_str"] == "success" for e in entries.values())
    took = [pid for _, pid in TOOK_RE.findall(last)]
    assert sorted(took) == sorted(waiting), took  # pooled again, each taken once; the retry was bound to device 1
    assert all(len(starts_in_log(last).get(pid, [])) == 1 for pid in ids)


# -- a native crash, twice --------------------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_native_crash_runs_once_more_then_is_recorded_as_crashed_twice(comfy_dir: Path) -> None:
    version = comfy_dir.name
    started = time.time()
    s = Server(comfy_dir, serve_args=["--supervise"], user_dir=fresh_user_dir(f"crash-abort-user-{version}"),
               name=f"crash-abort-{version}").start()
    try:
        others = [s.submit({"1": {"class_type": "CPSleep", "inputs": {"seconds": 0.3, "steps": 3, "tag": f"o{i}"}}},
                           headers={"X-TARGET-GPU": str(i % s.n_devices)})["prompt_id"] for i in range(12)]
        abort = s.submit({"1": {"class_type": "CPAbort", "inputs": {"tag": "abort"}}},
                         headers={"X-TARGET-GPU": "1"}, client_id="crash-abort-client")["prompt_id"]
        entry = history_through_restarts(s, abort)
        entries = {pid: history_through_restarts(s, pid) for pid in others}
        ready = ready_through_restarts(s)
        history = s.get("/history").json()
    finally:
        s.stop()
    log = s.log()
    starts = starts_in_log(log)
    status = entry["status"]
    assert status["status_str"] == "error" and CRASHED_TWICE_MESSAGE in json.dumps(status["messages"]), status
    assert entry["gpu_id"] == 1 and starts[abort] == [1, 1], starts.get(abort)  # ran once more, never a third time
    assert log.count("server crashed (killed by SIGABRT)") == 2, log[-3000:]
    assert all(e["status"]["status_str"] == "success" for e in entries.values())
    assert all(len(starts[pid]) <= 2 for pid in others)  # one running at each crash may run twice (flagged)
    assert all(len(starts[pid]) == 1 or retry_flags(entries[pid]) for pid in others)
    assert ready["ready"] and ready["status"] == "ready"
    # The last start's listing: the record its recovery made, and what finished since; not the earlier runs'.
    assert set(history) == finished_in_last_run(log) and abort in history
    reliability_results.record(f"crash os.abort ({version})", {
        "section": "crash: os.abort in a node", "comfyui": version, "prompts_sent": len(others) + 1, "lost": 0,
        "duplicated": 0, "faults_injected": 2, "faults_survived": 2, "wall_s": round(time.time() - started, 1),
        "others_retried_after_crash": sum(1 for e in entries.values() if retry_flags(e)),
    })


# -- a poisoned CUDA context ----------------------------------------------------------------------------------------

def test_poisoned_cuda_context_ends_the_process_with_its_exit_code(comfy_dir: Path) -> None:
    """A CPU worker stands in: the error text is what tells a poisoned context apart."""
    version = comfy_dir.name
    user_dir = fresh_user_dir(f"crash-cuda-user-{version}")
    s = Server(comfy_dir, devices="cpu,cpu", user_dir=user_dir, name=f"crash-cuda-{version}").start()
    pid = prompt_id_for(f"cuda-fatal-{uuid.uuid4().hex[:8]}")
    body = {"prompt": {"1": {"class_type": "CPFail", "inputs": {
        "message": "CUDA error: an illegal memory access was encountered"}}}, "prompt_id": pid}
    try:
        try:
            s.post("/prompt", body, headers={"X-TARGET-GPU": "1"})
        except OSError:
            pass  # it may start, and end the process, before the answer is sent: it was stored first
        code = s.wait_exit(60)
    finally:
        s.stop()
    assert code == cuda_fatal.EXIT_CODE, s.log()[-3000:]
    assert f"prompt {pid} hit a CUDA error that poisons the device context" in s.log()
    # Read as the next start reads it: the staging log (where the worker staged the start) applied to SQLite.
    journal = Journal(user_dir / STORE)
    recovery.open_staging(journal, "NORMAL")
    rows = [(p.prompt_id, p.route, p.state, p.device) for p in journal.unfinished()]
    journal.close()
    assert rows == [(pid, "1", "running", 1)]  # runs once more after the restart, flagged as a retry after a crash
