"""Admin token: the routes that act on every device or show what others run need it; the rest stays stock."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import pytest
from harness import Server, prompt_id_for, sleep_prompt

from comfy_parallel.cli import build_parser, serve_settings

TOKEN = "cp-" + uuid.uuid4().hex
PREFIXES = ("", "/api", "/gpu1")
ADMIN_GETS = ("/metrics", "/multigpu/status", "/multigpu/", "/debug/queues")


@pytest.fixture(scope="module")
def guarded(comfy_dir: Path):
    # the environment, as recommended: a token on the command line is visible in ps
    server = Server(comfy_dir, devices="cpu,cpu", env={"COMFY_PARALLEL_ADMIN_TOKEN": TOKEN},
                    name=f"access-{comfy_dir.name}").start()
    yield server
    server.stop()


def bearer(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_denied(resp, what: str) -> None:  # type: ignore[no-untyped-def]
    assert resp.status == 401, (what, resp.status, resp.body)
    assert resp.json()["error"]["type"] == "unauthorized", what
    assert resp.headers["WWW-Authenticate"].startswith("Bearer"), what


def test_admin_routes_need_the_token_under_every_prefix(guarded: Server) -> None:
    s = guarded
    basic = {"Authorization": "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()}
    for prefix in PREFIXES:
        for path in ADMIN_GETS:
            url = prefix + path
            assert_denied(s.get(url), f"GET {url} without a token")
            assert_denied(s.get(url, headers=bearer("wrong")), f"GET {url} with a wrong token")
            assert_denied(s.get(url, headers={"X-Admin-Token": TOKEN[:-1]}), f"GET {url} with a prefix of it")
            for headers in (bearer(), {"X-Admin-Token": TOKEN}, basic):
                assert s.get(url, headers=headers).status == 200, (url, headers)
        assert_denied(s.post(prefix + "/free", {"unload_models": True}), f"POST {prefix}/free")
        assert s.post(prefix + "/free", {"unload_models": True}, headers=bearer()).status == 200
        assert_denied(s.post(prefix + "/queue", {"clear": True}), f"POST {prefix}/queue clear")
        assert s.post(prefix + "/queue", {"clear": True}, headers=bearer()).status == 200
    # an entry port is a target like the prefix: the token rules are the same
    assert_denied(s.get("/metrics", base=s.entry_url(0)), "GET /metrics on an entry port")


def test_interrupt_needs_the_token_only_when_it_stops_everything(guarded: Server) -> None:
    s = guarded
    assert_denied(s.post("/interrupt", {}), "untargeted /interrupt")
    assert_denied(s.post("/api/interrupt", {}), "untargeted /api/interrupt")
    assert s.post("/interrupt", {}, headers=bearer()).status == 200
    # an id that runs nowhere, in both spellings: /interrupt takes any string on 0.3.75 and 0.33 alike (only
    # 0.33's /prompt insists on a UUID), and a targeted interrupt never needs the token
    assert s.post("/interrupt", {"prompt_id": "not-running"}).status == 200
    assert s.post("/interrupt", {"prompt_id": prompt_id_for("not-running")}).status == 200
    assert s.post("/interrupt", {}, headers={"X-TARGET-GPU": "1"}).status == 200
    assert s.post("/gpu1/interrupt", {}).status == 200
    assert s.post("/interrupt", {}, base=s.entry_url(0)).status == 200

    busy = s.submit(sleep_prompt(20, 200), headers={"X-TARGET-GPU": "0"})["prompt_id"]
    s.wait_running(busy)
    assert s.post("/interrupt", {"prompt_id": busy}).status == 200  # your own prompt: no token needed
    assert s.wait_history(busy, timeout=20)["status"]["status_str"] == "error"


def test_everything_else_stays_open(guarded: Server) -> None:
    s = guarded
    for path in ("/health", "/ready", "/queue", "/history", "/system_stats", "/prompt", "/gpu1/queue"):
        assert s.get(path).status == 200, path
    pid = s.submit(sleep_prompt(0.05, 1), path="/gpu1/prompt")["prompt_id"]
    assert s.wait_history(pid)["gpu_id"] == 1
    queued = s.submit(sleep_prompt(0.05, 1), headers={"X-TARGET-GPU": "0"})["prompt_id"]
    assert s.post("/queue", {"delete": [queued]}).status == 200
    assert s.post("/history", {"delete": [pid]}).status == 200
    assert TOKEN not in s.log()
    assert "comfy-parallel: 401 for GET /metrics" in s.log()


def test_token_setting_comes_from_the_option_or_the_environment() -> None:
    args = build_parser().parse_args(["serve", "--devices", "cpu,cpu", "--admin-token", "from-option"])
    assert serve_settings(args, env={}).admin_token == "from-option"
    assert serve_settings(args, env={"COMFY_PARALLEL_ADMIN_TOKEN": "from-env"}).admin_token == "from-option"
    args = build_parser().parse_args(["serve", "--devices", "cpu,cpu"])
    settings = serve_settings(args, env={"COMFY_PARALLEL_ADMIN_TOKEN": "from-env"})
    assert settings.admin_token == "from-env" and "from-env" not in repr(settings)
    assert serve_settings(args, env={}).admin_token is None
