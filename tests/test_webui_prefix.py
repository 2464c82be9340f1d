"""The web UI opened at ``/gpuN/`` in headless Chromium: the graph editor renders, and a prompt queued from it runs
on device N.

Driven like ``test_status_page.py`` (its DevTools helpers are imported). The frontend's router matches only ``/``,
so ``/gpuN/`` binds the browser with a cookie and redirects there; these tests check the page, not only HTTP:
the same tab opened at ``/`` without the cookie is untargeted (its prompt takes the default route), the bound
page's prompt lands on N and its websocket status counts device N's queue only, and ``/multigpu/unbind`` removes
the cookie. One server with two CPU workers per ComfyUI version; every wait polls a condition.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from harness import ARTIFACTS, Server, record_of, sleep_prompt
from test_status_page import (DESKTOP, DevTools, assert_real_screenshot, chromium_page,
                              needs_chromium)

from comfy_parallel.server.routing import COOKIE

# The graph editor is up: the app and its graph exist, the canvas is laid out, the test node pack's node types
# are registered (object_info loaded) and the websocket is open (so queued prompts carry its client id).
RENDERED = ("!!(window.app && window.app.graph && window.LiteGraph && LiteGraph.registered_node_types.CPSleep"
            " && window.comfyAPI && comfyAPI.api.api.socket && comfyAPI.api.api.socket.readyState === 1"
            " && document.getElementById('graph-canvas')"
            " && document.getElementById('graph-canvas').getBoundingClientRect().width > 200)")

# Keep every /prompt answer and every websocket status the page receives, for the test to read.
RECORD = """(() => {
    const api = comfyAPI.api.api;
    if (window.__cp) return true;
    window.__cp = {answers: [], statuses: [], errors: []};
    const queue = api.queuePrompt.bind(api);
    api.queuePrompt = async (...args) => {
        try {
            const answer = await queue(...args);
            window.__cp.answers.push(answer);
            return answer;
        } catch (err) {
            window.__cp.errors.push(String(err && (err.message || JSON.stringify(err.response))));
            throw err;
        }
    };
    api.addEventListener("status", (e) => { if (e.detail) window.__cp.statuses.push(e.detail); });
    return true;
})()"""


@pytest.fixture(scope="module")
def two_cpu(comfy_dir: Path):
    """Two CPU workers: with both idle an untargeted prompt goes to device 0, so device 1 proves the binding."""
    server = Server(comfy_dir, mode="multi", devices="cpu,cpu", name=f"webui-{comfy_dir.name}").start()
    yield server
    server.stop()


async def open_ui(dev: DevTools, url: str) -> str:
    """Navigate, wait until the graph editor has rendered, start recording; the page's final path."""
    await dev.send("Page.navigate", {"url": url})
    await dev.wait_for(RENDERED, timeout=90)
    await dev.eval(RECORD)
    return await dev.eval("location.pathname")


async def binding(dev: DevTools, base: str) -> str | None:
    """The browser's binding cookie for ``base`` (HttpOnly: the page's own script cannot see it)."""
    cookies = (await dev.send("Network.getCookies", {"urls": [base + "/"]}))["cookies"]
    return next((c["value"] for c in cookies if c["name"] == COOKIE), None)


async def queue_from_page(dev: DevTools, server: Server, seconds: float = 0.2) -> tuple[dict, dict]:
    """Load a one-node CPSleep workflow into the app and queue it as the Queue button does; the /prompt answer
    the page got and the prompt's history entry."""
    tag = f"webui-{uuid.uuid4().hex[:12]}"
    workflow = sleep_prompt(seconds, 2, tag)
    before = await dev.eval("window.__cp.answers.length")
    await dev.eval(f"app.loadApiJson({json.dumps(workflow)}, 'comfy-parallel-test.json'); true")
    await dev.wait_for("app.graph.nodes.length === 1 && app.graph.nodes[0].type === 'CPSleep'")
    await dev.eval("app.queuePrompt(0, 1); true")
    await dev.wait_for(f"window.__cp.answers.length > {before} || window.__cp.errors.length", timeout=30)
    assert await dev.eval("window.__cp.errors") == [], "the page's /prompt failed"
    answer = await dev.eval(f"window.__cp.answers[{before}]")
    loop = asyncio.get_running_loop()
    entry = await loop.run_in_executor(None, server.wait_history, answer["prompt_id"], 60)
    assert record_of(entry)["tag"] == tag, "history holds another prompt than the one the page queued"
    return answer, entry


async def drive(server: Server, shot: Path, log: Path) -> None:
    base = server.url
    async with chromium_page(log, DESKTOP) as dev:
        # Not bound: the UI at / without the cookie sends untargeted prompts (to the pool, the default route).
        assert await open_ui(dev, base + "/") == "/"
        assert await binding(dev, base) is None
        answer, entry = await queue_from_page(dev, server)
        assert answer["gpu_id"] is None and answer["route"] == "pool" and entry["gpu_id"] in (0, 1), (answer, entry)

        # Bound: /gpu1/ lands on / with the cookie, and the page's prompt runs on device 1.
        assert await open_ui(dev, base + "/gpu1/") == "/"
        assert await binding(dev, base) == "1"
        answer, entry = await queue_from_page(dev, server)
        assert answer["gpu_id"] == 1 and entry["gpu_id"] == 1, (answer, entry["gpu_id"])
        assert record_of(entry)["thread"] == "comfy-parallel-worker-1"
        await dev.screenshot(shot)

        # The bound page's websocket counts device 1's queue only: with device 0 busy, its last status after
        # its own prompt finished is 0 (an unbound page would count device 0's running prompt).
        busy = server.submit(sleep_prompt(60, 600), headers={"X-TARGET-GPU": "0"})["prompt_id"]
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, server.wait_running, busy)
            await dev.eval("window.__cp.statuses.length = 0")
            answer, entry = await queue_from_page(dev, server)
            assert answer["gpu_id"] == 1 and entry["gpu_id"] == 1
            await dev.wait_for("window.__cp.statuses.length && "
                               "window.__cp.statuses.at(-1).exec_info.queue_remaining === 0")
            seen = await dev.eval("window.__cp.statuses.map(s => s.exec_info.queue_remaining)")
            assert max(seen) <= 1, f"the bound page's status counted other devices' prompts: {seen}"
            queue = await dev.send("Runtime.evaluate", {"expression": "fetch('api/queue').then(r => r.json())",
                                                         "awaitPromise": True, "returnByValue": True})
            pending = len(queue["result"]["value"]["queue_running"])
            assert pending == 0, "the bound page's /queue shows device 0's running prompt"
        finally:
            server.post("/interrupt", {"prompt_id": busy})
            server.wait_idle(timeout=60)

        # Unbound: /multigpu/unbind clears the cookie and lands on /, and the page's prompt is untargeted again.
        assert await open_ui(dev, base + "/multigpu/unbind") == "/"
        assert await binding(dev, base) is None
        answer, entry = await queue_from_page(dev, server)
        assert answer["gpu_id"] is None and answer["route"] == "pool" and entry["gpu_id"] in (0, 1), (answer, entry)


@needs_chromium
def test_webui_under_prefix_is_bound_to_its_device(two_cpu: Server, comfy_dir: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"webui_gpu1_{comfy_dir.name}.png"
    log = ARTIFACTS / f"webui_chromium_{comfy_dir.name}.log"
    log.write_bytes(b"")
    shot.unlink(missing_ok=True)
    two_cpu.wait_idle()
    asyncio.run(drive(two_cpu, shot, log))
    assert_real_screenshot(shot)
