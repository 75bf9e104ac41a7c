"""A PulseAudio null sink as the microphone, for live tests on machines without a sound card.

What it does, and the shell equivalent (for CI scripts):

    pactl info >/dev/null 2>&1 || pulseaudio -D --exit-idle-time=-1
    pactl unload-module module-suspend-on-idle 2>/dev/null || true
    pactl load-module module-null-sink sink_name=speakerd_test
    pactl set-default-source speakerd_test.monitor
    paplay --device=speakerd_test clip.wav      # what is played is what the "mic" hears

module-suspend-on-idle is unloaded because a suspended null sink's monitor delivers no audio at
all while nothing plays, so a recording would hold only the played parts, not real elapsed time.

Recording goes through ALSA's ``pulse`` PCM (libasound2-plugins), which PortAudio lists only if a
PulseAudio server answered when PortAudio was initialised: call
``speakerd.devices.rescan_devices()`` after ``ensure_pulse()``.

As root, plain ``pulseaudio -D`` works (it warns "not intended to be run as root" and puts its
socket under /tmp/pulse-*); ``--system`` is not needed and would need a different client set-up.
The daemon and the module are removed again by ``PulseSink.close()`` only if this helper created them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SINK = "speakerd_test"
SUSPEND_MODULE = "module-suspend-on-idle"
TOOLS = ("pulseaudio", "pactl", "paplay")
COMMAND_TIMEOUT_S = 10.0
START_TIMEOUT_S = 10.0
POLL_S = 0.1


class PulseError(RuntimeError):
    """The PulseAudio set-up failed; the message carries the command and its output."""


def missing_tools() -> list[str]:
    """Programs the helper needs that are not installed (empty when all are)."""
    return [t for t in TOOLS if shutil.which(t) is None]


def pactl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["pactl", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise PulseError(f"pactl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def server_running() -> bool:
    return pactl("info", check=False).returncode == 0


@dataclass
class PulseSink:
    """The running null sink. ``daemon_pid`` / ``module_index`` are set only for what we created."""

    sink: str
    daemon_pid: int | None
    module_index: int | None
    previous_source: str | None
    unloaded_suspend: bool

    @property
    def monitor(self) -> str:
        return f"{self.sink}.monitor"

    def play(self, path: Path) -> subprocess.Popen[bytes]:
        """Start playing ``path`` into the sink; the caller waits on the process (with a timeout)."""
        return subprocess.Popen(["paplay", f"--device={self.sink}", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def close(self) -> None:
        """Undo what ensure_pulse did: stop the daemon it started (by pid), or else restore the
        default source and unload the module it loaded."""
        if self.daemon_pid is not None:
            _stop_daemon(self.daemon_pid)
            return
        if self.previous_source and self.previous_source != self.monitor:
            pactl("set-default-source", self.previous_source, check=False)
        if self.module_index is not None:
            pactl("unload-module", str(self.module_index), check=False)
        if self.unloaded_suspend:
            pactl("load-module", SUSPEND_MODULE, check=False)


def ensure_pulse() -> PulseSink:
    """Make sure a server runs, with the null sink loaded once and its monitor as default source."""
    missing = missing_tools()
    if missing:
        raise PulseError(f"not installed: {', '.join(missing)} (apt-get install pulseaudio pulseaudio-utils)")
    daemon_pid = None
    if not server_running():
        daemon_pid = _start_daemon()
    modules = pactl("list", "short", "modules").stdout
    unloaded_suspend = any(line.split("\t")[1:2] == [SUSPEND_MODULE] for line in modules.splitlines())
    if unloaded_suspend:
        pactl("unload-module", SUSPEND_MODULE)
    sinks = pactl("list", "short", "sinks").stdout
    module_index = None
    if not any(line.split("\t")[1:2] == [SINK] for line in sinks.splitlines()):
        out = pactl("load-module", "module-null-sink", f"sink_name={SINK}").stdout.strip()
        module_index = int(out)
    previous = _default_source()
    pactl("set-default-source", f"{SINK}.monitor")
    log.info("PulseAudio null sink %s ready (daemon %s, module %s)", SINK,
             daemon_pid or "already running", module_index if module_index is not None else "already loaded")
    return PulseSink(SINK, daemon_pid, module_index, previous, unloaded_suspend)


def _default_source() -> str | None:
    m = re.search(r"^Default Source: (.+)$", pactl("info").stdout, re.MULTILINE)
    return m.group(1).strip() if m else None


def _runtime_dir() -> Path | None:
    """The server's runtime directory, from the socket path ``pactl info`` reports."""
    m = re.search(r"^Server String: (.+)$", pactl("info").stdout, re.MULTILINE)
    if not m:
        return None
    socket = Path(m.group(1).strip().removeprefix("unix:"))
    return socket.parent


def _start_daemon() -> int | None:
    """Start ``pulseaudio -D`` and wait (bounded) until it answers; returns its pid."""
    cmd = ["pulseaudio", "-D", "--exit-idle-time=-1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=os.environ.copy())
    if proc.returncode != 0:
        raise PulseError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server_running():
        if time.monotonic() > deadline:
            raise PulseError(f"{' '.join(cmd)} started but pactl info got no answer within {START_TIMEOUT_S} s")
        time.sleep(POLL_S)  # polling a readiness condition under a deadline
    runtime = _runtime_dir()
    pid_file = runtime / "pid" if runtime else None
    pid = int(pid_file.read_text().split()[0]) if pid_file and pid_file.is_file() else None
    log.info("started PulseAudio (pid %s, runtime %s)", pid, runtime)
    return pid


def _stop_daemon(pid: int) -> None:
    """SIGTERM the daemon we started and wait (bounded) for it to go."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + COMMAND_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(POLL_S)
    log.warning("PulseAudio pid %d did not exit within %s s", pid, COMMAND_TIMEOUT_S)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (no init to reap the daemonised process) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
