"""comfy-parallel: one ComfyUI process, one prompt queue and one worker per GPU.

Also a ComfyUI custom node: put this folder (or a link to it) into ``custom_nodes/`` and start ComfyUI with
``COMFY_MULTI_GPU_SCHED=1 COMFY_NUM_GPUS=N``. With the switch off (the default) nothing is patched.
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"

# ComfyUI's custom-node loader looks for these; comfy-parallel adds no nodes.
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


def _loaded_as_custom_node() -> bool:
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None) is not None


if _loaded_as_custom_node():
    from .dropin import activate_from_env

    activate_from_env()
