"""What the daemon's lifecycle promises: bounded shutdown, reload results, a fast exit; and the
factories it opens its source and backend with.

Kept apart from ``daemon.Daemon`` so the daemon module holds only the object that runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from types import FrameType
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

from .settings import Settings
from .sources import RecoverySettings, Source, open_source

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .embedding.backend import EmbeddingBackend

logger = logging.getLogger(__name__)

LIVE_SECTIONS = ("matching", "decision")
"""Settings sections a reload applies to the running daemon; every other change needs a restart."""

SettingsLoader = Callable[[], Settings]
SourceFactory = Callable[[Settings], Source]
BackendFactory = Callable[["ModelBundle", Settings], "EmbeddingBackend"]


def default_source_factory(recovery: RecoverySettings | None = None) -> SourceFactory:
    def make(settings: Settings) -> Source:
        d = settings.daemon
        return open_source(d.source, settings.audio, realtime=d.realtime, recovery=recovery)

    return make


def default_backend(bundle: ModelBundle, settings: Settings) -> EmbeddingBackend:
    from .embedding import backend_for

    # every embedding setting (precision, trunk) and the windows the daemon will send
    return backend_for(bundle, settings.embedding, settings.windows)


@dataclass(frozen=True)
class LifecycleTiming:
    """Bounds on shutdown. Injectable so tests can make them tight or loose."""

    stop_drain_s: float = 0.8
    """After a stop request, how long queued windows may still be embedded (the rest are dropped),
    so SIGTERM to exit stays well under 2 s."""
    end_drain_s: float = 60.0
    """When a file source ends by itself: every queued window is embedded (bounded only as a guard)."""
    publisher_close_s: float = 0.5
    """How long closing waits for queued events to reach the socket and ``events_out``."""
    store_lock_wait_s: float = 10.0
    """How long start-up waits for an offline store edit to finish (another daemon: not at all)."""

    def __post_init__(self) -> None:
        for name in ("stop_drain_s", "end_drain_s", "publisher_close_s", "store_lock_wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did, for the log and for a control-socket reply."""

    ok: bool
    speakers: int
    """Speakers the matcher knows after the reload (before it, when the reload failed)."""
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    applied: tuple[str, ...] = ()
    """Settings keys changed and applied live."""
    restart_needed: tuple[str, ...] = ()
    """Settings keys changed in the file that only take effect after a restart."""
    error: str | None = None


def exit_process(code: int) -> NoReturn:
    """End the process now, after a clean ``Daemon.run()``, skipping interpreter teardown.

    Everything that matters is already closed explicitly (store, sockets, events_out, threads);
    what remains is freeing modules, which measured 0.6-2.6 s on a busy 2-core machine (scipy alone
    0.6 s) and would push SIGTERM-to-exit past the 2 s a service manager is promised. Only for the
    ``speakerd run`` entry point; in-process callers use ``run()``'s return value.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def changed_keys(old: Settings, new: Settings) -> list[tuple[str, Any, Any]]:
    """(``section.key``, old value, new value) for every setting that differs."""
    out = []
    for section in dataclasses.fields(old):
        a, b = getattr(old, section.name), getattr(new, section.name)
        if a == b:
            continue
        for f in dataclasses.fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                out.append((f"{section.name}.{f.name}", va, vb))
    return out


@contextmanager
def signal_handlers(stop: Callable[[], None], reload: Callable[[], None], stopping: Callable[[], bool]) -> Iterator[None]:
    """SIGTERM/SIGINT call ``stop``, SIGHUP ``reload`` (both must return at once); the previous
    handlers come back afterwards. Outside the main thread there are none."""
    if threading.current_thread() is not threading.main_thread():
        logger.debug("not in the main thread: no signal handlers (use request_stop / request_reload)")
        yield
        return
    def on_stop(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        logger.info("%s: %s", name, "already stopping" if stopping() else "stopping")
        stop()

    def on_reload(signum: int, _frame: FrameType | None) -> None:
        logger.info("%s: reloading the configuration and speakers", signal.Signals(signum).name)
        reload()

    wanted = {signal.SIGTERM: on_stop, signal.SIGINT: on_stop}
    if hasattr(signal, "SIGHUP"):
        wanted[signal.SIGHUP] = on_reload
    previous = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
