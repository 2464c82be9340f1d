"""Settings for the multi-device server, read from the command line or from the environment.

The environment names are the seed's (``COMFY_MULTI_GPU_SCHED``, ``COMFY_NUM_GPUS``) plus ``COMFY_PARALLEL_*``
for everything else, so the launcher and the drop-in custom node read the same switches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Union


DefaultRoute = Union[str, int]  # "auto", "pool" or a device index
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# Where untargeted prompts go when nothing says otherwise (launcher and drop-in): "pool" lets idle workers take them
# (pool.py); "auto" binds each to the shortest queue when it arrives. Pool is the default because it met every goal
# of the H200 scheduling benchmark against auto in two runs (1.48-1.55x img/s and 1/3 of the model loads with three
# checkpoints, a lower p95 with long and short jobs mixed: bench/results/affinity_nvidia-h200.md, runs 3 and 4).
DEFAULT_ROUTE = "pool"
ROUTES = ("auto", "pool")
# The pool's starvation bound: no pooled prompt waits behind more younger ones (pool.py; the H200 benchmark's
# longest wait with 8 stayed below FIFO's own, bench/results/affinity_nvidia-h200.md).
DEFAULT_SLACK = 8


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message says which and what is valid."""


@dataclass(frozen=True)
class DeviceSpec:
    """One worker slot: a CUDA ordinal, or a CPU worker standing in for a GPU."""

    index: int
    kind: str  # "cuda" or "cpu"
    ordinal: int | None = None

    @property
    def label(self) -> str:
        return f"cuda:{self.ordinal}" if self.kind == "cuda" else f"cpu#{self.index}"


@dataclass(frozen=True)
class Settings:
    devices: tuple[DeviceSpec, ...]
    entry_ports: tuple[int, ...] = ()
    default_route: DefaultRoute = DEFAULT_ROUTE
    affinity_slack: int = DEFAULT_SLACK  # pool: no prompt waits behind more younger prompts than this
    worker_vram_limit: int | None = None  # bytes of VRAM each CUDA worker's model loading may plan with
    enabled: bool = True
    warmup_checkpoint: str | None = None
    shared_weights: bool = True  # one host copy per model file for all workers (weights/store.py)
    pin_weights: str = "auto"  # auto | on | off: page-locked host copies (auto: when they fit in half the RAM)
    weights_ram_limit: int | None = None  # bytes of host copies kept for reuse; LRU beyond it
    host_copy: str = "ram"  # ram | page-cache: where the one host copy of a model file lives (weights/store.py)
    cuda_graphs: str = "auto"  # auto | on | off: replay captured CUDA graphs of the UNet (comfy_adapter/cuda_graphs.py)
    cuda_graphs_max: int = 24  # graphs kept per UNet per worker, least recently used out
    # Python's GIL switch interval in ms (None: Python's own, 5 ms): how long a busy worker may keep the GIL from
    # the HTTP loop (bench/results/http_under_gil_load_cpu.md)
    switch_interval_ms: float | None = None

    @property
    def graphs_enabled(self) -> bool:
        return self.cuda_graphs == "on" or (self.cuda_graphs == "auto" and not self.cpu_mode)
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S  # after SIGTERM/SIGINT, running prompts may finish (shutdown.py)
    persist: bool = True  # prompts left at shutdown are saved and queued again at the next start
    persist_path: str | None = None  # default: <ComfyUI user directory>/__comfy_parallel/queue.sqlite3
    journal_synchronous: str = "NORMAL"  # SQLite synchronous of the write-ahead queue (journal.py says why)
    admin_token: str | None = field(default=None, repr=False)  # access.py; kept out of repr so it is never logged
    allow_unchecked_comfyui: bool = False  # a ComfyUI outside comfy_adapter.CHECKED starts if every check passes

    @property
    def multi_device(self) -> bool:
        return self.enabled and len(self.devices) > 1

    @property
    def cpu_mode(self) -> bool:
        return any(d.kind == "cpu" for d in self.devices)


def parse_devices(text: str) -> tuple[DeviceSpec, ...]:
    """Parse ``0,1,2`` (CUDA ordinals), ``cpu,cpu`` or ``cpu*3`` (CPU workers).

    ``0*2`` puts two workers on GPU 0 (each with its own VRAM copy of what it runs): for small models, or to
    exercise two workers on a one-GPU machine. ``0,0`` is refused as the typo it usually is.
    """
    items: list[tuple[str, bool]] = []
    for raw in text.split(","):
        raw = raw.strip().lower()
        if not raw:
            continue
        if "*" in raw:
            name, _, count = raw.partition("*")
            if not count.isdigit() or int(count) < 1:
                raise SettingsError(f"--devices: bad repeat count in {raw!r}; write e.g. cpu*3")
            items.extend([(name.strip(), True)] * int(count))
        else:
            items.append((raw, False))
    if not items:
        raise SettingsError("--devices is empty; give CUDA ordinals like 0,1 or CPU workers like cpu,cpu")
    specs: list[DeviceSpec] = []
    seen: dict[int, bool] = {}
    for i, (item, repeated) in enumerate(items):
        if item == "cpu":
            specs.append(DeviceSpec(i, "cpu"))
            continue
        ordinal_text = item[len("cuda:"):] if item.startswith("cuda:") else item
        if not ordinal_text.isdigit():
            raise SettingsError(f"--devices: {item!r} is neither a CUDA ordinal (0, 1, cuda:2) nor 'cpu'")
        ordinal = int(ordinal_text)
        if ordinal in seen and not (repeated and seen[ordinal]):
            raise SettingsError(f"--devices: CUDA device {ordinal} is listed twice (write {ordinal}*2 for two "
                                "workers on one GPU)")
        seen[ordinal] = repeated
        specs.append(DeviceSpec(i, "cuda", ordinal))
    kinds = {s.kind for s in specs}
    if len(kinds) > 1:
        raise SettingsError("--devices: mixing CUDA devices and CPU workers in one process is not supported")
    return tuple(specs)


def parse_entry_ports(text: str, n_devices: int) -> tuple[int, ...]:
    """``none``/empty: no entry ports; ``auto``: 8181.. one per device; ``8181`` or ``8181,8182,..``."""
    text = text.strip().lower()
    if text in ("", "none", "off", "0"):
        return ()
    if text == "auto":
        return tuple(8181 + i for i in range(n_devices))
    try:
        ports = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise SettingsError(f"--entry-ports: {text!r} is not a comma-separated list of ports, 'auto' or 'none'")
    if len(ports) == 1 and n_devices > 1:
        ports = [ports[0] + i for i in range(n_devices)]
    if len(ports) != n_devices:
        raise SettingsError(f"--entry-ports: {len(ports)} ports given for {n_devices} devices; give one per "
                            "device, a single first port, 'auto' or 'none'")
    if any(not 0 < p < 65536 for p in ports) or len(set(ports)) != len(ports):
        raise SettingsError(f"--entry-ports: ports must be distinct and in 1..65535, got {ports}")
    return tuple(ports)


def parse_default_route(text: str, n_devices: int) -> DefaultRoute:
    text = text.strip().lower()
    if text in ROUTES:
        return text
    if text.isdigit() and int(text) < n_devices:
        return int(text)
    raise SettingsError(f"--default-route: {text!r} is not valid; use 'auto' (shortest queue at arrival), 'pool' "
                        f"(idle workers take the cheapest pooled prompt) or a device index 0..{n_devices - 1}")


def parse_affinity_slack(text: str) -> int:
    raw = str(text).strip()
    if not raw.isdigit():
        raise SettingsError(f"--affinity-slack: {text!r} is not valid; use a whole number >= 0 (0: first in, "
                            "first out)")
    return int(raw)


def parse_vram_limit(text: str | None) -> int | None:
    """``--worker-vram-limit 12G``; none/off/empty: no limit."""
    if text is None or text.strip().lower() in ("", "none", "off"):
        return None
    try:
        value = parse_bytes(text)
    except ValueError as err:
        raise SettingsError(f"--worker-vram-limit: {err}") from None
    if value <= 0:
        raise SettingsError(f"--worker-vram-limit: {text!r} must be more than 0")
    return value


def cuda_device_count() -> int:
    """Visible CUDA devices, asked of the driver directly so torch is not imported before ComfyUI sets it up."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def default_devices(cpu_workers: int = 2) -> tuple[DeviceSpec, ...]:
    """Every visible CUDA device, or ``cpu_workers`` CPU workers when there is none."""
    count = cuda_device_count()
    if count:
        return tuple(DeviceSpec(i, "cuda", i) for i in range(count))
    return tuple(DeviceSpec(i, "cpu") for i in range(cpu_workers))


def env_enabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get("COMFY_MULTI_GPU_SCHED", "0").strip().lower() in ("1", "true", "yes", "on")


def from_env(env: Mapping[str, str] | None = None, cpu_mode: bool = False) -> Settings:
    """Settings for drop-in mode: ``COMFY_NUM_GPUS=N`` means devices 0..N-1 (CPU workers in CPU mode)."""
    env = os.environ if env is None else env
    enabled = env_enabled(env)
    if env.get("COMFY_PARALLEL_DEVICES"):
        devices = parse_devices(env["COMFY_PARALLEL_DEVICES"])
    elif env.get("COMFY_NUM_GPUS"):
        text = env["COMFY_NUM_GPUS"].strip()
        if not text.isdigit() or int(text) < 1:
            raise SettingsError(f"COMFY_NUM_GPUS={text!r} is not a positive integer")
        n = int(text)
        devices = tuple(DeviceSpec(i, "cpu") if cpu_mode else DeviceSpec(i, "cuda", i) for i in range(n))
    else:
        devices = default_devices() if not cpu_mode else tuple(DeviceSpec(i, "cpu") for i in range(2))
    entry = parse_entry_ports(env.get("COMFY_PARALLEL_ENTRY_PORTS", "none"), len(devices))
    route = parse_default_route(env.get("COMFY_PARALLEL_DEFAULT_ROUTE", DEFAULT_ROUTE), len(devices))
    return Settings(devices=devices, entry_ports=entry, default_route=route, enabled=enabled,
                    affinity_slack=parse_affinity_slack(env.get("COMFY_PARALLEL_AFFINITY_SLACK", str(DEFAULT_SLACK))),
                    worker_vram_limit=parse_vram_limit(env.get("COMFY_PARALLEL_WORKER_VRAM_LIMIT")),
                    warmup_checkpoint=env.get("COMFY_PARALLEL_WARMUP_CHECKPOINT") or None,
                    cuda_graphs=parse_cuda_graphs(env.get("COMFY_PARALLEL_CUDA_GRAPHS", "auto")),
                    cuda_graphs_max=parse_graphs_max(env.get("COMFY_PARALLEL_CUDA_GRAPHS_MAX", "24")),
                    switch_interval_ms=parse_switch_interval(env.get(SWITCH_INTERVAL_ENV)),
                    **weight_settings(env.get("COMFY_PARALLEL_SHARED_WEIGHTS", "on"),
                                      env.get("COMFY_PARALLEL_PIN_WEIGHTS", "auto"),
                                      env.get("COMFY_PARALLEL_WEIGHTS_RAM_LIMIT"),
                                      env.get("COMFY_PARALLEL_HOST_COPY", "ram")),
                    allow_unchecked_comfyui=env_flag(env, ALLOW_UNCHECKED_ENV),
                    journal_synchronous=journal_synchronous(env), **lifecycle_settings(*lifecycle_env(env)))


ALLOW_UNCHECKED_ENV = "COMFY_PARALLEL_ALLOW_UNCHECKED_COMFYUI"


def env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


JOURNAL_SYNCHRONOUS_ENV = "COMFY_PARALLEL_JOURNAL_SYNCHRONOUS"


def journal_synchronous(env: Mapping[str, str]) -> str:
    """SQLite ``synchronous`` of the write-ahead queue: NORMAL (default; survives process crashes) or FULL (also
    power loss, one fsync per prompt)."""
    value = env.get(JOURNAL_SYNCHRONOUS_ENV, "NORMAL").strip().upper()
    if value not in ("NORMAL", "FULL", "EXTRA"):
        raise SettingsError(f"{JOURNAL_SYNCHRONOUS_ENV}={value!r}: use NORMAL, FULL or EXTRA")
    return value


def lifecycle_env(env: Mapping[str, str]) -> tuple[str, bool, str | None, str | None]:
    """Drain timeout, no-persist, persist path and admin token from ``COMFY_PARALLEL_*`` (the launcher's defaults)."""
    no_persist = env.get("COMFY_PARALLEL_NO_PERSIST", "0").strip().lower() in ("1", "true", "yes", "on")
    return (env.get("COMFY_PARALLEL_DRAIN_TIMEOUT", str(DEFAULT_DRAIN_TIMEOUT_S)), no_persist,
            env.get("COMFY_PARALLEL_PERSIST_PATH"), env.get("COMFY_PARALLEL_ADMIN_TOKEN"))


def lifecycle_settings(drain_timeout: str, no_persist: bool, persist_path: str | None,
                       admin_token: str | None) -> dict:
    """``--drain-timeout``, ``--no-persist``, ``--persist-path``, ``--admin-token`` as Settings fields."""
    try:
        timeout = float(drain_timeout)
    except ValueError:
        timeout = float("nan")
    if not 0 <= timeout < float("inf"):
        raise SettingsError(f"drain timeout: {drain_timeout!r} is not a number of seconds >= 0")
    token = (admin_token or "").strip() or None
    return {"drain_timeout": timeout, "persist": not no_persist, "persist_path": persist_path or None,
            "admin_token": token}


def weight_settings(shared: str, pin: str, ram_limit: str | None, host_copy: str = "ram") -> dict:
    """``--shared-weights on|off``, ``--pin-weights auto|on|off``, ``--weights-ram-limit 48G``,
    ``--host-copy ram|page-cache`` as Settings fields."""
    shared_text, pin_text, copy_text = shared.strip().lower(), pin.strip().lower(), host_copy.strip().lower()
    if shared_text not in ("on", "off", "1", "0", "true", "false"):
        raise SettingsError(f"shared weights: {shared!r} is not valid; use on or off")
    if pin_text not in ("auto", "on", "off"):
        raise SettingsError(f"pin weights: {pin!r} is not valid; use auto, on or off")
    if copy_text not in ("ram", "page-cache"):
        raise SettingsError(f"host copy: {host_copy!r} is not valid; use ram or page-cache")
    limit = None
    if ram_limit and ram_limit.strip().lower() not in ("none", "off", ""):
        try:
            limit = parse_bytes(ram_limit)
        except ValueError as err:
            raise SettingsError(f"weights RAM limit: {err}") from None
    return {"shared_weights": shared_text in ("on", "1", "true"), "pin_weights": pin_text,
            "weights_ram_limit": limit, "host_copy": copy_text}


def parse_cuda_graphs(text: str) -> str:
    value = text.strip().lower()
    if value not in ("auto", "on", "off"):
        raise SettingsError(f"cuda graphs: {text!r} is not valid; use auto, on or off")
    return value


SWITCH_INTERVAL_ENV = "COMFY_PARALLEL_SWITCH_INTERVAL_MS"
SWITCH_INTERVAL_RANGE_MS = (0.05, 100.0)


def parse_switch_interval(text: str | float | None) -> float | None:
    """Milliseconds, or ``None`` (empty or ``default``) for Python's own switch interval."""
    value = "" if text is None else str(text).strip().lower()
    if value in ("", "default"):
        return None
    low, high = SWITCH_INTERVAL_RANGE_MS
    try:
        ms = float(value)
    except ValueError:
        ms = float("nan")
    if not low <= ms <= high:  # also false for nan
        raise SettingsError(f"switch interval: {text!r} is not valid; use milliseconds from {low} to {high:g}, "
                            "or 'default' for Python's own (5 ms)")
    return ms


def parse_graphs_max(text: str | int) -> int:
    value = str(text).strip()
    if not value.isdigit() or int(value) < 1:
        raise SettingsError(f"cuda graphs max: {text!r} is not valid; use a whole number of graphs, at least 1")
    return int(value)


def parse_bytes(text: str) -> int:
    """``8G``, ``8GiB``, ``512M``, ``1.5T`` or a plain byte count; binary units."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    scale = 1
    if raw and raw[-1] in units:
        scale, raw = units[raw[-1]], raw[:-1]
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{text!r} is not a size; write e.g. 48G, 512M or a byte count") from None
    if value < 0:
        raise ValueError(f"{text!r} is negative")
    return int(value * scale)
