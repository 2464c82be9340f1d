"""The status page at /multigpu/ and the status JSON behind it: progress, last errors, live updates in Chromium.

The browser tests drive Debian's headless ``chromium`` (``apt-get install -y chromium``): two screenshots
(phone- and desktop-sized) go to ``test-artifacts/``, and a DevTools-protocol session checks that the page
updates itself without reloading and shows an error state when the server cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest
from harness import ARTIFACTS, Server, sleep_prompt

from comfy_parallel.server.device_status import DeviceStatus, error_message

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]
PHONE = (412, 915)
DESKTOP = (1280, 800)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="headless Chromium missing: apt-get install -y chromium")


def fail_prompt(message: str) -> dict:
    return {"1": {"class_type": "CPFail", "inputs": {"message": message}}}


def device(server: Server, index: int) -> dict:
    return server.get("/multigpu/status").json()["devices"][index]


def stop_everything(server: Server) -> None:
    server.post("/interrupt")
    server.wait_idle(timeout=60)


# -- the listener, without a server -------------------------------------------------------------------------------
def test_error_message_and_last_errors() -> None:
    ok = {"status_str": "success", "completed": True, "messages": []}
    interrupted = {"status_str": "error", "completed": False,
                   "messages": [("execution_start", {}), ("execution_interrupted", {"node_id": "1"})]}
    failed = {"status_str": "error", "completed": False, "messages": [
        ("execution_start", {}),
        ("execution_error", {"exception_message": "boom\n", "exception_type": "RuntimeError",
                             "node_id": "1", "node_type": "CPFail", "traceback": ["..."]})]}
    assert error_message(ok) is None
    assert error_message(interrupted) is None
    assert error_message(failed) == ("boom", {"exception_type": "RuntimeError", "node_id": "1",
                                              "node_type": "CPFail"})
    assert error_message(None)[0]

    status = DeviceStatus(2, max_errors=5)
    for i in range(7):
        status.on_start(1, f"p{i}", 0.0)
        status.on_done(1, f"p{i}", failed if i != 3 else ok, 0.1)
    status.on_done(1, "int", interrupted, 0.1)
    errors = status.last_errors(1)
    assert [e["prompt_id"] for e in errors] == ["p6", "p5", "p4", "p2", "p1"]  # newest first, at most 5
    assert all(e["message"] == "boom" and isinstance(e["time"], float) for e in errors)
    assert status.last_errors(0) == []
    status.on_oom_retry(0)
    assert "out of memory" in status.last_errors(0)[0]["message"]
    assert status.progress(0, []) is None


# -- the JSON --------------------------------------------------------------------------------------------------------
def test_switch_interval_reaches_the_process(comfy_dir: Path, idle_multi: Server) -> None:
    """--switch-interval-ms sets the serving process's GIL switch interval; without it Python's own (5 ms) stays."""
    assert idle_multi.get("/multigpu/status").json()["switch_interval_ms"] == 5.0
    s = Server(comfy_dir, devices="cpu,cpu", serve_args=["--switch-interval-ms", "0.5", "--no-persist"],
               name=f"switch-{comfy_dir.name}").start()
    try:
        assert s.get("/multigpu/status").json()["switch_interval_ms"] == 0.5
        assert "GIL switch interval 0.5 ms" in s.log()
    finally:
        s.stop()


def test_status_json_progress_and_errors(idle_multi: Server) -> None:
    s = idle_multi
    idle = s.get("/multigpu/status").json()["devices"]
    for d in idle:
        for key in ("gpu_id", "device", "queued", "running", "running_prompt_ids", "alive", "restarts",
                    "loaded_models"):  # the keys the status JSON always had
            assert key in d
        assert d["name"] == "CPU worker"
        assert d["vram_used_bytes"] is None and d["vram_total_bytes"] is None
        assert d["progress"] is None
        assert isinstance(d["last_errors"], list)

    try:
        prompt_id = s.submit(sleep_prompt(3, 30), headers={"X-TARGET-GPU": "1"})["prompt_id"]
        s.wait_running(prompt_id)
        values: list[float] = []
        deadline = time.time() + 10
        while time.time() < deadline and len(set(values)) < 4:
            d1 = device(s, 1)
            p = d1["progress"]
            if p is not None:
                assert p["prompt_id"] == prompt_id
                assert d1["running_prompt_ids"] == [prompt_id]
                # before the node's first step ComfyUI shows its start state (0 of 1), then the node's own steps
                if p["max"] == 30:
                    assert p["node"] == "1" and p["node_type"] == "CPSleep"
                    values.append(p["value"])
            time.sleep(0.25)
        assert len(set(values)) >= 3, f"progress did not move: {values}"
        assert values == sorted(values) and values[-1] > values[0], values
        assert device(s, 0)["progress"] is None and device(s, 2)["progress"] is None

        message = f"boom-{uuid.uuid4()}"
        failed_id = s.submit(fail_prompt(message), headers={"X-TARGET-GPU": "2"})["prompt_id"]
        assert s.wait_history(failed_id)["status"]["status_str"] == "error"
        errors = device(s, 2)["last_errors"]
        assert errors and errors[0]["prompt_id"] == failed_id, errors
        assert message in errors[0]["message"]
        assert errors[0]["node_type"] == "CPFail" and time.time() - errors[0]["time"] < 60
        assert all(message not in e["message"] for e in device(s, 1)["last_errors"])
    finally:
        stop_everything(s)
    assert all(d["progress"] is None for d in s.get("/multigpu/status").json()["devices"])


def test_page_is_served_under_every_prefix(idle_multi: Server) -> None:
    s = idle_multi
    for path in ("/multigpu/", "/api/multigpu/", "/gpu1/multigpu/", "/multigpu", "/gpu2/multigpu"):
        resp = s.get(path)  # urllib follows the relative redirect of the slash-less forms
        assert resp.status == 200, (path, resp.status)
        assert resp.headers["Content-Type"].startswith("text/html")
        assert b'new URL("status", location.href)' in resp.body
        assert b"<meta name=\"viewport\"" in resp.body
    # what the page's relative URL resolves to from each of those places
    for path in ("/multigpu/status", "/api/multigpu/status", "/gpu1/multigpu/status"):
        resp = s.get(path)
        assert resp.status == 200 and len(resp.json()["devices"]) == 3, path
    # self-contained: no external scripts, styles, fonts or images
    body = s.get("/multigpu/").body.decode()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", body)
    assert "@import" not in body


# -- the browser ----------------------------------------------------------------------------------------------------
def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def assert_real_screenshot(path: Path, size: tuple[int, int] | None = None) -> None:
    from PIL import Image

    assert path.exists(), f"{path} missing"
    assert path.stat().st_size > 10_000, f"{path} is only {path.stat().st_size} bytes"
    if size is not None:
        assert png_size(path) == size
    with Image.open(path) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, f"{path} looks blank ({len(colours)} colours)"


def _profile_dir() -> tempfile.TemporaryDirectory:
    """A throw-away Chromium profile. Chromium's helper processes can still write into it for a moment after the
    browser exits, so a failed removal is not a test failure (it once failed a CI run: 'Directory not empty')."""
    return tempfile.TemporaryDirectory(prefix="cp-chromium-", ignore_cleanup_errors=True)


def screenshot(url: str, out: Path, size: tuple[int, int], log: Path) -> None:
    """Chromium's own --screenshot, after letting the page's timers run 4 s of virtual time (a few polls)."""
    out.unlink(missing_ok=True)
    with _profile_dir() as profile, open(log, "ab") as log_file:
        cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               "--virtual-time-budget=4000", f"--screenshot={out}", url]
        proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}; see {log}"


class DevTools:
    """The few Chrome DevTools protocol calls the tests need, over aiohttp's websocket client."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        msg_id = next(self.ids)
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools socket closed while waiting for {method}: {msg}")
            data = json.loads(msg.data)
            if data.get("id") == msg_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data["result"]

    async def eval(self, expression: str):  # type: ignore[no-untyped-def]
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        raise TimeoutError(f"never true: {expression} (last {value!r})")

    async def screenshot(self, out: Path) -> None:
        metrics = await self.send("Page.getLayoutMetrics")
        content = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = await self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": content["width"], "height": content["height"], "scale": 1}})
        import base64

        out.write_bytes(base64.b64decode(shot["data"]))


def card_text(index: int, selector: str) -> str:
    return f"(document.querySelector('.card[data-gpu=\"{index}\"] {selector}') || {{}}).textContent || ''"


async def check_live_page(dev: DevTools, url: str, running_id: str, error_text: str) -> None:
    await dev.send("Page.navigate", {"url": url})
    await dev.wait_for("document.querySelectorAll('.card').length == 3 && "
                       f"/\\d+ \\/ \\d+/.test({card_text(1, '.progress-text')})")
    assert await dev.eval(card_text(1, ".prompt-id")) == running_id
    assert error_text in await dev.eval(card_text(2, ".errors"))
    assert re.fullmatch(r"updated \d\d:\d\d:\d\d", await dev.eval("document.getElementById('updated').textContent"))
    assert await dev.eval(card_text(0, ".name")) == "CPU worker"
    assert await dev.eval(card_text(1, ".badge")) == "running"
    assert await dev.eval(card_text(1, ".n-running")) == "1"
    assert await dev.eval(card_text(1, ".n-queued")) == "1"
    assert await dev.eval(card_text(0, ".badge")) == "idle"

    # live: the same document (a marker survives) shows new progress a second later
    await dev.eval("window.__sameDocument = 42")
    polls = await dev.eval("window.comfyParallelStatus.polls")
    first = await dev.eval(card_text(1, ".progress-text"))
    await asyncio.sleep(1.6)
    second = await dev.eval(card_text(1, ".progress-text"))
    assert first != second, f"progress text did not change: {first!r}"
    assert await dev.eval("window.__sameDocument") == 42, "the page reloaded"
    assert await dev.eval("window.comfyParallelStatus.polls") > polls


@contextlib.asynccontextmanager
async def chromium_page(log: Path, size: tuple[int, int], mobile: bool = False) -> AsyncIterator[DevTools]:
    """A headless Chromium with a fresh profile and a DevTools session on its one tab (closed afterwards)."""
    with _profile_dir() as profile, open(log, "ab") as log_file:
        proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 f"--window-size={size[0]},{size[1]}", "--remote-debugging-port=0",
                                 "--remote-allow-origins=*", "about:blank"],
                                stdout=log_file, stderr=subprocess.STDOUT)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().strip()):
                assert proc.poll() is None, f"chromium exited with {proc.returncode}; see {log}"
                assert time.monotonic() < deadline, "chromium wrote no DevToolsActivePort"
                await asyncio.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    page = next(t for t in await resp.json() if t.get("type") == "page")
                async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    dev = DevTools(ws)
                    await dev.send("Page.enable")
                    await dev.send("Network.enable")
                    await dev.send("Emulation.setDeviceMetricsOverride", {
                        "width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": mobile})
                    yield dev
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)


async def drive_browser(base: str, running_id: str, error_text: str, phone_full: Path, log: Path) -> None:
    async with chromium_page(log, PHONE, mobile=True) as dev:
        await check_live_page(dev, base + "/multigpu/", running_id, error_text)
        # one column on a phone: the cards are stacked, each (nearly) as wide as the screen
        boxes = await dev.eval("[...document.querySelectorAll('.card')].map(c => {"
                               "const r = c.getBoundingClientRect(); return [r.left, r.top, r.width]; })")
        assert len({round(left) for left, _, _ in boxes}) == 1, boxes
        assert boxes[0][1] < boxes[1][1] < boxes[2][1], boxes
        assert all(width > PHONE[0] * 0.85 for _, _, width in boxes), boxes
        assert await dev.eval("document.documentElement.scrollWidth <= window.innerWidth"), \
            "the page scrolls sideways on a phone"
        await dev.screenshot(phone_full)

        # a visible error state when the server cannot be reached, and recovery after
        assert await dev.eval("getComputedStyle(document.getElementById('error')).display") == "none"
        await dev.send("Network.emulateNetworkConditions", {
            "offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
        await dev.wait_for("document.body.classList.contains('offline') && "
                           "getComputedStyle(document.getElementById('error')).display == 'block'")
        assert "Cannot load status" in await dev.eval("document.getElementById('error').textContent")
        assert (await dev.eval("document.getElementById('updated').textContent")).startswith("stale")
        await dev.send("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
        await dev.wait_for("!document.body.classList.contains('offline')")

        # under a device prefix the relative status URL still reaches the server
        await check_live_page(dev, base + "/gpu1/multigpu/", running_id, error_text)


@needs_chromium
def test_status_page_in_headless_chromium(idle_multi: Server) -> None:
    s = idle_multi
    ARTIFACTS.mkdir(exist_ok=True)
    phone, desktop = ARTIFACTS / "status_page_phone.png", ARTIFACTS / "status_page_desktop.png"
    phone_full = ARTIFACTS / "status_page_phone_full.png"
    log = ARTIFACTS / "status_page_chromium.log"
    log.write_bytes(b"")
    try:
        error_text = f"boom-{uuid.uuid4()}"
        failed_id = s.submit(fail_prompt(error_text), headers={"X-TARGET-GPU": "2"})["prompt_id"]
        s.wait_history(failed_id)
        running_id = s.submit(sleep_prompt(90, 900), headers={"X-TARGET-GPU": "1"})["prompt_id"]
        s.submit(sleep_prompt(1, 10), headers={"X-TARGET-GPU": "1"})  # one waiting behind it
        s.wait_running(running_id)

        screenshot(s.url + "/multigpu/", phone, PHONE, log)
        screenshot(s.url + "/multigpu/", desktop, DESKTOP, log)
        assert_real_screenshot(phone, PHONE)
        assert_real_screenshot(desktop, DESKTOP)
        assert s.get("/queue").json()["queue_running"], "the prompt ended before the screenshots"

        asyncio.run(drive_browser(s.url, running_id, error_text, phone_full, log))
        assert_real_screenshot(phone_full)
        assert png_size(phone_full)[0] == PHONE[0]
    finally:
        stop_everything(s)


GIB = 1 << 30
MOCK_STATUS = {"mode": "multi-device", "default_route": "auto", "entry_ports": {}, "devices": [
    {"gpu_id": 0, "device": "cuda:0", "name": "NVIDIA H100 80GB HBM3", "vram_used_bytes": 61 * GIB,
     "vram_total_bytes": 80 * GIB, "vram_reserved_bytes": 58 * GIB, "queued": 3, "running": 1,
     "running_prompt_ids": ["5f0c7a4e-mock"], "alive": True, "restarts": 0, "loaded_models": 3,
     "progress": {"prompt_id": "5f0c7a4e-mock", "node": "3", "node_type": "KSampler", "value": 12, "max": 20,
                  "elapsed_s": 4.2},
     "models": [{"name": "SDXL", "loaded_bytes": 5 * GIB}, {"name": "SDXLClipModel", "loaded_bytes": GIB},
                {"name": "AutoencoderKL", "loaded_bytes": 160 << 20}],
     "last_errors": []},
    {"gpu_id": 1, "device": "cuda:1", "name": "NVIDIA H100 80GB HBM3", "vram_used_bytes": 79 * GIB,
     "vram_total_bytes": 80 * GIB, "vram_reserved_bytes": 78 * GIB, "queued": 0, "running": 0,
     "running_prompt_ids": [], "alive": True, "restarts": 1, "loaded_models": 1, "progress": None,
     "models": [{"name": "Flux", "loaded_bytes": 23 * GIB}],
     "last_errors": [{"prompt_id": "a1b2-mock", "time": 1.0e9, "exception_type": "OutOfMemoryError",
                      "node_type": "KSampler", "message": "CUDA out of memory. Tried to allocate 2.00 GiB"}]},
    {"gpu_id": 2, "device": "cuda:2", "name": "NVIDIA H100 80GB HBM3", "vram_used_bytes": None,
     "vram_total_bytes": None, "vram_reserved_bytes": None, "queued": 0, "running": 0, "running_prompt_ids": [],
     "alive": False, "restarts": 4, "loaded_models": 0, "progress": None, "models": [], "last_errors": []},
]}


@needs_chromium
async def test_status_page_gpu_cards_with_canned_status() -> None:
    """GPU cards (VRAM bars, models, a dead worker) rendered from canned JSON: no GPU needed."""
    from aiohttp import web

    from comfy_parallel.server.http_api import STATUS_PAGE

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=STATUS_PAGE.read_bytes(), content_type="text/html")

    async def status(request: web.Request) -> web.Response:
        return web.json_response(MOCK_STATUS)

    app = web.Application()
    app.router.add_get("/multigpu/", page)
    app.router.add_get("/multigpu/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    out = ARTIFACTS / "status_page_gpu_mock.png"
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, screenshot, f"http://127.0.0.1:{port}/multigpu/", out, DESKTOP,
                                   ARTIFACTS / "status_page_chromium.log")
    finally:
        await runner.cleanup()
    assert_real_screenshot(out, DESKTOP)
