"""``comfy-parallel``: serve, doctor, provision, install-node.

Everything after ``--`` on the ``serve`` command line goes to ComfyUI unchanged (``--listen``, ``--port``,
``--highvram``...).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

from .ops import deploy, provision, scan, supervisor
from .settings import (DEFAULT_ROUTE, DEFAULT_SLACK, Settings, SettingsError, default_devices, env_enabled,
                       parse_affinity_slack, parse_cuda_graphs, parse_default_route, parse_devices, parse_entry_ports,
                       parse_graphs_max, parse_vram_limit, weight_settings)
from .settings import (ALLOW_UNCHECKED_ENV, DEFAULT_DRAIN_TIMEOUT_S, SWITCH_INTERVAL_ENV, env_flag,
                       journal_synchronous, lifecycle_env, lifecycle_settings, parse_switch_interval)

log = logging.getLogger("comfy_parallel")

SERVE_EPILOG = """\
routing (one process, one queue and one worker per device):
  X-TARGET-GPU: N header      send this request to device N
  entry ports (8181, 8182..)  every request on port 8181+N goes to device N
  /gpuN/ path prefix          every ComfyUI route (web UI, /ws, /api/...) under /gpuN/ goes to device N
  no target                   --default-route: pool (default) = the prompt waits unbound and the next idle
                              worker takes the pooled prompt cheapest for it (its models already loaded, then its
                              executor cache, then age; /prompt answers "gpu_id": null, "route": "pool");
                              auto = shortest queue when the prompt arrives (ties to the lowest index);
                              N = always device N
A bad target is answered with HTTP 400 and a JSON body listing the valid targets.

crash safety (the write-ahead queue, on unless --no-persist):
  every accepted prompt is in <user-dir>/__comfy_parallel/queue.sqlite3 (--persist-path)
  and its memory-mapped staging log (queue.sqlite3.staging) before POST /prompt answers,
  until its history entry is written; the last 10,000 history entries are kept there too.
  After a crash (kill -9, OOM killer, native crash, CUDA error) the next start queues the
  unfinished prompts again as routed (device or pool), in order; a prompt running at the
  crash runs once more (flagged as a retry), at two crashes in a row it is recorded as an
  error. --supervise restarts the server after a crash.

shutdown (SIGTERM or Ctrl-C; a second signal stops at once):
  POST /prompt answers 503 with Retry-After, reads keep working, /ready answers 503;
  running prompts get --drain-timeout seconds; queued prompts (pooled ones too) and those
  cut off stay in the write-ahead queue and run after the next start, as they were routed
  (their device, or the pool); with --no-persist queued prompts are recorded in /history
  as errors.

admin token (--admin-token or COMFY_PARALLEL_ADMIN_TOKEN; unset: no access control, as stock):
  POST /free, untargeted POST /interrupt without prompt_id, POST /queue {"clear": true},
  GET /metrics, /multigpu/status, /multigpu/, /debug/queues need
  'Authorization: Bearer TOKEN' or 'X-Admin-Token: TOKEN' (else 401); /health, /ready stay open.

environment:
  COMFYUI_DIR            ComfyUI folder (same as --comfyui)
  COMFY_MULTI_GPU_SCHED  0 = stock ComfyUI, no patches (the launcher defaults to 1)
  COMFY_NUM_GPUS         N = devices 0..N-1 (same as --devices 0,..,N-1)
  COMFY_PARALLEL_HOME    where provisioned ComfyUI releases are cached (~/.cache/comfy-parallel)
  COMFY_PARALLEL_DRAIN_TIMEOUT, COMFY_PARALLEL_NO_PERSIST=1, COMFY_PARALLEL_PERSIST_PATH,
  COMFY_PARALLEL_ADMIN_TOKEN   defaults of the options of the same names (also read in drop-in mode)

examples:
  comfy-parallel serve                                   # provisioned ComfyUI, every GPU (or 2 CPU workers)
  comfy-parallel serve --comfyui ~/ComfyUI --devices 0,1,2,3 -- --listen 0.0.0.0 --port 8188
  comfy-parallel serve --devices cpu,cpu --entry-ports none
"""


def _split_comfy_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comfy-parallel",
                                     description="One ComfyUI process serving N GPUs in parallel.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start ComfyUI with one worker per device",
                           description="Start ComfyUI with one prompt queue and one worker per device. "
                                       "Arguments after -- go to ComfyUI unchanged.",
                           epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _comfy_location_args(serve)
    serve.add_argument("--devices", help="CUDA ordinals (0,1,2,3) or CPU workers (cpu,cpu or cpu*3); "
                                         "default: every visible CUDA device, else 2 CPU workers")
    serve.add_argument("--entry-ports", default="auto",
                       help="one listener per device: 'auto' (8181, 8182, ..), a first port, a list, or 'none' "
                            "(default: auto when there is more than one device)")
    serve.add_argument("--default-route", default=DEFAULT_ROUTE,
                       help="where untargeted prompts go: 'pool' (they wait unbound; an idle worker takes the one "
                            "cheapest for it: model files already in its VRAM, then its executor cache, then age), "
                            "'auto' (bound to the shortest queue when they arrive) or a device index "
                            "(default %(default)s)")
    serve.add_argument("--affinity-slack", default=str(DEFAULT_SLACK), metavar="N",
                       help="with --default-route pool, no prompt waits behind more than N younger prompts that "
                            "were taken first for affinity (0: first in, first out). Each pass costs a waiting "
                            "prompt at most one job's time spread over the workers, so its worst extra wait is "
                            "about N/workers job times; 8 is enough for a worker to keep its model through a "
                            "random stream of three models (a given model is among the next 8 prompts in ~96%% "
                            "of cases) while that extra wait stays a few jobs long (default %(default)s)")
    serve.add_argument("--worker-vram-limit", metavar="SIZE",
                       help="VRAM each CUDA worker's model loading plans with, e.g. 12G: ComfyUI unloads that "
                            "worker's models to stay within it, as on a card of that size (for several workers on "
                            "one large GPU, or to keep room for other processes; default: the device's free memory)")
    _unchecked_arg(serve)
    serve.add_argument("--warmup-checkpoint", metavar="NAME",
                       help="at start, load this checkpoint on every device and run one 64x64 sampling step; "
                            "/ready answers 503 until it is done")
    serve.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                       help="replay a captured CUDA graph of the UNet (SD1.x/SDXL) per input shape instead of "
                            "launching its kernels from Python every step; falls back to the normal path when "
                            "capture is unsafe (patches, ControlNet, low VRAM) or fails. auto: on for CUDA workers "
                            "of a multi-device server; on: also with a single device. With graphs on and several "
                            "devices ComfyUI is started with --disable-cuda-malloc (torch's native allocator; "
                            "cudaMallocAsync cannot serve captures from several threads) unless you pass "
                            "--cuda-malloc, which turns graphs off (default %(default)s)")
    serve.add_argument("--cuda-graphs-max", type=int, metavar="N",
                       default=os.environ.get("COMFY_PARALLEL_CUDA_GRAPHS_MAX", "24"),
                       help="most CUDA graphs kept per model per worker, least recently used out (default "
                            "%(default)s; env COMFY_PARALLEL_CUDA_GRAPHS_MAX). A graph is kept per input shape and "
                            "weight placement, so plain and LoRA prompts keep theirs; each holds activation memory "
                            "in its worker's graph pool")
    serve.add_argument("--switch-interval-ms", metavar="MS", default=os.environ.get(SWITCH_INTERVAL_ENV),
                       help="Python's GIL switch interval in milliseconds (default: Python's own, 5 ms; env "
                            f"{SWITCH_INTERVAL_ENV}). The HTTP side shares the GIL with every worker: while workers "
                            "run Python (sampling loops, custom nodes), each HTTP request waits for it. Measured on "
                            "CPU workers: POST /prompt 60 ms at 5 ms, 15 ms at 0.5 ms "
                            "(bench/results/http_under_gil_load_cpu.md), but 0.5 ms also cut the accepted prompts "
                            "per second by 21%% on a 16-core host (bench/results/crash_safe_queue_device.md), "
                            "hence not the default")
    weights = serve.add_argument_group("shared weights (one host copy of each model file for all devices)")
    weights.add_argument("--shared-weights", choices=("on", "off"), default="on",
                         help="read each checkpoint/UNET/CLIP/VAE/ControlNet/LoRA file once and give every device "
                              "a view of that one host copy (default on); off = one copy per worker")
    weights.add_argument("--pin-weights", choices=("auto", "on", "off"), default="auto",
                         help="keep host copies in page-locked memory for fast host-to-GPU loads (auto: while "
                              "pinned copies fit in half the RAM; never on CPU-only machines)")
    weights.add_argument("--host-copy", choices=("ram", "page-cache"), default="ram",
                         help="where the one host copy of a model file lives. ram (default): the process's own "
                              "memory, page-locked per --pin-weights; fastest loads to a GPU, and it costs the "
                              "file's size in RSS. page-cache: .safetensors tensors ComfyUI loads unchanged stay "
                              "in the kernel's page cache of the file (one read from disk while the kernel keeps "
                              "it) and leave the process's RSS between prompts, as with stock ComfyUI; loads to a "
                              "GPU copy from pageable memory, several times slower, and --pin-weights does not "
                              "apply")
    weights.add_argument("--weights-ram-limit", metavar="SIZE",
                         help="host bytes of model copies kept for reuse, e.g. 64G; the least recently used "
                              "unused copy is evicted beyond it (default: no limit)")

    lifecycle = serve.add_argument_group("shutdown and access")
    lifecycle.add_argument("--drain-timeout", metavar="SECONDS",
                           help="after SIGTERM/SIGINT, how long running prompts may finish before they are cut "
                                f"off and persisted (default {DEFAULT_DRAIN_TIMEOUT_S:.0f})")
    lifecycle.add_argument("--no-persist", action="store_true",
                           help="no write-ahead queue: a crash loses every queued and running prompt and the "
                                "history, and at shutdown queued prompts are recorded as errors")
    lifecycle.add_argument("--persist-path", metavar="FILE",
                           help="SQLite file of the write-ahead queue and the history, with FILE.staging "
                                "beside it (default <user-dir>/__comfy_parallel/queue.sqlite3)")
    lifecycle.add_argument("--supervise", action="store_true",
                           help="run the server as a child process and start it again whenever it crashes "
                                f"(killed, aborted, or exit code {supervisor.cuda_fatal.EXIT_CODE} after a CUDA error "
                                "that poisons a device); a clean shutdown, bad settings or a refused ComfyUI end "
                                "it. Not needed under systemd, whose unit restarts the service itself")
    lifecycle.add_argument("--admin-token", metavar="TOKEN",
                           help="require this token for /free, /interrupt of everything, clearing queues and the "
                                "monitoring routes (prefer COMFY_PARALLEL_ADMIN_TOKEN: a command line is visible "
                                "to other users in ps)")

    doctor = sub.add_parser("doctor", help="check ComfyUI, devices, packages and which patches apply")
    _comfy_location_args(doctor)
    _unchecked_arg(doctor)

    prov = sub.add_parser("provision", help="download (or take from a local archive), hash-check and extract pinned "
                                            "ComfyUI releases")
    prov.add_argument("--versions", default=provision.DEFAULT_VERSION,
                      help=f"comma-separated versions (known: {', '.join(provision.RELEASES)}); "
                           f"{', '.join(v for v, r in provision.RELEASES.items() if r.archive)} come from a local "
                           f"archive looked for in ${provision.ARCHIVES_ENV}, <cache>/archives or shared/comfyui")
    prov.add_argument("--skip-missing-archives", action="store_true",
                      help="skip, with one line, a release whose local archive is not on this machine")

    node = sub.add_parser("install-node", help="link this package into a ComfyUI custom_nodes folder (drop-in mode)")
    _comfy_location_args(node)
    node.add_argument("--copy", action="store_true", help="copy instead of symlinking")
    node.add_argument("--custom-nodes-dir", help="install here instead of <ComfyUI>/custom_nodes")

    scan.add_parser(sub)
    deploy.add_parser(sub)
    return parser


def _unchecked_arg(p: argparse.ArgumentParser) -> None:
    from .comfy_adapter.base import CHECKED

    p.add_argument("--allow-unchecked-comfyui", action="store_true",
                   help=f"run multi-device mode on a ComfyUI version comfy-parallel was not checked on "
                        f"({', '.join(CHECKED)} are), if every patch check passes (default: refuse to start and "
                        f"list what did not match; env {ALLOW_UNCHECKED_ENV}=1)")


def _comfy_location_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"),
                   help="ComfyUI folder (default: $COMFYUI_DIR, else the provisioned release)")
    p.add_argument("--comfyui-version", default=provision.DEFAULT_VERSION, choices=sorted(provision.RELEASES),
                   help="provisioned release to use when no folder is given (default %(default)s)")


def resolve_comfyui(args: argparse.Namespace) -> Path:
    if args.comfyui:
        return Path(args.comfyui).expanduser().resolve()
    return provision.ensure_comfyui(args.comfyui_version)


def serve_settings(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    enabled = env_enabled(env) if "COMFY_MULTI_GPU_SCHED" in env else True
    if args.devices:
        devices = parse_devices(args.devices)
    elif env.get("COMFY_NUM_GPUS"):
        n = env["COMFY_NUM_GPUS"].strip()
        if not n.isdigit() or int(n) < 1:
            raise SettingsError(f"COMFY_NUM_GPUS={n!r} is not a positive integer")
        devices = parse_devices(",".join(str(i) for i in range(int(n))))
    else:
        devices = default_devices()
    entry_text = args.entry_ports if len(devices) > 1 and enabled else "none"
    return Settings(devices=devices, entry_ports=parse_entry_ports(entry_text, len(devices)),
                    default_route=parse_default_route(args.default_route, len(devices)), enabled=enabled,
                    affinity_slack=parse_affinity_slack(getattr(args, "affinity_slack", str(DEFAULT_SLACK))),
                    worker_vram_limit=parse_vram_limit(getattr(args, "worker_vram_limit", None)),
                    warmup_checkpoint=getattr(args, "warmup_checkpoint", None),
                    cuda_graphs=parse_cuda_graphs(getattr(args, "cuda_graphs", "auto")),
                    cuda_graphs_max=parse_graphs_max(getattr(args, "cuda_graphs_max", 24)),
                    switch_interval_ms=parse_switch_interval(getattr(args, "switch_interval_ms", None)),
                    **weight_settings(getattr(args, "shared_weights", "on"), getattr(args, "pin_weights", "auto"),
                                       getattr(args, "weights_ram_limit", None), getattr(args, "host_copy", "ram")),
                    allow_unchecked_comfyui=bool(getattr(args, "allow_unchecked_comfyui", False))
                    or env_flag(env, ALLOW_UNCHECKED_ENV),
                    journal_synchronous=journal_synchronous(env), **_lifecycle(args, env))


def _lifecycle(args: argparse.Namespace, env: dict[str, str]) -> dict:
    """Command-line options win over their COMFY_PARALLEL_* variables."""
    drain, no_persist, path, token = lifecycle_env(env)
    given_drain = getattr(args, "drain_timeout", None)
    return lifecycle_settings(given_drain if given_drain is not None else drain,
                              bool(getattr(args, "no_persist", False)) or no_persist,
                              getattr(args, "persist_path", None) or path, getattr(args, "admin_token", None) or token)


def graph_safe_allocator(settings: Settings, comfy_args: list[str]) -> tuple[list[str], str | None]:
    """Add ``--disable-cuda-malloc`` when several CUDA workers will capture graphs; say so (or ``None``).

    ComfyUI turns on torch's cudaMallocAsync backend by default, whose capture state is process-wide: concurrent
    captures from two workers abort the process (comfy_adapter/cuda_graphs.py). The choice must be made before
    torch is imported, hence here. An explicit ``--cuda-malloc`` or ``--disable-cuda-malloc`` is left alone.
    """
    given = {"--cuda-malloc", "--disable-cuda-malloc"} & set(comfy_args)
    if not (settings.multi_device and not settings.cpu_mode and settings.graphs_enabled) or given:
        return comfy_args, None
    return ([*comfy_args, "--disable-cuda-malloc"],
            "ComfyUI runs with --disable-cuda-malloc (torch's native allocator): CUDA graphs captured by several "
            "workers need it (--cuda-graphs off or --cuda-malloc keep ComfyUI's default)")


def classic_vram(settings: Settings, comfy_dir: Path, comfy_args: list[str]) -> tuple[list[str], str | None]:
    """Add ``--disable-dynamic-vram`` for several CUDA workers on a ComfyUI that has DynamicVRAM (0.33+).

    DynamicVRAM's state is process-wide (comfy_adapter.model_management.dynamic_vram_problem says what broke);
    the choice is made before ComfyUI is imported, hence here. Raises ``SettingsError`` for an explicit
    ``--enable-dynamic-vram``.
    """
    if not (settings.multi_device and not settings.cpu_mode):
        return comfy_args, None
    if "--enable-dynamic-vram" in comfy_args:
        raise SettingsError("--enable-dynamic-vram: ComfyUI's DynamicVRAM keeps process-wide state that several "
                            "workers corrupt (measured: a CUDA illegal memory access aborted the process); leave it "
                            "out, and comfy-parallel starts ComfyUI with --disable-dynamic-vram")
    from .comfy_adapter.loader import has_cli_flag

    if not has_cli_flag(comfy_dir, "--disable-dynamic-vram") or "--disable-dynamic-vram" in comfy_args:
        return comfy_args, None
    return ([*comfy_args, "--disable-dynamic-vram"],
            "ComfyUI runs with --disable-dynamic-vram: its DynamicVRAM state is process-wide, and several workers "
            "broke it (README, 'ComfyUI versions')")


def cmd_serve(args: argparse.Namespace, comfy_args: list[str]) -> int:
    try:
        settings = serve_settings(args)
        comfy_dir = resolve_comfyui(args)
    except (SettingsError, ValueError, FileNotFoundError) as err:
        print(f"comfy-parallel serve: {err}", file=sys.stderr)
        return 2
    if settings.cpu_mode and "--cpu" not in comfy_args:
        comfy_args = [*comfy_args, "--cpu"]
    comfy_args, allocator_note = graph_safe_allocator(settings, comfy_args)
    try:
        comfy_args, vram_note = classic_vram(settings, comfy_dir, comfy_args)
    except SettingsError as err:
        print(f"comfy-parallel serve: {err}", file=sys.stderr)
        return 2
    if settings.multi_device and not settings.cpu_mode and "--cuda-device" in comfy_args:
        print("comfy-parallel serve: --cuda-device selects one GPU; use --devices instead", file=sys.stderr)
        return 2
    from .activation import activate
    from .comfy_adapter import AdapterError, load_comfyui

    try:
        main_module = load_comfyui(comfy_dir, comfy_args)
    except FileNotFoundError as err:
        print(f"comfy-parallel serve: {err}", file=sys.stderr)
        return 2
    log.info("comfy-parallel %s: ComfyUI at %s", __import__("comfy_parallel").__version__, comfy_dir)
    for note in (allocator_note, vram_note):
        if note:
            log.info("comfy-parallel: %s", note)
    try:
        activate(settings, main_module)
    except AdapterError as err:
        log.critical("comfy-parallel: %s", err)
        return 3
    return run_comfyui(main_module)


def run_comfyui(main_module) -> int:  # type: ignore[no-untyped-def]
    """Start ComfyUI as ``python main.py`` does."""
    # WARNING: mirrors the end of main.py's __main__ block (0.3.52-0.3.75).
    import comfyui_version  # type: ignore[import-not-found]

    log.info("Python version: %s", sys.version)
    log.info("ComfyUI version: %s", comfyui_version.__version__)
    event_loop, _, start_all = main_module.start_comfyui()
    try:
        coro = start_all()
        app_logger = sys.modules.get("app.logger")
        if app_logger is not None and hasattr(app_logger, "print_startup_warnings"):
            app_logger.print_startup_warnings()
        event_loop.run_until_complete(coro)
    except KeyboardInterrupt:
        log.info("Stopped server")
    main_module.cleanup_temp()
    return 0


REQUIRED_MODULES = ("torch", "torchvision", "torchsde", "aiohttp", "yarl", "safetensors", "transformers",
                    "einops", "PIL", "scipy", "psutil", "av", "kornia", "spandrel", "sqlalchemy", "alembic",
                    "pydantic", "pydantic_settings", "comfyui_frontend_package", "prometheus_client")


def cmd_doctor(args: argparse.Namespace) -> int:
    from .settings import cuda_device_count

    problems: list[str] = []
    print(f"comfy-parallel {__import__('comfy_parallel').__version__}, Python {sys.version.split()[0]}")
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    print(f"packages: {'all present' if not missing else 'MISSING ' + ', '.join(missing)}")
    problems += [f"package {m} is missing" for m in missing]
    n_cuda = cuda_device_count()
    print(f"devices: {n_cuda} CUDA device(s) visible" + ("" if n_cuda else "; serve would use 2 CPU workers"))
    try:
        comfy_dir = resolve_comfyui(args)
    except (ValueError, OSError) as err:
        print(f"ComfyUI: not available ({err})")
        return 1
    from .comfy_adapter import Comfy, gate, load_comfyui, read_version, report

    print(f"ComfyUI: {read_version(comfy_dir)} at {comfy_dir}")
    if missing:
        print("patches: not checked (install the missing packages first)")
        return 1
    cpu = [] if n_cuda else ["--cpu"]
    load_comfyui(comfy_dir, [*cpu, "--disable-all-custom-nodes", "--dont-print-server"])
    comfy = Comfy.from_sys_modules()
    print("patches:")
    statuses = report(comfy, hooks=_NoHooks())
    for status in statuses:
        state = "ok" if status.problem is None else f"DOES NOT APPLY: {status.problem}"
        checked = "checked on " + ", ".join(status.checked_on)
        print(f"  {status.name:32} {state} ({checked})\n      replaces {status.replaces}")
    refusal = gate(comfy, statuses, args.allow_unchecked_comfyui)
    if refusal is not None:
        print("multi-device mode would not start:\n" + "\n".join(f"  {line}" for line in refusal.splitlines()))
        problems.append("ComfyUI does not pass the version gate")
    print("result: " + ("ready" if not problems else f"NOT READY, {len(problems)} problem(s)"))
    return 0 if not problems else 1


class _NoHooks:
    """``doctor`` only checks patch points (every patch's, the shared-weight and CUDA graph ones too); it never
    starts a server."""

    def __init__(self) -> None:
        from .settings import parse_devices
        from .weights.store import WeightStore

        self.weight_store = WeightStore(pin="off")
        self.settings = Settings(devices=parse_devices("cpu,cpu"), cuda_graphs="on", worker_vram_limit=1 << 30)


def cmd_install_node(args: argparse.Namespace) -> int:
    nodes_dir = Path(args.custom_nodes_dir) if args.custom_nodes_dir else resolve_comfyui(args) / "custom_nodes"
    target = nodes_dir / "comfy_parallel"
    source = Path(__file__).resolve().parent
    if target.exists() or target.is_symlink():
        print(f"{target} already exists; remove it first to reinstall", file=sys.stderr)
        return 1
    if args.copy:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        target.symlink_to(source, target_is_directory=True)
    print(f"installed {target} -> {source}\n"
          "start ComfyUI with COMFY_MULTI_GPU_SCHED=1 COMFY_NUM_GPUS=<n> python main.py to turn it on")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, comfy_args = _split_comfy_args(argv)
    args = build_parser().parse_args(ours)
    if args.command == "serve" and args.supervise:
        child_args = [a for a in ours[ours.index("serve") + 1:] if a != "--supervise"]
        return supervisor.run([*child_args, "--", *comfy_args])
    if args.command == "serve":
        return cmd_serve(args, comfy_args)
    if args.command == "doctor":
        return cmd_doctor(args)
    if args.command == "provision":
        return provision.main(["--versions", args.versions,
                               *(["--skip-missing-archives"] if args.skip_missing_archives else [])])
    if args.command == "install-node":
        return cmd_install_node(args)
    if args.command == "scan":
        return scan.run(args)
    if args.command == "deploy":
        return deploy.run(args, comfy_args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
