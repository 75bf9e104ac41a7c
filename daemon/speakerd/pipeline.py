"""The streaming pipeline: source -> VAD -> windows -> features -> embedding -> decisions -> publisher.

It wires the stages and decides nothing: who is speaking is ``decisions.DecisionLayer``'s, and its
events go to the publisher as they come back, in one direction. Threads: the source's capture
thread (a mic callback, or none for files); this module's main loop (VAD and windowing, cheap); the
embedding worker, which also runs the decision layer and publishes so that events leave in stream
order; and the publisher's socket thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from . import events as ev
from .audio import SAMPLE_RATE, AudioChunk, seconds, to_samples
from .bundle import ModelBundle
from .decisions.clustering import Relabel
from .decisions.cohort import Cohort, load_cohort
from .decisions.evidence import MatchedWindow
from .decisions.layer import DecisionLayer, Embedded, Ranker
from .decisions.turns import Decision
from .decisions.values import DecisionValues, for_bundle
from .embedding.backend import windows_for
from .embedding.worker import EmbeddingWorker
from .settings import Settings
from .vad import SpeechStart, VadEvent, VadSegmenter
from .windows import SpeechWindower

logger = logging.getLogger(__name__)

FINAL_STATUS_DRAIN_S = 0.5
"""How long the final status waits for earlier events to reach the socket, so its counts are exact."""
SOURCE_POLL_S = 0.2
"""How long the main loop waits for audio before it checks for a stop request."""
FAULT_COUNTERS = ("device_errors", "reconnects")
"""Source counters whose change is published at once in a status event (a lost or regained device)."""


class Publisher(Protocol):
    def publish(self, payload: ev.Payload, *, stream_time: float, wall_time: float) -> None: ...

    def stats(self) -> dict[str, int]: ...


class Backend(Protocol):
    name: str

    def embed(self, feats: np.ndarray) -> np.ndarray: ...


class Source(Protocol):
    finished: bool

    def __enter__(self) -> object: ...

    def __exit__(self, *exc: object) -> object: ...

    def read(self, timeout: float) -> AudioChunk | None: ...

    def stats(self) -> Mapping[str, object]: ...


@dataclass
class _Clock:
    """Maps the sample clock to capture wall time from the latest chunk."""

    sample: int = 0
    wall: float = 0.0

    def wall_of(self, sample: int) -> float:
        return self.wall + (sample - self.sample) / SAMPLE_RATE


class Pipeline:
    """One stream through every stage. ``decision`` defaults to the bundle's values under the
    config's overrides (``decisions.values.for_bundle``); ``status`` to this pipeline's own status
    (the daemon passes one that adds its own parts)."""

    def __init__(
        self,
        settings: Settings,
        *,
        bundle: ModelBundle,
        backend: Backend,
        matcher: Ranker,
        publisher: Publisher,
        live: bool,
        on_window: Callable[[MatchedWindow], None] | None = None,
        decision: DecisionValues | None = None,
        status: Callable[[], ev.Status] | None = None,
        cohort: Cohort | None | Literal["bundle"] = "bundle",
    ) -> None:
        self.settings = settings
        self.bundle = bundle
        self.backend = backend
        self.publisher = publisher
        self._on_window = on_window
        """Sees every regular window with its evidence (history, evaluation); on the worker thread."""
        self._status = status or self.status
        self.vad = VadSegmenter(settings.vad)
        self.windower = SpeechWindower(windows_for(bundle, settings.windows), bundle.features, bundle.sample_rate)
        values = decision if decision is not None else for_bundle(bundle, settings.decision).values
        self.decisions = DecisionLayer(
            values,
            settings.tracker,
            settings.provisional,
            ranker=matcher,
            dim=bundle.embedding_dim,
            hop_samples=to_samples(settings.windows.hop_s),
            cohort=load_cohort(bundle) if isinstance(cohort, str) else cohort,
        )
        self._lock = threading.RLock()
        """Held while the decision layer runs and its events are published, and while the control
        plane relabels, so a relabel event and the events after it leave in order."""
        reset = getattr(backend, "reset", None)
        if reset is not None:
            reset()  # a backend that follows the stream (shared trunk, lockstep rows) starts afresh
        self.worker = EmbeddingWorker(
            backend.embed,
            self._on_embedded,
            batch_max=settings.embedding.batch_max,
            queue_windows=settings.embedding.queue_windows,
            drop_oldest=live,
            embed_windows=getattr(backend, "embed_windows", None),
        )
        self._clock = _Clock()
        self._started = time.monotonic()
        self._next_status = 0
        self._source_stats: dict[str, int] = {}
        self.speech_regions = 0

    # -- main loop -------------------------------------------------------------------------------

    def run(self, source: Source, stop: threading.Event, *, drain_timeout: float = 10.0,
            stop_drain_timeout: float | None = None) -> None:
        """Stream until the source is finished or ``stop`` is set, then flush every event.

        ``drain_timeout`` bounds embedding what is still queued when the source ends;
        ``stop_drain_timeout`` (default the same) when ``stop`` ended the run, so a stop request
        finishes within the service manager's patience however long the backlog is.
        """
        self._started = time.monotonic()
        self._next_status = to_samples(self.settings.daemon.status_interval_s)
        self.worker.start()
        try:
            with source:
                while not stop.is_set():
                    chunk = source.read(SOURCE_POLL_S)
                    if chunk is not None:
                        self.feed(chunk)
                    if self._update_source_stats(source) or (chunk is not None and chunk.end >= self._next_status):
                        self._publish_status()
                        if chunk is not None and chunk.end >= self._next_status:
                            self._next_status += to_samples(self.settings.daemon.status_interval_s)
                    if chunk is None and source.finished:
                        break
                self._source_stats = dict(source.stats())
        finally:
            stopped = stop.is_set() and stop_drain_timeout is not None
            self.finish(stop_drain_timeout if stopped else drain_timeout)

    def _update_source_stats(self, source: Source) -> bool:
        """Refresh the source's counters; True when a fault counter moved (publish that at once)."""
        before = self._source_stats
        self._source_stats = dict(source.stats())
        return any(self._source_stats.get(k, 0) != before.get(k, 0) for k in FAULT_COUNTERS)

    def swap_matcher(self, matcher: Ranker) -> Ranker:
        """Rank against ``matcher`` from the next batch on (a reload); returns the old one.

        Safe from any thread: the decision layer reads its ranker once per batch and an attribute
        assignment is atomic, so each batch is ranked wholly by one index or the other.
        """
        return self.decisions.swap_ranker(matcher)

    def swap_decision(self, values: DecisionValues) -> None:
        """Decide with ``values`` from the next batch on (a reload changed the config's overrides)."""
        with self._lock:
            self.decisions.swap_values(values)

    def feed(self, chunk: AudioChunk) -> None:
        self._clock = _Clock(chunk.start, chunk.capture_time)
        for event in self.vad.process(chunk):
            self._route(event)
        self._clock = _Clock(chunk.end, chunk.wall_time_of(chunk.end))

    def finish(self, drain_timeout: float) -> None:
        """Close open speech, drain the worker, close the last turn, publish a final status."""
        try:
            for event in self.vad.flush():
                self._route(event)
        finally:
            self.worker.close(drain_timeout)  # even after an error: a live worker thread would hang exit
        end = self._clock.sample
        with self._lock:
            self._emit(self.decisions.flush(end, self._clock.wall_of(end)))
        drain = getattr(self.publisher, "drain", None)
        if drain is not None:
            drain(FINAL_STATUS_DRAIN_S)  # so the final status counts every event before it
        self._publish_status()

    def _route(self, event: VadEvent) -> None:
        for item in self.windower.process(event):
            if isinstance(item, SpeechStart):
                self.speech_regions += 1
            self.worker.submit(item)

    # -- worker thread ---------------------------------------------------------------------------

    def _on_embedded(self, items: Sequence[Embedded]) -> None:
        with self._lock:
            decided = self.decisions.process(items)
            self._emit(decided.events)
            if self._on_window is not None:
                for mw in decided.windows:
                    self._on_window(mw)

    # -- control plane (any thread) ----------------------------------------------------------------

    def relabel(self, old: ev.SpeakerRef, new: ev.SpeakerRef, cause: str | None = None) -> None:
        """Publish ``speaker.renamed`` (``cause`` None) or ``speaker.merged``, then make the tracker
        and later events use ``new``."""
        with self._lock:
            self._emit(self.decisions.relabel(Relabel(old, new, "renamed" if cause is None else cause)))

    def _emit(self, decisions: list[Decision]) -> None:
        for d in decisions:
            self.publisher.publish(d.payload, stream_time=seconds(d.sample), wall_time=d.wall_time)

    # -- status ----------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Every stage's counters: windows, embedding, decisions, the source and the publisher."""
        counters = {
            "windows": self.windower.windows_emitted,
            "windows_rejected": self.windower.windows_rejected,
            "probes": self.windower.probes_emitted,
            **self.worker.counters,
            "speech_regions": self.speech_regions,
            **self.decisions.counters,
            **{k: v for k, v in self._source_stats.items() if isinstance(v, int)},
        }
        counters.update({k: v for k, v in self.publisher.stats().items() if k != "queue_depth"})
        return counters

    def status(self) -> ev.Status:
        """This pipeline's status; the daemon's adds its own counters (``Daemon.stream_status``)."""
        return ev.Status(
            uptime_s=time.monotonic() - self._started,
            backend=self.backend.name,
            model=self.bundle.name,
            counters=self.counters(),
            queue_depth={"windows": self.worker.queue_depth(), "events": self.publisher.stats().get("queue_depth", 0)},
        )

    def _publish_status(self) -> None:
        end = self._clock.sample
        self.publisher.publish(self._status(), stream_time=seconds(end), wall_time=self._clock.wall_of(end))
