"""Faults under traffic: each one is survived, recorded in /history, visible in /metrics, and the device it hit
serves the next prompt.

test_operations.py covers each worker fault on an idle server; here they are injected while every device is
busy with other clients' prompts, plus the faults of clients: a websocket that closes while its prompt runs, an
HTTP client that leaves right after its POST or halfway through it, and a websocket client that never reads.
The figures go to tests/results/reliability.md (see reliability_results.py).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import struct
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import pytest
import reliability_results
from harness import Server, prompt_id_for, tag_of

TERMINAL = ("execution_success", "execution_error", "execution_interrupted")


def sleep_body(prompt_id: str, client_id: str | None, seconds: float = 0.0, steps: int = 1) -> dict:
    """A CPSleep prompt whose record carries the id's readable tag."""
    body: dict = {"prompt": {"1": {"class_type": "CPSleep", "inputs": {"seconds": seconds, "steps": steps,
                                                                        "tag": tag_of(prompt_id)}}},
                  "prompt_id": prompt_id}
    if client_id is not None:
        body["client_id"] = client_id
    return body


def node_body(prompt_id: str, client_id: str | None, class_type: str, **inputs: object) -> dict:
    body: dict = {"prompt": {"1": {"class_type": class_type, "inputs": inputs}}, "prompt_id": prompt_id}
    if client_id is not None:
        body["client_id"] = client_id
    return body


def parse_metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:]+)(?:\{([^}]*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))).strip(",") == want:
            return float(m.group(3))
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


@dataclass
class Api:
    """The server over one aiohttp session; counts every status it answers with."""

    server: Server
    session: aiohttp.ClientSession
    statuses: Counter[int] = field(default_factory=Counter)

    async def post(self, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict | str]:
        async with self.session.post(self.server.url + path, json=body, headers=headers or {}) as resp:
            self.statuses[resp.status] += 1
            text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text

    async def submit(self, body: dict, device: int | None = None) -> dict:
        status, answer = await self.post("/prompt", body, {"X-TARGET-GPU": str(device)} if device is not None
                                         else None)
        assert status == 200 and isinstance(answer, dict), (status, answer)
        return answer

    async def history(self, prompt_id: str) -> dict | None:
        async with self.session.get(f"{self.server.url}/history/{prompt_id}") as resp:
            self.statuses[resp.status] += 1
            return (await resp.json()).get(prompt_id)

    async def wait_history(self, prompt_id: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = await self.history(prompt_id)
            if entry is not None:
                return entry
            await asyncio.sleep(0.05)
        raise AssertionError(f"prompt {tag_of(prompt_id)} ({prompt_id}) not in /history after {timeout}s")

    async def metrics(self) -> str:
        async with self.session.get(self.server.url + "/metrics") as resp:
            self.statuses[resp.status] += 1
            return await resp.text()

    async def metric(self, name: str, **labels: str) -> float:
        return parse_metric(await self.metrics(), name, **labels)

    async def metric_becomes(self, value: float, name: str, timeout: float = 5, **labels: str) -> bool:
        """Poll until the metric equals ``value`` (gauges follow a closed socket a moment later)."""
        deadline = time.monotonic() + timeout
        while await self.metric(name, **labels) != value:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def forget(self, prompt_ids: list[str]) -> None:
        """Delete entries from the shared server's history (large outputs would slow later tests' /history)."""
        await self.post("/history", {"delete": prompt_ids})

    @property
    def http_5xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


@dataclass
class Listener:
    """A websocket client that reads everything and keeps each tagged message as (type, prompt_id, data)."""

    ws: aiohttp.ClientWebSocketResponse
    messages: list[tuple[str, str, dict]] = field(default_factory=list)
    arrived: dict[str, float] = field(default_factory=dict)  # prompt_id -> time its terminal message came
    task: asyncio.Task | None = None

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, url: str) -> "Listener":
        listener = cls(await session.ws_connect(url))
        listener.task = asyncio.create_task(listener._read())
        return listener

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            payload = data.get("data")
            if isinstance(payload, dict) and payload.get("prompt_id"):
                self.messages.append((data["type"], payload["prompt_id"], payload))
                if data["type"] in TERMINAL:
                    self.arrived.setdefault(payload["prompt_id"], time.monotonic())

    def kinds(self, prompt_id: str) -> list[str]:
        return [kind for kind, pid, _ in self.messages if pid == prompt_id]

    async def wait_terminal(self, prompt_ids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(pid in self.arrived for pid in prompt_ids):
                return True
            await asyncio.sleep(0.02)
        return False

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.ws.close()


@dataclass
class Tally:
    """Faults injected and survived, by kind, with the first reason a fault was not survived."""

    injected: Counter[str] = field(default_factory=Counter)
    survived: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def check(self, kind: str, checks: dict[str, bool]) -> None:
        self.injected[kind] += 1
        failed = [what for what, ok in checks.items() if not ok]
        if failed:
            self.problems.append(f"{kind}: {', '.join(failed)}")
        else:
            self.survived[kind] += 1

    def figures(self) -> dict[str, int]:
        out = {"faults_injected": sum(self.injected.values()), "faults_survived": sum(self.survived.values())}
        for kind in self.injected:
            out[f"{kind}_injected"] = self.injected[kind]
            out[f"{kind}_survived"] = self.survived[kind]
        return out


def _version(s: Server) -> str:
    return s.comfy_dir.name


# ----------------------------------------------------------------------------------------------------------------
# Worker faults while every device is busy
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.timeout(180)
async def test_worker_faults_under_traffic(idle_multi: Server) -> None:
    """OOM (once, twice), a node exception and a worker crash, while other clients keep every device busy."""
    s = idle_multi
    run = uuid.uuid4().hex[:8]
    tally = Tally()
    began = time.monotonic()
    background: list[str] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        api = Api(s, session)
        bg_cid, fault_cid = f"bg-{run}", f"faults-{run}"
        bg_ws = await Listener.connect(session, f"{s.url}/ws?clientId={bg_cid}")
        fault_ws = await Listener.connect(session, f"{s.url}/gpu2/ws?clientId={fault_cid}")

        async def traffic() -> None:
            """Other clients' prompts on every device, for the whole test."""
            rng = random.Random(7)
            i = 0
            while not stop.is_set():
                pid = prompt_id_for(f"bg-{run}-{i:04d}")
                device = rng.choice([None, 0, 1, 2])
                await api.submit(sleep_body(pid, bg_cid, 0.02), device)
                background.append(pid)
                i += 1
                await asyncio.sleep(0.02)

        traffic_task = asyncio.create_task(traffic())
        await asyncio.sleep(0.5)

        async def next_prompt_served(device: int) -> bool:
            pid = prompt_id_for(f"next-{uuid.uuid4().hex[:8]}-{run}")
            await api.submit(sleep_body(pid, fault_cid), device)
            entry = await api.wait_history(pid)
            return entry["status"]["status_str"] == "success" and entry["gpu_id"] == device

        async def told(pid: str, kind: str) -> bool:
            """The submitter's websocket got exactly one ``kind`` message for ``pid``."""
            return await fault_ws.wait_terminal([pid], 5) and fault_ws.kinds(pid).count(kind) == 1

        # out of memory once: freed and retried, the prompt succeeds
        oom_before = await api.metric("comfy_parallel_oom_total", device="1")
        pid = prompt_id_for(f"oom1-{run}")
        await api.submit(node_body(pid, fault_cid, "CPOOM", times=1, tag=tag_of(pid)), 1)
        entry = await api.wait_history(pid)
        tally.check("oom_retried", {
            "success after retry": entry["status"]["status_str"] == "success" and entry["gpu_id"] == 1,
            "oom counted once": await api.metric("comfy_parallel_oom_total", device="1") == oom_before + 1,
            "submitter told": await told(pid, "execution_success"),
            "retried attempt not shown as an error": "execution_error" not in fault_ws.kinds(pid),
            "next prompt served": await next_prompt_served(1),
        })

        # out of memory twice: recorded as an error naming the second OOM
        oom_before = await api.metric("comfy_parallel_oom_total", device="1")
        pid = prompt_id_for(f"oom2-{run}")
        await api.submit(node_body(pid, fault_cid, "CPOOM", times=2, tag=tag_of(pid)), 1)
        entry = await api.wait_history(pid)
        events = [event for event, _ in entry["status"]["messages"]]
        tally.check("oom_twice", {
            "error recorded": entry["status"]["status_str"] == "error" and "comfy_parallel_oom" in events,
            "oom counted twice": await api.metric("comfy_parallel_oom_total", device="1") == oom_before + 2,
            "submitter told": await told(pid, "execution_error"),
            "next prompt served": await next_prompt_served(1),
        })

        # an exception in a node
        errors_before = await api.metric("comfy_parallel_prompts_total", device="0", outcome="error")
        pid = prompt_id_for(f"fail-{run}")
        await api.submit(node_body(pid, fault_cid, "CPFail", message=f"injected {tag_of(pid)}"), 0)
        entry = await api.wait_history(pid)
        error = dict(entry["status"]["messages"]).get("execution_error", {})
        tally.check("node_exception", {
            "error recorded": entry["status"]["status_str"] == "error"
            and error.get("exception_message", "").strip() == f"injected {tag_of(pid)}",
            "error counted": await api.metric("comfy_parallel_prompts_total", device="0", outcome="error")
            == errors_before + 1,
            "submitter told": await told(pid, "execution_error"),
            "next prompt served": await next_prompt_served(0),
        })

        # a BaseException that ends the worker's loop: the prompt is recorded, the worker starts again
        restarts_before = await api.metric("comfy_parallel_worker_restarts_total", device="2", reason="crash")
        pid = prompt_id_for(f"crash-{run}")
        await api.submit(node_body(pid, fault_cid, "CPCrash", tag=tag_of(pid)), 2)
        entry = await api.wait_history(pid)
        tally.check("worker_crash", {
            "error recorded": entry["status"]["status_str"] == "error" and "crashed" in str(entry["status"]),
            "restart counted": await api.metric("comfy_parallel_worker_restarts_total", device="2", reason="crash")
            == restarts_before + 1,
            "submitter told": await told(pid, "execution_error"),
            "next prompt served": await next_prompt_served(2),
        })

        stop.set()
        await traffic_task
        bg_done = await bg_ws.wait_terminal(background, 60)
        bg_entries = {pid: await api.history(pid) for pid in background}
        ready = await session.get(s.url + "/ready")
        ready_body = await ready.json()
        await bg_ws.close()
        await fault_ws.close()

    lost = [tag_of(pid) for pid, e in bg_entries.items() if e is None]
    failed = [tag_of(pid) for pid, e in bg_entries.items()
              if e is not None and e["status"]["status_str"] != "success"]
    foreign = [(kind, tag_of(pid)) for kind, pid, _ in bg_ws.messages if not tag_of(pid).startswith(f"bg-{run}-")]
    foreign += [(kind, tag_of(pid)) for kind, pid, _ in fault_ws.messages if not tag_of(pid).endswith(f"-{run}")]
    successes = Counter(tag_of(pid) for kind, pid, _ in bg_ws.messages if kind == "execution_success")
    reliability_results.record(f"faults: worker ({_version(s)})", {
        "section": "faults: worker", "comfyui": _version(s), "prompts_sent": len(background) + 4 + 4,
        "lost": len(lost), "duplicated": sum(n - 1 for n in successes.values() if n > 1),
        "background_not_success": len(failed), "ws_misdelivered": len(foreign), "http_5xx": api.http_5xx,
        "wall_s": round(time.monotonic() - began, 1),
        **tally.figures(),
    })
    assert not tally.problems, tally.problems
    assert bg_done and not lost and not failed, (lost[:5], failed[:5])
    assert all(n == 1 for n in successes.values()), successes.most_common(3)
    assert not foreign, foreign[:5]
    assert api.http_5xx == 0, api.statuses
    assert ready.status == 200 and ready_body["ready"] is True


# ----------------------------------------------------------------------------------------------------------------
# Clients that leave
# ----------------------------------------------------------------------------------------------------------------

def _raw_http(port: int, raw: bytes, reset: bool) -> None:
    """Send ``raw`` on a new connection and leave without reading: at once with a FIN, or with an RST once the
    server has had time to read what was sent (an RST that arrives first discards it: then nothing happened)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(raw)
    if reset:
        time.sleep(0.3)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _post_bytes(path: str, port: int, body: bytes, declared: int | None = None) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared if declared is not None else len(body)}\r\n\r\n")
    return head.encode() + body


@pytest.mark.timeout(120)
async def test_clients_that_leave(idle_multi: Server) -> None:
    """Clients that vanish must not take their prompt, their device or the server with them."""
    s = idle_multi
    run = uuid.uuid4().hex[:8]
    tally = Tally()
    sent = 0
    began = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        api = Api(s, session)

        # a websocket closed while its prompt runs
        cid = f"leaver-{run}"
        clients_before = await api.metric("comfy_parallel_websocket_clients")
        ws = await Listener.connect(session, f"{s.url}/gpu0/ws?clientId={cid}")
        connected = await api.metric("comfy_parallel_websocket_clients") == clients_before + 1
        pid = prompt_id_for(f"wsleft-{run}")
        await api.submit(sleep_body(pid, cid, 1.0, 10), 0)
        sent += 1
        deadline = time.monotonic() + 20
        while "progress" not in ws.kinds(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        started = "progress" in ws.kinds(pid)
        await ws.close()
        entry = await api.wait_history(pid)
        gone = await api.metric_becomes(clients_before, "comfy_parallel_websocket_clients")
        # the same client comes back and gets its next prompt's messages
        back = await Listener.connect(session, f"{s.url}/gpu0/ws?clientId={cid}")
        pid2 = prompt_id_for(f"wsback-{run}")
        await api.submit(sleep_body(pid2, cid), 0)
        sent += 1
        told = await back.wait_terminal([pid2], 10)
        tally.check("ws_closed_mid_prompt", {
            "closed while running": started,
            "socket counted in /metrics": connected,
            "prompt finished": entry["status"]["status_str"] == "success" and entry["gpu_id"] == 0,
            "socket gone from /metrics": gone,
            "returning client served": told and back.kinds(pid2).count("execution_success") == 1,
        })
        await back.close()

        # an HTTP client that sends its POST and leaves before the answer (FIN, then RST)
        for reset in (False, True):
            pid = prompt_id_for(f"httpleft-{'rst' if reset else 'fin'}-{run}")
            success_before = await api.metric("comfy_parallel_prompts_total", device="1", outcome="success")
            raw = _post_bytes("/gpu1/prompt", s.port, json.dumps(sleep_body(pid, None, 0.05)).encode())
            await asyncio.get_running_loop().run_in_executor(None, _raw_http, s.port, raw, reset)
            sent += 1
            try:
                entry = await api.wait_history(pid, timeout=10)
            except AssertionError:
                entry = None
            success_after = await api.metric("comfy_parallel_prompts_total", device="1", outcome="success")
            nxt = prompt_id_for(f"after-{tag_of(pid)}")
            await api.submit(sleep_body(nxt, None), 1)
            sent += 1
            served = (await api.wait_history(nxt))["status"]["status_str"] == "success"
            tally.check(f"http_left_after_post_{'rst' if reset else 'fin'}", {
                "prompt ran": entry is not None and entry["status"]["status_str"] == "success"
                and entry["gpu_id"] == 1,
                "success counted": success_after >= success_before + 1,
                "next prompt served": served,
            })

        # an HTTP client that leaves halfway through its body: nothing is queued, nothing breaks
        pid = prompt_id_for(f"halfbody-{run}")
        log_mark = len(s.log())
        left_before = await api.metric("comfy_parallel_http_clients_left_total")
        body = json.dumps(sleep_body(pid, None)).encode()
        raw = _post_bytes("/prompt", s.port, body[: len(body) // 2], declared=len(body))
        await asyncio.get_running_loop().run_in_executor(None, _raw_http, s.port, raw, True)
        sent += 1
        await asyncio.sleep(1.0)
        nxt = prompt_id_for(f"after-{tag_of(pid)}")
        await api.submit(sleep_body(nxt, None))
        sent += 1
        tally.check("http_left_mid_body", {
            "nothing queued": await api.history(pid) is None,
            "next prompt served": (await api.wait_history(nxt))["status"]["status_str"] == "success",
            "no traceback logged": "Error handling request" not in s.log()[log_mark:],
            "counted in /metrics": await api.metric("comfy_parallel_http_clients_left_total") == left_before + 1,
        })

    reliability_results.record(f"faults: clients leave ({_version(s)})", {
        "section": "faults: clients leave", "comfyui": _version(s), "prompts_sent": sent,
        "http_5xx": api.http_5xx, "wall_s": round(time.monotonic() - began, 1),
        **tally.figures(),
    })
    assert not tally.problems, tally.problems
    assert api.http_5xx == 0, api.statuses


# ----------------------------------------------------------------------------------------------------------------
# A websocket client that never reads
# ----------------------------------------------------------------------------------------------------------------

def _unread_websocket(port: int, path: str, rcvbuf: int = 4096) -> socket.socket:
    """Open a websocket with a small receive buffer, read the handshake answer, and then never read again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("websocket handshake failed")
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


SLOW_PROMPTS = 24
SLOW_KB = 512


@pytest.mark.timeout(120)
async def test_websocket_client_that_never_reads(idle_multi: Server) -> None:
    """Stock ComfyUI's publish loop awaits each socket send in turn: once this client's socket is full, nobody got
    messages any more (9 of 9 of the other client's prompts unseen after 15 s before the fix)."""
    s = idle_multi
    run = uuid.uuid4().hex[:8]
    tally = Tally()
    began = time.monotonic()
    slow_cid, fast_cid = f"slow-{run}", f"fast-{run}"
    slow_ids = [prompt_id_for(f"slow-{run}-{i:02d}") for i in range(SLOW_PROMPTS)]
    fast_ids = [prompt_id_for(f"fast-{run}-{i:02d}") for i in range(9)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        api = Api(s, session)
        text = await api.metrics()
        dropped_before = sum(parse_metric(text, "comfy_parallel_websocket_dropped_total", reason=r)
                             for r in ("send_blocked", "backlog"))
        clients_before = parse_metric(text, "comfy_parallel_websocket_clients")
        slow = await asyncio.get_running_loop().run_in_executor(None, _unread_websocket, s.port,
                                                                f"/ws?clientId={slow_cid}")
        fast = await Listener.connect(session, f"{s.url}/ws?clientId={fast_cid}")
        for i, pid in enumerate(slow_ids):
            await api.submit(node_body(pid, slow_cid, "CPBigOutput", kilobytes=SLOW_KB, tag=tag_of(pid)), i % 3)
        for pid in slow_ids:
            await api.wait_history(pid, timeout=60)
        # the slow client's outputs are all sent (or stuck in its socket) by now; everyone else must still be served
        submitted: dict[str, float] = {}
        for i, pid in enumerate(fast_ids):
            await api.submit(sleep_body(pid, fast_cid), i % 3)
            submitted[pid] = time.monotonic()
        fast_ok = await fast.wait_terminal(fast_ids, 15)
        fast_wait = max(fast.arrived.get(pid, time.monotonic()) - submitted[pid] for pid in fast_ids)
        dropped, dropped_after = False, -1.0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = await api.metrics()
            total = sum(parse_metric(text, "comfy_parallel_websocket_dropped_total", reason=r)
                        for r in ("send_blocked", "backlog"))
            if total > dropped_before:
                dropped = True
                dropped_after = time.monotonic() - began
                break
            await asyncio.sleep(0.2)
        # the server let go of the slow socket: only the fast client is left
        released = dropped and await api.metric_becomes(clients_before + 1, "comfy_parallel_websocket_clients")
        slow_entries = [await api.history(pid) for pid in slow_ids]
        await fast.close()
        slow.close()
        await api.forget(slow_ids)

    tally.check("ws_never_reads", {
        "other clients served": fast_ok,
        "slow client's prompts recorded": all(e is not None and e["status"]["status_str"] == "success"
                                              for e in slow_entries),
        "slow client dropped and counted": dropped,
        "slow socket released": released,
        "drop logged": f"websocket client {slow_cid} cannot keep up" in s.log(),
    })
    reliability_results.record(f"faults: slow websocket ({_version(s)})", {
        "section": "faults: slow websocket", "comfyui": _version(s),
        "prompts_sent": len(slow_ids) + len(fast_ids), "http_5xx": api.http_5xx,
        "slow_client_mb_sent": round(SLOW_PROMPTS * SLOW_KB / 1024, 1),
        "other_client_max_wait_ms": round(1000 * fast_wait), "dropped_after_s": round(dropped_after, 1),
        "wall_s": round(time.monotonic() - began, 1),
        **tally.figures(),
    })
    assert not tally.problems, tally.problems
    assert api.http_5xx == 0, api.statuses
