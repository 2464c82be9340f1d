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

from comfy_parallel.ops import provision  # noqa: E402



def _matrix() -> tuple[list[str], list[str]]:
    """The ComfyUI versions the suite runs on, and one line for each version it cannot run on here.

    ``COMFY_TEST_COMFYUI=/path/to/ComfyUI`` runs the suite against that checkout alone; otherwise
    ``COMFY_TEST_VERSIONS`` (default 0.3.75 and 0.33.0) names provisioned releases. A release that comes from a
    local archive (0.33.0) is skipped when its archive is not on this machine, as on a user's fresh machine.
    """
    own = os.environ.get("COMFY_TEST_COMFYUI", "").strip()
    if own:
        return [own], []
    wanted = [v.strip() for v in os.environ.get("COMFY_TEST_VERSIONS", "0.3.75,0.33.0").split(",") if v.strip()]
    versions, skipped = [], []
    for version in wanted:
        release = provision.RELEASES.get(version)
        if release is not None and release.archive and not provision.is_provisioned(version):
            try:
                provision.find_archive(release)
            except provision.ArchiveMissing as err:
                skipped.append(f"ComfyUI {version} tests skipped: {err}")
                continue
        versions.append(version)
    return versions, skipped


VERSIONS, SKIPPED_VERSIONS = _matrix()


def _comfy_id(version: str) -> str:
    return f"comfyui-{version}" if version in provision.RELEASES else f"comfyui-{Path(version).name}"


@pytest.fixture(scope="session", params=VERSIONS, ids=_comfy_id)
def comfy_dir(request: pytest.FixtureRequest) -> Path:
    if request.param not in provision.RELEASES:
        from comfy_parallel.comfy_adapter.loader import check_comfyui_dir

        return check_comfyui_dir(request.param)  # COMFY_TEST_COMFYUI: the user's own checkout
    return provision.ensure_comfyui(request.param, quiet=True)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"ComfyUI under test: {', '.join(VERSIONS)}", *SKIPPED_VERSIONS]


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


def full_run(config: pytest.Config) -> bool:
    """Did this session run the whole suite (no paths, -k, -m, --lf or --deselect, every version)?

    tests/results/reliability.md must come from a full run; a partial run's figures would replace the whole file.
    """
    option = config.option
    return (config.args_source == pytest.Config.ArgsSource.TESTPATHS and not option.keyword and not option.markexpr
            and not getattr(option, "lf", False) and not getattr(option, "deselect", None)
            and not SKIPPED_VERSIONS and not os.environ.get("COMFY_TEST_COMFYUI")
            and "COMFY_TEST_VERSIONS" not in os.environ)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Render the reliability figures of a full run (a partial run leaves the committed file as it is)."""
    import reliability_results

    session_id = os.environ.get(reliability_results.SESSION_ENV)
    if not session_id or not full_run(session.config):
        return
    args = " ".join(session.config.invocation_params.args)
    command = f"COMFY_TEST_VERSIONS={','.join(VERSIONS)} python -m pytest {args}".rstrip()
    reliability_results.write_markdown(session_id, command)
