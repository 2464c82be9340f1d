"""Explicit, idempotent, reversible patches (in the manner of sentry-sdk integrations and gevent's monkey).

A :class:`Patch` names what it replaces, why, and the ComfyUI versions it was checked against. ``check`` looks
for the patch point without changing anything; ``apply`` records every replacement in a :class:`PatchLog` so
that ``undo`` puts the originals back exactly. Applying twice is a no-op.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

_MISSING = object()

# The ComfyUI versions every patch was checked on: the versions `make test` runs (CI). Another version starts in
# multi-device mode only if every check passes and the user asks for it (--allow-unchecked-comfyui).
CHECKED = ("0.3.75", "0.33.0")


class AdapterError(RuntimeError):
    """ComfyUI does not offer a patch point we need; the message lists which patches failed and why."""


@dataclass
class Replacement:
    owner: Any
    attr: str
    original: Any


@dataclass
class PatchLog:
    replacements: list[Replacement] = field(default_factory=list)

    def replace(self, owner: Any, attr: str, new: Any) -> Any:
        """Set ``owner.attr = new`` and remember what was there (``_MISSING`` if nothing was)."""
        original = owner.__dict__.get(attr, _MISSING) if isinstance(owner, type) else getattr(owner, attr, _MISSING)
        self.replacements.append(Replacement(owner, attr, original))
        setattr(owner, attr, new)
        return None if original is _MISSING else original

    def replace_everywhere(self, module: ModuleType, attr: str, new: Any) -> Any:
        """Replace a module-level function in its module and in every module that imported it by name."""
        original = getattr(module, attr)
        for mod in list(sys.modules.values()):
            if not isinstance(mod, ModuleType):
                continue
            try:
                namespace = vars(mod)
            except TypeError:
                continue
            for name, value in list(namespace.items()):
                if value is original:
                    self.replace(mod, name, new)
        return original

    def undo(self) -> None:
        for rep in reversed(self.replacements):
            if rep.original is _MISSING:
                try:
                    delattr(rep.owner, rep.attr)
                except AttributeError:
                    pass
            else:
                setattr(rep.owner, rep.attr, rep.original)
        self.replacements.clear()


@dataclass
class Comfy:
    """The ComfyUI modules the patches touch, looked up once ComfyUI is imported."""

    main: ModuleType
    server: ModuleType
    execution: ModuleType
    nodes: ModuleType
    model_management: ModuleType
    progress: ModuleType | None
    version: str

    @classmethod
    def from_sys_modules(cls, main_module: ModuleType | None = None) -> "Comfy":
        def need(name: str) -> ModuleType:
            if name not in sys.modules:
                raise AdapterError(f"ComfyUI module {name!r} is not imported; is this a ComfyUI process?")
            return sys.modules[name]

        if main_module is None:
            main_module = sys.modules.get("main")
            if main_module is None or not hasattr(main_module, "prompt_worker"):
                main_module = sys.modules.get("__main__")
        version_module = sys.modules.get("comfyui_version")
        if version_module is None:
            try:
                import comfyui_version as version_module  # type: ignore[no-redef]
            except ImportError:
                version_module = None
        return cls(
            main=main_module,  # type: ignore[arg-type]
            server=need("server"),
            execution=need("execution"),
            nodes=need("nodes"),
            model_management=need("comfy.model_management"),
            progress=sys.modules.get("comfy_execution.progress"),
            version=getattr(version_module, "__version__", "unknown"),
        )


class Patch:
    """One named change to ComfyUI. Subclasses set the class attributes and implement check/apply."""

    name: str = ""
    replaces: str = ""
    why: str = ""
    checked_on: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.log = PatchLog()
        self.applied = False

    def check(self, comfy: Comfy) -> str | None:
        """Return why this patch cannot apply to this ComfyUI, or ``None`` if it can."""
        raise NotImplementedError

    def _apply(self, comfy: Comfy) -> None:
        raise NotImplementedError

    def apply(self, comfy: Comfy) -> None:
        if self.applied:
            return
        problem = self.check(comfy)
        if problem:
            raise AdapterError(f"patch {self.name}: {problem}")
        self._apply(comfy)
        self.applied = True

    def undo(self) -> None:
        self.log.undo()
        self.applied = False


def require_modules(*names: str) -> str | None:
    """Which of these ComfyUI modules is not imported yet (a patch point cannot be looked up), or ``None``."""
    missing = [n for n in names if n not in sys.modules]
    if missing:
        return f"{' / '.join(missing)} {'is' if len(missing) == 1 else 'are'} not imported"
    return None


def require_parameters(func: Any, label: str, *names: str) -> str | None:
    """Does ``func`` take these parameters first, in this order (a wrapper passes them on by position)?"""
    params = list(inspect.signature(func).parameters)
    if params[:len(names)] != list(names):
        return f"{label} takes {params}, not ({', '.join(names)}, ...)"
    return None


def accepts_keywords(func: Any, label: str, *names: str) -> str | None:
    """Can ``func`` be called with these keyword arguments (its own parameters, or ``**kwargs`` of a wrapper that
    a custom node put around it)?"""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return f"{label} has no inspectable signature"
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    missing = [n for n in names if n not in params or params[n].kind is inspect.Parameter.POSITIONAL_ONLY]
    return f"{label} takes no {', '.join(missing)} keyword" if missing else None


def require_callables(obj: Any, *names: str) -> str | None:
    missing = [n for n in names if not callable(getattr(obj, n, None))]
    if missing:
        label = getattr(obj, "__name__", type(obj).__name__)
        return f"{label} has no callable {', '.join(missing)}"
    return None


def uses(func: Any, *names: str) -> str | None:
    """Does ``func``'s code still name these globals/attributes/locals (the state a patch takes over)?"""
    code = getattr(func, "__code__", None)
    if code is None:
        return f"{func!r} is not a Python function"
    missing = [n for n in names if n not in code.co_names and n not in code.co_varnames]
    if missing:
        return f"{func.__qualname__} no longer refers to {', '.join(missing)}"
    return None


def does_not_use(func: Any, label: str, *names: str) -> str | None:
    """Does ``func`` touch state the patch does not take over (new in a later ComfyUI)?"""
    code = getattr(func, "__code__", None)
    found = [n for n in names if code is not None and n in code.co_names]
    if found:
        return f"{label} now uses {', '.join(found)}, which comfy-parallel does not make per worker"
    return None


def require_signature(func: Any, label: str, *names: str) -> str | None:
    """Does ``func`` take exactly these parameters (a replacement that calls or mirrors it passes all of them)?"""
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return f"{label} has no inspectable signature"
    if params != list(names):
        return f"{label} takes ({', '.join(params)}), not ({', '.join(names)})"
    return None


def first_problem(*checks: Callable[[], str | None]) -> str | None:
    for check in checks:
        problem = check()
        if problem:
            return problem
    return None
