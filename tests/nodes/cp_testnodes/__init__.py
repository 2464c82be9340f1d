"""Small ComfyUI nodes the tests install: they sleep, report progress, record where they ran, or fail; they hold
a worker until a test opens a gate, keep the GIL (CPSpin), and stand for models (load costs) and text encodes (the
executor cache)."""

from __future__ import annotations

import threading
import time

import comfy.model_management
import comfy.utils


def _record(tag: str, started: float) -> dict:
    return {
        "tag": tag,
        "thread": threading.current_thread().name,
        "device": str(comfy.model_management.get_torch_device()),
        "start": started,
        "end": time.time(),
    }


class _OutputNode:
    """An output node that runs every time (never served from ComfyUI's cache)."""

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "comfy_parallel_tests"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")


class CPSleep(_OutputNode):
    """Sleep ``seconds`` in ``steps`` slices, reporting progress and honouring interrupts; record the run."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seconds": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 600.0, "step": 0.01}),
            "steps": ("INT", {"default": 5, "min": 1, "max": 10000}),
            "tag": ("STRING", {"default": ""}),
        }}

    def run(self, seconds: float, steps: int, tag: str):
        started = time.time()
        bar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(seconds / steps)
            bar.update(1)
        comfy.model_management.throw_exception_if_processing_interrupted()
        return {"ui": {"record": [_record(tag, started)]}}


class CPSpin(_OutputNode):
    """Run Python for ``seconds`` without giving up the GIL, as a sampling loop's launch code does between kernels
    (bench/http_under_gil_load.py: how long the HTTP side then waits for the GIL)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seconds": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 60.0, "step": 0.01}),
            "tag": ("STRING", {"default": ""}),
        }}

    def run(self, seconds: float, tag: str):
        started = time.time()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            sum(range(1000))
        return {"ui": {"record": [_record(tag, started)]}}


class CPFail(_OutputNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"message": ("STRING", {"default": "boom"})}}

    def run(self, message: str):
        raise RuntimeError(message)


class CPOOM(_OutputNode):
    """Raise CUDA out-of-memory on the first ``times`` runs of ``tag`` (OOM injection on CPU workers)."""

    runs: dict[str, int] = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"times": ("INT", {"default": 1, "min": 0, "max": 100}), "tag": ("STRING", {})}}

    def run(self, times: int, tag: str):
        import torch

        started = time.time()
        n = self.runs[tag] = self.runs.get(tag, 0) + 1
        if n <= times:
            raise torch.cuda.OutOfMemoryError(f"injected out of memory ({n}/{times}) for {tag}")
        return {"ui": {"record": [_record(tag, started)]}}


class WorkerCrash(BaseException):
    """Not an Exception: ComfyUI's executor does not catch it, so it ends the worker's loop."""


class CPCrash(_OutputNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {})}}

    def run(self, tag: str):
        raise WorkerCrash(f"injected worker crash {tag}")


class CPAbort(_OutputNode):
    """``os.abort()``: a native crash of the whole process, as a segfaulting extension or a CUDA ``terminate``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {})}}

    def run(self, tag: str):
        import os
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the test run's folder
        os.abort()


class CPBigOutput(_OutputNode):
    """Emit ``kilobytes`` KB of incompressible text in its ``ui`` output: a large websocket ``executed`` message."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kilobytes": ("INT", {"default": 256, "min": 1, "max": 65536}),
                             "tag": ("STRING", {"default": ""})}}

    def run(self, kilobytes: int, tag: str):
        import base64
        import os

        started = time.time()
        blob = base64.b64encode(os.urandom(kilobytes * 768)).decode()
        return {"ui": {"record": [_record(tag, started)], "blob": [blob]}}


_gates: dict[str, threading.Event] = {}
_gates_lock = threading.Lock()


def _gate(tag: str) -> threading.Event:
    with _gates_lock:
        return _gates.setdefault(tag, threading.Event())


def _wait_gate(tag: str, timeout: float) -> bool:
    """Wait until ``GET /cp_test/release?tag=...`` opens the gate (or it was opened before); honours interrupts."""
    gate = _gate(tag)
    deadline = time.time() + timeout
    while not gate.wait(0.02):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if time.time() > deadline:
            return False
    return True


class CPGate(_OutputNode):
    """Hold the worker until the test opens the gate ``tag``: a test decides when a worker becomes idle."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": ""}),
                             "timeout": ("FLOAT", {"default": 60.0, "min": 0.0, "max": 600.0})},
                "optional": {"text": ("STRING", {"forceInput": True})}}

    def run(self, tag: str, timeout: float, text: str | None = None):
        started = time.time()
        opened = _wait_gate(tag, timeout)
        return {"ui": {"record": [{**_record(tag, started), "opened": opened, "text": text}]}}


# What each worker thread "holds in VRAM" for CPModel: one model at a time, as on a card that fits one.
_resident: dict[str, str] = {}


class CPModel(_OutputNode):
    """Stands for a checkpoint and its load cost: a worker that does not hold ``ckpt_name`` (one model per
    worker) spends ``load_seconds`` loading it. Then waits on gate ``gate`` if one is named."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),),
                             "load_seconds": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 60.0}),
                             "gate": ("STRING", {"default": ""}),
                             "tag": ("STRING", {"default": ""})}}

    def run(self, ckpt_name: str, load_seconds: float, gate: str, tag: str):
        started = time.time()
        slot = threading.current_thread().name
        loaded = _resident.get(slot) != ckpt_name
        if loaded:
            _resident.pop(slot, None)
            deadline = time.time() + load_seconds
            while time.time() < deadline:
                comfy.model_management.throw_exception_if_processing_interrupted()
                time.sleep(min(0.02, max(0.0, deadline - time.time())))
            _resident[slot] = ckpt_name
        opened = _wait_gate(gate, 60.0) if gate else True
        return {"ui": {"record": [{**_record(tag, started), "model": ckpt_name, "loaded": loaded, "opened": opened}]}}


_encodes: dict[str, int] = {}


class CPText:
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = "comfy_parallel_tests"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""})}}

    def run(self, text: str):
        return (text,)


class CPEncode:
    """Stands for a text encode: cacheable, reads another node's output, counts its real runs per text."""

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = "comfy_parallel_tests"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True}),
                             "seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 60.0})}}

    def run(self, text: str, seconds: float):
        _encodes[text] = _encodes.get(text, 0) + 1
        time.sleep(seconds)
        return (f"encoded({text})",)


NODE_CLASS_MAPPINGS = {"CPSleep": CPSleep, "CPFail": CPFail, "CPOOM": CPOOM, "CPCrash": CPCrash}
NODE_CLASS_MAPPINGS["CPBigOutput"] = CPBigOutput
NODE_CLASS_MAPPINGS["CPAbort"] = CPAbort
NODE_CLASS_MAPPINGS.update(CPGate=CPGate, CPModel=CPModel, CPText=CPText, CPEncode=CPEncode, CPSpin=CPSpin)
NODE_DISPLAY_NAME_MAPPINGS = {name: f"{name} (comfy-parallel tests)" for name in NODE_CLASS_MAPPINGS}


def _count_file_loads() -> None:
    """Count ComfyUI's reads of model files per path (``GET /cp_test/load_counts``) and hash the shared host
    copies (``GET /cp_test/host_digest``): how the shared-weights tests see disk reads and host writes."""
    import hashlib
    from collections import Counter

    import server
    import torch
    from aiohttp import web

    counts: Counter = Counter()
    original = comfy.utils.load_torch_file

    def load_torch_file(ckpt, *args, **kwargs):
        counts[str(ckpt)] += 1
        return original(ckpt, *args, **kwargs)

    comfy.utils.load_torch_file = load_torch_file

    @server.PromptServer.instance.routes.get("/cp_test/load_counts")
    async def load_counts(request):
        return web.json_response(dict(counts))

    @server.PromptServer.instance.routes.get("/cp_test/release")
    async def release(request):
        _gate(request.query["tag"]).set()
        return web.json_response({"released": request.query["tag"]})

    @server.PromptServer.instance.routes.get("/cp_test/encodes")
    async def encodes(request):
        return web.json_response(dict(_encodes))

    @server.PromptServer.instance.routes.get("/cp_test/host_digest")
    async def host_digest(request):
        from comfy_parallel.comfy_adapter import active
        from comfy_parallel.weights import store as weights

        adapter = active()
        stores = [p.store for p in (adapter.patches if adapter else []) if hasattr(p, "store")]
        digests = {}
        for entry in (stores[0].entries() if stores else []):
            h = hashlib.blake2b(digest_size=16)
            for module in _host_modules(entry):
                for t in weights.module_tensors(module):
                    h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            digests[entry.label] = h.hexdigest()
        return web.json_response(digests)


def _host_modules(entry):
    from comfy_parallel.comfy_adapter.shared_weights import host_modules
    from comfy_parallel.weights.store import tensor_bag

    return host_modules(entry.host) if not isinstance(entry.host, dict) else [tensor_bag(entry.host)]


_count_file_loads()
