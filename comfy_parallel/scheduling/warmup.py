"""Optional model warm-up at start: each device loads a checkpoint and runs one tiny sampling step.

With ``--warmup-checkpoint NAME`` the first real prompt on a device finds the model loaded, its kernels chosen and
its allocator warm. Warm-up prompts go straight into each device's queue, are removed from history when they end,
and ``/ready`` answers 503 until every device has finished its own.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .queues import DeviceQueues

log = logging.getLogger("comfy_parallel.warmup")


def warmup_prompt(ckpt_name: str) -> tuple[dict, list[str]]:
    """A 64x64, one-step txt2img workflow and its output node ids."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "warm-up", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    return prompt, ["6"]


class Warmup:
    """Queues one warm-up prompt per device and tracks them; a queue listener."""

    def __init__(self, queues: "DeviceQueues", ckpt_name: str | None) -> None:
        self.queues = queues
        self.ckpt_name = ckpt_name
        self.pending: dict[str, tuple[int, float]] = {}
        self.lock = threading.Lock()

    def start(self) -> None:
        if not self.ckpt_name:
            return
        prompt, outputs = warmup_prompt(self.ckpt_name)
        for q in self.queues.devices:
            prompt_id = f"comfy-parallel-warmup-{q.index}-{uuid.uuid4().hex[:8]}"
            with self.lock:
                self.pending[prompt_id] = (q.index, time.monotonic())
            q.put((float("-inf"), prompt_id, prompt, {}, outputs, {}))
        log.info("comfy-parallel: warming up every device with %s", self.ckpt_name)

    @property
    def done(self) -> bool:
        with self.lock:
            return not self.pending

    def on_start(self, index: int, prompt_id: str, waited_s: float) -> None:
        pass

    def on_oom_retry(self, index: int) -> None:
        pass

    def on_done(self, index: int, prompt_id: str, status: dict | None, exec_s: float) -> None:
        with self.lock:
            entry = self.pending.pop(prompt_id, None)
        if entry is None:
            return
        self.queues.delete_history_item(prompt_id)
        outcome = (status or {}).get("status_str", "error")
        elapsed = time.monotonic() - entry[1]
        if outcome == "success":
            log.info("[GPU %d] model warm-up with %s done in %.2f s", index, self.ckpt_name, elapsed)
        else:
            log.error("[GPU %d] model warm-up with %s failed after %.2f s: %s", index, self.ckpt_name, elapsed,
                      (status or {}).get("messages"))
