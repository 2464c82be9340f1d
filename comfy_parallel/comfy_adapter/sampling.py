"""Patch of how ComfyUI draws noise (``comfy.sample``): the same seed gives the same noise in every worker."""

from __future__ import annotations

import sys
from typing import Any

from ..scheduling import worker_context
from .base import CHECKED, Comfy, Patch, require_modules, uses


class SeededGeneratorPerCall(Patch):
    name = "seeded-generator-per-call"
    replaces = "torch.manual_seed, as ComfyUI uses it for noise (comfy.sample.prepare_noise, comfy.samplers, ...)"
    why = ("torch.manual_seed(seed) seeds and returns the process-wide CPU generator; two workers seeding and "
           "drawing at once interleave their draws, so the same seed gave different images. In a worker it "
           "still seeds as before but returns a private generator seeded alike, so the noise equals stock's")
    checked_on = CHECKED

    def check(self, comfy: Comfy) -> str | None:
        return require_modules("comfy.sample") or uses(sys.modules["comfy.sample"].prepare_noise, "manual_seed")

    def _apply(self, comfy: Comfy) -> None:
        import torch

        original = torch.manual_seed

        def manual_seed(seed: int) -> Any:
            generator = original(seed)
            if worker_context.current() is None:
                return generator
            return torch.Generator().manual_seed(int(seed))

        manual_seed.__wrapped__ = original  # type: ignore[attr-defined]
        self.log.replace(torch, "manual_seed", manual_seed)
