"""``comfy-parallel deploy nginx|systemd|script``: print deployment files made from the live settings.

The files are computed from the same settings ``serve`` would use on this machine (devices, entry ports,
default route), so what nginx proxies to is what the server actually listens on. Standard library only.

Per-device public ports: nginx normally runs on the same host as comfy-parallel, whose entry listeners
already hold 8181, 8182, ... So nginx's per-device server blocks listen on other ports, by default each entry
port + 1000 (9181, 9182, ...; 9181.. when there are no entry ports), and proxy to that device's comfy-parallel
entry port. Without entry ports they proxy to the main port and set ``X-TARGET-GPU: N`` instead.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..settings import DEFAULT_ROUTE, DEFAULT_SLACK, Settings, SettingsError, parse_entry_ports
from . import provision

KINDS = ("nginx", "systemd", "script")
PUBLIC_PORT_OFFSET = 1000  # nginx's per-device port = entry port + this, so both fit on one host
FIRST_PUBLIC_ENTRY_PORT = 9181  # when there are no entry ports to offset
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
WILDCARD = {"", "0.0.0.0", "::", "[::]", "*"}

DEPLOY_EPILOG = """\
The files come from the settings `serve` would use here (devices, entry ports, default route); give the
same --devices/--entry-ports you give serve, or none to use the defaults of this machine.
Arguments after -- (or --extra-comfy-args='...') go to ComfyUI in the generated command line.

nginx per-device ports: nginx usually shares the host with comfy-parallel, whose entry listeners hold
8181, 8182, ..; so the per-device server blocks listen on entry port + 1000 (9181, 9182, ..) by default
and proxy to the entry port of their device (or to the main port with X-TARGET-GPU when there are none).

examples:
  comfy-parallel deploy nginx --devices 0,1,2,3 --public-port 80 > /etc/nginx/conf.d/comfy-parallel.conf
  comfy-parallel deploy systemd --comfyui /srv/ComfyUI --user comfy > /etc/systemd/system/comfy-parallel.service
  comfy-parallel deploy script --devices 0,1 -- --highvram > start-comfy-parallel.sh
"""


@dataclass(frozen=True)
class DeployOptions:
    """Everything the renderers need besides :class:`Settings`; built by :func:`options_from_args`."""

    upstream_host: str = "127.0.0.1"
    upstream_port: int = 8188
    public_port: int = 80
    public_host: str | None = None  # nginx listen address; None: every address
    public_entry_ports: tuple[int, ...] = ()
    server_name: str = "_"
    rate: str = "10r/s"
    burst: int = 20
    max_body: str = "100m"
    timeout_s: int = 3600
    user: str = "root"
    workdir: str = "/"
    executable: tuple[str, ...] = ("comfy-parallel",)
    comfyui: str | None = None
    comfyui_version: str | None = None
    comfy_parallel_home: str | None = None
    warmup_checkpoint: str | None = None
    comfy_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = field(default_factory=tuple)


# -- command line ---------------------------------------------------------------------------------------------

def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``deploy``; the caller dispatches ``args.command == "deploy"`` to :func:`run`."""
    p = subparsers.add_parser("deploy", help="print an nginx config, a systemd unit or a start script",
                              description="Print a deployment file generated from the settings `serve` would "
                                          "use: an nginx http{}-level config, a systemd unit, or a bash start "
                                          "script. Arguments after -- go to ComfyUI.",
                              epilog=DEPLOY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"),
                   help="ComfyUI folder (default: $COMFYUI_DIR, else the provisioned release)")
    p.add_argument("--comfyui-version", default=None, choices=sorted(provision.RELEASES),
                   help="provisioned release to serve when no folder is given (default: serve's default)")
    p.add_argument("--devices", help="as for serve; default: every visible CUDA device, else 2 CPU workers")
    p.add_argument("--entry-ports", default="auto", help="as for serve (default: auto)")
    p.add_argument("--default-route", default=DEFAULT_ROUTE, help=f"as for serve (default: {DEFAULT_ROUTE})")
    p.add_argument("--affinity-slack", default=str(DEFAULT_SLACK), metavar="N",
                   help=f"as for serve (default: {DEFAULT_SLACK})")
    p.add_argument("--worker-vram-limit", metavar="SIZE", help="as for serve")
    p.add_argument("--warmup-checkpoint", metavar="NAME", help="as for serve")
    p.add_argument("--switch-interval-ms", metavar="MS", help="as for serve")
    p.add_argument("--upstream-host", default=None,
                   help="address nginx reaches ComfyUI on, also ComfyUI's --listen in the generated command "
                        "(default: ComfyUI's --listen after --, else 127.0.0.1)")
    p.add_argument("--upstream-port", type=int, default=None,
                   help="ComfyUI's --port (default: --port after --, else 8188)")
    p.add_argument("--public-port", type=int, default=80, help="nginx listen port of the main server block (80)")
    p.add_argument("--public-host", default=None,
                   help="nginx listen address (default: every address)")
    p.add_argument("--public-entry-ports", default="auto",
                   help="nginx listen ports, one per device: 'auto' (entry port + 1000: 9181, 9182, ..), a first "
                        "port, a list, or 'none' for no per-device server blocks")
    p.add_argument("--server-name", default="_", help="nginx server_name (default: _ = any)")
    p.add_argument("--rate", default="10r/s",
                   help="nginx limit_req rate for prompt submissions per client address (default: 10r/s)")
    p.add_argument("--burst", type=int, default=20, help="nginx limit_req burst (default: 20)")
    p.add_argument("--max-body", default="100m", help="nginx client_max_body_size, for uploads (default: 100m)")
    p.add_argument("--timeout", type=int, default=3600,
                   help="nginx proxy read/send timeout in seconds; websockets idle this long (default: 3600)")
    p.add_argument("--user", default=None, help="systemd User= (default: the current user)")
    p.add_argument("--workdir", default=None,
                   help="working directory of the service/script (default: the ComfyUI folder, else the "
                        "current directory)")
    p.add_argument("--venv", default=None,
                   help="virtual environment holding comfy-parallel (default: the one running this command)")
    p.add_argument("--extra-comfy-args", default="",
                   help="more ComfyUI arguments as one string, e.g. --extra-comfy-args='--highvram'")


def run(args: argparse.Namespace, comfy_args: Sequence[str] = ()) -> int:
    """Print the requested file on stdout; 2 with a message on stderr when a setting is unusable."""
    from ..cli import serve_settings  # lazy: cli imports this module

    try:
        settings = serve_settings(args)
        opts = options_from_args(args, settings, [*comfy_args, *shlex.split(args.extra_comfy_args or "")])
    except (SettingsError, ValueError) as err:
        print(f"comfy-parallel deploy: {err}", file=sys.stderr)
        return 2
    renderers = {"nginx": render_nginx, "systemd": render_systemd, "script": render_script}
    sys.stdout.write(renderers[args.kind](settings, opts))
    return 0


def options_from_args(args: argparse.Namespace, settings: Settings, comfy_args: Sequence[str],
                      env: Mapping[str, str] | None = None) -> DeployOptions:
    """Resolve defaults the way ``serve`` and ComfyUI would, so the files match what will actually run."""
    env = os.environ if env is None else env
    comfy_args = list(comfy_args)
    listen = comfy_option(comfy_args, "--listen", const="0.0.0.0,::")
    port_text = comfy_option(comfy_args, "--port")
    host = args.upstream_host
    if host is None:
        host = _connect_host(listen) if listen is not None else "127.0.0.1"
    if port_text is not None:
        if not port_text.isdigit():
            raise SettingsError(f"ComfyUI --port {port_text!r} is not a port number")
        if args.upstream_port is not None and args.upstream_port != int(port_text):
            raise SettingsError(f"--upstream-port {args.upstream_port} disagrees with ComfyUI's --port {port_text}")
    port = args.upstream_port if args.upstream_port is not None else int(port_text or 8188)
    # the generated command must make ComfyUI listen where nginx will connect
    comfy_args = [*(["--listen", host.strip("[]")] if listen is None else []),
                  *(["--port", str(port)] if port_text is None else []), *comfy_args]

    public_entry = public_entry_ports(args.public_entry_ports, settings) if settings.enabled else ()
    _check_ports(host, port, args.public_port, public_entry, settings)
    if not re.fullmatch(r"[1-9][0-9]*r/[sm]", args.rate):
        raise SettingsError(f"--rate {args.rate!r}: write requests per second or minute, e.g. 10r/s or 300r/m")
    if args.burst < 0 or args.timeout < 1:
        raise SettingsError("--burst must be >= 0 and --timeout >= 1")
    if not re.fullmatch(r"[0-9]+[kKmMgG]?", args.max_body):
        raise SettingsError(f"--max-body {args.max_body!r}: write a size like 100m")

    comfyui = str(Path(args.comfyui).expanduser().resolve()) if args.comfyui else None
    workdir = args.workdir or comfyui or os.getcwd()
    extra_env: list[tuple[str, str]] = []
    if "COMFY_MULTI_GPU_SCHED" in env:
        extra_env.append(("COMFY_MULTI_GPU_SCHED", env["COMFY_MULTI_GPU_SCHED"]))
    return DeployOptions(
        upstream_host=host, upstream_port=port, public_port=args.public_port, public_host=args.public_host,
        public_entry_ports=public_entry, server_name=args.server_name, rate=args.rate, burst=args.burst,
        max_body=args.max_body, timeout_s=args.timeout, user=args.user or _current_user(),
        workdir=str(Path(workdir).expanduser().resolve()), executable=executable_for(args.venv),
        comfyui=comfyui, comfyui_version=args.comfyui_version, comfy_parallel_home=str(provision.home()),
        warmup_checkpoint=getattr(args, "warmup_checkpoint", None), comfy_args=tuple(comfy_args),
        extra_env=tuple(extra_env))


def comfy_option(comfy_args: Sequence[str], name: str, const: str | None = None) -> str | None:
    """The value of ``name`` among ComfyUI's arguments (the last one wins, as in argparse); None if absent."""
    value: str | None = None
    for i, arg in enumerate(comfy_args):
        if arg == name:
            nxt = comfy_args[i + 1] if i + 1 < len(comfy_args) else None
            if nxt is not None and not nxt.startswith("-"):
                value = nxt
            elif const is not None:
                value = const
            else:
                raise SettingsError(f"ComfyUI {name} needs a value")
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def _connect_host(listen: str) -> str:
    """Where to connect to a ComfyUI started with ``--listen listen``: a wildcard means this host."""
    for host in (h.strip() for h in listen.split(",")):
        if host not in WILDCARD:
            return f"[{host}]" if ":" in host and not host.startswith("[") else host
    return "127.0.0.1"


def public_entry_ports(text: str, settings: Settings) -> tuple[int, ...]:
    """nginx's per-device listen ports: 'auto' = entry port + 1000 (9181.. without entry ports)."""
    n = len(settings.devices)
    if text.strip().lower() != "auto":
        return parse_entry_ports(text, n)
    if settings.entry_ports:
        ports = tuple(p + PUBLIC_PORT_OFFSET for p in settings.entry_ports)
        if max(ports) > 65535:
            raise SettingsError("--public-entry-ports auto: entry port + 1000 is past 65535; give the ports")
        return ports
    return tuple(FIRST_PUBLIC_ENTRY_PORT + i for i in range(n))


def _check_ports(host: str, port: int, public_port: int, public_entry: tuple[int, ...],
                 settings: Settings) -> None:
    """nginx and comfy-parallel on one host cannot bind the same port: refuse a config that would try."""
    public = [public_port, *public_entry]
    if any(not 0 < p < 65536 for p in [port, *public]):
        raise SettingsError(f"ports must be in 1..65535: upstream {port}, public {public}")
    if len(set(public)) != len(public):
        raise SettingsError(f"nginx would listen on one port twice: --public-port {public_port}, "
                            f"--public-entry-ports {list(public_entry)}")
    if host in LOOPBACK:
        taken = {port, *settings.entry_ports}
        clash = sorted(taken.intersection(public))
        if clash:
            raise SettingsError(f"nginx would listen on {clash}, which comfy-parallel itself listens on "
                                f"(main port {port}, entry ports {list(settings.entry_ports)}); choose other "
                                "--public-port/--public-entry-ports")


def _current_user() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def executable_for(venv: str | None) -> tuple[str, ...]:
    """The command that starts comfy-parallel: the venv's console script, else ``python -m comfy_parallel``."""
    if venv:
        root = Path(venv).expanduser().resolve()
    elif sys.prefix != sys.base_prefix:
        root = Path(sys.prefix).resolve()
    else:
        return (str(Path(sys.executable).resolve()), "-m", "comfy_parallel")
    script = root / "bin" / "comfy-parallel"
    if script.exists() or venv:
        return (str(script),)
    return (str(root / "bin" / "python"), "-m", "comfy_parallel")


# -- the serve command line -----------------------------------------------------------------------------------

def devices_text(settings: Settings) -> str:
    return ",".join("cpu" if d.kind == "cpu" else str(d.ordinal) for d in settings.devices)


def serve_command(settings: Settings, opts: DeployOptions) -> list[str]:
    """``comfy-parallel serve`` with every live setting spelled out, so the service does not re-guess them."""
    cmd = [*opts.executable, "serve"]
    if opts.comfyui:
        cmd += ["--comfyui", opts.comfyui]
    elif opts.comfyui_version:
        cmd += ["--comfyui-version", opts.comfyui_version]
    cmd += ["--devices", devices_text(settings),
            "--entry-ports", ",".join(map(str, settings.entry_ports)) or "none",
            "--default-route", str(settings.default_route)]
    if settings.default_route == "pool":
        cmd += ["--affinity-slack", str(settings.affinity_slack)]
    if settings.worker_vram_limit is not None:
        cmd += ["--worker-vram-limit", str(settings.worker_vram_limit)]
    if opts.warmup_checkpoint:
        cmd += ["--warmup-checkpoint", opts.warmup_checkpoint]
    if settings.switch_interval_ms is not None:
        cmd += ["--switch-interval-ms", f"{settings.switch_interval_ms:g}"]
    return [*cmd, "--", *opts.comfy_args]


def service_env(opts: DeployOptions) -> list[tuple[str, str]]:
    env = [("PYTHONUNBUFFERED", "1")]
    if opts.comfyui:
        env.append(("COMFYUI_DIR", opts.comfyui))
    if opts.comfy_parallel_home:
        env.append(("COMFY_PARALLEL_HOME", opts.comfy_parallel_home))
    return env + list(opts.extra_env)


def _summary(settings: Settings) -> str:
    devices = ", ".join(d.label for d in settings.devices)
    entry = ",".join(map(str, settings.entry_ports)) or "none"
    return f"devices {devices}; entry ports {entry}; default route {settings.default_route}"


# -- nginx ----------------------------------------------------------------------------------------------------

def _listen(opts: DeployOptions, port: int) -> str:
    return f"{opts.public_host}:{port}" if opts.public_host else str(port)


def _proxy_common(opts: DeployOptions, target_gpu: int | None = None) -> list[str]:
    """Server-level proxy settings, inherited by every location (none of them sets its own headers)."""
    lines = [
        f"client_max_body_size {opts.max_body};",
        "proxy_http_version 1.1;",
        "proxy_set_header Host $http_host;  # with its port: ComfyUI compares Host and Origin",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $comfy_parallel_connection_upgrade;",
        "proxy_set_header X-Real-IP $remote_addr;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
    ]
    if target_gpu is not None:
        lines.append(f"proxy_set_header X-TARGET-GPU {target_gpu};")
    lines += [
        "proxy_connect_timeout 10s;",
        f"proxy_read_timeout {opts.timeout_s}s;  # websockets stay open between prompts",
        f"proxy_send_timeout {opts.timeout_s}s;",
        "proxy_buffering off;  # progress and previews reach the browser at once",
        "limit_req_status 429;",
        "limit_req_log_level warn;",
    ]
    return lines


def _limit(opts: DeployOptions) -> str:
    return f"limit_req zone=comfy_parallel_prompt burst={opts.burst} nodelay;"


def _block(head: str, body: Iterable[str], indent: int = 0) -> list[str]:
    pad = "    " * indent
    out = [f"{pad}{head} {{"]
    for line in body:
        out.append(f"{pad}    {line}" if line else "")
    out.append(f"{pad}}}")
    return out


def render_nginx(settings: Settings, opts: DeployOptions) -> str:
    """An http{}-level snippet (e.g. /etc/nginx/conf.d/comfy-parallel.conf): main server plus one per device."""
    up_main = "comfy_parallel"
    out = [
        "# comfy-parallel behind nginx; generated by `comfy-parallel deploy nginx`",
        f"# {_summary(settings)}; ComfyUI at {opts.upstream_host}:{opts.upstream_port}",
        "# Include at http{} level, e.g. as /etc/nginx/conf.d/comfy-parallel.conf.",
        "",
        "# websocket upgrade; an empty Connection otherwise, so upstream keepalive works",
    ]
    out += _block("map $http_upgrade $comfy_parallel_connection_upgrade", ["default upgrade;", "''      '';"])
    out += ["", "# rate limit prompt submissions (POST) per client address; other methods are not counted"]
    out += _block("map $request_method $comfy_parallel_prompt_key", ["POST    $binary_remote_addr;",
                                                                     "default '';"])
    out += [f"limit_req_zone $comfy_parallel_prompt_key zone=comfy_parallel_prompt:10m rate={opts.rate};", ""]
    out += _block(f"upstream {up_main}", [f"server {opts.upstream_host}:{opts.upstream_port};", "keepalive 16;"])
    devices = settings.devices if settings.enabled else ()
    for d in devices:
        if settings.entry_ports:
            out += _block(f"upstream comfy_parallel_gpu{d.index}",
                          [f"server {opts.upstream_host}:{settings.entry_ports[d.index]};", "keepalive 8;"])

    body = [f"listen {_listen(opts, opts.public_port)};", f"server_name {opts.server_name};", "",
            *_proxy_common(opts), ""]
    body += _block("location /", [f"proxy_pass http://{up_main};"])
    body += _block("location ~ ^/(api/)?prompt$", [_limit(opts), f"proxy_pass http://{up_main};"])
    for d in devices:
        body += ["", f"# device {d.index} ({d.label}): ComfyUI routes /gpu{d.index}/... itself, "
                     "so the URI goes up unchanged"]
        inner = [f"proxy_pass http://{up_main};"]
        inner += _block(f"location ~ ^/gpu{d.index}/(api/)?prompt$", [_limit(opts), f"proxy_pass http://{up_main};"])
        body += _block(f"location /gpu{d.index}/", inner)
    out += ["", "# main entry: routing by X-TARGET-GPU header, /gpuN/ prefix, or the default route"]
    out += _block("server", body)

    for d, port in zip(devices, opts.public_entry_ports):
        if settings.entry_ports:
            upstream, target = f"comfy_parallel_gpu{d.index}", None
            note = f"proxies to comfy-parallel's entry port {settings.entry_ports[d.index]}"
        else:
            upstream, target = up_main, d.index
            note = "proxies to the main port with X-TARGET-GPU set"
        out += ["", f"# device {d.index} ({d.label}) on its own port: {note}"]
        body = [f"listen {_listen(opts, port)};", f"server_name {opts.server_name};", "",
                *_proxy_common(opts, target), ""]
        body += _block("location /", [f"proxy_pass http://{upstream};"])
        body += _block("location ~ ^(/gpu[0-9]+)?/(api/)?prompt$", [_limit(opts), f"proxy_pass http://{upstream};"])
        out += _block("server", body)
    return "\n".join(out) + "\n"


def render_nginx_test_config(snippet: str, pid: str, error_log: str, temp_dir: str, user: str | None = None,
                             without: Iterable[str] = ()) -> str:
    """A standalone nginx.conf around ``snippet`` with every path under ``temp_dir``, for ``nginx -t`` and tests.

    ``without``: temp-path modules the nginx binary lacks (``fastcgi``, ``uwsgi``, ``scgi``, see ``nginx -V``);
    their directives would be unknown there, and each present one must get a path or nginx tries its
    compiled-in default, which only root can create.
    """
    temp = Path(temp_dir)
    paths = {"client_body": "client_body", "proxy": "proxy", "fastcgi": "fastcgi", "uwsgi": "uwsgi",
             "scgi": "scgi"}
    http = [f"access_log {temp / 'access.log'};"]
    for module, sub in paths.items():
        if module not in set(without):
            http.append(f"{module}_temp_path {temp / sub};")
    http += ["", *snippet.rstrip("\n").split("\n")]
    out = ["# standalone nginx.conf wrapping a comfy-parallel snippet (tests, `nginx -t`)"]
    if user:
        out.append(f"user {user};")
    out += ["worker_processes 1;", f"pid {pid};", f"error_log {error_log} info;", ""]
    out += _block("events", ["worker_connections 256;"])
    out += _block("http", http)
    return "\n".join(out) + "\n"


# -- systemd --------------------------------------------------------------------------------------------------

def _systemd_word(word: str, dollars: bool = True) -> str:
    """Quote one ExecStart word: systemd expands % specifiers and $ variables, and splits on whitespace.

    ``dollars=False`` for Environment= values, where systemd leaves $ alone.
    """
    word = word.replace("%", "%%")
    if dollars:
        word = word.replace("$", "$$")
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_systemd(settings: Settings, opts: DeployOptions) -> str:
    """``comfy-parallel.service``: restarts after a crash (what ``serve --supervise`` does without systemd), SIGTERM
    to stop (a drain), many open files for websockets."""
    lines = [
        "# comfy-parallel.service; generated by `comfy-parallel deploy systemd`",
        f"# {_summary(settings)}; ComfyUI at {opts.upstream_host}:{opts.upstream_port}",
        "# Install: save as /etc/systemd/system/comfy-parallel.service, then",
        "#   systemctl daemon-reload && systemctl enable --now comfy-parallel",
        "[Unit]",
        "Description=comfy-parallel: one ComfyUI process serving several GPUs",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={opts.user}",
        f"WorkingDirectory={opts.workdir.replace('%', '%%')}",
    ]
    lines += [f"Environment={_systemd_word(f'{k}={v}', dollars=False)}" for k, v in service_env(opts)]
    lines += [
        "ExecStart=" + " ".join(_systemd_word(w) for w in serve_command(settings, opts)),
        "# A crash (kill -9, the OOM killer, a native crash, exit code 75 after a CUDA error that poisons a device)",
        "# restarts the service; the write-ahead queue queues every unfinished prompt again. Exit codes 2 (bad",
        "# settings) and 3 (ComfyUI failed the version gate) do not: a restart would fail the same way.",
        "Restart=on-failure",
        "RestartSec=1",
        "RestartPreventExitStatus=2 3",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=60",
        "LimitNOFILE=65536",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


# -- start script ---------------------------------------------------------------------------------------------

def render_script(settings: Settings, opts: DeployOptions) -> str:
    """A bash script that execs the same command line as the unit; its own arguments go to ComfyUI."""
    cmd = " ".join(shlex.quote(w) for w in serve_command(settings, opts))
    lines = [
        "#!/usr/bin/env bash",
        "# Start comfy-parallel; generated by `comfy-parallel deploy script`",
        f"# {_summary(settings)}; ComfyUI at {opts.upstream_host}:{opts.upstream_port}",
        "# Arguments to this script are appended to ComfyUI's arguments.",
        "set -euo pipefail",
        "",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in service_env(opts)]
    lines += [
        "ulimit -n 65536 2>/dev/null || true  # one open file per websocket client",
        f"cd {shlex.quote(opts.workdir)}",
        f'exec {cmd} "$@"',
    ]
    return "\n".join(lines) + "\n"
