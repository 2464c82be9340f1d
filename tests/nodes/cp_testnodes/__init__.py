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


class CPSleep:
    """Sleep ``seconds`` in ``steps`` slices, reporting progress and honouring interrupts; record the run."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seconds": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 600.0, "step": 0.01}),
            "steps": ("INT", {"default": 5, "min": 1, "max": 10000}),
            "tag": ("STRING", {"default": ""}),
        }}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "comfy_parallel_tests"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def run(self, seconds: float, steps: int, tag: str):
        started = time.time()
        bar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(seconds / steps)
            bar.update(1)
        comfy.model_management.throw_exception_if_processing_interrupted()
        return {"ui": {"record": [_record(tag, started)]}}


class CPFail:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"message": ("STRING", {"default": "boom"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "comfy_parallel_tests"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def run(self, message: str):
        raise RuntimeError(message)


NODE_CLASS_MAPPINGS = {"CPSleep": CPSleep, "CPFail": CPFail}
NODE_DISPLAY_NAME_MAPPINGS = {"CPSleep": "Sleep (comfy-parallel tests)", "CPFail": "Fail (comfy-parallel tests)"}
