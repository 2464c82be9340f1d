"""The command line: --help explains itself, doctor reports on a real ComfyUI, bad settings exit clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comfy_parallel", *args], cwd=str(REPO), capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_serve_help_explains_routing() -> None:
    out = cli("serve", "--help")
    assert out.returncode == 0
    for words in ("X-TARGET-GPU", "--devices", "--entry-ports", "--default-route", "COMFY_MULTI_GPU_SCHED",
                  "COMFY_NUM_GPUS", "/gpuN/", "400"):
        assert words in out.stdout, words


def test_bad_settings_exit_with_a_clear_message(comfy_dir: Path) -> None:
    out = cli("serve", "--comfyui", str(comfy_dir), "--devices", "0,0")
    assert out.returncode == 2 and "listed twice" in out.stderr
    out = cli("serve", "--comfyui", str(comfy_dir), "--devices", "cpu,cpu", "--default-route", "5")
    assert out.returncode == 2 and "--default-route" in out.stderr
    out = cli("serve", "--comfyui", "/nonexistent", "--devices", "cpu,cpu")
    assert out.returncode == 2 and "not a ComfyUI folder" in out.stderr
    out = cli("serve", "--comfyui", str(comfy_dir), "--devices", "cpu,cpu", "--switch-interval-ms", "0")
    assert out.returncode == 2 and "switch interval" in out.stderr and "0.05 to 100" in out.stderr


def test_switch_interval_setting() -> None:
    from comfy_parallel.settings import SettingsError, from_env, parse_switch_interval

    assert parse_switch_interval(None) is None and parse_switch_interval(" default ") is None
    assert parse_switch_interval("0.5") == 0.5 and parse_switch_interval(2) == 2.0
    for bad in ("0", "-1", "1000", "fast", "nan"):
        with pytest.raises(SettingsError, match="switch interval"):
            parse_switch_interval(bad)
    assert from_env({"COMFY_PARALLEL_SWITCH_INTERVAL_MS": "1"}, cpu_mode=True).switch_interval_ms == 1.0
    assert from_env({}, cpu_mode=True).switch_interval_ms is None


def test_doctor_reports_version_devices_and_patches(comfy_dir: Path) -> None:
    out = cli("doctor", "--comfyui", str(comfy_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ComfyUI: {comfy_dir.name} at {comfy_dir}" in out.stdout
    assert "devices: 0 CUDA device(s) visible" in out.stdout
    assert "packages: all present" in out.stdout
    for name in ("server-worker-attrs", "interrupt-per-worker", "loaded-models-per-worker", "device-workers",
                 "entry-ports"):
        assert f"{name}" in out.stdout
    assert "DOES NOT APPLY" not in out.stdout and "result: ready" in out.stdout


def test_graphs_on_several_gpus_start_comfyui_on_the_native_allocator() -> None:
    from comfy_parallel.cli import graph_safe_allocator
    from comfy_parallel.settings import Settings, parse_devices

    two_gpus, one_gpu, cpus = parse_devices("0,1"), parse_devices("0"), parse_devices("cpu,cpu")
    args, note = graph_safe_allocator(Settings(devices=two_gpus), ["--port", "1"])
    assert args == ["--port", "1", "--disable-cuda-malloc"] and note and "--disable-cuda-malloc" in note
    assert graph_safe_allocator(Settings(devices=parse_devices("0*2")), [])[0] == ["--disable-cuda-malloc"]
    for settings, given in ((Settings(devices=two_gpus, cuda_graphs="off"), []),
                            (Settings(devices=two_gpus), ["--cuda-malloc"]),        # the user's choice stands
                            (Settings(devices=two_gpus), ["--disable-cuda-malloc"]),
                            (Settings(devices=one_gpu, cuda_graphs="on"), []),      # one worker: no concurrency
                            (Settings(devices=cpus, cuda_graphs="on"), []),
                            (Settings(devices=two_gpus, enabled=False), [])):
        assert graph_safe_allocator(settings, given) == (given, None), settings



def test_several_gpus_start_comfyui_033_without_dynamic_vram(comfy_dir: Path) -> None:
    import pytest

    from comfy_parallel.cli import classic_vram
    from comfy_parallel.settings import Settings, SettingsError, parse_devices

    has_dynamic_vram = "--disable-dynamic-vram" in (comfy_dir / "comfy" / "cli_args.py").read_text()
    two_gpus = Settings(devices=parse_devices("0,1"))
    args, note = classic_vram(two_gpus, comfy_dir, ["--port", "1"])
    if has_dynamic_vram:  # 0.33
        assert args == ["--port", "1", "--disable-dynamic-vram"] and note and "process-wide" in note
        with pytest.raises(SettingsError, match="--enable-dynamic-vram"):
            classic_vram(two_gpus, comfy_dir, ["--enable-dynamic-vram"])
    else:  # 0.3.75 has no such flag and no DynamicVRAM
        assert (args, note) == (["--port", "1"], None)
    for settings in (Settings(devices=parse_devices("0")), Settings(devices=parse_devices("cpu,cpu")),
                     Settings(devices=parse_devices("0,1"), enabled=False)):
        assert classic_vram(settings, comfy_dir, []) == ([], None), settings
