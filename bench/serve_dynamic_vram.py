"""``comfy-parallel serve`` with its DynamicVRAM guard switched off: a measurement tool, not a way to run it.

comfy-parallel starts ComfyUI 0.33 with ``--disable-dynamic-vram`` when it has several CUDA workers and refuses
to patch a ComfyUI running DynamicVRAM (cli.classic_vram, activation's dynamic_vram_problem check). The GPU check
needs the same code with DynamicVRAM left on, to measure whether DynamicVRAM is what breaks two workers; this
wrapper turns those two checks off in its own process only and then runs ``serve`` unchanged.

usage: python bench/serve_dynamic_vram.py [serve options] -- [ComfyUI options]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comfy_parallel import activation, cli  # noqa: E402


def keep_comfy_args(settings: object, comfy_dir: Path, comfy_args: list[str]) -> tuple[list[str], str | None]:
    """cli.classic_vram's signature, adding nothing: ComfyUI keeps its default (DynamicVRAM on CUDA)."""
    return comfy_args, "bench/serve_dynamic_vram.py: DynamicVRAM left as ComfyUI chooses (guard off, measurement only)"


def no_problem() -> str | None:
    return None


if __name__ == "__main__":
    cli.classic_vram = keep_comfy_args
    activation.dynamic_vram_problem = no_problem
    raise SystemExit(cli.main(["serve", *sys.argv[1:]]))
