"""Websocket messages reach only the client that submitted the prompt, while several devices run at once."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
from harness import Server, sleep_prompt


async def _collect(ws: aiohttp.ClientWebSocketResponse, out: list[dict], done: asyncio.Event,
                   expected: set[str]) -> None:
    finished: set[str] = set()
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        data = json.loads(msg.data)
        out.append(data)
        d = data.get("data", {})
        if data["type"] == "executing" and d.get("node") is None and d.get("prompt_id"):
            finished.add(d["prompt_id"])
        if expected and expected <= finished:
            done.set()


async def test_each_client_gets_only_its_own_messages(idle_multi: Server) -> None:
    s = idle_multi
    clients = {
        "A": (s.url + "/ws", {"X-TARGET-GPU": "0"}, None, "/prompt"),
        "B": (s.url + "/gpu1/ws", None, None, "/gpu1/prompt"),
        "C": (s.entry_url(2) + "/ws", None, s.entry_url(2), "/prompt"),
    }
    cids = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in clients}
    async with aiohttp.ClientSession() as session:
        sockets = {name: await session.ws_connect(f"{url}?clientId={cids[name]}")
                   for name, (url, _, _, _) in clients.items()}
        prompt_ids: dict[str, set[str]] = {name: set() for name in clients}
        loop = asyncio.get_running_loop()
        for round_ in range(2):
            for name, (_, headers, base, path) in clients.items():
                resp = await loop.run_in_executor(None, lambda: s.submit(
                    sleep_prompt(1.0, 10), headers=headers, base=base, path=path, client_id=cids[name]))
                prompt_ids[name].add(resp["prompt_id"])
        # A also runs one on device 2, concurrently with C's, and must still see only its own
        resp = await loop.run_in_executor(None, lambda: s.submit(
            sleep_prompt(1.0, 10), headers={"X-TARGET-GPU": "2"}, client_id=cids["A"]))
        prompt_ids["A"].add(resp["prompt_id"])

        received = {name: [] for name in clients}
        events = {name: asyncio.Event() for name in clients}
        tasks = [asyncio.create_task(_collect(sockets[n], received[n], events[n], prompt_ids[n])) for n in clients]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events.values())), timeout=60)
        for t in tasks:
            t.cancel()
        for ws in sockets.values():
            await ws.close()

    all_ids = set().union(*prompt_ids.values())
    for name, messages in received.items():
        mine = prompt_ids[name]
        tagged = [m for m in messages if isinstance(m.get("data"), dict) and m["data"].get("prompt_id")]
        foreign = [m for m in tagged if m["data"]["prompt_id"] not in mine]
        assert not foreign, f"client {name} got messages of other clients' prompts: {foreign[:3]}"
        for pid in mine:
            kinds = [m["type"] for m in tagged if m["data"]["prompt_id"] == pid]
            assert "execution_start" in kinds and "progress" in kinds and "executed" in kinds, (name, kinds)
            assert "execution_success" in kinds, (name, kinds)
            progress = [m["data"]["value"] for m in tagged if m["type"] == "progress"
                        and m["data"]["prompt_id"] == pid]
            assert progress == sorted(progress) and progress[-1] == 10, (name, pid, progress)
        assert mine <= all_ids


async def test_websocket_status_is_scoped_to_its_device(idle_multi: Server) -> None:
    s = idle_multi
    busy = s.submit(sleep_prompt(30, 300), headers={"X-TARGET-GPU": "0"})["prompt_id"]
    queued = s.submit(sleep_prompt(0.05, 1), headers={"X-TARGET-GPU": "0"})["prompt_id"]
    s.wait_running(busy)

    async def first_status(url: str) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url) as ws:
                async for msg in ws:
                    data = json.loads(msg.data)
                    if data["type"] == "status":
                        return data["data"]["status"]["exec_info"]["queue_remaining"]
        raise AssertionError("no status message")

    assert await first_status(s.url + "/gpu1/ws") == 0
    assert await first_status(s.url + "/gpu0/ws") == 2
    assert await first_status(s.url + "/ws") == 2
    assert await first_status(s.entry_url(0) + "/ws?clientId=x0") == 2

    # broadcasts after a queue change are scoped too
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(s.url + "/gpu2/ws") as ws2, session.ws_connect(s.url + "/ws") as ws_all:
            await asyncio.sleep(0.3)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: s.submit(sleep_prompt(0.05, 1),
                                                              headers={"X-TARGET-GPU": "1"}))

            async def statuses(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[int]:
                seen: list[int] = []
                while len(seen) < n:
                    msg = await asyncio.wait_for(ws.receive(), 10)
                    data = json.loads(msg.data)
                    if data["type"] == "status":
                        seen.append(data["data"]["status"]["exec_info"]["queue_remaining"])
                return seen

            assert max(await statuses(ws2, 2)) == 0
            assert max(await statuses(ws_all, 2)) >= 3
    assert s.post("/interrupt").status == 200
    s.wait_history(busy, timeout=10)
    s.wait_history(queued)
