"""Plain-Python pieces without a server: settings parsing, target resolution, device queues."""

from __future__ import annotations

import threading

import pytest

from comfy_parallel.scheduling.queues import DeviceQueues
from comfy_parallel.server.routing import RequestRoute, RoutingError, resolve
from comfy_parallel.settings import (SettingsError, from_env, parse_default_route, parse_devices,
                                     parse_entry_ports)


def test_parse_devices() -> None:
    assert [d.label for d in parse_devices("0,1,cuda:3")] == ["cuda:0", "cuda:1", "cuda:3"]
    assert [d.label for d in parse_devices("cpu*3")] == ["cpu#0", "cpu#1", "cpu#2"]
    assert [d.label for d in parse_devices("0*2,1")] == ["cuda:0", "cuda:0", "cuda:1"]  # two workers on GPU 0
    for bad in ("", "0,0", "gpu1", "0,cpu", "cpu*0", "-1"):
        with pytest.raises(SettingsError):
            parse_devices(bad)


def test_cuda_graph_setting() -> None:
    from comfy_parallel.settings import Settings, parse_cuda_graphs

    assert [parse_cuda_graphs(t) for t in ("auto", " ON ", "off")] == ["auto", "on", "off"]
    with pytest.raises(SettingsError):
        parse_cuda_graphs("yes")
    gpus, cpus = parse_devices("0,1"), parse_devices("cpu,cpu")
    assert Settings(devices=gpus).graphs_enabled and not Settings(devices=cpus).graphs_enabled  # auto
    assert Settings(devices=cpus, cuda_graphs="on").graphs_enabled
    assert not Settings(devices=gpus, cuda_graphs="off").graphs_enabled
    assert from_env({"COMFY_PARALLEL_DEVICES": "0,1", "COMFY_PARALLEL_CUDA_GRAPHS": "off"}).cuda_graphs == "off"


def test_host_copy_setting() -> None:
    env = {"COMFY_PARALLEL_DEVICES": "0,1"}
    assert from_env(env).host_copy == "ram"
    assert from_env({**env, "COMFY_PARALLEL_HOST_COPY": " Page-Cache "}).host_copy == "page-cache"
    with pytest.raises(SettingsError, match="ram or page-cache"):
        from_env({**env, "COMFY_PARALLEL_HOST_COPY": "disk"})


def test_entry_ports_and_default_route() -> None:
    assert parse_entry_ports("auto", 3) == (8181, 8182, 8183)
    assert parse_entry_ports("9000", 2) == (9000, 9001)
    assert parse_entry_ports("none", 2) == ()
    for bad in ("1,2,3", "x", "70000,70001", "5,5"):
        with pytest.raises(SettingsError):
            parse_entry_ports(bad, 2)
    assert parse_default_route("auto", 2) == "auto" and parse_default_route("1", 2) == 1
    with pytest.raises(SettingsError):
        parse_default_route("2", 2)


def test_seed_environment() -> None:
    s = from_env({"COMFY_MULTI_GPU_SCHED": "1", "COMFY_NUM_GPUS": "4"})
    assert s.multi_device and [d.label for d in s.devices] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert not from_env({"COMFY_NUM_GPUS": "4"}).enabled
    assert [d.kind for d in from_env({"COMFY_NUM_GPUS": "2"}, cpu_mode=True).devices] == ["cpu", "cpu"]
    with pytest.raises(SettingsError):
        from_env({"COMFY_NUM_GPUS": "two"})


@pytest.mark.parametrize("headers,path,port,expected", [
    ({}, "/prompt", None, (None, "none")),
    ({"X-TARGET-GPU": "2"}, "/prompt", None, (2, "header")),
    ({"X-TARGET-GPU": " auto "}, "/prompt", None, (None, "none")),
    ({}, "/gpu1/api/prompt", None, (1, "prefix")),
    ({}, "/prompt", 9001, (1, "port")),
    ({"X-TARGET-GPU": "1"}, "/gpu1/ws", 9001, (1, "port+prefix+header")),
    ({}, "/gpu_stats", None, (None, "none")),
])
def test_resolve(headers: dict, path: str, port: int | None, expected: tuple) -> None:
    route = resolve(headers, path, port, 3, {9000: 0, 9001: 1, 9002: 2})
    assert (route.target, route.source) == expected


@pytest.mark.parametrize("headers,path,port", [
    ({"X-TARGET-GPU": "3"}, "/prompt", None), ({"X-TARGET-GPU": "-1"}, "/prompt", None),
    ({"X-TARGET-GPU": "a"}, "/prompt", None), ({}, "/gpu3/", None), ({}, "/gpu/", None),
    ({"X-TARGET-GPU": "0"}, "/gpu1/prompt", None), ({}, "/gpu2/prompt", 9000),
])
def test_resolve_rejects(headers: dict, path: str, port: int | None) -> None:
    with pytest.raises(RoutingError) as err:
        resolve(headers, path, port, 3, {9000: 0})
    assert err.value.valid == [0, 1, 2]


def _item(n: int) -> tuple:
    return (n, f"p{n}", {}, {}, [], {})


def test_device_queues_route_scope_and_history() -> None:
    route: list[RequestRoute | None] = [None]
    qs = DeviceQueues(3, lambda: route[0])
    assert qs.put(_item(0)) == 0  # all empty: lowest index
    assert qs.put(_item(1)) == 1
    route[0] = RequestRoute(0, "header")
    assert qs.put(_item(2)) == 0 and route[0].assigned == 0
    assert qs.get_tasks_remaining() == 2 and len(qs.get_current_queue()[1]) == 2
    route[0] = None
    assert qs.put(_item(3)) == 2 and qs.get_tasks_remaining() == 4
    item, item_id = qs.devices[0].get(timeout=1)
    assert item[1] == "p0"
    qs.devices[0].task_done(item_id, {"outputs": {"x": 1}}, None)
    assert qs.get_history("p0")["p0"]["gpu_id"] == 0
    route[0] = RequestRoute(1, "prefix")
    qs.wipe_queue()
    route[0] = None
    assert [s.queued for s in qs.stats()] == [1, 0, 1]


def test_device_queue_get_blocks_until_put() -> None:
    qs = DeviceQueues(2, lambda: RequestRoute(1, "header"))
    got: list = []
    t = threading.Thread(target=lambda: got.append(qs.devices[1].get(timeout=5)))
    t.start()
    qs.put(_item(5))
    t.join(5)
    assert got and got[0][0][1] == "p5"
    assert qs.devices[0].get(timeout=0.05) is None


def test_launcher_does_not_import_torch_before_comfyui() -> None:
    """ComfyUI sets its CUDA allocator options before importing torch and warns when torch came first."""
    import subprocess
    import sys

    code = ("import sys, comfy_parallel.cli, comfy_parallel.activation, comfy_parallel.dropin\n"
            "from comfy_parallel.cli import build_parser, serve_settings\n"
            "serve_settings(build_parser().parse_args(\n"
            "    ['serve', '--devices', 'cpu,cpu', '--weights-ram-limit', '8G']))\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_gpu_option_inside_a_worker_is_its_own_device_or_a_clear_error() -> None:
    import pytest
    import torch

    from comfy_parallel.comfy_adapter.model_management import device_for_option

    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert device_for_option("gpu:1", devices, torch.device("cuda", 1), 1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="'gpu:0' names cuda:0, which another comfy-parallel worker owns"):
        device_for_option("gpu:0", devices, torch.device("cuda", 1), 1)
    assert device_for_option("gpu:7", devices, torch.device("cuda", 1), 1) is None  # ComfyUI's own fallback
    assert device_for_option("gpu:x", devices, torch.device("cuda", 1), 1) is None
