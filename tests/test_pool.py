"""``--default-route pool``: untargeted prompts wait unbound, and a worker that goes idle takes the one cheapest for it.

Against a real server with two CPU workers. The test node pack decides when a worker goes idle (``CPGate`` holds a
worker until the test opens its gate), stands for model files and their load cost (``CPModel``: one model per
worker, a load when the worker holds another one) and for text encodes (``CPEncode``, answered by ComfyUI's
executor cache when its input did not change). What is checked:

- late binding: a pooled prompt goes to the first worker that goes idle, never waits while a worker is idle, and
  several pooled prompts wake several idle workers;
- affinity: a worker takes the pooled prompt whose model it holds, then the one whose nodes its executor cache
  answers, before an older one; the starvation bound holds under an adversarial stream;
- targeted prompts are untouched; pooled prompts can be deleted and interrupted, show in /queue with
  ``gpu_ids``, name their device in execution_start and history; every accepted prompt is in history once;
- the real weight store: a pooled SD1.5 prompt goes to the worker that holds the checkpoint, and the load counter
  does not move for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import shutil
import signal
import sqlite3
import threading
import uuid
from pathlib import Path

import aiohttp
import pytest
from harness import ARTIFACTS, Server, record_of, sleep_prompt
from test_diffusion import sd15_models, txt2img  # noqa: F401  (sd15_models is a fixture)

SLACK = 2
MODELS = {"cp_model_a.safetensors": 4096, "cp_model_b.safetensors": 8192, "cp_model_c.safetensors": 12288}
TOOK_RE = re.compile(r"\[GPU (\d+)\] took pooled prompt (\S+) \((\w+);")


def tag() -> str:
    return uuid.uuid4().hex[:12]


def gate_prompt(gate: str, timeout: float = 60.0) -> dict:
    return {"1": {"class_type": "CPGate", "inputs": {"tag": gate, "timeout": timeout}}}


def model_prompt(ckpt: str, gate: str = "", load_seconds: float = 0.3, label: str = "") -> dict:
    return {"1": {"class_type": "CPModel", "inputs": {"ckpt_name": ckpt, "load_seconds": load_seconds, "gate": gate,
                                                      "tag": label or tag()}}}


def client_prompt(text: str, seed: int, gate: str) -> dict:
    """A client's workflow: text -> encode (cacheable) -> a gated output that changes with the seed."""
    return {"1": {"class_type": "CPText", "inputs": {"text": text}},
            "2": {"class_type": "CPEncode", "inputs": {"text": ["1", 0], "seconds": 0.05}},
            "3": {"class_type": "CPGate", "inputs": {"tag": f"{gate}-{seed}", "timeout": 60.0, "text": ["2", 0]}}}


def release(server: Server, gate: str) -> None:
    assert server.get(f"/cp_test/release?tag={gate}").status == 200


def took_order(server: Server) -> list[tuple[int, str, str]]:
    """(device, prompt id, reason) of every pooled prompt a worker took, in the order they were taken."""
    return [(int(gpu), pid, reason) for gpu, pid, reason in TOOK_RE.findall(server.log())]


def block(server: Server, device: int) -> tuple[str, str]:
    """Hold worker ``device`` with a targeted gate prompt; (gate, prompt id)."""
    gate = tag()
    answer = server.submit(gate_prompt(gate), headers={"X-TARGET-GPU": str(device)})
    assert answer["gpu_id"] == device and "route" not in answer
    server.wait_running(answer["prompt_id"])
    return gate, answer["prompt_id"]


@pytest.fixture(scope="module")
def fake_models() -> Path:
    folder = ARTIFACTS / "pool-models"
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in MODELS.items():
        (folder / name).write_bytes(b"\0" * size)
    return folder


@pytest.fixture(scope="module")
def pool(comfy_dir: Path, fake_models: Path):
    server = Server(comfy_dir, devices="cpu,cpu", models_dir=fake_models,
                    serve_args=["--default-route", "pool", "--affinity-slack", str(SLACK)],
                    name=f"pool-{comfy_dir.name}").start()
    yield server
    server.stop()


@pytest.fixture()
def idle_pool(pool: Server) -> Server:
    pool.wait_idle()
    return pool


def hold_models(server: Server, models: dict[int, str]) -> dict[int, tuple[str, str]]:
    """Make each worker hold a model (a targeted CPModel prompt), then hold the worker there with its gate."""
    held = {}
    for device, ckpt in models.items():
        gate = tag()
        answer = server.submit(model_prompt(ckpt, gate=gate, load_seconds=0.05), headers={"X-TARGET-GPU": str(device)})
        server.wait_running(answer["prompt_id"])
        held[device] = (gate, answer["prompt_id"])
    return held


# -- late binding ------------------------------------------------------------------------------------------------

def test_pooled_prompt_waits_unbound_and_the_first_idle_worker_takes_it(idle_pool: Server) -> None:
    s = idle_pool
    gate0, run0 = block(s, 0)
    gate1, run1 = block(s, 1)
    client = f"pool-ws-{tag()}"

    async def scenario() -> tuple[dict, dict, dict]:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{s.url}/ws?clientId={client}") as ws:
                answer = await loop.run_in_executor(None, lambda: s.submit(sleep_prompt(0.05, 1), client_id=client))
                pending = await loop.run_in_executor(None, lambda: s.get("/queue").json())
                await loop.run_in_executor(None, lambda: release(s, gate1))
                while True:
                    msg = await asyncio.wait_for(ws.receive(), 60)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    data = json.loads(msg.data)
                    if data["type"] == "execution_start" and data["data"].get("prompt_id") == answer["prompt_id"]:
                        return answer, pending, data["data"]

    answer, pending, start = asyncio.run(scenario())
    pid = answer["prompt_id"]
    assert answer["gpu_id"] is None and answer["route"] == "pool", answer
    assert [item[1] for item in pending["queue_pending"]] == [pid]
    assert pending["gpu_ids"] == {run0: 0, run1: 1, pid: None}, pending["gpu_ids"]
    # worker 1 went idle first, so it took the pooled prompt while worker 0 still waits at its gate
    assert start["gpu_id"] == 1
    entry = s.wait_history(pid)
    assert entry["gpu_id"] == 1 and entry["status"]["status_str"] == "success"
    assert any(event == "execution_start" and data.get("gpu_id") == 1 for event, data in entry["status"]["messages"])
    assert run0 in [item[1] for item in s.get("/queue").json()["queue_running"]]
    release(s, gate0)
    s.wait_history(run0)


def test_pooled_prompts_wake_every_idle_worker(idle_pool: Server) -> None:
    s = idle_pool
    gates = [tag(), tag()]
    ids = [s.submit(gate_prompt(g))["prompt_id"] for g in gates]
    for pid in ids:
        s.wait_running(pid)  # both at once: one idle worker woken per pooled prompt
    running = s.get("/queue").json()
    assert sorted(running["gpu_ids"][pid] for pid in ids) == [0, 1]
    status = s.get("/multigpu/status").json()
    assert status["pool"]["enabled"] and status["pool"]["length"] == 0
    for g in gates:
        release(s, g)
    assert sorted(s.wait_history(pid)["gpu_id"] for pid in ids) == [0, 1]


def test_a_device_view_shows_only_its_own_queue(idle_pool: Server) -> None:
    s = idle_pool
    gate0, run0 = block(s, 0)
    gate1, run1 = block(s, 1)
    pooled = s.submit(sleep_prompt(0.01, 1))["prompt_id"]
    try:
        assert pooled in [i[1] for i in s.get("/queue").json()["queue_pending"]]
        own = s.get("/gpu0/queue").json()
        assert own["queue_pending"] == [] and [i[1] for i in own["queue_running"]] == [run0]
        assert s.get("/prompt").json()["exec_info"]["queue_remaining"] == 3
        assert s.get("/prompt", headers={"X-TARGET-GPU": "1"}).json()["exec_info"]["queue_remaining"] == 1
        metrics = s.get("/metrics").body.decode()
        assert "comfy_parallel_pool_length 1.0" in metrics
        assert re.search(r"comfy_parallel_pool_oldest_wait_seconds \d", metrics)
    finally:
        release(s, gate0)
        release(s, gate1)
    assert s.wait_history(pooled)["status"]["status_str"] == "success"


# -- affinity ----------------------------------------------------------------------------------------------------

def test_a_worker_takes_the_pooled_prompt_whose_model_it_holds(idle_pool: Server) -> None:
    s = idle_pool
    held = hold_models(s, {0: "cp_model_a.safetensors", 1: "cp_model_b.safetensors"})
    older = s.submit(model_prompt("cp_model_a.safetensors"))["prompt_id"]  # first in line, but A is on worker 0
    gate_b = tag()
    younger = s.submit(model_prompt("cp_model_b.safetensors", gate=gate_b))["prompt_id"]
    release(s, held[1][0])  # worker 1 (holds B) goes idle first: it takes the younger B prompt
    s.wait_running(younger)
    assert s.get("/queue").json()["gpu_ids"] == {held[0][1]: 0, younger: 1, older: None}
    release(s, held[0][0])
    entry_a = s.wait_history(older)
    release(s, gate_b)
    entry_b = s.wait_history(younger)
    assert entry_a["gpu_id"] == 0 and record_of(entry_a)["loaded"] is False
    assert entry_b["gpu_id"] == 1 and record_of(entry_b)["loaded"] is False
    reasons = {pid: (gpu, reason) for gpu, pid, reason in took_order(s)}
    assert reasons[younger] == (1, "affinity") and reasons[older] == (0, "oldest")
    picks = s.get("/multigpu/status").json()["devices"][1]["pool_picks"]
    assert picks["picks"]["affinity"] >= 1 and picks["model_hits"] >= 1
    assert re.search(r'comfy_parallel_pool_picks_total\{device="1",reason="affinity"\} [1-9]',
                     s.get("/metrics").body.decode())


def test_a_worker_takes_the_prompt_its_executor_cache_answers(idle_pool: Server) -> None:
    s = idle_pool
    gate = tag()
    text_a, text_b = f"client a {tag()}", f"client b {tag()}"
    first_a = s.submit(client_prompt(text_a, 1, gate), headers={"X-TARGET-GPU": "0"}, client_id="cache-a")
    first_b = s.submit(client_prompt(text_b, 11, gate), headers={"X-TARGET-GPU": "1"}, client_id="cache-b")
    for answer in (first_a, first_b):
        s.wait_running(answer["prompt_id"])
    next_b = s.submit(client_prompt(text_b, 12, gate), client_id="cache-b")["prompt_id"]  # older
    next_a = s.submit(client_prompt(text_a, 2, gate), client_id="cache-a")["prompt_id"]
    release(s, f"{gate}-1")  # worker 0 finishes client A's first prompt
    s.wait_running(next_a)  # and takes A's next one (held at its gate), not the older one of client B
    release(s, f"{gate}-11")
    s.wait_running(next_b)
    assert s.get("/queue").json()["gpu_ids"] == {next_a: 0, next_b: 1}
    release(s, f"{gate}-2")
    release(s, f"{gate}-12")
    entry_a, entry_b = s.wait_history(next_a), s.wait_history(next_b)
    assert (entry_a["gpu_id"], entry_b["gpu_id"]) == (0, 1)
    for entry in (entry_a, entry_b):
        cached = [data["nodes"] for event, data in entry["status"]["messages"] if event == "execution_cached"]
        assert cached and "2" in cached[0], entry["status"]["messages"]  # the encode came from the cache
    encodes = s.get("/cp_test/encodes").json()
    assert (encodes[text_a], encodes[text_b]) == (1, 1)  # each client's text encoded once, on its worker


def test_no_prompt_waits_behind_more_than_the_slack_of_younger_ones(idle_pool: Server) -> None:
    """Adversarial: both workers hold model A and a stream of A prompts keeps coming after one B prompt."""
    s = idle_pool
    held = hold_models(s, {0: "cp_model_a.safetensors", 1: "cp_model_a.safetensors"})
    victim = s.submit(model_prompt("cp_model_c.safetensors", load_seconds=0.05))["prompt_id"]
    stream = [s.submit(model_prompt("cp_model_a.safetensors", load_seconds=0.05))["prompt_id"] for _ in range(6)]
    before = len(took_order(s))
    for gate, _ in held.values():
        release(s, gate)
    for pid in [victim, *stream]:
        s.wait_history(pid)
    order = [(pid, reason) for _, pid, reason in took_order(s)[before:]]
    position = [pid for pid, _ in order].index(victim)
    assert position == SLACK, order  # passed exactly SLACK times (affinity works), never more (the bound)
    assert dict(order)[victim] == "slack"
    assert s.get("/multigpu/status").json()["pool"]["max_passed"] <= SLACK


# -- targeted prompts, delete, interrupt, nothing lost -------------------------------------------------------------

def test_targeted_prompts_are_untouched(idle_pool: Server) -> None:
    s = idle_pool
    for how, expected in (({"headers": {"X-TARGET-GPU": "1"}}, 1), ({"base": s.entry_url(0)}, 0),
                          ({"path": "/gpu1/prompt"}, 1), ({"path": "/gpu0/api/prompt"}, 0)):
        answer = s.submit(sleep_prompt(0.01, 1), **how)
        assert answer["gpu_id"] == expected and "route" not in answer, (how, answer)
        assert s.wait_history(answer["prompt_id"])["gpu_id"] == expected
    # a targeted prompt sent to the front runs before an older pooled prompt on its device
    gate0, run0 = block(s, 0)
    gate1, run1 = block(s, 1)
    pooled = s.submit(sleep_prompt(0.01, 1))["prompt_id"]
    front = s.post("/prompt", {"prompt": sleep_prompt(0.01, 1), "front": True}, headers={"X-TARGET-GPU": "0"}).json()
    release(s, gate0)
    first, then = s.wait_history(front["prompt_id"]), s.wait_history(pooled)
    assert (first["gpu_id"], then["gpu_id"]) == (0, 0)  # worker 1 is still held: worker 0 takes the pooled one
    assert record_of(then)["start"] >= record_of(first)["end"]
    release(s, gate1)
    s.wait_history(run1)


def test_pooled_prompts_can_be_deleted_cleared_and_interrupted(idle_pool: Server) -> None:
    s = idle_pool
    gate0, run0 = block(s, 0)
    gate1, run1 = block(s, 1)
    doomed = [s.submit(sleep_prompt(0.01, 1))["prompt_id"] for _ in range(3)]
    assert s.post("/queue", {"delete": [doomed[1]]}).status == 200
    assert [i[1] for i in s.get("/queue").json()["queue_pending"]] == [doomed[0], doomed[2]]
    assert s.post("/queue", {"delete": [doomed[0]]}, headers={"X-TARGET-GPU": "0"}).status == 200  # not device 0's
    assert [i[1] for i in s.get("/queue").json()["queue_pending"]] == [doomed[0], doomed[2]]
    assert s.post("/queue", {"clear": True}).status == 200
    assert s.get("/queue").json()["queue_pending"] == []
    # a pooled prompt is interrupted like any other once a worker runs it
    long_gate = tag()
    victim = s.submit(gate_prompt(long_gate))["prompt_id"]
    assert s.post("/interrupt", {"prompt_id": victim}).status == 200  # not running yet: nothing to stop
    release(s, gate1)
    s.wait_running(victim)
    assert s.post("/interrupt", {"prompt_id": victim}).status == 200
    entry = s.wait_history(victim)
    assert entry["gpu_id"] == 1 and entry["status"]["status_str"] == "error"
    assert any(event == "execution_interrupted" for event, _ in entry["status"]["messages"])
    release(s, gate0)
    s.wait_history(run0)
    history = s.get("/history").json()
    assert not any(pid in history for pid in doomed)  # deleted before they ran: as stock, never in history


def test_every_accepted_prompt_ends_in_history_once(idle_pool: Server) -> None:
    """Four clients at once, pooled and targeted prompts mixed: the wake-ups and takes race with the puts."""
    s = idle_pool
    accepted: dict[str, int | None] = {}
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(40):
            target = rng.choice([None, None, None, 0, 1])
            prompt = sleep_prompt(rng.choice([0.0, 0.02, 0.1]), 1) if i % 3 else \
                model_prompt(rng.choice(list(MODELS)), load_seconds=0.02)
            headers = {"X-TARGET-GPU": str(target)} if target is not None else None
            answer = s.submit(prompt, headers=headers)
            assert answer["gpu_id"] == target and (target is not None or answer["route"] == "pool")
            with lock:
                accepted[answer["prompt_id"]] = target

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(accepted) == 160
    for pid, target in accepted.items():
        entry = s.wait_history(pid)
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert entry["gpu_id"] in (0, 1) and (target is None or entry["gpu_id"] == target)
    s.wait_idle()
    log = s.wait_log(f"prompt {list(accepted)[-1]} finished")
    for pid in accepted:
        assert len(re.findall(rf"prompt {pid} finished", log)) == 1, pid
    took = [pid for _, pid, _ in took_order(s)]
    assert all(took.count(pid) == 1 for pid, target in accepted.items() if target is None)


# -- shutdown ----------------------------------------------------------------------------------------------------

def store_routes(user_dir: Path) -> dict[str, tuple[str, str]]:
    """prompt id -> (route, state) of every prompt the drain persisted."""
    path = user_dir / "__comfy_parallel" / "queue.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:  # closed: a server's lock on the file is exclusive
        rows = conn.execute("SELECT prompt_id, route, state FROM prompts").fetchall()
    return {pid: (route, state) for pid, route, state in rows}


def test_pooled_prompts_are_persisted_at_shutdown_and_pooled_again(comfy_dir: Path, fake_models: Path) -> None:
    version = comfy_dir.name
    user_dir = ARTIFACTS / f"pool-shutdown-user-{version}"
    shutil.rmtree(user_dir, ignore_errors=True)
    user_dir.mkdir(parents=True)
    serve = ["--default-route", "pool", "--drain-timeout", "1"]
    s1 = Server(comfy_dir, devices="cpu,cpu", models_dir=fake_models, serve_args=serve, user_dir=user_dir,
                name=f"pool-shutdown-{version}").start()
    try:
        gate0, run0 = block(s1, 0)  # targeted, cut off by the drain timeout
        gate1 = tag()
        pooled_running = s1.submit(gate_prompt(gate1))["prompt_id"]  # pooled, taken by worker 1, cut off
        s1.wait_running(pooled_running)
        pooled = [s1.submit(sleep_prompt(0.01, 1))["prompt_id"] for _ in range(3)]  # waiting in the pool
        bound = s1.submit(sleep_prompt(0.01, 1), headers={"X-TARGET-GPU": "1"})["prompt_id"]
        s1.send_signal(signal.SIGTERM)
        assert s1.wait_exit(30) == 0
    finally:
        s1.stop()
    assert "persisted 6 prompts (4 queued, 2 cut off while running)" in s1.log(), s1.log()[-3000:]
    rows = store_routes(user_dir)  # cut off by a drain: queued again, not counted as crashed
    assert rows == {run0: ("0", "queued"), pooled_running: ("pool", "queued"), bound: ("1", "queued"),
                    **{pid: ("pool", "queued") for pid in pooled}}

    s2 = Server(comfy_dir, devices="cpu,cpu", models_dir=fake_models, serve_args=serve, user_dir=user_dir,
                name=f"pool-restart-{version}").start()
    try:
        s2.wait_log("restored 6 persisted prompts")  # written by the worker-start thread, maybe after /queue answers
        release(s2, gate0)
        release(s2, gate1)
        entries = {pid: s2.wait_history(pid) for pid in rows}
        assert all(e["status"]["status_str"] == "success" for e in entries.values())
        assert entries[run0]["gpu_id"] == 0 and entries[bound]["gpu_id"] == 1
        assert all(entries[pid]["gpu_id"] in (0, 1) for pid in [pooled_running, *pooled])
        s2.wait_idle()
        log = s2.wait_log(f"prompt {pooled[-1]} finished")
        took = [pid for _, pid, _ in TOOK_RE.findall(log)]
        assert sorted(took) == sorted([pooled_running, *pooled])  # pooled again, each taken once
        assert all(len(re.findall(rf"prompt {pid} finished", log)) == 1 for pid in rows)
    finally:
        s2.stop()


def test_no_persist_records_pooled_prompts_as_errors(comfy_dir: Path, fake_models: Path) -> None:
    s = Server(comfy_dir, devices="cpu,cpu", models_dir=fake_models,
               serve_args=["--default-route", "pool", "--no-persist", "--drain-timeout", "30"],
               name=f"pool-no-persist-{comfy_dir.name}").start()
    try:
        gate0, _ = block(s, 0)
        gate1, _ = block(s, 1)
        pooled = [s.submit(sleep_prompt(0.01, 1))["prompt_id"] for _ in range(2)]
        s.send_signal(signal.SIGTERM)
        for pid in pooled:
            entry = s.wait_history(pid, timeout=10)
            assert entry["status"]["status_str"] == "error" and entry["gpu_id"] is None
            assert "server shut down before this prompt ran" in json.dumps(entry["status"]["messages"])
        assert s.get("/queue").json()["queue_pending"] == []
        release(s, gate0)
        release(s, gate1)
        assert s.wait_exit(30) == 0
    finally:
        s.stop()


# -- the real weight store ---------------------------------------------------------------------------------------

def test_the_weight_store_tells_which_worker_holds_a_checkpoint(comfy_dir: Path,
                                                                sd15_models: Path) -> None:  # noqa: F811
    s = Server(comfy_dir, devices="cpu,cpu", models_dir=sd15_models, serve_args=["--default-route", "pool"],
               name=f"pool-sd15-{comfy_dir.name}").start()
    try:
        first = s.submit(txt2img(seed=1, steps=1), headers={"X-TARGET-GPU": "0"})["prompt_id"]
        assert s.wait_history(first, timeout=300)["status"]["status_str"] == "success"
        status = s.get("/multigpu/status").json()
        loads = [d["model_loads"] for d in status["devices"]]
        assert loads[0] >= 1 and loads[1] == 0, loads
        assert any(0 in e["devices_loaded"] for e in status["weights"]["entries"])
        gate0, _ = block(s, 0)
        gate1, _ = block(s, 1)
        sd = s.submit(txt2img(seed=2, steps=1))["prompt_id"]  # older, but its checkpoint is loaded on worker 0 only
        gate_small = tag()
        small = s.submit(gate_prompt(gate_small))["prompt_id"]
        release(s, gate1)
        s.wait_running(small)  # worker 1 takes the prompt that needs no model
        release(s, gate0)
        entry = s.wait_history(sd, timeout=300)
        release(s, gate_small)
        assert entry["gpu_id"] == 0 and entry["status"]["status_str"] == "success"
        assert s.wait_history(small)["gpu_id"] == 1
        after = [d["model_loads"] for d in s.get("/multigpu/status").json()["devices"]]
        assert after == loads, (loads, after)  # the checkpoint's second prompt on worker 0 loaded nothing
        log = s.log()
        assert re.search(rf"\[GPU 1\] took pooled prompt {small} \(affinity;", log)
        assert re.search(rf"\[GPU 0\] took pooled prompt {sd} \(oldest; model files loaded", log)
        metrics = s.get("/metrics").body.decode()
        assert re.search(r'comfy_parallel_model_loads_total\{device="0"\} [1-9]', metrics)
        assert re.search(r'comfy_parallel_affinity_hits_total\{device="0",kind="model"\} [1-9]', metrics)
    finally:
        s.stop()
