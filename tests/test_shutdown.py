"""Graceful shutdown: SIGTERM drains, new prompts get 503, what is left is persisted and runs after a restart.

The accounting rule checked here: every accepted prompt ends in history exactly once (before the shutdown, or
after the restart on the device it was routed to), or, with persistence off, in history as an error.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
import reliability_results
from harness import ARTIFACTS, Server, prompt_id_for, record_of, sleep_prompt, tag_of

from comfy_parallel.durability.journal import QUEUED, Journal, as_queue_item

STORE = Path("__comfy_parallel") / "queue.sqlite3"
FINISHED_RE = re.compile(r"\[GPU (\d+)\] prompt (\S+) finished: (\w+)")


def finished_in_log(log: str) -> dict[str, list[tuple[int, str]]]:
    """prompt id -> [(device, status)] for every prompt the server logged as finished."""
    out: dict[str, list[tuple[int, str]]] = {}
    for gpu, pid, status in FINISHED_RE.findall(log):
        out.setdefault(pid, []).append((int(gpu), status))
    return out


def store_rows(path: Path) -> dict[str, tuple[str, str, list]]:
    """The unfinished prompts in the write-ahead queue: prompt id -> (route, state, item fields)."""
    if not path.exists():
        return {}
    with contextlib.closing(sqlite3.connect(path)) as conn:  # closed: the server's lock on the file is exclusive
        rows = conn.execute("SELECT prompt_id, route, state, item FROM prompts").fetchall()
    return {pid: (route, state, json.loads(item)) for pid, route, state, item in rows}


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def assert_rejected_while_draining(server: Server, path: str = "/prompt", **where: dict | str) -> None:
    resp = server.post(path, {"prompt": sleep_prompt(0.05, 1)}, **where)  # type: ignore[arg-type]
    assert resp.status == 503, (where, resp.status, resp.body)
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.json()["error"]["type"] == "shutting_down"


# -- the store alone ---------------------------------------------------------------------------------------------

def test_store_keeps_order_and_drops_secrets(tmp_path: Path) -> None:
    path = tmp_path / "q" / "queue.sqlite3"
    journal = Journal(path)
    assert journal.unfinished() == [] and journal.count() == 0
    secret = "sk-" + uuid.uuid4().hex
    late, front, cut = (prompt_id_for(f"store-{name}") for name in ("late", "front", "cut"))  # UUIDs, as on 0.33
    journal.accepted("2", (7, late, {"1": {}}, {"client_id": "c1"}, ["1"], {"auth_token_comfy_org": secret}))
    journal.accepted_many([("0", (-3, front, {"1": {}}, {"api_key_comfy_org": secret, "x": 1}, ["1"])),
                           ("pool", (5.5, cut, {"1": {}}, {}, ["1"], {}))])
    journal.started(cut, 1)
    journal.requeued([cut])  # a drain cut it off: queued again, no crash counted
    journal.finished(front, {"prompt": [-3, front, {}, {"api_key_comfy_org": secret}, []], "outputs": {}})
    journal.close()
    for suffix in ("", "-wal"):
        if Path(f"{path}{suffix}").exists():
            assert secret.encode() not in Path(f"{path}{suffix}").read_bytes()
    journal = Journal(path)
    loaded = journal.unfinished()
    assert [tag_of(p.prompt_id) for p in loaded] == ["store-cut", "store-late"]  # number order
    stored_late = loaded[1]
    assert (stored_late.route == "2" and stored_late.item[3] == {"client_id": "c1"}
            and stored_late.dropped_keys == ("auth_token_comfy_org",))
    assert loaded[0].state == QUEUED and loaded[0].crashes == 0
    assert (loaded[0].route, loaded[0].device) == ("pool", 1)  # a pooled prompt: pooled again after a restart
    assert as_queue_item(stored_late, 6) == (7, late, {"1": {}}, {"client_id": "c1"}, ["1"], {})
    assert as_queue_item(stored_late, 5) == (7, late, {"1": {}}, {"client_id": "c1"}, ["1"])
    assert journal.history_ids(10) == [front] and journal.history_entry(front)["prompt"][3] == {}
    journal.forget_prompts([late])
    assert [tag_of(p.prompt_id) for p in journal.unfinished()] == ["store-cut"]


@pytest.mark.parametrize("schema", [1, 2])
def test_store_of_a_drain_from_before_the_write_ahead_queue_is_converted(tmp_path: Path, schema: int) -> None:
    """Schema 1 kept each prompt's device, schema 2 a route too (empty on rows schema 1 wrote; "pool")."""
    path = tmp_path / "queue.sqlite3"
    rows = [("b", 1, "running", 9, None), ("a", 2, "queued", 3, "2"), ("p", 0, "queued", 5, "pool")][:schema + 1]
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE prompts (prompt_id TEXT PRIMARY KEY, gpu_id INTEGER NOT NULL, state TEXT NOT NULL,"
                     " item TEXT NOT NULL, dropped_keys TEXT NOT NULL, saved_at REAL NOT NULL"
                     + (", route TEXT)" if schema == 2 else ")"))
        for pid, gpu, state, number, route in rows:
            values = (pid, gpu, state, json.dumps([number, pid, {"1": {}}, {}, ["1"]]), "[]", 0.0)
            conn.execute(f"INSERT INTO prompts VALUES (?, ?, ?, ?, ?, ?{', ?' if schema == 2 else ''})",
                         values + ((route,) if schema == 2 else ()))
        conn.execute(f"PRAGMA user_version = {schema}")
    stored = Journal(path).unfinished()  # a drain is not a crash: all queued, none counted as crashed
    routes = {pid: route or str(gpu) for pid, gpu, _, _, route in rows}
    numbers = {pid: number for pid, _, _, number, _ in rows}
    assert [(p.prompt_id, p.route, p.state, p.crashes) for p in stored] == [
        (pid, routes[pid], QUEUED, 0) for pid in sorted(numbers, key=numbers.__getitem__)]
    assert routes["b"] == "1" and (schema == 1 or routes["p"] == "pool")


def test_shutdown_settings_from_options_and_environment() -> None:
    from comfy_parallel.cli import build_parser, serve_settings
    from comfy_parallel.settings import SettingsError, from_env

    args = build_parser().parse_args(["serve", "--devices", "cpu,cpu", "--drain-timeout", "5", "--persist-path",
                                      "/tmp/q.sqlite3"])
    settings = serve_settings(args, env={"COMFY_PARALLEL_DRAIN_TIMEOUT": "9"})
    assert (settings.drain_timeout, settings.persist, settings.persist_path) == (5.0, True, "/tmp/q.sqlite3")
    args = build_parser().parse_args(["serve", "--devices", "cpu,cpu"])
    settings = serve_settings(args, env={"COMFY_PARALLEL_DRAIN_TIMEOUT": "9", "COMFY_PARALLEL_NO_PERSIST": "1"})
    assert (settings.drain_timeout, settings.persist, settings.persist_path) == (9.0, False, None)
    assert serve_settings(args, env={}).drain_timeout == 30.0
    env = {"COMFY_NUM_GPUS": "2", "COMFY_PARALLEL_DRAIN_TIMEOUT": "0", "COMFY_PARALLEL_PERSIST_PATH": "/x/q.db"}
    dropin = from_env(env, cpu_mode=True)
    assert (dropin.drain_timeout, dropin.persist, dropin.persist_path) == (0.0, True, "/x/q.db")
    for bad in ("-1", "soon", "inf"):
        with pytest.raises(SettingsError, match="drain timeout"):
            from_env({"COMFY_PARALLEL_DRAIN_TIMEOUT": bad}, cpu_mode=True)


# -- real servers --------------------------------------------------------------------------------------------------

def test_sigterm_drains_persists_and_restores_on_the_same_devices(comfy_dir: Path) -> None:
    version = comfy_dir.name
    user_dir = ARTIFACTS / f"shutdown-user-{version}"
    shutil.rmtree(user_dir, ignore_errors=True)
    user_dir.mkdir(parents=True)
    started = time.time()
    s1 = Server(comfy_dir, serve_args=["--drain-timeout", "3"], user_dir=user_dir, name=f"shutdown-{version}").start()
    routed: dict[str, int] = {}  # every accepted prompt -> the device POST /prompt named
    try:
        header, port, prefix = {"headers": {"X-TARGET-GPU": "0"}}, {"base": s1.entry_url(1)}, {"path": "/gpu2/prompt"}

        def submit(prompt: dict, how: dict, **kw: str) -> str:
            answer = s1.submit(prompt, **how, **kw)
            routed[answer["prompt_id"]] = answer["gpu_id"]
            return answer["prompt_id"]

        before = [submit(sleep_prompt(0.05, 1), how) for how in (header, port, prefix)]
        for pid in before:
            s1.wait_history(pid)
        # device 0 (header): finishes inside the drain, two queued behind it
        run0 = submit(sleep_prompt(1.2, 12), header)
        q0 = [submit(sleep_prompt(0.1, 1), header) for _ in range(2)]
        # device 1 (entry port): cut off at the drain timeout, one queued behind it
        run1 = submit(sleep_prompt(7, 70), port)
        q1 = [submit(sleep_prompt(0.1, 1), port)]
        # device 2 (prefix, /api under the prefix): finishes inside the drain, two queued, one with a client id
        run2 = submit(sleep_prompt(1.2, 12), prefix)
        q2 = [submit(sleep_prompt(0.1, 1), {"path": "/gpu2/api/prompt"}, client_id="cp-shutdown-client"),
              submit(sleep_prompt(0.1, 1), prefix)]
        for pid, gpu in ((run0, 0), (run1, 1), (run2, 2)):
            s1.wait_running(pid, headers={"X-TARGET-GPU": str(gpu)})
        queued = q0 + q1 + q2

        s1.send_signal(signal.SIGTERM)
        wait_for(lambda: s1.get("/ready").status == 503, 10, "/ready never answered 503 while draining")
        assert s1.get("/ready").json()["draining"] is True
        for where in ({"headers": {"X-TARGET-GPU": "1"}}, {"base": s1.entry_url(0)}, {"path": "/gpu1/prompt"},
                      {"path": "/api/prompt"}, {}):
            assert_rejected_while_draining(s1, **where)
        assert s1.get("/health").status == 200 and s1.get(f"/history/{before[0]}").json()
        pending = {item[1] for item in s1.get("/queue").json()["queue_pending"]}
        assert pending == set(queued), "queued prompts must not start while draining"
        assert s1.wait_exit(30) == 0
    finally:
        s1.stop()
    log1 = s1.log()
    finished1 = finished_in_log(log1)
    assert "SIGTERM received: draining" in log1 and "shutdown complete" in log1
    for bad in ("drain failed", "never retrieved", "Fatal Python error", "could not persist"):
        assert bad not in log1, log1[-3000:]
    assert finished1[run0] == [(0, "success")] and finished1[run2] == [(2, "success")]
    assert run1 not in finished1  # cut off: its result is dropped, it runs again after the restart
    rows = store_rows(user_dir / STORE)
    assert set(rows) == set(queued) | {run1}
    assert rows[run1][:2] == ("1", QUEUED) and all(rows[p][1] == QUEUED for p in queued)  # cut off: not a crash
    assert all(rows[p][0] == str(routed[p]) for p in rows)
    assert rows[q2[0]][2][3]["client_id"] == "cp-shutdown-client"
    numbers = {p: rows[p][2][0] for p in rows}

    s2 = Server(comfy_dir, user_dir=user_dir, name=f"shutdown-restart-{version}").start()
    try:
        s2.wait_log(f"restored {len(rows)} persisted prompts")  # logged while the listener starts, not before
        entries = {pid: s2.wait_history(pid, timeout=60) for pid in rows}
        for pid, entry in entries.items():
            assert entry["status"]["status_str"] == "success", entry["status"]
            assert entry["gpu_id"] == routed[pid]
            assert record_of(entry)["thread"] == f"comfy-parallel-worker-{routed[pid]}"
            assert entry["prompt"][0] == numbers[pid] and entry["prompt"][1] == pid
        assert entries[q2[0]]["prompt"][3]["client_id"] == "cp-shutdown-client"
        assert record_of(entries[q0[0]])["start"] < record_of(entries[q0[1]])["start"]  # same order
        assert record_of(entries[run1])["end"] <= record_of(entries[q1[0]])["start"] + 0.05
        later = s2.submit(sleep_prompt(0.05, 1), headers={"X-TARGET-GPU": "0"})
        assert later["number"] > max(numbers.values())  # new prompts queue behind the restored ones
        s2.wait_history(later["prompt_id"])
        assert "retry_after_server_crash" not in json.dumps(entries)  # a drain is not a crash
        history2 = s2.get("/history").json()
        by_id = {pid: s2.get(f"/history/{pid}").json().get(pid) for pid in routed}
    finally:
        s2.stop()

    assert store_rows(user_dir / STORE) == {}  # each left the write-ahead queue with its history entry
    finished2 = finished_in_log(s2.log())
    in_s1 = {p for p in routed if p in finished1}
    in_s2 = {p for p in routed if p in finished2}
    # One rule for every start: /history/{id} answers for what finished before it (before the signal or while
    # draining); the /history listing starts empty, as stock's, and lists what finished since.
    assert set(history2) == in_s2 | {later["prompt_id"]}, (sorted(map(tag_of, history2)), len(in_s2))
    assert all(by_id[p] is not None and by_id[p]["status"]["status_str"] == "success" for p in in_s1)
    lost = [p for p in routed if by_id[p] is None]
    duplicated = [p for p in routed if len(finished1.get(p, []) + finished2.get(p, [])) > 1]
    wrong = [p for p in routed if by_id[p] is not None and by_id[p]["gpu_id"] != routed[p]]
    reliability_results.record(f"shutdown ({version})", {
        "section": "shutdown", "comfyui": version, "prompts_sent": len(routed),
        "finished_before_signal": len(before), "finished_while_draining": len(in_s1) - len(before),
        "persisted": len(rows), "persisted_queued": len(queued), "persisted_cut_off": 1,
        "requeued_finished_after_restart": len(in_s2), "lost": len(lost), "duplicated": len(duplicated),
        "wrong_device": len(wrong), "http_503_while_draining": 5, "wall_s": round(time.time() - started, 1),
    })
    assert not lost and not duplicated and not wrong, (lost, duplicated, wrong)


def test_dropin_no_persist_records_queued_as_errors(comfy_dir: Path, dropin_nodes: Path) -> None:
    """Drop-in mode, env switches only; a second SIGTERM stops at once."""
    version = comfy_dir.name
    started = time.time()
    s = Server(comfy_dir, mode="dropin", devices="cpu,cpu", custom_nodes=dropin_nodes,
               env={"COMFY_PARALLEL_NO_PERSIST": "1", "COMFY_PARALLEL_DRAIN_TIMEOUT": "60"},
               name=f"shutdown-dropin-{version}").start()
    try:
        assert "queued prompts are recorded as errors (persistence is off)" in s.log()
        run = [s.submit(sleep_prompt(30, 300), headers={"X-TARGET-GPU": str(i)})["prompt_id"] for i in (0, 1)]
        queued = [s.submit(sleep_prompt(0.1, 1), headers={"X-TARGET-GPU": str(i % 2)})["prompt_id"]
                  for i in range(3)]
        for i, pid in enumerate(run):
            s.wait_running(pid, headers={"X-TARGET-GPU": str(i)})
        s.send_signal(signal.SIGTERM)
        entries = {pid: s.wait_history(pid, timeout=10) for pid in queued}
        for pid, entry in entries.items():
            assert entry["status"]["status_str"] == "error"
            assert "server shut down before this prompt ran" in json.dumps(entry["status"]["messages"])
        assert_rejected_while_draining(s, path="/gpu1/prompt")
        assert not s.get("/queue").json()["queue_pending"]
        s.send_signal(signal.SIGTERM)  # a second signal cuts the drain short
        assert s.wait_exit(20) == 0
    finally:
        s.stop()
    log = s.log()
    assert "SIGTERM again: stopping now" in log and "shutdown complete" in log
    assert not (s.user_dir or ARTIFACTS / f"{s.name}-{s.port}" / "user").joinpath(STORE).exists()
    reliability_results.record(f"shutdown no-persist, drop-in ({version})", {
        "section": "shutdown --no-persist", "comfyui": version, "prompts_sent": len(run) + len(queued),
        "queued_recorded_as_errors": len(entries), "running_cut_by_second_signal": len(run),
        "lost": len(queued) - len(entries), "duplicated": 0, "wall_s": round(time.time() - started, 1),
    })
