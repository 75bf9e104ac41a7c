"""The running daemon: open everything once, stream, reload on SIGHUP, stop cleanly on SIGTERM/SIGINT.

One object owns the settings, model bundle, speaker store and index, backend, publisher, source and
pipeline, so that signal handlers (main thread) and the control socket (its own thread) act on the
same daemon through a few thread-safe methods: ``request_stop()``, ``request_reload()``, ``reload()``,
``reload_speakers()`` and ``enroll()``.

Stopping is bounded so a service manager never has to escalate to SIGKILL: capture stops within one
source poll, queued windows are embedded for at most ``LifecycleTiming.stop_drain_s`` (the rest are
dropped and counted), open segments are closed, a final status event is published and the publisher
gets ``publisher_close_s`` to hand everything to its socket and ``events_out``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import numpy as np

from .errors import ConfigError, SpeakerdError
from .settings import Settings
from .sources import FileSource, RecoverySettings, Source, open_source

logger = logging.getLogger(__name__)

LIVE_SECTIONS = ("matching",)
"""Settings sections a reload applies to the running daemon; every other change needs a restart."""
RELOADER_JOIN_S = 2.0


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


SettingsLoader = Callable[[], Settings]
SourceFactory = Callable[[Settings], Source]
BackendFactory = Callable[[Any, Settings], Any]


def default_source_factory(recovery: RecoverySettings | None = None) -> SourceFactory:
    def make(settings: Settings) -> Source:
        d = settings.daemon
        return open_source(d.source, settings.audio, realtime=d.realtime, recovery=recovery)

    return make


def default_backend(bundle: Any, settings: Settings) -> Any:
    from .embedding import create_backend

    e = settings.embedding
    return create_backend(bundle, e.backend, threads=e.threads, coreml_compute_units=e.coreml_compute_units)


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


class Daemon:
    """The daemon's lifecycle around one ``Pipeline``. ``run()`` in the main thread; the rest from anywhere.

    ``load_settings`` re-reads the configuration as at start (the --config file plus the same
    command-line overrides) for a reload; None makes a reload re-read only the speakers.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store_dir: Path,
        load_settings: SettingsLoader | None = None,
        timing: LifecycleTiming | None = None,
        source_factory: SourceFactory | None = None,
        backend_factory: BackendFactory = default_backend,
    ) -> None:
        self.settings = settings
        self.store_dir = Path(store_dir)
        self.timing = timing or LifecycleTiming()
        self._load_settings = load_settings
        self._source_factory = source_factory or default_source_factory()
        self._backend_factory = backend_factory
        self._stop = threading.Event()
        self._wake = threading.Event()  # wakes the reloader thread: a reload request or a stop
        self._reload_pending = False
        self._lock = threading.RLock()  # one reload / enrollment at a time, and none after close
        self._counters = {"reloads": 0, "reload_errors": 0}
        self._open = False
        self.bundle: Any = None
        self.store: Any = None
        self.index: Any = None
        self.backend: Any = None
        self.publisher: Any = None
        self.source: Source | None = None
        self.pipeline: Any = None

    # -- control (any thread) ----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask ``run()`` to stop; returns at once. Safe from a signal handler."""
        self._stop.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_reload(self) -> None:
        """Ask the reloader thread to ``reload()``; returns at once. Safe from a signal handler."""
        self._reload_pending = True
        self._wake.set()

    def counters(self) -> dict[str, int]:
        """The daemon's own counters, merged into every status event."""
        with self._lock:
            return dict(self._counters)

    def reload(self) -> ReloadResult:
        """Re-read the configuration and the store's speakers into the running matcher.

        Capture is not restarted. Changes to ``matching`` apply at once; any other changed key is
        logged as needing a restart (and reported in the result). A bad configuration keeps the
        running settings and is counted in ``reload_errors``.
        """
        with self._lock:
            if not self._open:
                return ReloadResult(False, 0, error="the daemon is not running")
            fresh = self.settings
            if self._load_settings is not None:
                try:
                    fresh = self._load_settings()
                except ConfigError as e:
                    self._counters["reload_errors"] += 1
                    logger.error("reload: %s; keeping the running settings", e)
                    return ReloadResult(False, len(self.index), error=str(e))
            changes = changed_keys(self.settings, fresh)
            applied = tuple(k for k, _, _ in changes if k.split(".")[0] in LIVE_SECTIONS)
            restart = tuple(k for k, _, _ in changes if k not in applied)
            for key, old, new in changes:
                if key in restart:
                    logger.warning("reload: %s changed from %r to %r; that takes effect after a restart", key, old, new)
            result = self._swap_index(fresh.matching)
            if not result.ok:
                return result
            self.settings = dataclasses.replace(self.settings, matching=fresh.matching)
            self._counters["reloads"] += 1
            logger.info(
                "reloaded: %d speaker(s)%s%s%s",
                result.speakers,
                f", added {', '.join(result.added)}" if result.added else "",
                f", removed {', '.join(result.removed)}" if result.removed else "",
                f", applied {', '.join(applied)}" if applied else "",
            )
            return dataclasses.replace(result, applied=applied, restart_needed=restart)

    def reload_speakers(self) -> ReloadResult:
        """Re-read only the store's speakers (e.g. after an enrollment through the control socket)."""
        with self._lock:
            if not self._open:
                return ReloadResult(False, 0, error="the daemon is not running")
            return self._swap_index(self.settings.matching)

    def enroll(self, name: str, embeddings: np.ndarray, source: str) -> Any:
        """Store ``embeddings`` for ``name`` (new or existing) and match against them from now on.

        For the control plane (e.g. naming a provisional speaker from its windows); returns the
        store's ``Speaker``. Raises ``StoreError`` with a user-facing message on a bad name or shape.
        """
        with self._lock:
            if not self._open:
                raise SpeakerdError("the daemon is not running")
            speaker = self.store.enroll(name, embeddings, source=source)
            result = self._swap_index(self.settings.matching)
            if not result.ok:
                raise SpeakerdError(f"enrolled {name}, but the matcher could not be reloaded: {result.error}")
            return speaker

    def _swap_index(self, matching: Any) -> ReloadResult:
        from .matcher import SpeakerIndex
        from .store import StoreError

        before = self.index.speakers
        try:
            index = SpeakerIndex.from_store(self.store, matching)
        except (StoreError, sqlite3.Error) as e:
            self._counters["reload_errors"] += 1
            logger.error("reload: cannot read the speakers from %s: %s", self.store_dir, e)
            return ReloadResult(False, len(before), error=str(e))
        after = index.speakers
        self.pipeline.swap_matcher(index)
        self.index = index
        return ReloadResult(
            True,
            len(after),
            added=tuple(sorted(n for i, n in after.items() if i not in before)),
            removed=tuple(sorted(n for i, n in before.items() if i not in after)),
        )

    # -- running (main thread) ---------------------------------------------------------------------

    def run(self) -> int:
        """Open everything, stream until the source ends or a stop is requested, close; 0 on a clean stop.

        Errors a user can act on (a bad source, a store made by another model, a busy endpoint) are
        raised as ``SpeakerdError`` before capture starts.
        """
        with ExitStack() as stack:
            stack.enter_context(self._signal_handlers())  # first: a SIGTERM during start-up stops cleanly
            self._start(stack)
            stack.enter_context(self._reloader())
            started = time.monotonic()
            self.pipeline.run(
                self.source,
                self._stop,
                drain_timeout=self.timing.end_drain_s,
                stop_drain_timeout=self.timing.stop_drain_s,
            )
            logger.info("stopped after %.1f s", time.monotonic() - started)
        return 0

    def _start(self, stack: ExitStack) -> None:
        """Open in the order that reports user errors before anything binds or records."""
        from .bundle import resolve_bundle
        from .matcher import SpeakerIndex
        from .paths import ensure_private_dir
        from .pipeline import Pipeline
        from .publisher import EventPublisher
        from .store import SpeakerStore
        from .storelock import RUN_COMMAND, StoreLock

        s = self.settings
        self.bundle = resolve_bundle(s.embedding.model)
        self.source = self._source_factory(s)
        stack.callback(self._close_source_if_unused)
        ensure_private_dir(self.store_dir)  # one daemon per store: held while this one runs (the kernel drops it on any exit)
        stack.enter_context(StoreLock(self.store_dir, RUN_COMMAND).acquire(wait_s=self.timing.store_lock_wait_s))
        self.store = stack.enter_context(
            SpeakerStore(self.store_dir, fingerprint=self.bundle.fingerprint, dim=self.bundle.embedding_dim)
        )
        self.index = SpeakerIndex.from_store(self.store, s.matching)
        self.backend = self._backend_factory(self.bundle, s)
        stack.callback(self.backend.close)
        context, curve = self._sockets(stack)
        self.publisher = EventPublisher(s.publish, context=context, curve=curve)
        self.publisher.start()
        stack.callback(self.publisher.close, self.timing.publisher_close_s)
        live = not isinstance(self.source, FileSource)
        logger.info(
            "model %s (%s), backend %s, %d enrolled speaker(s), source %s, publishing on %s",
            self.bundle.name,
            self.bundle.fingerprint,
            self.backend.name,
            len(self.index),
            s.daemon.source,
            self.publisher.bound_endpoint,
        )
        self.pipeline = Pipeline(
            s,
            bundle=self.bundle,
            backend=self.backend,
            matcher=self.index,
            publisher=self.publisher,
            live=live,
            extra_counters=self.counters,
        )
        with self._lock:
            self._open = True
        stack.callback(self._mark_closed)  # runs before the store, backend and publisher close
        from .control import ControlServer, ControlService

        stack.enter_context(ControlServer(s.control, ControlService(self), context=context, curve=curve))  # closes first
        wait = s.publish.wait_for_subscriber_s
        if wait and not self.publisher.wait_for_subscriber(wait):
            logger.warning("no subscriber within %.1f s; starting anyway", wait)

    def _sockets(self, stack: ExitStack) -> tuple[Any, Any]:
        """One ZeroMQ context for both sockets, so one CURVE authenticator guards both."""
        import zmq

        from .security import CurveServer

        context = zmq.Context()
        stack.callback(context.term)  # after both sockets and the authenticator have closed
        keys = self.settings.daemon.curve_keys
        if not keys:
            return context, None
        curve = stack.enter_context(CurveServer(Path(keys).expanduser()))
        curve.start(context)
        return context, curve

    def _mark_closed(self) -> None:
        with self._lock:  # waits for a reload or enrollment in progress
            self._open = False

    def _close_source_if_unused(self) -> None:
        """The pipeline stops the source it ran; one that never ran (start-up failed) is closed here."""
        if self.source is not None and self.pipeline is None:
            self.source.stop()

    @contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """SIGTERM/SIGINT stop, SIGHUP reloads; the previous handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not in the main thread: no signal handlers (use request_stop / request_reload)")
            yield
            return
        wanted = {signal.SIGTERM: self._on_stop_signal, signal.SIGINT: self._on_stop_signal}
        if hasattr(signal, "SIGHUP"):
            wanted[signal.SIGHUP] = self._on_reload_signal
        previous = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            logger.info("%s: already stopping", name)
        else:
            logger.info("%s: stopping", name)
        self.request_stop()

    def _on_reload_signal(self, signum: int, _frame: FrameType | None) -> None:
        logger.info("%s: reloading the configuration and speakers", signal.Signals(signum).name)
        self.request_reload()

    @contextmanager
    def _reloader(self) -> Iterator[None]:
        """A thread that performs requested reloads, so a signal handler never does real work."""
        thread = threading.Thread(target=self._reload_loop, name="speakerd-reload")
        thread.start()
        try:
            yield
        finally:
            self.request_stop()
            thread.join(RELOADER_JOIN_S)
            if thread.is_alive():
                logger.error("the reload thread did not stop within %.1f s", RELOADER_JOIN_S)

    def _reload_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._reload_pending:
                self._reload_pending = False
                try:
                    self.reload()
                except Exception:  # noqa: BLE001 - a failed reload must not end the running daemon
                    with self._lock:
                        self._counters["reload_errors"] += 1
                    logger.exception("reload failed; the daemon keeps running with what it had")
