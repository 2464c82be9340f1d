"""Import a ComfyUI checkout as a library, the way ``python main.py`` would start it."""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from types import ModuleType


def read_version(comfy_dir: str | Path) -> str:
    """ComfyUI's version from ``comfyui_version.py`` without importing anything."""
    path = Path(comfy_dir) / "comfyui_version.py"
    if not path.exists():
        return "unknown"
    m = re.search(r"__version__\s*=\s*[\"']([^\"']+)", path.read_text())
    return m.group(1) if m else "unknown"


def has_cli_flag(comfy_dir: str | Path, flag: str) -> bool:
    """Whether ComfyUI's command line knows ``flag`` (e.g. ``--disable-dynamic-vram``, 0.33+), without importing it.

    Read from ``comfy/cli_args.py``'s text: importing that module parses ``sys.argv`` at once, and the launcher
    must decide the flags it adds before ComfyUI (and torch) are imported.
    """
    path = Path(comfy_dir) / "comfy" / "cli_args.py"
    try:
        return re.search(rf"[\"']{re.escape(flag)}[\"']", path.read_text(errors="replace")) is not None
    except OSError:
        return False


def check_comfyui_dir(comfy_dir: str | Path) -> Path:
    path = Path(comfy_dir).expanduser().resolve()
    missing = [f for f in ("main.py", "server.py", "execution.py", "nodes.py") if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a ComfyUI folder (missing {', '.join(missing)}); "
                                "pass --comfyui DIR or set COMFYUI_DIR")
    return path


def load_comfyui(comfy_dir: str | Path, comfy_args: list[str]) -> ModuleType:
    """Import ComfyUI's ``main`` with ``comfy_args`` as its command line and return the module.

    Importing ``main`` parses the args, sets up logging, applies extra model paths and runs custom nodes'
    prestartup scripts; its ``if __name__ == "__main__"`` block does not run, so the parts of it that must
    happen before torch is imported are repeated here.
    """
    path = check_comfyui_dir(comfy_dir)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    sys.argv = [str(path / "main.py"), *comfy_args]
    import comfy.options  # type: ignore[import-not-found]

    comfy.options.enable_args_parsing()
    from comfy.cli_args import args  # type: ignore[import-not-found]

    # WARNING: mirrors main.py's __main__ block (0.3.75, 0.33.0): device selection and the allocator switch
    # only take effect before torch is first imported.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    cuda_device = getattr(args, "cuda_device", None)
    if cuda_device is not None and str(cuda_device) != "all":  # 0.38 reads --cuda-device all as "every GPU"
        os.environ["CUDA_VISIBLE_DEVICES"] = str(cuda_device)
    if getattr(args, "deterministic", False) and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    cuda_malloc = importlib.import_module("cuda_malloc") if "torch" not in sys.modules else None
    main = importlib.import_module("main")
    # main.py binds ``cuda_malloc`` in that block too, and cuda_malloc_warning() reads it on CUDA devices.
    if not hasattr(main, "cuda_malloc"):
        main.cuda_malloc = cuda_malloc or importlib.import_module("cuda_malloc")
    return main
