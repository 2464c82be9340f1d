"""Start real ComfyUI servers (stock, launcher, drop-in) on 127.0.0.1 and talk to them over HTTP."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TEST_NODES = REPO / "tests" / "nodes"
ARTIFACTS = REPO / "test-artifacts"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict

    def json(self) -> Any:
        return json.loads(self.body)


def request(method: str, url: str, body: Any = None, headers: dict | None = None, timeout: float = 30
            ) -> Response:
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as err:
        return Response(err.code, err.read(), dict(err.headers))


#: Namespace of the prompt ids tests choose (uuid5 of their tags).
# The line a start logs when it applies what the last run left in the staging log (durability/recovery.py).
STAGED_RE = re.compile(r"(\d+) prompts accepted, (\d+) starts, (\d+) deletions from the queue, (\d+) history "
                       r"entries and (\d+) deletions of history in the last run's staging log")
PROMPT_ID_NAMESPACE = uuid.UUID("6c1f3a52-9a0e-4d1b-8f4e-2b7d5c0e9a31")
_TAGS: dict[str, str] = {}


def prompt_id_for(tag: str) -> str:
    """The prompt id a test sends for its readable ``tag``.

    ComfyUI 0.33 answers 400 to a client-supplied ``prompt_id`` that is not a canonical lowercase UUID (0.3.75
    took any string), so tests send ``uuid5(tag)`` and keep the tag for filters and failure messages. The same
    tag gives the same id, as the readable id did: stock and comfy-parallel see identical ids in a conversation.
    """
    pid = str(uuid.uuid5(PROMPT_ID_NAMESPACE, tag))
    _TAGS[pid] = tag
    return pid


def tag_of(prompt_id: str) -> str:
    """The tag ``prompt_id_for`` made ``prompt_id`` from; an id no test chose (made by the server, or changed on
    the way) reads ``unknown <id>``, which matches no test's tag prefix, so filters count it as foreign."""
    return _TAGS.get(prompt_id, f"unknown {prompt_id}")


def sleep_prompt(seconds: float = 0.5, steps: int = 5, tag: str | None = None) -> dict:
    return {"1": {"class_type": "CPSleep", "inputs": {"seconds": seconds, "steps": steps,
                                                       "tag": tag or uuid.uuid4().hex}}}


@dataclass
class Server:
    """One ComfyUI process. ``mode``: ``multi`` (launcher), ``stock`` (python main.py), ``dropin``."""

    comfy_dir: Path
    mode: str = "multi"
    devices: str = "cpu,cpu,cpu"
    entry_ports: bool = True
    extra_args: list[str] = field(default_factory=list)
    serve_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    models_dir: Path | None = None
    model_paths: dict[str, Path] = field(default_factory=dict)  # extra ComfyUI folders, e.g. {"loras": dir}
    custom_nodes: Path = TEST_NODES
    user_dir: Path | None = None  # ComfyUI's --user-directory; default: a fresh one in the work folder
    name: str = "server"
    port: int = 0
    ports: list[int] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def n_devices(self) -> int:
        return len(self.devices.split(","))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def entry_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def _workdir(self) -> Path:
        work = ARTIFACTS / f"{self.name}-{self.port}"
        shutil.rmtree(work, ignore_errors=True)
        (work / "out").mkdir(parents=True)
        (work / "user").mkdir()
        return work

    def start(self, timeout: float = 120) -> "Server":
        self.port, *self.ports = free_ports(1 + self.n_devices)
        work = self._workdir()
        extra = work / "extra_model_paths.yaml"
        lines = ["cp_tests:", f"    base_path: {self.custom_nodes}", f"    custom_nodes: {self.custom_nodes}"]
        if self.models_dir is not None:
            lines.append(f"    checkpoints: {self.models_dir}")
        lines += [f"    {folder}: {path}" for folder, path in self.model_paths.items()]
        extra.write_text("\n".join(lines) + "\n")
        comfy_args = ["--port", str(self.port), "--listen", "127.0.0.1", "--extra-model-paths-config", str(extra),
                      "--output-directory", str(work / "out"), "--user-directory", str(self.user_dir or work / "user"),
                      "--temp-directory", str(work), *self.extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONHASHSEED": "0", **self.env}
        if self.mode == "multi":
            cmd = [sys.executable, "-m", "comfy_parallel", "serve", "--comfyui", str(self.comfy_dir),
                   "--devices", self.devices,
                   "--entry-ports", ",".join(map(str, self.ports)) if self.entry_ports else "none",
                   *self.serve_args, "--", *comfy_args]
        else:
            cmd = [sys.executable, str(self.comfy_dir / "main.py"), "--cpu", *comfy_args]
            if self.mode == "dropin":
                env.setdefault("COMFY_MULTI_GPU_SCHED", "1")
                if "COMFY_NUM_GPUS" not in env:
                    env.setdefault("COMFY_PARALLEL_DEVICES", self.devices)
                env.setdefault("COMFY_PARALLEL_ENTRY_PORTS",
                               ",".join(map(str, self.ports)) if self.entry_ports else "none")
        self.log_path = work / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_dir), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if request("GET", self.url + "/queue", timeout=2).status == 200 and self._entry_ports_up():
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server did not start in {timeout}s:\n{self.log()[-4000:]}")

    def _entry_ports_up(self) -> bool:
        if (self.mode == "stock" or not self.entry_ports or self.n_devices < 2
                or self.env.get("COMFY_MULTI_GPU_SCHED") == "0"):
            return True
        try:
            return all(request("GET", self.entry_url(i) + "/queue", timeout=2).status == 200
                       for i in range(self.n_devices))
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait_log(self, text: str, timeout: float = 60) -> str:
        """The log once it holds ``text`` (lines written after the listener is up, e.g. by worker threads)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            log = self.log()
            if text in log:
                return log
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in the server log after {timeout}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """Signal the process group and return at once (``stop`` waits, and kills after 10 s)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if getattr(self, "_log", None) is not None:
            self._log.close()
        return code

    # -- API helpers -----------------------------------------------------------------------------------------
    def get(self, path: str, headers: dict | None = None, base: str | None = None) -> Response:
        return request("GET", (base or self.url) + path, headers=headers)

    def post(self, path: str, body: Any = None, headers: dict | None = None, base: str | None = None) -> Response:
        return request("POST", (base or self.url) + path, body=body if body is not None else {}, headers=headers)

    def submit(self, prompt: dict, headers: dict | None = None, base: str | None = None, path: str = "/prompt",
               client_id: str | None = None) -> dict:
        body: dict = {"prompt": prompt}
        if client_id is not None:
            body["client_id"] = client_id
        resp = self.post(path, body, headers=headers, base=base)
        assert resp.status == 200, resp.body
        return resp.json()

    def wait_history(self, prompt_id: str, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{prompt_id}").json()
            if prompt_id in h:
                return h[prompt_id]
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not in history after {timeout}s")

    def wait_idle(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            q = self.get("/queue").json()
            if not q["queue_running"] and not q["queue_pending"]:
                return
            time.sleep(0.1)
        raise TimeoutError("server did not become idle")

    def wait_running(self, prompt_id: str, timeout: float = 60, headers: dict | None = None) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            running = self.get("/queue", headers=headers).json()["queue_running"]
            if any(item[1] == prompt_id for item in running):
                return
            time.sleep(0.05)
        raise TimeoutError(f"prompt {prompt_id} never ran")


def record_of(entry: dict) -> dict:
    """The CPSleep record of a finished prompt."""
    return entry["outputs"]["1"]["record"][0]
