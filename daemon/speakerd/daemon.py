"""The running daemon: open everything once, stream, reload on SIGHUP, stop cleanly on SIGTERM/SIGINT.

One object owns the settings, model bundle, speaker store and index, backend, publisher, source and
pipeline, so that signal handlers (main thread) and the control socket (its own thread, through the
``SpeakerPort`` methods) act on the same daemon through a few thread-safe methods.

Stopping is bounded so a service manager never has to escalate to SIGKILL: capture stops within one
source poll, queued windows are embedded for at most ``LifecycleTiming.stop_drain_s`` (the rest are
dropped and counted), open segments are closed, a final status event is published and the publisher
gets ``publisher_close_s`` to hand everything to its socket and ``events_out``.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, SpeakerdError
from .history import WindowHistory
from .lifecycle import (
    LIVE_SECTIONS,
    BackendFactory,
    LifecycleTiming,
    ReloadResult,
    SettingsLoader,
    SourceFactory,
    changed_keys,
    default_backend,
    signal_handlers,
    default_source_factory,
    exit_process,
)
from .settings import Settings
from .sources import FileSource, Source

if TYPE_CHECKING:
    import zmq

    from . import events as ev
    from .bundle import ModelBundle
    from .decisions.clustering import ProvisionalSpeakers
    from .decisions.evidence import MatchedWindow
    from .embedding.backend import EmbeddingBackend
    from .events import SpeakerRef
    from .matcher import MatchSettings, SpeakerIndex
    from .pipeline import Pipeline
    from .publisher import EventPublisher
    from .security import CurveServer
    from .store import Speaker, SpeakerStore

__all__ = ["Daemon", "LifecycleTiming", "ReloadResult", "changed_keys", "default_backend", "exit_process"]

logger = logging.getLogger(__name__)

RELOADER_JOIN_S = 2.0


class Daemon:
    """The daemon's lifecycle around one ``Pipeline``. ``run()`` in the main thread; the rest from anywhere.

    ``load_settings`` re-reads the configuration as at start (the --config file plus the same
    command-line overrides) for a reload; None makes a reload re-read only the speakers. The daemon
    is the control plane's ``SpeakerPort`` (control_service.py): the one place that changes
    speakers in the store, then in the matcher, and assembles status.
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
        self.history = WindowHistory(settings.control.history_s)
        self.bundle: ModelBundle | None = None
        self.store: SpeakerStore | None = None
        self.index: SpeakerIndex | None = None
        self.backend: EmbeddingBackend | None = None
        self.publisher: EventPublisher | None = None
        self.source: Source | None = None
        self.pipeline: Pipeline | None = None

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

    def _live(self) -> tuple[SpeakerStore, SpeakerIndex, Pipeline]:
        if not self._open or self.store is None or self.index is None or self.pipeline is None:
            raise SpeakerdError("the daemon is not running")
        return self.store, self.index, self.pipeline

    def reload(self) -> ReloadResult:
        """Re-read the configuration and the store's speakers into the running matcher.

        Capture is not restarted. Changes to ``matching`` and ``decision`` apply at once; any other
        changed key is logged as needing a restart (and reported in the result). A bad
        configuration keeps the running settings and is counted in ``reload_errors``.
        """
        with self._lock:
            if not self._open or self.index is None or self.pipeline is None or self.bundle is None:
                return ReloadResult(False, 0, error="the daemon is not running")
            fresh = self.settings
            if self._load_settings is not None:
                from .decisions.values import DecisionValuesMissing, for_bundle

                try:
                    fresh = self._load_settings()
                    decision = for_bundle(self.bundle, fresh.decision).values
                except (ConfigError, DecisionValuesMissing) as e:
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
            if fresh is not self.settings:
                self.pipeline.swap_decision(decision)
            self.settings = dataclasses.replace(self.settings, matching=fresh.matching, decision=fresh.decision)
            self._counters["reloads"] += 1
            logger.info(
                "reloaded: %d speaker(s)%s%s%s",
                result.speakers,
                f", added {', '.join(result.added)}" if result.added else "",
                f", removed {', '.join(result.removed)}" if result.removed else "",
                f", applied {', '.join(applied)}" if applied else "",
            )
            return dataclasses.replace(result, applied=applied, restart_needed=restart)

    def _swap_index(self, matching: MatchSettings) -> ReloadResult:
        from .matcher import SpeakerIndex
        from .store import StoreError

        store, old, pipeline = self._live()
        before = old.speakers
        try:
            index = SpeakerIndex.from_store(store, matching)
        except (StoreError, sqlite3.Error) as e:
            self._counters["reload_errors"] += 1
            logger.error("reload: cannot read the speakers from %s: %s", self.store_dir, e)
            return ReloadResult(False, len(before), error=str(e))
        after = index.speakers
        pipeline.swap_matcher(index)
        self.index = index
        return ReloadResult(
            True,
            len(after),
            added=tuple(sorted(n for i, n in after.items() if i not in before)),
            removed=tuple(sorted(n for i, n in before.items() if i not in after)),
        )

    # -- the control plane's port (control_service.SpeakerPort) ----------------------------------

    @property
    def provisional(self) -> ProvisionalSpeakers:
        return self._live()[2].decisions.provisional

    def speakers(self) -> list[Speaker]:
        return self._live()[0].speakers()

    def speaker(self, who: str) -> Speaker | None:
        return self._live()[0].get(who)

    def enroll(self, name: str, embeddings: np.ndarray, source: str) -> Speaker:
        """Store ``embeddings`` for ``name`` (new or existing) and match against them from now on;
        ``StoreError`` (a message for the user) on a bad name or shape."""
        with self._lock:
            speaker = self._live()[0].enroll(name, embeddings, source=source)
            result = self._swap_index(self.settings.matching)
            if not result.ok:
                raise SpeakerdError(f"enrolled {name}, but the matcher could not be reloaded: {result.error}")
            return speaker

    def rename(self, speaker_id: str, name: str) -> Speaker:
        with self._lock:
            store, index, _ = self._live()
            renamed = store.rename(speaker_id, name)
            index.rename(speaker_id, renamed.name)
            return renamed

    def merge(self, source_id: str, target_id: str) -> int:
        with self._lock:
            store = self._live()[0]
            target = store.get(target_id)
            if target is None:
                raise SpeakerdError(f"no speaker {target_id!r}")
            _, owners, vectors = store.embeddings()
            mine = np.array([o == source_id for o in owners], dtype=bool)
            self.enroll(target.name, vectors[mine], f"merge:{source_id}")
            self.forget(source_id)
            return int(mine.sum())

    def forget(self, speaker_id: str) -> Speaker:
        with self._lock:
            store, index, _ = self._live()
            gone = store.remove(speaker_id)
            index.remove(gone.id)
            return gone

    def recent_windows(self, seconds_back: float) -> list[MatchedWindow]:
        return self.history.recent(seconds_back)

    def relabel(self, old: SpeakerRef, new: SpeakerRef, cause: str | None = None) -> None:
        self._live()[2].relabel(old, new, cause)

    def stream_status(self) -> ev.Status:
        """The status event: the pipeline's stages and the daemon's own counters."""
        status = self._live()[2].status()
        return dataclasses.replace(status, counters={**status.counters, **self.counters()})

    def status(self) -> dict[str, Any]:
        """The status a control client sees: the status event, speakers, session and subscriptions."""
        status = self.stream_status().to_dict()
        status["enrolled"] = len(self._live()[1].speakers)
        status["provisional"] = len(self.provisional.speakers())
        if self.publisher is not None:
            status["session"] = self.publisher.session
            status["subscriptions"] = self.publisher.subscribers
        return status

    # -- running (main thread) ---------------------------------------------------------------------

    def run(self) -> int:
        """Open everything, stream until the source ends or a stop is requested, close; 0 on a clean stop.

        Errors a user can act on (a bad source, a store made by another model, a busy endpoint) are
        raised as ``SpeakerdError`` before capture starts.
        """
        with ExitStack() as stack:
            stack.enter_context(signal_handlers(self.request_stop, self.request_reload, lambda: self.stopping))  # first: a SIGTERM during start-up stops cleanly
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
        from .control import ControlServer
        from .control_service import ControlService
        from .decisions.values import for_bundle
        from .matcher import SpeakerIndex
        from .paths import ensure_private_dir
        from .pipeline import Pipeline
        from .publisher import EventPublisher
        from .store import SpeakerStore
        from .storelock import RUN_COMMAND, StoreLock

        s = self.settings
        self.bundle = resolve_bundle(s.embedding.model)
        decision = for_bundle(self.bundle, s.decision)  # a model nobody calibrated stops here
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
            on_window=self.history.add,
            decision=decision.values,
            status=self.stream_status,
        )
        with self._lock:
            self._open = True
        stack.callback(self._mark_closed)  # runs before the store, backend and publisher close
        stack.enter_context(ControlServer(s.control, ControlService(self), context=context, curve=curve))  # closes first
        wait = s.publish.wait_for_subscriber_s
        if wait and not self.publisher.wait_for_subscriber(wait):
            logger.warning("no subscriber within %.1f s; starting anyway", wait)

    def _sockets(self, stack: ExitStack) -> tuple[zmq.Context, CurveServer | None]:
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
