"""Fixtures: provisioned ComfyUI per version (a matrix), and real servers started on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ARTIFACTS, REPO, TEST_NODES, Server  # noqa: E402

from comfy_parallel import provision  # noqa: E402

VERSIONS = [v.strip() for v in os.environ.get("COMFY_TEST_VERSIONS", "0.3.75,0.3.52").split(",") if v.strip()]


@pytest.fixture(scope="session", params=VERSIONS, ids=lambda v: f"comfyui-{v}")
def comfy_dir(request: pytest.FixtureRequest) -> Path:
    return provision.ensure_comfyui(request.param, quiet=True)


@pytest.fixture(scope="session")
def multi(comfy_dir: Path):
    """Three CPU workers standing in for GPUs, entry ports on, launched with ``comfy-parallel serve``."""
    server = Server(comfy_dir, mode="multi", devices="cpu,cpu,cpu", name=f"multi-{comfy_dir.name}").start()
    yield server
    server.stop()


@pytest.fixture()
def idle_multi(multi: Server) -> Server:
    multi.wait_idle()
    return multi


@pytest.fixture(scope="module")
def dropin_nodes(request: pytest.FixtureRequest, comfy_dir: Path) -> Path:
    """A custom_nodes folder holding comfy_parallel (installed by ``install-node``) and the test node pack."""
    nodes = ARTIFACTS / f"{request.module.__name__}-dropin-nodes-{comfy_dir.name}"
    shutil.rmtree(nodes, ignore_errors=True)
    nodes.mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "comfy_parallel", "install-node", "--custom-nodes-dir", str(nodes)],
                         cwd=str(REPO), capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert (nodes / "comfy_parallel").resolve() == (REPO / "comfy_parallel").resolve()
    (nodes / "cp_testnodes").symlink_to(TEST_NODES / "cp_testnodes", target_is_directory=True)
    return nodes


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start tests/results/reliability.md from this run's figures only."""
    import uuid

    import reliability_results

    reliability_results.clear(uuid.uuid4().hex)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Render the reliability figures this run recorded (none: the committed file stays as it is)."""
    import reliability_results

    session_id = os.environ.get(reliability_results.SESSION_ENV)
    if not session_id:
        return
    args = " ".join(session.config.invocation_params.args)
    command = f"COMFY_TEST_VERSIONS={','.join(VERSIONS)} python -m pytest {args}".rstrip()
    reliability_results.write_markdown(session_id, command)
