"""Load: 1,000 fast prompts over three CPU workers through every route, with several websocket clients attached.

Every prompt must end in /history exactly once, on the device it was routed to, with success; every websocket
client must get exactly its own prompts' execution messages; no request may get a 5xx. The figures go to
tests/results/reliability.md (see reliability_results.py).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import pytest
import reliability_results
from harness import Server, prompt_id_for, tag_of

N_PROMPTS = 1000
ROUTES = ("header", "port", "prefix", "default")  # default: no target, so the default route (the pool)
TERMINAL = ("execution_success", "execution_error", "execution_interrupted")
EXECUTION_EVENTS = ("execution_start", "executing", "executed", "execution_success")
SUBMIT_CONCURRENCY = 8
DEADLINE_S = 150


@dataclass
class Planned:
    tag: str  # load-<run>-<i>: readable, in failure messages and the CPSleep record
    route: str
    device: int | None  # None: untargeted, the server picks
    client: str
    assigned: int | None = None
    prompt_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_id = prompt_id_for(self.tag)


@dataclass
class WsClient:
    name: str
    client_id: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    expected: set[str] = field(default_factory=set)
    events: list[tuple[str, str]] = field(default_factory=list)  # (type, prompt_id) of every tagged message
    finished: set[str] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _ws_clients(s: Server, run: str) -> list[WsClient]:
    """Six clients, bound to the server in every way a client can be: plain, /gpuN/ws, entry port, header."""
    specs = [
        ("plain", s.url + "/ws", {}),
        ("prefix1", s.url + "/gpu1/ws", {}),
        ("port2", s.entry_url(2) + "/ws", {}),
        ("header0", s.url + "/ws", {"X-TARGET-GPU": "0"}),
        ("prefix0", s.url + "/gpu0/ws", {}),
        ("port1", s.entry_url(1) + "/ws", {}),
    ]
    return [WsClient(name, f"load-{name}-{run}", url, headers) for name, url, headers in specs]


async def _listen(ws: aiohttp.ClientWebSocketResponse, client: WsClient) -> None:
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        data = json.loads(msg.data)
        payload = data.get("data")
        prompt_id = payload.get("prompt_id") if isinstance(payload, dict) else None
        if not prompt_id:
            continue
        client.events.append((data["type"], prompt_id))
        if data["type"] in TERMINAL:
            client.finished.add(prompt_id)
            if client.expected and client.expected <= client.finished:
                client.done.set()


def _request_of(s: Server, p: Planned) -> tuple[str, dict[str, str]]:
    if p.route == "header":
        return s.url + "/prompt", {"X-TARGET-GPU": str(p.device)}
    if p.route == "port":
        return s.entry_url(p.device) + "/prompt", {}  # type: ignore[arg-type]
    if p.route == "prefix":
        return f"{s.url}/gpu{p.device}/prompt", {}
    return s.url + "/prompt", {}


def _record_tag(entry: dict) -> str:
    """The tag the CPSleep record of a history entry carries ("" when it has no record, e.g. it failed)."""
    try:
        return str(entry["outputs"]["1"]["record"][0]["tag"])
    except (KeyError, IndexError, TypeError):
        return ""


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    if dupes:
        raise AssertionError(f"duplicate keys in a JSON object: {dupes[:5]}")
    return dict(pairs)


@pytest.mark.timeout(240)
async def test_thousand_prompts_over_every_route(idle_multi: Server) -> None:
    s = idle_multi
    run = uuid.uuid4().hex[:8]
    rng = random.Random(1234)
    clients = _ws_clients(s, run)
    by_name = {c.name: c for c in clients}
    plan: list[Planned] = []
    for i in range(N_PROMPTS):
        route = ROUTES[i % len(ROUTES)]
        device = None if route == "default" else rng.randrange(s.n_devices)
        client = clients[rng.randrange(len(clients))]
        p = Planned(f"load-{run}-{i:04d}", route, device, client.name)
        client.expected.add(p.prompt_id)
        plan.append(p)
    statuses: Counter[int] = Counter()
    failures: list[str] = []

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sockets = []
        for c in clients:
            ws = await session.ws_connect(f"{c.url}?clientId={c.client_id}", headers=c.headers)
            sockets.append(ws)
        listeners = [asyncio.create_task(_listen(ws, c)) for ws, c in zip(sockets, clients)]
        gate = asyncio.Semaphore(SUBMIT_CONCURRENCY)

        async def submit(p: Planned) -> None:
            url, headers = _request_of(s, p)
            body = {"prompt": {"1": {"class_type": "CPSleep",
                                     "inputs": {"seconds": 0.0, "steps": 1, "tag": p.tag}}},
                    "client_id": by_name[p.client].client_id, "prompt_id": p.prompt_id}
            async with gate:
                async with session.post(url, json=body, headers=headers) as resp:
                    statuses[resp.status] += 1
                    text = await resp.text()
            if resp.status != 200:
                failures.append(f"{p.route} {p.tag}: HTTP {resp.status} {text[:200]}")
                return
            answer = json.loads(text)
            p.assigned = answer.get("gpu_id")
            if (p.assigned is None) != (p.route == "default"):  # a pooled prompt has no device before it runs
                failures.append(f"{p.tag} routed {p.route}: answered gpu_id {p.assigned}")
            if answer.get("prompt_id") != p.prompt_id:
                failures.append(f"{p.tag}: answered prompt_id {answer.get('prompt_id')} for {p.prompt_id}")

        started = time.monotonic()
        await asyncio.gather(*(submit(p) for p in plan))
        submitted_s = time.monotonic() - started
        pending = [c.done.wait() for c in clients if c.expected]
        try:
            await asyncio.wait_for(asyncio.gather(*pending), timeout=DEADLINE_S - submitted_s)
        except asyncio.TimeoutError:
            pass
        wall_s = time.monotonic() - started
        for t in listeners:
            t.cancel()
        for ws in sockets:
            await ws.close()
        s.wait_idle(timeout=30)
        async with session.get(s.url + "/history") as resp:
            statuses[resp.status] += 1
            history = json.loads(await resp.text(), object_pairs_hook=_no_duplicate_keys)

    # ours: by the id's tag, or by the tag the prompt itself ran with (an entry of ours under an id we never sent)
    mine = f"load-{run}-"
    ours = {pid: entry for pid, entry in history.items()
            if tag_of(pid).startswith(mine) or _record_tag(entry).startswith(mine)}
    lost = [p.tag for p in plan if p.prompt_id not in ours]
    planned_ids = {p.prompt_id for p in plan}
    extra = [f"{tag_of(pid)} ran {_record_tag(e) or 'no record'}" for pid, e in ours.items()
             if pid not in planned_ids or _record_tag(e) not in ("", tag_of(pid))]
    not_success = [tag_of(pid) for pid, e in ours.items() if e["status"]["status_str"] != "success"]
    wrong_device = []
    for p in plan:
        entry = ours.get(p.prompt_id)
        # targeted: its device; pooled: the device that took it, which history, thread and start must agree on
        want = p.device if p.device is not None else (entry or {}).get("gpu_id")
        if p.device is not None and p.assigned != p.device:
            wrong_device.append(f"{p.tag} routed {p.route}={p.device}, answered gpu_id {p.assigned}")
        elif entry is not None and (entry.get("gpu_id") != want
                                    or entry["outputs"]["1"]["record"][0]["thread"] != f"comfy-parallel-worker-{want}"):
            wrong_device.append(f"{p.tag} routed {p.route}={want}, ran on {entry.get('gpu_id')}")

    misdelivered: list[str] = []
    duplicated: list[str] = []
    missing_events: list[str] = []
    for c in clients:
        for kind, pid in c.events:
            if pid not in c.expected:
                misdelivered.append(f"{c.name} got {kind} of {tag_of(pid)}")
        counts = Counter(c.events)
        for pid in c.expected:
            if counts[("execution_success", pid)] > 1 or counts[("execution_start", pid)] > 1:
                duplicated.append(tag_of(pid))
            absent = [k for k in EXECUTION_EVENTS if counts[(k, pid)] == 0]
            if absent:
                missing_events.append(f"{c.name} {tag_of(pid)} lacks {absent}")
    http_5xx = sum(n for status, n in statuses.items() if status >= 500)
    routes = Counter(p.route for p in plan)
    default_spread = Counter(ours[p.prompt_id].get("gpu_id") for p in plan
                             if p.route == "default" and p.prompt_id in ours)
    reliability_results.record(f"load ({s.comfy_dir.name})", {
        "section": "load", "comfyui": s.comfy_dir.name,
        "prompts_sent": len(plan), "lost": len(lost), "duplicated": len(duplicated) + len(extra),
        "wrong_device": len(wrong_device), "ws_misdelivered": len(misdelivered),
        "ws_missing_events": len(missing_events), "not_success": len(not_success), "http_5xx": http_5xx,
        "http_non_200": sum(n for status, n in statuses.items() if status != 200),
        "ws_clients": len(clients), "wall_s": round(wall_s, 1), "submit_s": round(submitted_s, 1),
        "prompts_per_s": round(len(plan) / wall_s, 1),
        **{f"route_{name}": n for name, n in sorted(routes.items())},
        **{f"default_ran_on_gpu{gpu}": n for gpu, n in sorted(default_spread.items(), key=lambda kv: str(kv[0]))},
    })

    assert not failures, failures[:5]
    assert http_5xx == 0, statuses
    assert not lost, f"{len(lost)} prompts never reached /history, e.g. {lost[:5]}"
    assert not extra and not duplicated, (extra[:5], duplicated[:5])
    assert not not_success, not_success[:5]
    assert not wrong_device, wrong_device[:5]
    assert not misdelivered, misdelivered[:5]
    assert not missing_events, missing_events[:5]
    assert wall_s < DEADLINE_S
