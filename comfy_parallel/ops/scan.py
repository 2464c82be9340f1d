"""Find device hard-coding in ComfyUI custom nodes (``comfy-parallel scan`` and the startup pass).

comfy-parallel runs one worker thread per GPU in one process; each worker calls ``torch.cuda.set_device(k)``,
so ``comfy.model_management.get_torch_device()`` and index-less ``'cuda'`` mean "this worker's GPU". Code that
names a GPU (``'cuda:0'``, ``.cuda(0)``, ``.to(0)``), changes the current device, rewrites
``CUDA_VISIBLE_DEVICES`` or caches the device at import time sends every worker's work to one GPU.

The scan reads the syntax tree (``ast``), never the text, so comments are invisible to it and docstrings (any
string statement on its own) are skipped. It only reads files; nothing is imported or run.

Decisions worth knowing:

* A string that is exactly ``cuda:N`` is reported wherever it appears as an expression: arguments, defaults,
  comparisons (``device == 'cuda:0'``), dict keys and subscripts (``stats['cuda:0']``), choice lists in
  ``INPUT_TYPES``. Each of them names one GPU whichever worker runs the code. Plain ``'cuda'`` is fine.
* ``.cuda()`` without an index is reported at ``info`` severity inside functions: it does reach the worker's
  GPU, but outside ComfyUI's memory management. At import time it is a ``warning`` (it lands on GPU 0).
* One mistake gives one finding: ``.to('cuda:1')`` and ``torch.device('cuda:0')`` are reported by
  ``cuda-index-literal`` only, ``torch.cuda.set_device('cuda:1')`` by ``set-device`` only.
* Our own package is skipped when it sits in the scanned tree (``install-node`` links or copies it there): it
  sets devices on purpose.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

__all__ = ["Finding", "RULES", "scan_source", "scan_tree", "format_findings", "add_parser", "run",
           "startup_report"]

GET_DEVICE = "comfy.model_management.get_torch_device()"

RULES: dict[str, str] = {
    "cuda-index-literal": "a 'cuda:N' string names one GPU",
    "torch-device-index": "torch.device('cuda', N) / torch.device(N) with a literal index",
    "dot-cuda": ".cuda() / .cuda(N) moves tensors or models outside ComfyUI's device choice",
    "to-int-device": ".to(N) / .to(device=N) with a literal GPU index",
    "set-device": "torch.cuda.set_device(...) changes the calling thread's GPU",
    "cuda-visible-devices-write": "writing CUDA_VISIBLE_DEVICES from a node (reading it is fine)",
    "current-device-at-import": "the current device read once at import time (module level, class body, "
                                "default argument, decorator)",
    "unparsable": "a file Python could not parse, so it was not scanned",
}

_CUDA_INDEX = re.compile(r"cuda:(\d+)")
_CVD = "CUDA_VISIBLE_DEVICES"
_GET_DEVICE_NAMES = frozenset({"comfy.model_management.get_torch_device", "model_management.get_torch_device",
                               "torch.cuda.current_device"})
_CVD_FIRST_ARG_CALLS = frozenset({"os.environ.setdefault", "os.environ.pop", "os.putenv", "os.unsetenv"})
_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules", "venv", "env"})
_OWN_PACKAGE = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Finding:
    """One place in a custom node that pins, moves or caches a device; ``col`` is 1-based (characters)."""

    path: str
    line: int
    col: int
    rule: str
    message: str  # what it breaks with one worker per GPU
    hint: str
    severity: str = "warning"  # "warning", or "info" for findings that are usually harmless per worker


def _int_literal(node: ast.AST | None) -> int | None:
    """The value of a literal int (not a bool), else None."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def _str_literal(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _collect_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted module path for every import in the file (scope is ignored: good enough here)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom):
            # Relative imports keep their dots, so ``from .torch import device`` never matches ``torch.device``.
            module = "." * node.level + (node.module or "")
            for alias in node.names:
                if alias.name != "*":
                    aliases[alias.asname or alias.name] = f"{module}.{alias.name}" if module else alias.name
    return aliases


class _Scanner(ast.NodeVisitor):
    """One pass over one module; ``import_ctx`` says whether the code being visited runs at import time."""

    def __init__(self, source: str, path: str, tree: ast.Module) -> None:
        self.path = path
        self.lines = re.split(r"\r\n|\r|\n", source)
        self.aliases = _collect_aliases(tree)
        self.findings: list[Finding] = []
        self.claimed: set[int] = set()  # ids of string constants already covered by another finding
        self.import_ctx: str | None = "module level"  # None: inside a function body

    # -- helpers ---------------------------------------------------------------------------------------------
    def qualname(self, node: ast.AST) -> str | None:
        """``t.cuda.set_device`` -> ``torch.cuda.set_device`` with ``import torch as t``; None if not a name."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.qualname(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def _col(self, lineno: int, byte_col: int) -> int:
        """ast columns are UTF-8 byte offsets; report 1-based character columns like other linters."""
        try:
            return len(self.lines[lineno - 1].encode("utf-8")[:byte_col].decode("utf-8", "ignore")) + 1
        except IndexError:
            return byte_col + 1

    def add(self, lineno: int, byte_col: int, rule: str, message: str, hint: str, severity: str = "warning") -> None:
        self.findings.append(Finding(self.path, lineno, self._col(lineno, byte_col), rule, message, hint, severity))

    def add_at(self, node: ast.AST, rule: str, message: str, hint: str, severity: str = "warning") -> None:
        self.add(node.lineno, node.col_offset, rule, message, hint, severity)  # type: ignore[attr-defined]

    def add_at_attr(self, func: ast.Attribute, rule: str, message: str, hint: str, severity: str = "warning") -> None:
        """Point at ``.cuda`` / ``.to`` itself, which matters in multi-line method chains."""
        end_line, end_col = func.end_lineno, func.end_col_offset
        if end_line is None or end_col is None:
            self.add_at(func, rule, message, hint, severity)
        else:
            self.add(end_line, max(end_col - len(func.attr), 0), rule, message, hint, severity)

    # -- scopes: what runs at import time --------------------------------------------------------------------
    def _visit_arguments_outside(self, args: ast.arguments) -> None:
        """Defaults and annotations are evaluated where the function is defined, not when it runs."""
        saved = self.import_ctx
        if saved is not None:
            self.import_ctx = "default argument"
        for default in [*args.defaults, *args.kw_defaults]:
            if default is not None:
                self.visit(default)
        self.import_ctx = saved
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None and arg.annotation is not None:
                self.visit(arg.annotation)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        saved = self.import_ctx
        if saved is not None:
            self.import_ctx = "decorator"
        for decorator in node.decorator_list:
            self.visit(decorator)
        self.import_ctx = saved
        self._visit_arguments_outside(node.args)
        if node.returns is not None:
            self.visit(node.returns)
        self.import_ctx = None
        for stmt in node.body:
            self.visit(stmt)
        self.import_ctx = saved

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_arguments_outside(node.args)
        saved, self.import_ctx = self.import_ctx, None
        self.visit(node.body)
        self.import_ctx = saved

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        saved = self.import_ctx
        for child in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(child)
        if saved is not None:
            self.import_ctx = "class body"
        for stmt in node.body:
            self.visit(stmt)
        self.import_ctx = saved

    def visit_Expr(self, node: ast.Expr) -> None:
        # A string statement on its own (module/class/function docstring, attribute docstring) does nothing.
        if _str_literal(node.value) is None:
            self.generic_visit(node)

    # -- rules -----------------------------------------------------------------------------------------------
    def visit_Constant(self, node: ast.Constant) -> None:
        text = _str_literal(node)
        if text is None or id(node) in self.claimed:
            return
        match = _CUDA_INDEX.fullmatch(text)
        if match:
            n = match.group(1)
            self.add_at(node, "cuda-index-literal",
                        f"'{text}' pins work to GPU {n} whichever worker runs the node",
                        f"use {GET_DEVICE}, the running worker's GPU, or 'cuda' without an index")

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if (isinstance(node.ctx, (ast.Store, ast.Del)) and _str_literal(node.slice) == _CVD
                and self.qualname(node.value) == "os.environ"):
            self._cvd_write(node)
        self.generic_visit(node)

    def _cvd_write(self, node: ast.AST) -> None:
        self.add_at(node, "cuda-visible-devices-write",
                    "CUDA_VISIBLE_DEVICES is process-wide and read once when CUDA starts: writing it hides GPUs "
                    "from every worker, or does nothing after CUDA has started",
                    "remove the write; choose GPUs with `comfy-parallel serve --devices`")

    def visit_Call(self, node: ast.Call) -> None:
        name = self.qualname(node.func)
        if name == "torch.cuda.set_device":
            for arg in [*node.args, *(kw.value for kw in node.keywords)]:
                self.claimed.update(id(c) for c in ast.walk(arg) if isinstance(c, ast.Constant))
            self.add_at(node, "set-device",
                        "changes the calling thread's current GPU: a worker's later work runs on that GPU, and at "
                        "import it changes the main thread's device",
                        f"remove it; for a scoped switch use `with torch.cuda.device(d):` with d = {GET_DEVICE}")
        elif name == "torch.device":
            self._torch_device(node)
        elif name in _GET_DEVICE_NAMES and self.import_ctx is not None:
            self.add_at(node, "current-device-at-import",
                        f"{name}() runs once at import ({self.import_ctx}) on the main thread, so every worker "
                        "uses that one cached device (GPU 0)",
                        "call it inside the function that does the work: each worker thread gets its own GPU")
        elif name == "os.environ.update":
            if any(isinstance(a, ast.Dict) and any(_str_literal(k) == _CVD for k in a.keys) for a in node.args) \
                    or _keyword(node, _CVD) is not None:
                self._cvd_write(node)
        elif name in _CVD_FIRST_ARG_CALLS:
            if node.args and _str_literal(node.args[0]) == _CVD:
                self._cvd_write(node)
        if isinstance(node.func, ast.Attribute):
            if node.func.attr == "cuda":
                self._dot_cuda(node, node.func)
            elif node.func.attr == "to":
                self._dot_to(node, node.func)
        self.generic_visit(node)

    def _torch_device(self, node: ast.Call) -> None:
        dev_type = node.args[0] if node.args else _keyword(node, "type")
        index = node.args[1] if len(node.args) > 1 else _keyword(node, "index")
        if index is None and _int_literal(dev_type) is not None:  # torch.device(1) means cuda:1
            index, dev_type = dev_type, None
        n = _int_literal(index)
        type_name = _str_literal(dev_type)
        if n is not None and (type_name is None or type_name == "cuda"):
            self.add_at(node, "torch-device-index", f"pins work to GPU {n} whichever worker runs the node",
                        f"use {GET_DEVICE}, or torch.device('cuda') without an index")

    def _dot_cuda(self, node: ast.Call, func: ast.Attribute) -> None:
        device = node.args[0] if node.args else _keyword(node, "device")
        n = _int_literal(device)
        hint = f"use .to({GET_DEVICE}), or let ComfyUI's ModelPatcher load the model"
        if n is not None:
            self.add_at_attr(func, "dot-cuda", f".cuda({n}) pins work to GPU {n} whichever worker runs the node",
                             hint)
        elif device is None and self.import_ctx is not None:
            self.add_at_attr(func, "dot-cuda",
                             f".cuda() runs once at import ({self.import_ctx}) on the main thread, so it lands on "
                             "GPU 0 for every worker, outside ComfyUI's memory management", hint)
        elif device is None:
            self.add_at_attr(func, "dot-cuda",
                             ".cuda() reaches the worker's GPU but bypasses ComfyUI's memory management (no "
                             "offload, not counted when it plans VRAM)", hint, severity="info")

    def _dot_to(self, node: ast.Call, func: ast.Attribute) -> None:
        n = _int_literal(node.args[0] if node.args else _keyword(node, "device"))
        if n is not None:
            self.add_at_attr(func, "to-int-device", f".to({n}) pins work to GPU {n} whichever worker runs the node",
                             f"use .to({GET_DEVICE})")


def scan_source(source: str, path: str) -> list[Finding]:
    """Findings for one file's text; a file that does not parse gives one ``unparsable`` finding (info)."""
    try:
        with warnings.catch_warnings():  # invalid escape sequences etc. are the node author's business
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        line = getattr(err, "lineno", None) or 1
        col = getattr(err, "offset", None) or 1
        reason = getattr(err, "msg", None) or str(err) or type(err).__name__
        return [Finding(path, line, col, "unparsable", f"not scanned: Python could not parse it ({reason})",
                        f"check it with `python -m py_compile {path}`; ComfyUI cannot import it either, "
                        "unless it needs a newer Python", severity="info")]
    scanner = _Scanner(source, path, tree)
    scanner.visit(tree)
    return sorted(scanner.findings, key=lambda f: (f.line, f.col, f.rule))


def _is_own_package(path: Path) -> bool:
    """comfy-parallel itself, linked or copied into custom_nodes by ``install-node``."""
    try:
        if path.resolve() == _OWN_PACKAGE:
            return True
    except OSError:
        return False
    return (path.name == "comfy_parallel" and (path / "ops" / "scan.py").is_file()
            and (path / "scheduling" / "worker_context.py").is_file())


def _skip_dir(path: Path) -> bool:
    name = path.name
    return (name.startswith(".") or name in _SKIP_DIRS or name.endswith(".disabled")
            or (path / "pyvenv.cfg").exists() or _is_own_package(path))


def _python_files(root: Path) -> Iterator[Path]:
    """``*.py`` under root, following symlinked node packs but never the same real folder twice."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(here / d))
        for name in sorted(filenames):
            if name.endswith(".py") and (here / name).is_file():
                yield here / name


def _read_source(path: Path) -> str:
    """Decode like Python does (PEP 263 coding cookie, UTF-8 default)."""
    return importlib.util.decode_source(path.read_bytes())


def scan_tree(root: Path) -> list[Finding]:
    """Scan every ``*.py`` under root (or root itself if it is a file), skipping caches, VCS and venv folders."""
    root = Path(root)
    files: Iterable[Path] = [root] if root.is_file() else _python_files(root)
    findings: list[Finding] = []
    for file in files:
        try:
            source = _read_source(file)
        except (OSError, UnicodeDecodeError, SyntaxError) as err:
            findings.append(Finding(str(file), 1, 1, "unparsable", f"not scanned: could not read it ({err})",
                                    "check the file's encoding and permissions", severity="info"))
            continue
        findings.extend(scan_source(source, str(file)))
    return sorted(findings, key=lambda f: (f.path, f.line, f.col, f.rule))


def format_line(f: Finding) -> str:
    return f"{f.path}:{f.line}:{f.col}: {f.rule}: {f.message} (hint: {f.hint})"


def _summary(findings: Sequence[Finding]) -> str:
    if not findings:
        return "no device hard-coding found"
    files = len({f.path for f in findings})
    counts = ", ".join(f"{rule}: {n}" for rule, n in sorted(Counter(f.rule for f in findings).items()))
    return f"{len(findings)} finding(s) in {files} file(s) ({counts})"


def format_findings(findings: Sequence[Finding]) -> str:
    """One ``path:line:col: rule: message (hint: ...)`` line per finding, then a summary line."""
    return "\n".join([*(format_line(f) for f in findings), _summary(findings)])


SCAN_EPILOG = "rules:\n" + "\n".join(f"  {rule:28} {text}" for rule, text in RULES.items()) + """

Comments and docstrings are never reported; the files are parsed, not imported.
exit status: 0 nothing found, 1 findings, 2 bad folder.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``scan``; the caller dispatches ``args.command == "scan"`` to :func:`run`."""
    p = subparsers.add_parser("scan", help="find device hard-coding in custom nodes",
                              description="Find code in ComfyUI custom nodes that pins work to one GPU, which "
                                          "breaks one-worker-per-GPU serving.",
                              epilog=SCAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("custom_nodes_dir", nargs="?", metavar="CUSTOM_NODES_DIR",
                   help="folder (or single .py file) to scan (default: <ComfyUI>/custom_nodes)")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder whose custom_nodes to scan (default: $COMFYUI_DIR)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")


def _target(args: argparse.Namespace) -> Path | None:
    given = getattr(args, "custom_nodes_dir", None)
    if given:
        return Path(given).expanduser()
    comfy = getattr(args, "comfyui", None) or os.environ.get("COMFYUI_DIR")
    return Path(comfy).expanduser() / "custom_nodes" if comfy else None


def run(args: argparse.Namespace) -> int:
    """``comfy-parallel scan``: 0 nothing found, 1 findings, 2 no such folder."""
    target = _target(args)
    if target is None:
        print("comfy-parallel scan: give CUSTOM_NODES_DIR, --comfyui DIR or set COMFYUI_DIR", file=sys.stderr)
        return 2
    if not target.exists():
        print(f"comfy-parallel scan: {target} does not exist", file=sys.stderr)
        return 2
    findings = scan_tree(target)
    if getattr(args, "json", False):
        print(json.dumps({"root": str(target), "count": len(findings), "findings": [asdict(f) for f in findings]},
                         indent=2))
    else:
        print(format_findings(findings))
    return 1 if findings else 0


def startup_report(dirs: list[Path], log: logging.Logger) -> int:
    """Log each finding as a WARNING at startup and return how many; never raises (a scan must not stop serving)."""
    count = 0
    try:
        seen: set[str] = set()
        scanned: list[str] = []
        for d in dirs:
            try:
                d = Path(d)
                real = os.path.realpath(d)
                if real in seen or not d.exists():
                    continue
                seen.add(real)
                findings = scan_tree(d)
                scanned.append(str(d))
            except Exception as err:  # noqa: BLE001 - a broken folder must not stop the server
                log.warning("comfy-parallel scan: could not scan %s: %s", d, err)
                continue
            for f in findings:
                log.warning("comfy-parallel scan: %s", format_line(f))
            count += len(findings)
        if scanned:
            suffix = "; run `comfy-parallel scan` for details" if count else ""
            log.info("comfy-parallel scan: %s finding(s) under %s%s", count, ", ".join(scanned), suffix)
    except Exception as err:  # noqa: BLE001
        try:
            log.warning("comfy-parallel scan: failed: %s", err)
        except Exception:  # noqa: BLE001 - even a broken logger must not stop the server
            pass
    return count
