"""Conformance: ComfyUI 0.33.0's own ``tests/execution`` suite, unmodified, against the drop-in with two CPU workers.

Upstream's fixtures start ``python main.py --cpu ...`` from the working directory with arguments of their own, so
the only way in is the tree they start from and the environment their server inherits. Each run therefore gets a
scratch copy of the ComfyUI tree under test-artifacts/ (hard links: no bytes copied, the provisioned tree is never
written). The drop-in's copy has comfy_parallel in its ``custom_nodes/`` (``install-node``, as a user installs it)
and runs with ``COMFY_MULTI_GPU_SCHED=1 COMFY_NUM_GPUS=2``; stock runs from an identical copy without either.

Both runs go at the same time, each on its own port: the suite spends most of its time waiting for its seven
server starts, so two runs on two cores cost little more than one, and stock's counts are measured on the same
machine under the same load every time instead of being taken from an old run. Both pass upstream's own
``--skip-timing-checks`` ("for CI environments with variable performance"): a few of its checks time a whole
prompt against 0.1-0.8 s, which two suites on two cores miss now and then, stock included; every functional
assertion of those tests still runs. The drop-in must pass every test stock passes. Counts and wall times go to
tests/results/reliability.md (see reliability_results.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import reliability_results
from harness import ARTIFACTS, REPO, free_ports

from comfy_parallel.ops import provision

VERSION = "0.33.0"
WORKERS = 2
SUITE = "tests/execution"
WORK = ARTIFACTS / "upstream-execution"
RUN_TIMEOUT_S = 720  # one run takes ~3.5 min on a 2-core machine; a hang ends here, not at the CI's limit
TEST_TIMEOUT_S = 180  # per upstream test (pytest-timeout), so one hung test fails alone and the run goes on
FRESH_DIRS = ("custom_nodes", "user", "output", "temp", "input")  # empty in the copy: nothing left by other runs
# The environment a developer's shell may carry that would change either server; the runs set their own.
CLEARED_ENV_PREFIXES = ("COMFY_MULTI_GPU_SCHED", "COMFY_NUM_GPUS", "COMFY_PARALLEL_", "COMFYUI_SERVER", "PYTEST_")
KEPT_ENV = ("COMFY_PARALLEL_HOME", "COMFY_PARALLEL_ARCHIVES")
DROPIN_BANNER = f"multi-device mode with {WORKERS} workers"
STORE_BANNER = "queued prompts are kept in "  # the write-ahead queue is on (shutdown.GracefulShutdown.install)
SERVER_BANNER = "Starting server"


@dataclass
class SuiteRun:
    """One run of upstream's suite: its counts from the JUnit XML, and where its output went."""

    name: str
    log: Path
    returncode: int
    wall_s: float
    passed: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # test id -> first line of its failure

    @property
    def total(self) -> int:
        return self.passed + self.skipped + len(self.failed)

    def figures(self, prefix: str) -> dict[str, reliability_results.Figure]:
        figs: dict[str, reliability_results.Figure] = {
            f"{prefix}_passed": self.passed, f"{prefix}_failed": len(self.failed),
            f"{prefix}_skipped": self.skipped, f"{prefix}_wall_s": round(self.wall_s, 1)}
        if self.failed:
            figs[f"{prefix}_failed_ids"] = " ".join(sorted(self.failed))
        return figs


def upstream_comfyui() -> tuple[Path, str]:
    """The ComfyUI tree holding the suite and its label, or skip with the one reason it is not here.

    ``COMFY_TEST_COMFYUI`` (a user's checkout) wins, as in conftest.py; otherwise the provisioned 0.33.0, unless
    ``COMFY_TEST_VERSIONS`` leaves it out or its archive is not on this machine.
    """
    own = os.environ.get("COMFY_TEST_COMFYUI", "").strip()
    if own:
        path = Path(own).expanduser().resolve()
        if not (path / SUITE).is_dir():
            pytest.skip(f"upstream conformance skipped: COMFY_TEST_COMFYUI={path} has no {SUITE}")
        return path, path.name
    wanted = [v.strip() for v in os.environ.get("COMFY_TEST_VERSIONS", VERSION).split(",") if v.strip()]
    if VERSION not in wanted:
        pytest.skip(f"upstream conformance skipped: ComfyUI {VERSION} is not in COMFY_TEST_VERSIONS")
    if not provision.is_provisioned(VERSION):
        try:
            provision.find_archive(provision.RELEASES[VERSION])
        except provision.ArchiveMissing as err:
            pytest.skip(f"upstream conformance skipped: {err}")
    path = provision.ensure_comfyui(VERSION, quiet=True)
    if not (path / SUITE).is_dir():
        pytest.skip(f"upstream conformance skipped: {path} was provisioned without {SUITE}; delete it and run "
                    "`comfy-parallel provision --versions 0.33.0` again")
    return path, VERSION


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link a file (free on one file system), or copy it where links cannot cross devices."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def scratch_tree(comfy: Path, dest: Path) -> Path:
    """A private copy of the ComfyUI tree at ``dest``: ComfyUI locates custom_nodes/ and user/ from the real path
    of its own files, so a tree of symlinks would still be the original; hard links are not.

    models/ and hidden folders (a checkout's .git or venv) are linked, not copied; the folders a server writes
    start empty. Of custom_nodes/ only the files upstream ships there are kept: node packs (folders) of a user's
    checkout are not what this suite tests.
    """
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for entry in comfy.iterdir():
        target = dest / entry.name
        if entry.name in FRESH_DIRS:
            target.mkdir()
        elif entry.name == "models" or entry.name.startswith("."):
            target.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)
    for node_file in (comfy / "custom_nodes").glob("*"):
        if node_file.is_file():
            _link_or_copy(node_file, dest / "custom_nodes" / node_file.name)
    return dest


def compile_tree(tree: Path) -> None:
    """Write the tree's bytecode once: with ``PYTHONDONTWRITEBYTECODE`` set (as on the development machines) every
    one of the suite's fourteen server starts would otherwise compile ComfyUI's ~650 modules again, ~2.5 s of CPU
    each, inside upstream's 20 s connect window. Linked folders (models/, hidden ones) are not followed."""
    out = subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(tree)], check=False,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Return once something accepts connections on ``port``, ``proc`` has ended, or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)


def install_dropin(tree: Path) -> None:
    """Put comfy_parallel into the copy's custom_nodes/ the way a user does (``install-node``)."""
    out = subprocess.run([sys.executable, "-m", "comfy_parallel", "install-node", "--custom-nodes-dir",
                          str(tree / "custom_nodes")], check=False, cwd=str(REPO), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def suite_env(closed_url: str, extra: dict[str, str]) -> dict[str, str]:
    """The server's environment: upstream's fixtures run plain ``python``, which must be this venv's."""
    env = {k: v for k, v in os.environ.items() if k in KEPT_ENV or not k.startswith(CLEARED_ENV_PREFIXES)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    # test_preview_method.py needs SDXL weights and talks to a server someone else started (default
    # localhost:8988); it skips when none answers there. Pointing it at a port that refuses keeps it skipped,
    # identically in both runs, whatever runs on this machine.
    env["COMFYUI_SERVER"] = closed_url
    env.update(extra)
    return env


def start_suite(name: str, tree: Path, port: int, env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    """Start upstream's pytest in ``tree``; output goes to ``<name>.log``.

    ``-c``/``--rootdir`` pin upstream's own pytest.ini: pytest takes an existing path among the arguments (an
    option's value in a separate word too) as a place to look for its configuration, and above test-artifacts/
    it would find this repository's pyproject.toml (its addopts, and capture on, which swallows the server logs).
    """
    cmd = [sys.executable, "-m", "pytest", "-c", "pytest.ini", "--rootdir=.", "-p", "no:cacheprovider", "-q",
           SUITE, f"--port={port}", f"--output_dir={WORK / f'{name}-out'}", f"--junitxml={WORK / f'{name}.xml'}",
           "--skip-timing-checks", "-o", f"timeout={TEST_TIMEOUT_S}"]
    with open(WORK / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(tree), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, time.monotonic()


def kill_group(proc: subprocess.Popen) -> None:
    """End a run's process group: its pytest and any server upstream's fixtures left running."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def finish_suite(name: str, proc: subprocess.Popen, started: float) -> SuiteRun:
    """Wait for a run, end whatever it left behind (upstream's servers are in its process group), read its XML."""
    try:
        returncode = proc.wait(max(1.0, started + RUN_TIMEOUT_S - time.monotonic()))
    except subprocess.TimeoutExpired:
        returncode = -signal.SIGKILL
    wall_s = time.monotonic() - started
    kill_group(proc)
    run = SuiteRun(name, WORK / f"{name}.log", returncode, wall_s)
    xml_path = WORK / f"{name}.xml"
    if not xml_path.exists():
        return run
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").strip()
            run.failed[test_id] = message.splitlines()[0][:300] if message else "(no message)"
        elif case.find("skipped") is not None:
            run.skipped += 1
        else:
            run.passed += 1
    return run


def describe(run: SuiteRun) -> str:
    failures = "".join(f"\n  {test_id}: {msg}" for test_id, msg in sorted(run.failed.items()))
    return (f"{run.name}: {run.passed} passed, {len(run.failed)} failed, {run.skipped} skipped in "
            f"{run.wall_s:.0f}s (exit {run.returncode}, log {run.log}){failures}")


@pytest.mark.timeout(RUN_TIMEOUT_S + 240)
def test_upstream_execution_suite_passes_under_dropin_as_on_stock() -> None:
    comfy, label = upstream_comfyui()
    WORK.mkdir(parents=True, exist_ok=True)
    for stale in WORK.glob("*.xml"):
        stale.unlink()
    stock_tree = scratch_tree(comfy, WORK / "stock-comfyui")
    compile_tree(stock_tree)
    dropin_tree = scratch_tree(stock_tree, WORK / "dropin-comfyui")
    install_dropin(dropin_tree)
    stock_port, dropin_port = free_ports(2)
    procs: list[subprocess.Popen] = []
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
        closed_url = f"http://127.0.0.1:{refusing.getsockname()[1]}"
        try:
            stock_proc, stock_t0 = start_suite("stock", stock_tree, stock_port, suite_env(closed_url, {}))
            procs.append(stock_proc)
            # Upstream's client gives a server ~20 s to listen; the drop-in's run starts once stock's first server
            # listens, so the two runs' server starts (the CPU-bound part of the suite) do not all coincide.
            wait_listening(stock_port, stock_proc, timeout=60)
            # The drop-in as users get it: the write-ahead queue on. Upstream restarts servers on one user
            # directory (SIGKILL) and expects an empty /history listing after each start: the listing starts
            # empty at every start, stored entries answer /history/{id} only (README, Crash safety).
            dropin_env = {"COMFY_MULTI_GPU_SCHED": "1", "COMFY_NUM_GPUS": str(WORKERS)}
            dropin_proc, dropin_t0 = start_suite("dropin", dropin_tree, dropin_port,
                                                 suite_env(closed_url, dropin_env))
            procs.append(dropin_proc)
            stock = finish_suite("stock", stock_proc, stock_t0)
            dropin = finish_suite("dropin", dropin_proc, dropin_t0)
            both_wall_s = time.monotonic() - stock_t0
        finally:
            for proc in procs:
                if proc.returncode is None:  # not finished: an error or an interrupt on the way
                    kill_group(proc)

    reliability_results.record(f"conformance ({label})", {
        "section": "conformance", "comfyui": label, "suite": SUITE, "dropin_workers": WORKERS,
        "both_runs_wall_s": round(both_wall_s, 1), **stock.figures("stock"), **dropin.figures("dropin")})

    assert stock.total > 0, f"upstream's suite ran nothing against stock ComfyUI:\n{describe(stock)}"
    assert "comfy-parallel: " not in stock.log.read_text(errors="replace"), "the stock copy loaded comfy_parallel"
    dropin_log = dropin.log.read_text(errors="replace")
    starts = dropin_log.count(SERVER_BANNER)
    assert starts > 0 and dropin_log.count(DROPIN_BANNER) == starts, (
        f"not every drop-in server start ran {WORKERS} workers ({starts} starts, "
        f"{dropin_log.count(DROPIN_BANNER)} with '{DROPIN_BANNER}'): {dropin.log}")
    assert dropin_log.count(STORE_BANNER) == starts, (
        f"not every drop-in server start ran with the write-ahead queue ({starts} starts, "
        f"{dropin_log.count(STORE_BANNER)} with '{STORE_BANNER}'): {dropin.log}")
    only_dropin = sorted(set(dropin.failed) - set(stock.failed))
    assert not only_dropin and (dropin.total, dropin.skipped) == (stock.total, stock.skipped), (
        f"the drop-in ({WORKERS} CPU workers) does not pass what stock passes; failing only under the drop-in: "
        f"{only_dropin}\n{describe(stock)}\n{describe(dropin)}")
    if stock.failed:
        warnings.warn(f"stock ComfyUI failed upstream tests on this machine (the drop-in failed no other):\n"
                      f"{describe(stock)}\n{describe(dropin)}", stacklevel=1)
