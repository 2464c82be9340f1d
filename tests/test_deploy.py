"""``comfy-parallel deploy``: the generated nginx config, systemd unit and start script.

The nginx config is checked by nginx itself (``nginx -t``) and then used: a real comfy-parallel server behind a
real nginx must get prompts and websocket messages to the device the URL names. nginx comes from
``scripts/system-deps.sh``; under CI a missing nginx fails the test instead of skipping it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from harness import ARTIFACTS, Server, free_ports, request, sleep_prompt

from comfy_parallel.ops import deploy
from comfy_parallel.settings import Settings, parse_devices

# -- helpers ------------------------------------------------------------------------------------------------


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``comfy-parallel deploy ...`` through its own parser, as cli.main does (args after -- to ComfyUI)."""
    parser = argparse.ArgumentParser(prog="comfy-parallel")
    deploy.add_parser(parser.add_subparsers(dest="command", required=True))
    ours, comfy = list(argv), []
    if "--" in ours:
        i = ours.index("--")
        ours, comfy = ours[:i], ours[i + 1:]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = deploy.run(parser.parse_args(["deploy", *ours]), comfy)
    return rc, out.getvalue(), err.getvalue()


def settings(devices: str = "0,1,2", entry_ports: tuple[int, ...] = (8181, 8182, 8183)) -> Settings:
    return Settings(devices=parse_devices(devices), entry_ports=entry_ports)


def server_blocks(conf: str) -> list[str]:
    """The text of each top-level ``server { ... }`` block."""
    blocks, depth, start = [], 0, None
    for m in re.finditer(r"^\s*server\s*\{|\{|\}", conf, re.M):
        tok = m.group(0).strip()
        if tok.startswith("server") and depth == 0:
            start = m.start()
        depth += 1 if tok.endswith("{") else -1
        if depth == 0 and start is not None:
            blocks.append(conf[start:m.end()])
            start = None
    return blocks


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    return found or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def require_nginx() -> str:
    binary = nginx_binary()
    if binary is None:
        message = "nginx is not installed; run scripts/system-deps.sh (as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def nginx_without(binary: str) -> list[str]:
    """Temp-path modules this nginx build lacks (their directives would be unknown to it)."""
    info = subprocess.run([binary, "-V"], capture_output=True, text=True).stderr
    return [m for m in ("fastcgi", "uwsgi", "scgi") if f"--without-http_{m}_module" in info]


def write_test_config(binary: str, snippet: str, name: str) -> tuple[Path, Path]:
    work = ARTIFACTS / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    conf = work / "nginx.conf"
    conf.write_text(deploy.render_nginx_test_config(
        snippet, pid=str(work / "nginx.pid"), error_log=str(work / "error.log"), temp_dir=str(work),
        user="root" if os.geteuid() == 0 else None, without=nginx_without(binary)))
    return conf, work


def nginx_check(binary: str, conf: Path, work: Path) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "-t", "-c", str(conf), "-p", str(work), "-e", str(work / "error.log")],
                          capture_output=True, text=True, timeout=30)


# -- nginx text ---------------------------------------------------------------------------------------------


def test_nginx_has_prefix_locations_and_a_server_per_device() -> None:
    conf = deploy.render_nginx(settings(), deploy.DeployOptions(public_entry_ports=(9181, 9182, 9183)))
    blocks = server_blocks(conf)
    assert len(blocks) == 4  # main + one per device
    main, *per_device = blocks
    assert "listen 80;" in main
    for i in range(3):
        assert f"location /gpu{i}/ {{" in main
        assert re.search(rf"location ~ \^/gpu{i}/\(api/\)\?prompt\$ \{{\s*limit_req zone=comfy_parallel_prompt",
                         main)
        block = per_device[i]
        assert f"listen {9181 + i};" in block
        assert f"proxy_pass http://comfy_parallel_gpu{i};" in block
        assert "X-TARGET-GPU" not in block  # the entry port already names the device
        assert re.search(rf"upstream comfy_parallel_gpu{i} \{{\s*server 127.0.0.1:{8181 + i};", conf)
    assert re.search(r"upstream comfy_parallel \{\s*server 127.0.0.1:8188;", conf)
    for block in blocks:
        assert "proxy_set_header Upgrade $http_upgrade;" in block
        assert "proxy_set_header Connection $comfy_parallel_connection_upgrade;" in block
        assert "proxy_http_version 1.1;" in block
        assert "proxy_read_timeout 3600s;" in block and "proxy_send_timeout 3600s;" in block
        assert "proxy_buffering off;" in block
        assert "client_max_body_size 100m;" in block
        assert "limit_req zone=comfy_parallel_prompt burst=20 nodelay;" in block
    assert "map $http_upgrade $comfy_parallel_connection_upgrade {" in conf
    assert "limit_req_zone $comfy_parallel_prompt_key zone=comfy_parallel_prompt:10m rate=10r/s;" in conf
    assert re.search(r"location ~ \^/\(api/\)\?prompt\$ \{\s*limit_req", main)
    assert conf.count("{") == conf.count("}")


def test_nginx_without_entry_ports_sets_the_target_header() -> None:
    conf = deploy.render_nginx(settings("cpu,cpu", ()), deploy.DeployOptions(public_entry_ports=(9181, 9182)))
    main, dev0, dev1 = server_blocks(conf)
    assert "X-TARGET-GPU" not in main
    assert "proxy_set_header X-TARGET-GPU 0;" in dev0 and "proxy_pass http://comfy_parallel;" in dev0
    assert "proxy_set_header X-TARGET-GPU 1;" in dev1
    assert "comfy_parallel_gpu" not in conf


def test_cli_nginx_uses_the_live_settings() -> None:
    rc, out, err = cli("nginx", "--devices", "cpu*3", "--entry-ports", "8301", "--rate", "5r/s", "--burst", "7",
                       "--public-port", "8080", "--", "--listen", "0.0.0.0", "--port", "8400")
    assert rc == 0, err
    main, *per_device = server_blocks(out)
    assert "listen 8080;" in main and len(per_device) == 3
    assert [re.search(r"listen (\d+);", b).group(1) for b in per_device] == ["9301", "9302", "9303"]
    assert "server 127.0.0.1:8400;" in out  # wildcard --listen: connect over loopback
    assert all(f"server 127.0.0.1:{8301 + i};" in out for i in range(3))
    assert "rate=5r/s;" in out and "burst=7 nodelay;" in out


def test_cli_refuses_ports_comfy_parallel_holds() -> None:
    rc, out, err = cli("nginx", "--devices", "0,1", "--entry-ports", "8181", "--public-entry-ports", "8181")
    assert rc == 2 and out == ""
    assert "comfy-parallel itself listens on" in err and "8181" in err
    rc, _, err = cli("nginx", "--devices", "0,1", "--upstream-port", "9000", "--", "--port", "9001")
    assert rc == 2 and "disagrees" in err
    rc, _, err = cli("nginx", "--devices", "0,1", "--rate", "fast")
    assert rc == 2 and "--rate" in err


# -- systemd and script -------------------------------------------------------------------------------------


@pytest.fixture()
def fake_venv(tmp_path: Path) -> Path:
    """A venv whose comfy-parallel prints its arguments and environment as JSON, instead of serving."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    stub = bin_dir / "comfy-parallel"
    stub.write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                    "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': dict(os.environ)}))\n")
    stub.chmod(0o755)
    return tmp_path / "venv"


def test_systemd_unit_runs_serve_with_the_live_options(fake_venv: Path, tmp_path: Path) -> None:
    comfy = tmp_path / "Comfy UI"
    comfy.mkdir()
    rc, unit, err = cli("systemd", "--devices", "0,1,3", "--entry-ports", "8181,8182,8190", "--default-route", "1",
                        "--comfyui", str(comfy), "--venv", str(fake_venv), "--user", "comfy",
                        "--extra-comfy-args=--highvram --preview-method auto", "--", "--port", "8288")
    assert rc == 0, err
    exec_start = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert len(exec_start) == 1
    line = exec_start[0]
    assert line.startswith(f"ExecStart={fake_venv / 'bin' / 'comfy-parallel'} serve ")
    assert f'--comfyui "{comfy}"' in line  # a path with a space is quoted for systemd
    assert "--devices 0,1,3 --entry-ports 8181,8182,8190 --default-route 1 --" in line
    assert line.endswith("-- --listen 127.0.0.1 --port 8288 --highvram --preview-method auto")
    for expected in ("Restart=on-failure", "RestartPreventExitStatus=2 3", "KillSignal=SIGTERM", "TimeoutStopSec=",
                     "LimitNOFILE=65536", "User=comfy", f"WorkingDirectory={comfy}",
                     f'Environment="COMFYUI_DIR={comfy}"', "Environment=COMFY_PARALLEL_HOME=",
                     "WantedBy=multi-user.target"):
        assert expected in unit, expected
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed; the text was checked")
    path = tmp_path / "comfy-parallel.service"
    path.write_text(unit.replace("User=comfy", "User=root"))  # verify checks the user exists on some versions
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_systemd_unit_keeps_a_switch_interval(fake_venv: Path) -> None:
    rc, unit, err = cli("systemd", "--devices", "0,1", "--venv", str(fake_venv), "--switch-interval-ms", "0.5")
    assert rc == 0, err
    assert "--default-route pool --affinity-slack 8 --switch-interval-ms 0.5 --" in unit
    rc, _, err = cli("systemd", "--devices", "0,1", "--venv", str(fake_venv), "--switch-interval-ms", "fast")
    assert rc == 2 and "switch interval" in err


def test_systemd_escapes_specifiers_and_dollars(fake_venv: Path) -> None:
    rc, unit, err = cli("systemd", "--devices", "0", "--venv", str(fake_venv), "--",
                        "--output-directory", "/srv/out%d$HOME")
    assert rc == 0, err
    assert "--output-directory /srv/out%%d$$HOME" in unit


def test_start_script_execs_the_same_command(fake_venv: Path, tmp_path: Path) -> None:
    comfy = tmp_path / "comfy"
    comfy.mkdir()
    rc, script, err = cli("script", "--devices", "cpu,cpu", "--entry-ports", "8500", "--comfyui", str(comfy),
                          "--venv", str(fake_venv), "--", "--port", "8600", "--extra-model-paths-config",
                          "/a b/x.yaml")
    assert rc == 0, err
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    path = tmp_path / "start.sh"
    path.write_text(script)
    path.chmod(0o755)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    result = subprocess.run([str(path), "--highvram"], capture_output=True, text=True, timeout=30,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["argv"] == ["serve", "--comfyui", str(comfy), "--devices", "cpu,cpu", "--entry-ports", "8500,8501",
                            "--default-route", "pool", "--affinity-slack", "8", "--", "--listen", "127.0.0.1",
                            "--port", "8600",
                            "--extra-model-paths-config", "/a b/x.yaml", "--highvram"]
    assert seen["cwd"] == str(comfy)
    assert seen["env"]["COMFYUI_DIR"] == str(comfy) and seen["env"]["PYTHONUNBUFFERED"] == "1"
    assert "COMFY_PARALLEL_HOME" in seen["env"]


def test_one_device_has_no_entry_ports() -> None:
    rc, unit, err = cli("systemd", "--devices", "0")
    assert rc == 0, err
    assert "--devices 0 --entry-ports none" in unit  # what serve would compute for one device


# -- nginx for real -----------------------------------------------------------------------------------------


def test_nginx_accepts_the_generated_config() -> None:
    binary = require_nginx()
    rc, snippet, err = cli("nginx", "--devices", "0,1,2,3", "--public-host", "127.0.0.1",
                           "--public-port", str(free_ports(1)[0]))
    assert rc == 0, err
    conf, work = write_test_config(binary, snippet, "nginx-check")
    result = nginx_check(binary, conf, work)
    assert result.returncode == 0, result.stderr


class Stack:
    """A comfy-parallel server with two CPU workers behind an nginx running the generated config."""

    def __init__(self, server: Server, main: int, per_device: list[int], work: Path) -> None:
        self.server, self.main, self.per_device, self.work = server, main, per_device, work

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.main}"

    def device_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.per_device[index]}"

    def wait_history(self, prompt_id: str, base: str, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            resp = request("GET", f"{base}/history/{prompt_id}")
            assert resp.status == 200, resp.body
            if prompt_id in resp.json():
                return resp.json()[prompt_id]
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not in history through nginx after {timeout}s")


@pytest.fixture(scope="module")
def stack(comfy_dir: Path) -> Iterator[Stack]:
    binary = require_nginx()
    server = Server(comfy_dir, mode="multi", devices="cpu,cpu", name=f"deploy-{comfy_dir.name}")
    nginx: subprocess.Popen | None = None
    work: Path | None = None
    try:
        server.start()
        main, *per_device = free_ports(3)
        rc, snippet, err = cli("nginx", "--devices", "cpu,cpu", "--entry-ports", ",".join(map(str, server.ports)),
                               "--public-host", "127.0.0.1", "--public-port", str(main),
                               "--public-entry-ports", ",".join(map(str, per_device)),
                               "--", "--listen", "127.0.0.1", "--port", str(server.port))
        assert rc == 0, err
        conf, work = write_test_config(binary, snippet, f"nginx-{comfy_dir.name}-{main}")
        check = nginx_check(binary, conf, work)
        assert check.returncode == 0, check.stderr
        log = open(work / "nginx.out", "wb")
        nginx = subprocess.Popen([binary, "-c", str(conf), "-p", str(work), "-e", str(work / "error.log"),
                                  "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        s = Stack(server, main, per_device, work)
        deadline = time.time() + 30
        while True:
            if nginx.poll() is not None:
                raise RuntimeError(f"nginx exited with {nginx.returncode}: {(work / 'nginx.out').read_text()}")
            try:
                if all(request("GET", base + "/queue", timeout=2).status == 200
                       for base in (s.url, s.device_url(0), s.device_url(1))):
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError("nginx did not answer in 30s")
            time.sleep(0.2)
        yield s
    finally:
        if nginx is not None and nginx.poll() is None:
            os.killpg(nginx.pid, signal.SIGTERM)  # fast shutdown of master and workers
            try:
                nginx.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(nginx.pid, signal.SIGKILL)
                nginx.wait(10)
        server.stop()


def test_prompt_through_nginx_prefix_reaches_its_device(stack: Stack) -> None:
    for path in ("/gpu1/prompt", "/gpu1/api/prompt"):
        resp = stack.server.submit(sleep_prompt(0.1, 1), base=stack.url, path=path)
        assert resp["gpu_id"] == 1, resp
        assert stack.wait_history(resp["prompt_id"], stack.url)["gpu_id"] == 1
    # the /gpuN/ location serves the other routes too, under the prefix
    assert request("GET", stack.url + "/gpu1/queue").status == 200
    assert request("GET", stack.url + "/gpu0/object_info/CPSleep").json()["CPSleep"]["name"] == "CPSleep"


def test_prompt_through_nginx_device_port_reaches_its_device(stack: Stack) -> None:
    for index in (0, 1):
        resp = stack.server.submit(sleep_prompt(0.1, 1), base=stack.device_url(index))
        assert resp["gpu_id"] == index, resp
        assert stack.wait_history(resp["prompt_id"], stack.device_url(index))["gpu_id"] == index


def test_prompt_through_nginx_main_port_with_header(stack: Stack) -> None:
    resp = stack.server.submit(sleep_prompt(0.1, 1), base=stack.url, headers={"X-TARGET-GPU": "1"})
    assert resp["gpu_id"] == 1, resp
    bad = request("POST", stack.url + "/prompt", body={"prompt": sleep_prompt()}, headers={"X-TARGET-GPU": "7"})
    assert bad.status == 400 and "valid" in bad.body.decode()


async def _ws_session(ws_url: str, submit_base: str, submit_path: str, client_id: str, stack: Stack
                      ) -> tuple[dict, list[dict], dict]:
    """Open the websocket, submit a prompt for this client through nginx, collect until it finishes."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{ws_url}?clientId={client_id}") as ws:
            first = json.loads((await ws.receive(timeout=30)).data)
            loop = asyncio.get_running_loop()
            resp = await loop.run_in_executor(None, lambda: stack.server.submit(
                sleep_prompt(0.2, 2), base=submit_base, path=submit_path, client_id=client_id))
            messages: list[dict] = []
            deadline = loop.time() + 60
            while True:
                msg = await ws.receive(timeout=max(0.1, deadline - loop.time()))
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                messages.append(data)
                d = data.get("data") or {}
                if data["type"] == "executing" and d.get("node") is None and d.get("prompt_id") == resp["prompt_id"]:
                    return first, messages, resp


async def test_websocket_through_nginx_prefix(stack: Stack) -> None:
    client_id = f"nginx-{uuid.uuid4().hex[:8]}"
    ws_url = stack.url.replace("http://", "ws://") + "/gpu1/ws"
    first, messages, resp = await _ws_session(ws_url, stack.url, "/gpu1/prompt", client_id, stack)
    assert first["type"] == "status" and first["data"]["sid"] == client_id
    assert resp["gpu_id"] == 1
    executing = [m["data"] for m in messages if m["type"] == "executing"
                 and m["data"].get("prompt_id") == resp["prompt_id"]]
    assert [e["node"] for e in executing] == ["1", None]
    assert any(m["type"] == "executed" and m["data"]["prompt_id"] == resp["prompt_id"] for m in messages)


async def test_websocket_through_nginx_device_port(stack: Stack) -> None:
    client_id = f"nginx-{uuid.uuid4().hex[:8]}"
    base = stack.device_url(0)
    first, messages, resp = await _ws_session(base.replace("http://", "ws://") + "/ws", base, "/prompt",
                                              client_id, stack)
    assert first["type"] == "status" and resp["gpu_id"] == 0
    assert any(m["type"] == "executing" and m["data"].get("node") == "1" for m in messages)


def test_nginx_rate_limits_prompt_posts(stack: Stack) -> None:
    """Runs last: it spends the limit_req bucket of 127.0.0.1 (10r/s, burst 20)."""
    statuses = [request("POST", stack.url + "/gpu0/prompt", body={}).status for _ in range(40)]
    assert 429 in statuses, statuses
    assert set(statuses) <= {400, 429}  # the ones let through reach ComfyUI, which rejects the empty body
    assert request("GET", stack.url + "/gpu0/prompt").status == 200  # GETs are not counted
