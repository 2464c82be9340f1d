"""Small ComfyUI nodes the tests install: they sleep, report progress, record where they ran, or fail."""

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


NODE_CLASS_MAPPINGS = {"CPSleep": CPSleep, "CPFail": CPFail, "CPOOM": CPOOM, "CPCrash": CPCrash}
NODE_DISPLAY_NAME_MAPPINGS = {name: f"{name} (comfy-parallel tests)" for name in NODE_CLASS_MAPPINGS}
