"""Patch of ComfyUI's switch between weight-patch sets (``ModelPatcher.partially_load``): in place on the GPU."""

from __future__ import annotations

import sys
from typing import Any

from .base import CHECKED, Comfy, Patch, first_problem, require_modules, require_parameters, uses


def on_device(device_to: Any) -> bool:
    """Is this a load onto a GPU (where the weights are the worker's own copy, and moves cost PCIe)?"""
    import torch  # not at import: the launcher imports the adapter before ComfyUI sets up torch

    return device_to is not None and torch.device(device_to).type == "cuda"


class PatchSwitchInPlace(Patch):
    name = "patch-switch-in-place"
    replaces = "comfy.model_patcher.ModelPatcher.partially_load (the classic patcher; 0.33's dynamic one is left)"
    why = ("When a worker went from a model to its LoRA clone or back, ComfyUI un-patched with "
           "unpatch_model(offload_device), which moves the whole model to the CPU, and loaded it back (its own "
           "TODO says it should not), and a LoRA patch put new tensors in place of the weights it changed. So the "
           "weights never kept their addresses and every CUDA graph of the model was lost at each switch (soak on "
           "two H200s: ~45 captures a minute, GPU memory +22%), and the model crossed PCIe twice per switch. On a "
           "CUDA device a fully loaded model now gets its backed-up weights put back where it is, and patches are "
           "written into the weights' own memory (ComfyUI's weight_inplace_update; the backup is a host copy of "
           "the patched keys only): the same values, the same patch arithmetic, no round trip, stable addresses")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        problem = require_modules("comfy.model_patcher")
        if problem:
            return problem
        cls = sys.modules["comfy.model_patcher"].ModelPatcher
        return first_problem(
            lambda: require_parameters(cls.partially_load, "ModelPatcher.partially_load", "self", "device_to",
                                       "extra_memory", "force_patch_weights"),
            lambda: require_parameters(cls.unpatch_model, "ModelPatcher.unpatch_model", "self", "device_to",
                                       "unpatch_weights"),
            # the switch it replaces: an un-patch to the offload device when the patch set differs ...
            lambda: uses(cls.partially_load, "current_weight_patches_uuid", "patches_uuid", "unpatch_model",
                         "model_loaded_weight_memory"),
            # ... what an un-patch in place must reset for ComfyUI's load to patch again ...
            lambda: uses(cls.unpatch_model, "backup", "current_weight_patches_uuid", "model_loaded_weight_memory",
                         "copy_to_param"),
            # ... and the in-place write of a patched weight, with its backup, that it turns on
            lambda: uses(cls.patch_weight_to_device, "weight_inplace_update", "backup", "copy_to_param"),
        )

    def _apply(self, comfy: Comfy) -> None:
        cls = sys.modules["comfy.model_patcher"].ModelPatcher
        _module = sys.modules[__name__]  # on_device looked up per call: a CPU test can stand a device in
        original = cls.partially_load

        def partially_load(self_: Any, device_to: Any, extra_memory: int = 0, force_patch_weights: bool = False,
                           *args: Any, **kwargs: Any) -> Any:
            model = self_.model
            if not _module.on_device(device_to):
                return original(self_, device_to, extra_memory, force_patch_weights, *args, **kwargs)
            self_.weight_inplace_update = True
            current = getattr(model, "current_weight_patches_uuid", None)
            if (current is not None and current != self_.patches_uuid and not force_patch_weights
                    and not getattr(model, "model_lowvram", True) and model.model_loaded_weight_memory > 0):
                used = model.model_loaded_weight_memory
                self_.unpatch_model(None, unpatch_weights=True)  # the backups go back in place; nothing moves
                extra_memory += used  # as ComfyUI counts it after its own un-patch
            return original(self_, device_to, extra_memory, force_patch_weights, *args, **kwargs)

        partially_load.__wrapped__ = original  # type: ignore[attr-defined]
        self.log.replace(cls, "partially_load", partially_load)
