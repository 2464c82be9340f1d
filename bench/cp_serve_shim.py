"""``comfy-parallel`` with one bench-only workaround, for bench/gpu_check.py's ``parallel-shim`` server.

Bug (comfy_parallel/comfy_adapter/loader.py, found by the GPU check on an H100): ``load_comfyui`` imports the
``cuda_malloc`` module itself, but main.py's ``__main__`` block is what binds the name ``cuda_malloc`` in main's
globals. ``main.start_comfyui()`` calls ``cuda_malloc_warning()``, which reads ``cuda_malloc.blacklist`` whenever the
torch device name holds "cudaMallocAsync" (every CUDA device with the default allocator), so ``serve`` dies with
``NameError: name 'cuda_malloc' is not defined`` on CUDA; on CPU that branch never runs. The shim binds the name
after the import, then runs the real CLI unchanged. Remove it once the loader does this itself.

usage: python bench/cp_serve_shim.py serve ...   (same arguments as ``python -m comfy_parallel``)
"""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import comfy_parallel.comfy_adapter as adapter  # noqa: E402
from comfy_parallel import cli  # noqa: E402

_load = adapter.load_comfyui


def load_comfyui(comfy_dir, comfy_args):  # type: ignore[no-untyped-def]
    main = _load(comfy_dir, comfy_args)
    if not hasattr(main, "cuda_malloc"):
        main.cuda_malloc = sys.modules.get("cuda_malloc") or importlib.import_module("cuda_malloc")
        print("cp_serve_shim: bound main.cuda_malloc (loader bug workaround)", file=sys.stderr, flush=True)
    return main


adapter.load_comfyui = load_comfyui  # cli.cmd_serve imports it from comfy_parallel.comfy_adapter at call time
raise SystemExit(cli.main())
