"""Replay a captured CUDA graph of the UNet's forward instead of re-issuing ~2,000 kernels from Python each step.

The profile (bench/results/profile_step_nvidia-h200.md) shows a sampling step is bound by host time: ~90 ms of
Python and dispatch against ~41 ms of GPU work for SDXL at 1024², and every worker thread of one process competes
for the same interpreter. A replayed graph costs well under a millisecond of host time.

A graph is captured per (UNet, input shapes and dtypes, weight placement) on the second call with that key (the
first runs eagerly and warms up the kernels), into a memory pool private to the calling worker, with
``capture_error_mode="thread_local"`` so other workers keep launching work meanwhile. The eager path is used
whenever capture would be unsafe: CPU or low-VRAM (weights cast per call), weight hooks, attention/block patches,
ControlNets, model wrappers, extra conditioning inputs, or a capture that failed once for that key.

A replayed graph reads the UNet's weights from the addresses they had at capture, whatever values lie there now.
So graphs are kept per weight placement (the address, shape and dtype of every parameter and buffer, recorded
whenever ComfyUI loads or un-patches the model) instead of being dropped at each re-patch: a worker alternating
plain and LoRA prompts replays the graphs of both placements (a LoRA patch puts new tensors in place, its
un-patch puts the originals back). Graphs per UNet are capped (least recently used first out, ``--cuda-graphs-max``)
and dropped when the weights leave the GPU.

Several workers capturing at once need torch's native caching allocator: the ``cudaMallocAsync`` backend (ComfyUI's
default, ``cuda_malloc.py``) keeps one process-wide "capture underway" state, so another worker's allocations and
frees during a capture invalidate it, and a later free aborts the process (``terminate called``, seen on 2xH200
with SDXL). ``comfy-parallel serve`` therefore starts ComfyUI with ``--disable-cuda-malloc`` when graphs are on;
where that backend is still in use (the custom-node route, or an explicit ``--cuda-malloc``) graphs stay off.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import sys
import threading
from collections import OrderedDict
from typing import Any

import torch

from ..scheduling import device_gate, worker_context
from ..scheduling.device_gate import DeviceGate
from .base import CHECKED, Comfy, Patch, first_problem, require_callables, require_modules, require_parameters

log = logging.getLogger("comfy_parallel.cuda_graphs")

# UNet.__dict__ keys
_GRAPHS = "_cp_graphs"  # OrderedDict {(input key, placement): _SEEN | _Graph | _FAILED (stay eager)}, LRU last
_READY = "_cp_graphs_ready"  # True while its weights are fully resident on a CUDA device
_PLACEMENT = "_cp_placement"  # digest of where its weights lie now (None: unknown, no graphs)
_SEEN, _FAILED = object(), object()
DEFAULT_MAX_GRAPHS = 24
_SAMPLES = 16  # parameters whose address a replay checks (a move the hooks missed runs eagerly instead)
_COUNTS = ("replays", "eager", "captures", "failures", "evictions")


class _Graph:
    def __init__(self, worker: int) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.worker = worker
        self.inputs: list[torch.Tensor | None] = []
        self.output: torch.Tensor | None = None
        self.samples: list[tuple[Any, str, int]] = []  # (module, parameter name, address at capture)


class GraphStats:
    """Counts per worker for /multigpu/status, /metrics and the logs: replays, eager steps, captures, failures,
    evictions (LRU cap), live graphs and memory pools."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_worker: dict[int, dict[str, int]] = {}
        self.off_reason: str | None = None  # set when the patch is on but graphs cannot be used in this process
        self.max_graphs = DEFAULT_MAX_GRAPHS

    def _row(self, worker: int) -> dict[str, int]:
        return self.by_worker.setdefault(worker, {**dict.fromkeys(_COUNTS, 0), "graphs": 0, "pools": 0})

    def add(self, field: str, worker: int | None = None, n: int = 1) -> None:
        with self.lock:
            self._row(_worker_index() if worker is None else worker)[field] += n

    def total(self, field: str) -> int:
        with self.lock:
            return sum(row[field] for row in self.by_worker.values())

    def as_dict(self) -> dict:
        with self.lock:
            rows = {str(w): dict(row) for w, row in sorted(self.by_worker.items())}
        totals = {f: sum(r[f] for r in rows.values()) for f in (*_COUNTS, "graphs", "pools")}
        out = {**totals, "max_graphs_per_unet": self.max_graphs, "per_worker": rows}
        return out if self.off_reason is None else {**out, "off_reason": self.off_reason}


STATS = GraphStats()


def _worker_index() -> int:
    ctx = worker_context.current()
    return -1 if ctx is None else ctx.spec.index


def gate_of(device: torch.device) -> DeviceGate:
    return device_gate.gate_of(device.index)


def worker_gate() -> DeviceGate | None:
    """The gate of the calling worker's GPU (``None`` off a CUDA worker)."""
    ctx = worker_context.current()
    if ctx is None or ctx.spec.kind != "cuda":
        return None
    return device_gate.gate_of(ctx.spec.ordinal)


def held(function: Any) -> Any:
    """Run ``function`` holding the calling worker's GPU shared (no capture on that GPU meanwhile)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        gate = worker_gate()
        with gate.shared() if gate is not None else contextlib.nullcontext():
            return function(*args, **kwargs)

    run.__wrapped__ = function  # type: ignore[attr-defined]
    return run


_pools: dict[tuple[int, int], Any] = {}  # (thread id, device index) -> graph pool handle


def _pool(device: torch.device) -> Any:
    key = (threading.get_ident(), device.index or 0)
    if key not in _pools:
        _pools[key] = torch.cuda.graph_pool_handle()
        STATS.add("pools")
    return _pools[key]


def _abandon_pool(device: torch.device, pool: Any) -> None:
    """After a failed capture: stop the allocator recording into ``pool`` and give this worker a new one.

    A capture that fails inside ``capture_end`` leaves the caching allocator recording into the pool, and every
    later capture in the process then failed with "beginAllocateToPool: already recording to mempool_id" (H200,
    two workers); the pool's memory is given back once the failed graph is gone.
    """
    try:
        torch._C._cuda_endAllocateToPool(device.index or 0, pool)
    except RuntimeError:  # it was not recording: the capture failed before it began
        pass
    torch.cuda.synchronize(device)
    if _pools.pop((threading.get_ident(), device.index or 0), None) is not None:
        STATS.add("pools", n=-1)


def allocator_problem(concurrent: bool) -> str | None:
    """Why CUDA graphs must stay off with the allocator this process uses, or ``None`` when they may run."""
    if concurrent and torch.cuda.is_available() and torch.cuda.get_allocator_backend() == "cudaMallocAsync":
        return ("the cudaMallocAsync allocator cannot serve captures from several worker threads; start ComfyUI "
                "with --disable-cuda-malloc (comfy-parallel serve does so unless --cuda-malloc is given)")
    return None


def _weights(unet: Any) -> Any:
    return itertools.chain(unet.named_parameters(), unet.named_buffers())


def note_placement(unet: Any) -> None:
    """Record where the UNet's weights lie now (after ComfyUI loaded, patched or un-patched them)."""
    placement = repr([(t.data_ptr(), t.dtype, tuple(t.shape)) for _, t in _weights(unet)])
    unet.__dict__[_PLACEMENT] = hashlib.blake2b(placement.encode(), digest_size=16).hexdigest()


def _samples(unet: Any) -> list[tuple[Any, str, int]]:
    """A few parameters spread over the UNet, with their addresses now: what a replay re-checks."""
    named = [(name.rpartition("."), p) for name, p in unet.named_parameters()]
    step = max(1, len(named) // _SAMPLES)
    modules = dict(unet.named_modules())
    return [(modules[owner], attr, p.data_ptr()) for (owner, _, attr), p in named[::step]]


def _still_placed(entry: _Graph) -> bool:
    return all(getattr(module, attr).data_ptr() == address for module, attr, address in entry.samples)


def _capturable(unet: Any, x: Any, timesteps: Any, context: Any, y: Any, control: Any, transformer_options: dict,
                kwargs: dict, wrappers: list) -> bool:
    if not unet.__dict__.get(_READY) or unet.__dict__.get(_PLACEMENT) is None or control is not None or kwargs \
            or wrappers:
        return False
    if not (isinstance(x, torch.Tensor) and x.is_cuda and isinstance(timesteps, torch.Tensor)):
        return False
    if torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing():
        return False
    for name in ("patches", "patches_replace"):
        if transformer_options.get(name):
            return False
    return all(t is None or isinstance(t, torch.Tensor) and t.device == x.device for t in (context, y))


def _shapes(tensors: tuple) -> list:
    return [None if t is None else tuple(t.shape) for t in tensors]


def _key(tensors: tuple) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in tensors)


def forward_with_graphs(original: Any, unet: Any, x: Any, timesteps: Any = None, context: Any = None, y: Any = None,
                        control: Any = None, transformer_options: dict = {}, **kwargs: Any) -> Any:  # noqa: B006
    """``UNetModel.forward``: replay a graph when safe, else the original."""
    import comfy.patcher_extension as pe  # type: ignore[import-not-found]

    wrappers = pe.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL, transformer_options)
    inputs = (x, timesteps, context, y)
    entry: Any = None
    gate = gate_of(x.device) if isinstance(x, torch.Tensor) and x.is_cuda else None
    if gate is not None and _capturable(unet, x, timesteps, context, y, control, transformer_options, kwargs,
                                        wrappers):
        graphs: OrderedDict = unet.__dict__.setdefault(_GRAPHS, OrderedDict())
        key = (_key(inputs), unet.__dict__[_PLACEMENT])
        state = graphs.get(key)
        if state is None:  # first call with this key: eager, which also warms up kernels and allocator
            graphs[key] = _SEEN
        elif state is _SEEN:
            with gate.exclusive() as alone:
                if alone:  # else another worker captures on this GPU now: this step runs eagerly, capture later
                    entry = graphs[key] = _capture(original, unet, inputs, transformer_options) or _FAILED
                    _evict(graphs)
        elif isinstance(state, _Graph) and not _still_placed(state):
            log.warning("comfy-parallel: the UNet's weights moved without a load or un-patch; its graphs are "
                        "dropped and this step runs eagerly")
            drop_graphs(unet, ready=None)
            note_placement(unet)
        else:
            entry = state
            graphs.move_to_end(key)
    if not isinstance(entry, _Graph):
        STATS.add("eager")
        with gate.shared() if gate is not None else contextlib.nullcontext():
            return original(unet, x, timesteps, context, y, control, transformer_options, **kwargs)
    with gate.shared():  # type: ignore[union-attr]  # a graph exists only for CUDA inputs
        for static, value in zip(entry.inputs, inputs):
            if static is not None:
                static.copy_(value, non_blocking=True)
        entry.graph.replay()
        output = entry.output.clone()
    STATS.add("replays")
    return output


def _evict(graphs: OrderedDict) -> None:
    """Keep at most ``STATS.max_graphs`` graphs (and four times as many markers), least recently used out."""
    live = [k for k, v in graphs.items() if isinstance(v, _Graph)]
    for key in live[:max(0, len(live) - STATS.max_graphs)]:
        entry = graphs.pop(key)
        STATS.add("evictions", entry.worker)
        STATS.add("graphs", entry.worker, -1)
    markers = [k for k, v in graphs.items() if not isinstance(v, _Graph)]
    for key in markers[:max(0, len(markers) - 4 * STATS.max_graphs)]:
        del graphs[key]


def _capture(original: Any, unet: Any, inputs: tuple, transformer_options: dict) -> _Graph | None:
    x = inputs[0]
    graph = _Graph(_worker_index())
    graph.inputs = [None if t is None else t.clone() for t in inputs]
    stream = torch.cuda.Stream(device=x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    pool = _pool(x.device)
    try:
        with torch.cuda.stream(stream):
            # one eager pass on the capture stream: lazy initialisations must not happen inside the capture
            original(unet, *graph.inputs, None, dict(transformer_options))
        torch.cuda.current_stream(x.device).wait_stream(stream)
        with torch.cuda.graph(graph.graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            graph.output = original(unet, *graph.inputs, None, dict(transformer_options))
    except BaseException as err:  # this key stays eager; the step itself still runs (an interrupt goes on up)
        _abandon_pool(x.device, pool)
        if not isinstance(err, Exception):
            raise
        STATS.add("failures")
        log.warning("comfy-parallel: CUDA graph capture failed for input shapes %s (%s: %s); this shape runs "
                    "eagerly", _shapes(inputs), type(err).__name__, err)
        return None
    graph.samples = _samples(unet)
    STATS.add("captures", graph.worker)
    STATS.add("graphs", graph.worker)
    log.info("comfy-parallel: captured a CUDA graph of the UNet on %s for input shapes %s (%s)", x.device,
             _shapes(inputs), STATS.as_dict()["per_worker"].get(str(graph.worker)))
    return graph


def drop_graphs(unet: Any, ready: bool | None = False) -> None:
    """Forget the UNet's graphs (their pool memory goes back to the worker's pool) and say whether new ones may be
    captured (``None``: as before)."""
    graphs = unet.__dict__.pop(_GRAPHS, None) or {}
    for entry in graphs.values():
        if isinstance(entry, _Graph):
            STATS.add("graphs", entry.worker, -1)
    if ready is not None:
        unet.__dict__[_READY] = ready
    if not unet.__dict__.get(_READY):
        unet.__dict__[_PLACEMENT] = None


def _unet(patcher: Any) -> Any:
    return getattr(getattr(patcher, "model", None), "diffusion_model", None)


class CudaGraphs(Patch):
    name = "cuda-graphs"
    replaces = ("UNetModel.forward (SD1.x/SD2/SDXL UNet); ModelPatcher.load, unpatch_model, partially_unload "
                "(to drop graphs when weights move); PromptExecutor.execute (a capture waits for the other "
                "workers' prompts on its GPU)")
    why = ("a sampling step is bound by ~45-90 ms of host time per step with the GIL held, so threads driving "
           "several GPUs do not scale; replaying a captured graph costs under a millisecond of host time")
    checked_on = CHECKED

    def __init__(self, concurrent: bool = True, max_graphs: int = DEFAULT_MAX_GRAPHS) -> None:
        """``concurrent``: several workers may capture at the same time (multi-device mode); ``max_graphs``: the
        most graphs kept per UNet (per worker)."""
        super().__init__()
        self.concurrent = concurrent
        self.max_graphs = max_graphs

    def check(self, comfy: Comfy) -> str | None:
        problem = require_modules("comfy.ldm.modules.diffusionmodules.openaimodel", "comfy.model_patcher",
                                  "comfy.patcher_extension")
        if problem:
            return problem
        unet_mod = sys.modules["comfy.ldm.modules.diffusionmodules.openaimodel"]
        mp, pe = sys.modules["comfy.model_patcher"], sys.modules["comfy.patcher_extension"]
        if not hasattr(getattr(pe, "WrappersMP", None), "DIFFUSION_MODEL"):
            return "comfy.patcher_extension has no WrappersMP.DIFFUSION_MODEL"
        return first_problem(
            lambda: require_callables(mp.ModelPatcher, "load", "unpatch_model", "partially_unload"),
            lambda: require_callables(unet_mod.UNetModel, "forward"),
            lambda: require_callables(comfy.execution.PromptExecutor, "execute"),
            # forward_with_graphs receives and passes on these by position
            lambda: require_parameters(unet_mod.UNetModel.forward, "UNetModel.forward", "self", "x", "timesteps",
                                       "context", "y", "control", "transformer_options"),
            lambda: require_parameters(mp.ModelPatcher.unpatch_model, "ModelPatcher.unpatch_model", "self",
                                       "device_to", "unpatch_weights"),
        )

    def _apply(self, comfy: Comfy) -> None:
        STATS.max_graphs = self.max_graphs
        STATS.off_reason = allocator_problem(self.concurrent)
        if STATS.off_reason is not None:
            log.warning("comfy-parallel: CUDA graphs off: %s", STATS.off_reason)
            return
        unet_cls = sys.modules["comfy.ldm.modules.diffusionmodules.openaimodel"].UNetModel
        patcher_cls = sys.modules["comfy.model_patcher"].ModelPatcher
        original_forward = unet_cls.forward

        def forward(self_: Any, *args: Any, **kwargs: Any) -> Any:
            return forward_with_graphs(original_forward, self_, *args, **kwargs)

        original_load = patcher_cls.load

        def placed(unet: Any, on_cuda: bool) -> None:
            """After ComfyUI moved or (un)patched the weights: keep the graphs where they still fit the GPU copy."""
            if unet is None:
                return
            if on_cuda:
                unet.__dict__[_READY] = True
                note_placement(unet)
            else:
                drop_graphs(unet, ready=False)

        def load(self_: Any, device_to: Any = None, *args: Any, **kwargs: Any) -> Any:
            unet = _unet(self_)
            if unet is not None:
                unet.__dict__[_READY] = False  # no capture while the weights move
            result = original_load(self_, device_to, *args, **kwargs)
            placed(unet, not getattr(self_.model, "model_lowvram", True) and device_to is not None
                   and torch.device(device_to).type == "cuda" and not getattr(self_, "hook_patches", None))
            return result

        original_unpatch = patcher_cls.unpatch_model

        def unpatch_model(self_: Any, device_to: Any = None, unpatch_weights: bool = True) -> Any:
            # ComfyUI calls this with unpatch_weights=False before every prompt (partially_load): the weights stay
            # where they are, so the graphs stay valid unless an object patch inside the UNet is being undone.
            unet = _unet(self_)
            if unet is not None and not unpatch_weights and any(
                    str(k).startswith("diffusion_model.") for k in getattr(self_, "object_patches_backup", {})):
                drop_graphs(unet, ready=None)
            result = original_unpatch(self_, device_to, unpatch_weights)
            if unet is not None and unpatch_weights:
                device = device_to if device_to is not None else getattr(self_, "load_device", None)
                first = next(iter(unet.parameters()), None)
                placed(unet, unet.__dict__.get(_READY, False) and first is not None and first.is_cuda
                       and (device is None or torch.device(device).type == "cuda"))
            return result

        original_partially_unload = patcher_cls.partially_unload

        def partially_unload(self_: Any, *args: Any, **kwargs: Any) -> Any:
            unet = _unet(self_)
            if unet is not None:
                drop_graphs(unet)
            return original_partially_unload(self_, *args, **kwargs)

        self.log.replace(unet_cls, "forward", forward)
        # Weights move and prompts run while holding the worker's GPU, so a capture by another worker on that
        # GPU never overlaps them (device_gate.py says what broke).
        self.log.replace(patcher_cls, "load", held(load))
        self.log.replace(patcher_cls, "unpatch_model", held(unpatch_model))
        self.log.replace(patcher_cls, "partially_unload", held(partially_unload))
        executor = comfy.execution.PromptExecutor
        self.log.replace(executor, "execute", held(executor.execute))
