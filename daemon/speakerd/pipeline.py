"""The streaming pipeline: source -> VAD -> windows -> embedding worker -> matcher -> tracker -> publisher.

Threads: the source's capture thread (a mic callback, or none for files); this module's main loop
(VAD and windowing, cheap); the embedding worker, which also matches, tracks and publishes so that
events leave in stream order; and the publisher's socket thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from . import events as ev
from .audio import SAMPLE_RATE, AudioChunk, seconds, to_samples
from .bundle import ModelBundle
from .embedding.worker import EmbeddedWindow, EmbeddingWorker
from .settings import Settings
from .tracker import Decision, MatchedWindow, SpeakerTracker
from .vad import SpeechEnd, SpeechStart, VadSegmenter
from .windows import SpeechWindower

logger = logging.getLogger(__name__)

SOURCE_POLL_S = 0.2
"""How long the main loop waits for audio before it checks for a stop request."""


class Publisher(Protocol):
    def publish(self, payload: Any, *, stream_time: float, wall_time: float) -> None: ...

    def stats(self) -> dict[str, int]: ...


class Matcher(Protocol):
    def match(self, embs: np.ndarray) -> list[Any]: ...


class Backend(Protocol):
    name: str

    def embed(self, feats: np.ndarray) -> np.ndarray: ...


@dataclass
class _Clock:
    """Maps the sample clock to capture wall time from the latest chunk."""

    sample: int = 0
    wall: float = 0.0

    def wall_of(self, sample: int) -> float:
        return self.wall + (sample - self.sample) / SAMPLE_RATE


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        bundle: ModelBundle,
        backend: Backend,
        matcher: Matcher,
        publisher: Publisher,
        live: bool,
        on_window: Callable[[MatchedWindow], None] | None = None,
    ) -> None:
        self.settings = settings
        self.bundle = bundle
        self.backend = backend
        self.matcher = matcher
        self.publisher = publisher
        self._on_window = on_window
        """Sees every matched window (evaluation and calibration); runs on the worker thread."""
        self.vad = VadSegmenter(settings.vad)
        self.windower = SpeechWindower(settings.windows, bundle.features, bundle.sample_rate)
        self.tracker = SpeakerTracker(settings.tracker, to_samples(settings.windows.hop_s))
        self.worker = EmbeddingWorker(
            backend.embed,
            self._on_embedded,
            batch_max=settings.embedding.batch_max,
            queue_windows=settings.embedding.queue_windows,
            drop_oldest=live,
        )
        self._clock = _Clock()
        self._started = time.monotonic()
        self._next_status = 0
        self._source_stats: dict[str, int] = {}
        self.counters: dict[str, int] = {"speech_regions": 0, "changes": 0, "segments": 0}

    # -- main loop -------------------------------------------------------------------------------

    def run(self, source: Any, stop: threading.Event, *, drain_timeout: float = 10.0) -> None:
        """Stream until the source is finished or ``stop`` is set, then flush every event."""
        self._started = time.monotonic()
        self._next_status = to_samples(self.settings.daemon.status_interval_s)
        self.worker.start()
        try:
            with source:
                while not stop.is_set():
                    chunk = source.read(SOURCE_POLL_S)
                    if chunk is None:
                        if source.finished:
                            break
                        continue
                    self.feed(chunk)
                    self._source_stats = dict(source.stats())
                    if chunk.end >= self._next_status:
                        self._publish_status()
                        self._next_status += to_samples(self.settings.daemon.status_interval_s)
                self._source_stats = dict(source.stats())
        finally:
            self.finish(drain_timeout)

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
        self._emit(self.tracker.flush(end, self._clock.wall_of(end)))
        self._publish_status()

    def _route(self, event: Any) -> None:
        for item in self.windower.process(event):
            if isinstance(item, SpeechStart):
                self.counters["speech_regions"] += 1
            self.worker.submit(item)

    # -- worker thread ---------------------------------------------------------------------------

    def _on_embedded(self, items: Sequence[Any]) -> None:
        windows = [i for i in items if isinstance(i, EmbeddedWindow)]
        if windows:
            matches = self.matcher.match(np.stack([w.embedding for w in windows]))
            for embedded, match in zip(windows, matches, strict=True):
                matched = MatchedWindow(embedded.window, match)
                if self._on_window is not None:
                    self._on_window(matched)
                self._emit(self.tracker.process(matched))
            return
        for item in items:
            if isinstance(item, SpeechStart):
                self._publish(ev.SpeechStart(start=seconds(item.sample)), item.sample, item.wall_time)
                self.tracker.process(item)
                self._region_start = item.sample
            elif isinstance(item, SpeechEnd):
                self._emit(self.tracker.process(item))
                start = getattr(self, "_region_start", item.sample)
                self._publish(ev.SpeechEnd(start=seconds(start), end=seconds(item.sample)), item.sample, item.wall_time)

    def _emit(self, decisions: list[Decision]) -> None:
        for d in decisions:
            if isinstance(d.payload, ev.SpeakerChange):
                self.counters["changes"] += 1
            elif isinstance(d.payload, ev.SpeakerSegment):
                self.counters["segments"] += 1
            self._publish(d.payload, d.sample, d.wall_time)

    def _publish(self, payload: Any, sample: int, wall_time: float) -> None:
        self.publisher.publish(payload, stream_time=seconds(sample), wall_time=wall_time)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> ev.Status:
        counters = {
            "windows": self.windower.windows_emitted,
            "windows_rejected": self.windower.windows_rejected,
            **self.worker.counters,
            **self.counters,
            **{k: v for k, v in self._source_stats.items() if isinstance(v, int)},
        }
        pub = self.publisher.stats()
        counters.update({k: v for k, v in pub.items() if k != "queue_depth"})
        return ev.Status(
            uptime_s=time.monotonic() - self._started,
            backend=self.backend.name,
            model=self.bundle.name,
            counters=counters,
            queue_depth={"windows": self.worker.queue_depth(), "events": pub.get("queue_depth", 0)},
        )

    def _publish_status(self) -> None:
        end = self._clock.sample
        self._publish(self.status(), end, self._clock.wall_of(end))
