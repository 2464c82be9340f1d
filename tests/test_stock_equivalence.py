"""The same requests against stock ComfyUI and against comfy-parallel give the same answers.

With one device the launcher patches nothing, so every answer must match stock exactly. With three devices the
answers must match stock but for the documented additions (``gpu_id`` on /prompt, in history entries and in
execution_start messages, ``gpu_ids`` on /queue, ``route: "pool"`` on the /prompt answer of a pooled prompt).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import Server, prompt_id_for, sleep_prompt

VOLATILE = {"timestamp", "create_time", "start", "end", "thread", "traceback", "number"}


def normalise(value: Any) -> Any:
    if isinstance(value, dict):
        out = {k: ("*" if k in VOLATILE else normalise(v)) for k, v in value.items()}
        if isinstance(out.get("prompt"), list) and out["prompt"]:
            out["prompt"][0] = "*"  # a history entry's queue number depends on earlier requests
        return out
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    return value


ADDED = ("gpu_id", "gpu_ids", "route")  # route: "pool" in the /prompt answer of a pooled prompt


def without_gpu_id(value: Any) -> Any:
    """``value`` without the keys comfy-parallel adds (a websocket trace lists a message's keys as strings)."""
    if isinstance(value, dict):
        return {k: without_gpu_id(v) for k, v in value.items() if k not in ADDED}
    if isinstance(value, (list, tuple)):
        return [without_gpu_id(v) for v in value if v not in ADDED]
    return value


async def _ws_trace(server: Server, client_id: str, prompt: dict, prompt_id: str) -> list[tuple[str, list[str]]]:
    trace: list[tuple[str, list[str]]] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: server.post(
                "/prompt", {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}))
            while True:
                msg = await asyncio.wait_for(ws.receive(), 30)
                data = json.loads(msg.data)
                trace.append((data["type"], sorted(data["data"])))
                if data["type"] == "executing" and data["data"].get("node") is None:
                    return trace


def conversation(server: Server, tag: str) -> list[Any]:
    """A fixed sequence of stock API calls; returns their normalised answers."""
    server.wait_idle()
    out: list[Any] = []

    def call(method: str, path: str, body: Any = None) -> Any:
        resp = server.get(path) if method == "GET" else server.post(path, body)
        try:
            payload = resp.json()
        except ValueError:
            payload = resp.body.decode(errors="replace")
        out.append((method, path, resp.status, normalise(payload)))
        return payload

    ok, fail = prompt_id_for(f"ok-{tag}"), prompt_id_for(f"fail-{tag}")  # the same ids on every server
    call("GET", "/queue")
    call("GET", "/prompt")
    call("POST", "/prompt", {"prompt": sleep_prompt(0.1, 2, tag), "prompt_id": ok, "client_id": "eq"})
    server.wait_history(ok)
    call("GET", f"/history/{ok}")
    call("POST", "/prompt", {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}})
    call("POST", "/prompt", {"no_prompt": True})
    # a readable id: 0.33 refuses it (invalid_prompt_id) before validating the prompt, 0.3.75 takes it; the
    # prompt is invalid either way, so nothing is queued
    call("POST", "/prompt", {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}, "prompt_id": f"bad-{tag}"})
    call("POST", "/prompt", {"prompt": {"1": {"class_type": "CPSleep", "inputs": {"seconds": "x"}}}})
    call("POST", "/prompt", {"prompt": {"1": {"class_type": "CPFail", "inputs": {"message": "bad"}}},
                             "prompt_id": fail})
    server.wait_history(fail)
    call("GET", f"/history/{fail}")
    call("GET", "/object_info/CPSleep")
    call("POST", "/queue", {"clear": True})
    call("POST", "/queue", {"delete": ["nope"]})
    call("POST", "/interrupt", {})
    call("POST", "/free", {"unload_models": True, "free_memory": True})
    call("POST", "/history", {"delete": [ok]})
    call("GET", f"/history/{ok}")
    call("GET", "/queue")
    out.append(("WS", asyncio.run(_ws_trace(server, "ws-eq", sleep_prompt(0.2, 2, tag),
                                        prompt_id_for(f"ws-{tag}")))))
    return out


@pytest.fixture(scope="module")
def stock(comfy_dir: Path):
    server = Server(comfy_dir, mode="stock", devices="cpu", name=f"stock-{comfy_dir.name}").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def single(comfy_dir: Path):
    server = Server(comfy_dir, mode="multi", devices="cpu", name=f"single-{comfy_dir.name}").start()
    yield server
    server.stop()


def test_one_device_is_stock(stock: Server, single: Server) -> None:
    expected = conversation(stock, "t1")
    assert conversation(single, "t1") == expected
    assert "running stock ComfyUI (no patches)" in single.log()
    assert single.get("/debug/queues").status == 404  # nothing added either


def test_multi_device_answers_like_stock(stock: Server, multi: Server) -> None:
    expected = conversation(stock, "t2")
    got = conversation(multi, "t2")
    prompt_answer = next(x for x in got if x[0] == "POST" and x[1] == "/prompt" and x[2] == 200)
    assert "gpu_id" in prompt_answer[3]
    ok = prompt_id_for("ok-t2")
    history = next(x for x in got if x[0] == "GET" and x[1] == f"/history/{ok}")
    assert history[3][ok]["gpu_id"] in (0, 1, 2)
    starts = [data for event, data in history[3][ok]["status"]["messages"] if event == "execution_start"]
    assert [start["gpu_id"] for start in starts] == [history[3][ok]["gpu_id"]]
    assert all("gpu_ids" in x[3] for x in got if x[:3] == ("GET", "/queue", 200))
    ws_trace = next(x[1] for x in got if x[0] == "WS")
    assert ("execution_start", ["gpu_id", "prompt_id", "timestamp"]) in ws_trace
    assert without_gpu_id(got) == without_gpu_id(expected)
