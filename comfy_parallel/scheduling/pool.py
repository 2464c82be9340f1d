"""The shared pool of untargeted prompts (``--default-route pool``): late binding with model and cache affinity.

With ``--default-route auto`` an untargeted prompt is bound to a device when it arrives (shortest queue). Two
costs follow: a prompt queued behind a long job waits even when another GPU goes idle first, and consecutive
prompts of one model or one user bounce between GPUs, each bounce a model load and a lost executor cache.

Here untargeted prompts wait in one pool, unbound, and a worker that goes idle takes the pooled prompt that is
cheapest *for it*, in this order:

1. model files: the fewest bytes of the prompt's model files that are not already in this worker's VRAM (the
   weight store knows which files each worker's loaded models came from, and how much of each is loaded; for
   files it does not hold, the files of the worker's last prompt stand in). Bytes of a file that another worker
   holds or is loading count twice (a second copy): the worker holding that model serves its prompts without a
   load, so an idle worker takes a model no other worker has;
2. executor cache: the most nodes that read another node's output and whose inputs (and their inputs,
   recursively) equal those of a node of the worker's last prompt, which ComfyUI's executor then answers from its
   cache (a client's next seed reuses its text encodes); then whether the same client sent the worker's last
   prompt;
3. age: the queue number (ComfyUI's order, ``front`` included).

Starvation bound: each pooled prompt counts the younger pooled prompts that were taken before it; once the oldest
has been passed ``slack`` times, the next worker to take from the pool takes it. So no prompt waits behind more
than ``slack`` younger ones, and ``slack=0`` is first-in first-out.

Plain Python, no ComfyUI or torch imports: what the pool knows about a worker's VRAM comes through ``residency``.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from ..settings import DEFAULT_SLACK

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".pt2", ".onnx")
PICK_REASONS = ("oldest", "affinity", "slack")


class ModelFile(NamedTuple):
    """A model file a prompt names: its name as given, its real path and size (the bytes a load would move)."""

    name: str
    path: str
    size: int


@dataclass(frozen=True)
class Traits:
    """What the pool needs to know of a prompt to say how costly it is for a worker."""

    files: tuple[ModelFile, ...] = ()
    signatures: frozenset[int] = frozenset()
    derived: frozenset[int] = frozenset()  # signatures of nodes that take another node's output
    client_id: str | None = None


class Residency(NamedTuple):
    """What the weight store knows: the share (0..1) of each file's weights loaded on a worker's device, and every
    file it tracks at all. A share, not a yes/no: under a VRAM limit a checkpoint's text encoder may stay loaded
    after its UNet was unloaded for another model's."""

    loaded: Mapping[str, float]
    tracked: frozenset[str]


NO_RESIDENCY = Residency({}, frozenset())
MODEL_HIT_SHARE = 0.99  # a prompt whose model files are loaded to this share counts as a model hit


# -- what a prompt needs ---------------------------------------------------------------------------------------

def _is_link(value: Any, prompt: dict) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in prompt
            and isinstance(value[1], int))


def node_signatures(prompt: dict) -> tuple[frozenset[int], frozenset[int]]:
    """A signature per node from its class, its plain inputs and the signatures of the nodes it reads from.

    Two nodes with one signature compute the same output, which is how ComfyUI's executor cache decides that
    a node of the next prompt needs no run. Node ids are left out (the cache does not key on them either).
    Returns (all signatures, those of nodes that read another node's output).
    """
    memo: dict[str, int] = {}
    derived: set[int] = set()
    visiting: set[str] = set()

    def sig(node_id: str) -> int:
        if node_id in memo:
            return memo[node_id]
        if node_id in visiting:  # a cycle: ComfyUI refuses the prompt; no signature worth sharing
            return hash(("cycle", node_id))
        visiting.add(node_id)
        node = prompt.get(node_id)
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        parts = []
        linked = False
        for name in sorted(inputs) if isinstance(inputs, dict) else ():
            value = inputs[name]
            if _is_link(value, prompt):
                linked = True
                parts.append((name, "link", sig(value[0]), value[1]))
            else:
                parts.append((name, json.dumps(value, sort_keys=True, default=str)))
        visiting.discard(node_id)
        value = hash((str(node.get("class_type")) if isinstance(node, dict) else None, tuple(parts)))
        memo[node_id] = value
        if linked:
            derived.add(value)
        return value

    for node_id in prompt:
        sig(str(node_id))
    return frozenset(memo.values()), frozenset(derived)


def model_names(prompt: dict) -> list[str]:
    """Every plain string input that names a model file (by extension), in prompt order, without repeats."""
    names: dict[str, None] = {}
    for node in prompt.values():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        for value in inputs.values() if isinstance(inputs, dict) else ():
            if isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS):
                names[value] = None
    return list(names)


class FileResolver:
    """Model file name -> (real path, size), through ``find`` (ComfyUI's model folders); answers are kept
    ``ttl_s`` seconds, so a file added or replaced while the server runs is seen soon after."""

    def __init__(self, find: Callable[[str], str | None], ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.find = find
        self.ttl_s = ttl_s
        self.clock = clock
        self._cache: dict[str, tuple[float, ModelFile | None]] = {}
        self._lock = threading.Lock()

    def resolve(self, name: str) -> ModelFile | None:
        now = self.clock()
        with self._lock:
            hit = self._cache.get(name)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        found: ModelFile | None = None
        try:
            path = self.find(name)
            if path is not None:
                real = os.path.realpath(path)
                found = ModelFile(name, real, os.stat(real).st_size)
        except (OSError, ValueError, TypeError):
            found = None
        with self._lock:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[name] = (now, found)
        return found


def traits_of(item: tuple, resolver: FileResolver | None) -> Traits:
    """The traits of a ComfyUI queue item ``(number, prompt_id, prompt, extra_data, outputs[, sensitive])``."""
    prompt = item[2] if len(item) > 2 and isinstance(item[2], dict) else {}
    extra = item[3] if len(item) > 3 and isinstance(item[3], dict) else {}
    files: list[ModelFile] = []
    if resolver is not None:
        for name in model_names(prompt):
            found = resolver.resolve(name)
            if found is not None and found.path not in {f.path for f in files}:
                files.append(found)
    signatures, derived = node_signatures(prompt)
    client = extra.get("client_id")
    return Traits(tuple(files), signatures, derived, str(client) if client is not None else None)


# -- the pool --------------------------------------------------------------------------------------------------

@dataclass
class Pooled:
    item: tuple
    traits: Traits
    enqueued_at: float
    seq: int
    passed: int = 0  # younger pooled prompts taken before this one

    @property
    def key(self) -> tuple:
        return (self.item[0], self.seq)

    @property
    def prompt_id(self) -> str:
        return str(self.item[1])


@dataclass
class WorkerView:
    """What ran last on a worker: the executor cache holds its outputs, and its model files may still be loaded."""

    signatures: frozenset[int] = frozenset()
    client_id: str | None = None
    files: frozenset[str] = frozenset()


@dataclass
class Pick:
    """One take from the pool: why this prompt, and what the worker could reuse."""

    pooled: Pooled
    reason: str  # oldest | affinity | slack
    model_hit: bool  # it names model files and all of them were loaded on the worker
    cache_hit: bool  # a node that reads another node's output is predicted to come from the executor cache
    missing_bytes: int


@dataclass
class DeviceCounts:
    picks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PICK_REASONS, 0))
    model_hits: int = 0
    cache_hits: int = 0


class Pool:
    """The pooled prompts, in queue order. Not locked itself: the device queues' one mutex guards every call."""

    def __init__(self, n_devices: int, slack: int = DEFAULT_SLACK,
                 residency: Callable[[int], Residency] = lambda index: NO_RESIDENCY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if slack < 0:
            raise ValueError(f"affinity slack must be >= 0, got {slack}")
        self.slack = slack
        self.residency = residency
        self.clock = clock
        self.entries: list[Pooled] = []
        self.views = [WorkerView() for _ in range(n_devices)]
        self.counts = [DeviceCounts() for _ in range(n_devices)]
        self._seq = 0
        self.max_passed = 0  # the most times any prompt was passed (<= slack)
        self.pending_traits: dict[str, Traits] = {}  # bound to a device or taken from the pool, not started yet
        self.pooled_ids: set[str] = set()  # accepted into the pool and not finished (queued, running or retried)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, item: tuple, traits: Traits) -> Pooled:
        self._seq += 1
        pooled = Pooled(item, traits, self.clock(), self._seq)
        bisect.insort(self.entries, pooled, key=lambda p: p.key)
        self.pooled_ids.add(pooled.prompt_id)
        return pooled

    def note_bound(self, prompt_id: str, traits: Traits) -> None:
        """A prompt queued on a device (targeted): when it starts, the worker's view follows it."""
        self.pending_traits[prompt_id] = traits

    def start(self, index: int, prompt_id: str) -> None:
        traits = self.pending_traits.pop(prompt_id, None)
        if traits is not None:
            self.started(index, traits)

    def finished(self, prompt_id: str) -> None:
        """The prompt is in history, or was deleted: forget it."""
        self.pooled_ids.discard(prompt_id)
        self.pending_traits.pop(prompt_id, None)

    def was_pooled(self, prompt_id: str) -> bool:
        return prompt_id in self.pooled_ids

    def items(self) -> list[tuple]:
        return [p.item for p in self.entries]

    def oldest_wait_s(self) -> float:
        if not self.entries:
            return 0.0
        now = self.clock()
        return max(now - p.enqueued_at for p in self.entries)

    def remove_first(self, predicate: Callable[[tuple], bool]) -> Pooled | None:
        for i, pooled in enumerate(self.entries):
            if predicate(pooled.item):
                self.finished(pooled.prompt_id)
                return self.entries.pop(i)
        return None

    def clear(self) -> list[Pooled]:
        dropped, self.entries = self.entries, []
        for pooled in dropped:
            self.finished(pooled.prompt_id)
        return dropped

    def find(self, prompt_id: str) -> Pooled | None:
        return next((p for p in self.entries if p.prompt_id == prompt_id), None)

    # -- the worker side ---------------------------------------------------------------------------------------
    def _resident(self, index: int) -> dict[str, float]:
        """Share loaded on worker ``index`` per file: the store's answer, plus the last prompt's files that the store
        does not track (taken as loaded)."""
        known = self.residency(index)
        resident = dict(known.loaded)
        for path in self.views[index].files:
            if path not in known.tracked:
                resident[path] = 1.0
        return resident

    @staticmethod
    def missing_bytes(traits: Traits, resident: Mapping[str, float]) -> int:
        return int(sum(f.size * (1.0 - min(1.0, resident.get(f.path, 0.0))) for f in traits.files))

    def _elsewhere(self, index: int) -> frozenset[str]:
        """Files another worker holds (mostly loaded) or is about to load (its running prompt names them)."""
        paths: set[str] = set()
        for other in range(len(self.views)):
            if other != index:
                paths.update(p for p, share in self._resident(other).items() if share >= 0.5)
                paths.update(self.views[other].files)
        return frozenset(paths)

    def cost(self, traits: Traits, resident: Mapping[str, float], view: WorkerView,
             elsewhere: frozenset[str] = frozenset()) -> tuple[int, int, int, int]:
        """(bytes to load, bytes another worker holds, -derived nodes the executor cache answers, 0 if the same client
        sent the last prompt else 1), the smaller the better.

        A file another worker holds or is loading counts twice in the bytes to load: loading it here makes a second
        copy, while a model no other worker has would be loaded once. Without this, a few hundred MB a worker kept
        from an earlier model (a VAE) made it load the model the other worker had just taken, and both then
        switched again (six switches for three checkpoints on the H200 benchmark). Only nodes that read another
        node's output count for the cache: a leaf node (an empty latent of some size) costs nothing to run, and
        counting it let short prompts pass older long ones.
        """
        load = 0.0
        held_elsewhere = 0
        for f in traits.files:
            missing = f.size * (1.0 - min(1.0, resident.get(f.path, 0.0)))
            if f.path in elsewhere:
                held_elsewhere += f.size
                missing *= 2
            load += missing
        cached = len(traits.derived & view.signatures)
        same_client = traits.client_id is not None and traits.client_id == view.client_id
        return int(load), held_elsewhere, -cached, 0 if same_client else 1

    def take(self, index: int, before: Any = None) -> Pick | None:
        """The pooled prompt worker ``index`` should run next, removed from the pool; ``None`` if none may run.

        ``before``: the queue number of the worker's own next prompt (a targeted one); only pooled prompts older
        than it are candidates, so a targeted prompt never waits behind a younger pooled one.
        """
        if not self.entries:
            return None
        if before is not None:
            candidates = [p for p in self.entries if p.item[0] < before]
            if not candidates:
                return None
        else:
            candidates = self.entries
        oldest = candidates[0]
        view = self.views[index]
        resident = self._resident(index)
        elsewhere = self._elsewhere(index)
        best = min(candidates, key=lambda p: (self.cost(p.traits, resident, view, elsewhere), p.key))
        reason = "oldest" if best is oldest else "affinity"
        if best is not oldest and oldest.passed >= self.slack:
            best, reason = oldest, "slack"
        position = self.entries.index(best)
        for older in self.entries[:position]:
            older.passed += 1
            self.max_passed = max(self.max_passed, older.passed)
        self.entries.pop(position)
        traits = best.traits
        self.pending_traits[best.prompt_id] = traits
        missing = self.missing_bytes(traits, resident)
        total = sum(f.size for f in traits.files)
        pick = Pick(best, reason, model_hit=bool(traits.files) and missing <= (1 - MODEL_HIT_SHARE) * total,
                    cache_hit=bool(traits.derived & view.signatures), missing_bytes=missing)
        counts = self.counts[index]
        counts.picks[reason] += 1
        counts.model_hits += pick.model_hit
        counts.cache_hits += pick.cache_hit
        return pick

    def started(self, index: int, traits: Traits) -> None:
        """A prompt (pooled or bound) started on worker ``index``: its outputs and model files are there next."""
        self.views[index] = WorkerView(traits.signatures, traits.client_id, frozenset(f.path for f in traits.files))

    def forget_worker(self, index: int) -> None:
        """The worker's executor cache and models are gone (``/free``, an executor rebuild)."""
        self.views[index] = WorkerView()

    def cheapest_worker(self, traits: Traits, indices: Iterable[int]) -> int | None:
        """Among idle workers ``indices``, the one for which a prompt with ``traits`` costs least."""
        best: tuple | None = None
        chosen = None
        for index in indices:
            key = (self.cost(traits, self._resident(index), self.views[index], self._elsewhere(index)), index)
            if best is None or key < best:
                best, chosen = key, index
        return chosen

    def stats(self) -> dict:
        return {"length": len(self.entries), "oldest_wait_s": round(self.oldest_wait_s(), 3), "slack": self.slack,
                "max_passed": self.max_passed,
                "devices": [{"gpu_id": i, "picks": dict(c.picks), "model_hits": c.model_hits,
                             "cache_hits": c.cache_hits} for i, c in enumerate(self.counts)]}
