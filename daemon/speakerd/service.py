"""``speakerd service``: run the daemon at login under the platform's service manager.

macOS gets a launchd *user agent* (``~/Library/LaunchAgents``, domain ``gui/$UID``), never a system
LaunchDaemon: microphone access needs the logged-in user's consent (TCC), which a system daemon
cannot obtain. Linux gets a systemd *user* unit with the same semantics. Either way the daemon runs in
the foreground, logs to stderr and is restarted after a crash, not after a clean exit
(launchd ``KeepAlive = {SuccessfulExit = false}``; systemd ``Restart=on-failure``).
See docs/service.md.
"""

from __future__ import annotations

import argparse
import configparser
import logging
import os
import plistlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers.expat import ExpatError

from .errors import SpeakerdError

logger = logging.getLogger(__name__)

LABEL = "org.speakerd.agent"
"""launchd label (reverse-DNS, unique per user)."""
UNIT = "speakerd.service"
THROTTLE_S = 10
"""Least seconds between two starts (launchd ThrottleInterval, systemd RestartSec)."""
STOP_TIMEOUT_S = 5
"""systemd waits this long after SIGTERM before SIGKILL; the daemon needs under 2 s."""
KINDS = ("launchd", "systemd")
RUN_TIMEOUT_S = 30.0

AGENT_KEYS: dict[str, object] = {
    "RunAtLoad": True,
    "KeepAlive": {"SuccessfulExit": False},  # restart after a crash or a kill, not after a clean exit
    "ThrottleInterval": THROTTLE_S,
    "ProcessType": "Interactive",  # real-time audio: no App Nap style throttling
    "ExitTimeOut": STOP_TIMEOUT_S,  # SIGTERM, then SIGKILL after this
}
"""The agent's fixed keys. launchd/org.speakerd.agent.plist is the same agent with placeholder
paths, for reading or a manual install; a test keeps the two equal. Kept in code so an installed
package needs no data files."""


class ServiceError(SpeakerdError):
    """A service install/uninstall step failed; the message names the step."""


@dataclass(frozen=True)
class ServiceSpec:
    """What to run and where its files go. Paths are absolute: launchd expands neither ~ nor $PATH."""

    program: tuple[str, ...]
    """The command that starts the daemon in the foreground, e.g. (/abs/speakerd, run)."""
    home: Path
    environment: dict[str, str] = field(default_factory=dict)
    label: str = LABEL

    @property
    def log_dir(self) -> Path:
        return self.home / "Library" / "Logs" / "speakerd"

    @property
    def plist_path(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{self.label}.plist"

    @property
    def unit_path(self) -> Path:
        return self.home / ".config" / "systemd" / "user" / UNIT


def speakerd_program() -> tuple[str, ...]:
    """The absolute command of the ``speakerd`` running now: the entry point beside this interpreter
    (a virtualenv's own, activated or not), else the one on PATH, else ``python -m speakerd.cli``.

    The interpreter's path is kept as it is: a virtualenv's ``python`` is a symlink, and resolving it
    names the base interpreter, which cannot import speakerd.
    """
    interpreter = Path(sys.executable).absolute()
    beside = interpreter.parent / "speakerd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return (str(beside),)
    found = shutil.which("speakerd")
    if found:
        return (str(Path(found).resolve()),)
    return (str(interpreter), "-m", "speakerd.cli")


def default_environment() -> dict[str, str]:
    """The variables a login service lacks: launchd starts agents with a minimal environment."""
    env = {"PYTHONUNBUFFERED": "1", "LANG": os.environ.get("LANG", "en_US.UTF-8")}
    if "PYTHONPATH" in os.environ:  # a checkout run with PYTHONPATH=daemon keeps working as a service
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)
    return env


def build_spec(config: str | None, program: str | None, home: Path | None = None) -> ServiceSpec:
    base = (str(Path(program).expanduser().resolve()),) if program else speakerd_program()
    command = (*base, "run")
    if config:
        path = Path(config).expanduser().resolve()
        if not path.is_file():
            raise ServiceError(f"--config {config}: no such file")
        command = (*command, "--config", str(path))
    return ServiceSpec(program=command, home=home or Path.home(), environment=default_environment())


# -- rendering ------------------------------------------------------------------------------------


def launchd_agent(spec: ServiceSpec) -> dict[str, object]:
    """The agent's plist as a dict: the template's keys with the real paths filled in."""
    return {
        "Label": spec.label,
        "ProgramArguments": list(spec.program),
        **AGENT_KEYS,
        "StandardOutPath": str(spec.log_dir / "speakerd.out.log"),
        "StandardErrorPath": str(spec.log_dir / "speakerd.err.log"),
        "EnvironmentVariables": dict(spec.environment),
        "WorkingDirectory": str(spec.home),
    }


def render_launchd(spec: ServiceSpec) -> bytes:
    """The plist XML, checked by a plistlib round trip and for the keys the agent relies on."""
    plist = launchd_agent(spec)
    data = plistlib.dumps(plist, fmt=plistlib.FMT_XML, sort_keys=True)
    check_launchd(data)
    return data


def check_launchd(data: bytes) -> dict[str, object]:
    """Parse and check a rendered agent; ServiceError naming the problem."""
    try:
        plist = plistlib.loads(data)
    except (plistlib.InvalidFileException, ValueError, ExpatError) as e:
        raise ServiceError(f"the launchd agent is not a valid plist: {e}") from None
    if plistlib.loads(plistlib.dumps(plist)) != plist:
        raise ServiceError("the launchd agent does not survive a plist round trip")
    args = plist.get("ProgramArguments")
    problems = []
    if not isinstance(args, list) or not args or not Path(str(args[0])).is_absolute():
        problems.append("ProgramArguments must start with an absolute path")
    if plist.get("KeepAlive") != {"SuccessfulExit": False}:
        problems.append("KeepAlive must be {SuccessfulExit = false} (restart after a crash only)")
    if plist.get("RunAtLoad") is not True:
        problems.append("RunAtLoad must be true")
    if plist.get("ProcessType") != "Interactive":
        problems.append("ProcessType must be Interactive (audio must not be throttled)")
    if not isinstance(plist.get("ThrottleInterval"), int):
        problems.append("ThrottleInterval must be an integer")
    for key in ("StandardOutPath", "StandardErrorPath"):
        if not Path(str(plist.get(key, ""))).is_absolute():
            problems.append(f"{key} must be an absolute path")
    if problems:
        raise ServiceError("the launchd agent is wrong: " + "; ".join(problems))
    return plist


def _systemd_quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "/._-:=+@," for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_systemd(spec: ServiceSpec) -> str:
    """The user unit, checked by parsing it back."""
    env = "\n".join(f"Environment={_systemd_quote(f'{k}={v}')}" for k, v in sorted(spec.environment.items()))
    text = f"""\
[Unit]
Description=speakerd: who is speaking, published over ZeroMQ
After=pipewire-pulse.service pulseaudio.service

[Service]
Type=simple
ExecStart={" ".join(_systemd_quote(a) for a in spec.program)}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec={THROTTLE_S}
KillSignal=SIGTERM
TimeoutStopSec={STOP_TIMEOUT_S}
{env}

[Install]
WantedBy=default.target
"""
    check_systemd(text)
    return text


def check_systemd(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    try:
        parser.read_string(text)
    except configparser.Error as e:
        raise ServiceError(f"the systemd unit does not parse: {e}") from None
    service = parser["Service"] if parser.has_section("Service") else {}
    exec_start = str(service.get("ExecStart", ""))
    if not exec_start.startswith("/") and not exec_start.startswith('"/'):
        raise ServiceError("the systemd unit's ExecStart must start with an absolute path")
    if service.get("Restart") != "on-failure":
        raise ServiceError("the systemd unit must restart on failure only")
    return parser


# -- actions --------------------------------------------------------------------------------------

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_command(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)


@dataclass(frozen=True)
class Plan:
    """What an action writes, removes and runs, in order; ``--dry-run`` prints it."""

    write: tuple[tuple[Path, bytes], ...] = ()
    remove: tuple[Path, ...] = ()
    make_dirs: tuple[Path, ...] = ()
    commands: tuple[tuple[str, ...], ...] = ()
    may_fail: frozenset[tuple[str, ...]] = frozenset()
    """Commands whose failure is expected and harmless (e.g. unloading an agent that is not loaded)."""


def plan(action: str, kind: str, spec: ServiceSpec, uid: int) -> Plan:
    if kind == "launchd":
        domain, target = f"gui/{uid}", f"gui/{uid}/{spec.label}"
        unload = ("launchctl", "bootout", target)
        if action == "install":
            return Plan(
                write=((spec.plist_path, render_launchd(spec)),),
                make_dirs=(spec.plist_path.parent, spec.log_dir),
                commands=(unload, ("launchctl", "enable", target), ("launchctl", "bootstrap", domain, str(spec.plist_path))),
                may_fail=frozenset({unload}),
            )
        if action == "uninstall":
            return Plan(remove=(spec.plist_path,), commands=(unload,), may_fail=frozenset({unload}))
        return Plan(commands=(("launchctl", "print", target),))
    user = ("systemctl", "--user")
    if action == "install":
        return Plan(
            write=((spec.unit_path, render_systemd(spec).encode()),),
            make_dirs=(spec.unit_path.parent,),
            commands=((*user, "daemon-reload"), (*user, "enable", "--now", UNIT)),
        )
    if action == "uninstall":
        disable = (*user, "disable", "--now", UNIT)
        return Plan(remove=(spec.unit_path,), commands=(disable, (*user, "daemon-reload")), may_fail=frozenset({disable}))
    return Plan(commands=((*user, "status", "--no-pager", UNIT),))


def describe(p: Plan) -> str:
    lines = []
    for d in p.make_dirs:
        lines.append(f"mkdir -p {d}")
    for path, data in p.write:
        lines.append(f"write {path}:")
        lines.extend("    " + line for line in data.decode().splitlines())
    for path in p.remove:
        lines.append(f"remove {path}")
    for cmd in p.commands:
        lines.append("run " + " ".join(cmd) + ("   (may fail harmlessly)" if cmd in p.may_fail else ""))
    return "\n".join(lines)


def execute(p: Plan, runner: Runner = run_command) -> list[subprocess.CompletedProcess[str]]:
    """Write, remove, then run each command; ServiceError on the first real failure."""
    for d in p.make_dirs:
        d.mkdir(parents=True, exist_ok=True)
    for path, data in p.write:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    for path in p.remove:
        path.unlink(missing_ok=True)
    done = []
    for cmd in p.commands:
        try:
            proc = runner(cmd)
        except FileNotFoundError:
            raise ServiceError(f"{cmd[0]} not found: is this the right --kind for this system?") from None
        done.append(proc)
        if proc.returncode != 0 and cmd not in p.may_fail:
            raise ServiceError(f"{' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return done


def default_kind() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


# -- command line ---------------------------------------------------------------------------------


def add_service_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("install", "uninstall", "status"))
    p.add_argument("--dry-run", action="store_true", help="print what would be written and run, and do nothing")
    p.add_argument("--kind", choices=KINDS, help=f"service manager (default here: {default_kind()})")
    p.add_argument("--config", metavar="F", help="TOML settings file the service runs with (made absolute)")
    p.add_argument("--program", metavar="PATH", help="the speakerd executable (default: the one on PATH)")


def main_service(args: argparse.Namespace, runner: Runner = run_command) -> int:
    kind = args.kind or default_kind()
    spec = build_spec(args.config, args.program)
    p = plan(args.action, kind, spec, os.getuid())
    if args.dry_run:
        print(describe(p))
        return 0
    done = execute(p, runner)
    if args.action == "status":
        out = done[-1]
        print((out.stdout or out.stderr).rstrip())
        return out.returncode
    where = spec.plist_path if kind == "launchd" else spec.unit_path
    verb = "installed and started" if args.action == "install" else "stopped and removed"
    print(f"{kind} service {verb}: {where}")
    if args.action == "install" and kind == "launchd":
        print(f"logs: {spec.log_dir}; the first start asks for microphone access (see docs/service.md)")
    return 0
