"""The streaming pipeline: source -> VAD -> windows -> embedding worker -> matcher -> tracker -> publisher.

Threads: the source's capture thread (a mic callback, or none for files); this module's main loop
(VAD and windowing, cheap); the embedding worker, which also matches, tracks and publishes so that
events leave in stream order; and the publisher's socket thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from . import events as ev
from .audio import SAMPLE_RATE, AudioChunk, seconds, to_samples
from .bundle import ModelBundle
from .embedding.worker import EmbeddedWindow, EmbeddingWorker
from .settings import Settings
from .provisional import ProvisionalSpeakers, Relabel
from .tracker import UNKNOWN, Decision, MatchedWindow, SpeakerTracker
from .vad import SpeechEnd, SpeechStart, VadSegmenter
from .windows import SpeechWindower

logger = logging.getLogger(__name__)

FINAL_STATUS_DRAIN_S = 0.5
"""How long the final status waits for earlier events to reach the socket, so its counts are exact."""
SOURCE_POLL_S = 0.2
"""How long the main loop waits for audio before it checks for a stop request."""
FAULT_COUNTERS = ("device_errors", "reconnects")
"""Source counters whose change is published at once in a status event (a lost or regained device)."""


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
        extra_counters: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.settings = settings
        self.bundle = bundle
        self.backend = backend
        self.matcher = matcher
        self.publisher = publisher
        self._on_window = on_window
        """Sees every matched window (evaluation and calibration); runs on the worker thread."""
        self._extra_counters = extra_counters
        """The owner's own counters (e.g. the daemon's reloads), merged into every status event."""
        self.vad = VadSegmenter(settings.vad)
        self.windower = SpeechWindower(settings.windows, bundle.features, bundle.sample_rate)
        self.tracker = SpeakerTracker(settings.tracker, to_samples(settings.windows.hop_s))
        self.provisional = ProvisionalSpeakers(settings.provisional, bundle.embedding_dim, self._score_enrolled)
        self._track_lock = threading.RLock()
        """Held while windows are matched, tracked and published, and while the control plane
        relabels, so a relabel event and the events after it leave in order."""
        self._recent: collections.deque[MatchedWindow] = collections.deque()
        self._last_decided = (0, 0.0)
        self._region_start = 0
        """Start of the speech region in progress, for the speech.end event."""
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
        self.counters: dict[str, int] = {"speech_regions": 0, "changes": 0, "segments": 0, "relabels": 0}

    # -- main loop -------------------------------------------------------------------------------

    def run(self, source: Any, stop: threading.Event, *, drain_timeout: float = 10.0,
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

    def _update_source_stats(self, source: Any) -> bool:
        """Refresh the source's counters; True when a fault counter moved (publish that at once)."""
        before = self._source_stats
        self._source_stats = dict(source.stats())
        return any(self._source_stats.get(k, 0) != before.get(k, 0) for k in FAULT_COUNTERS)

    def swap_matcher(self, matcher: Matcher) -> Matcher:
        """Use ``matcher`` from the next batch on (a reload); returns the old one.

        Safe from any thread: the worker reads ``self.matcher`` once per batch and an attribute
        assignment is atomic, so each batch is matched wholly by one matcher or the other.
        """
        old, self.matcher = self.matcher, matcher
        return old

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
        drain = getattr(self.publisher, "drain", None)
        if drain is not None:
            drain(FINAL_STATUS_DRAIN_S)  # so the final status counts every event before it
        self._publish_status()

    def _route(self, event: Any) -> None:
        for item in self.windower.process(event):
            if isinstance(item, SpeechStart):
                self.counters["speech_regions"] += 1
            self.worker.submit(item)

    # -- worker thread ---------------------------------------------------------------------------

    def _on_embedded(self, items: Sequence[Any]) -> None:
        with self._track_lock:
            self._track(items)

    def _track(self, items: Sequence[Any]) -> None:
        windows = [i for i in items if isinstance(i, EmbeddedWindow)]
        if windows:
            matches = self.matcher.match(np.stack([w.embedding for w in windows]))
            for embedded, match in zip(windows, matches, strict=True):
                matched = MatchedWindow(embedded.window, match, embedded.embedding)
                if embedded.window.probe:  # probes are short-lived evidence for the tracker only
                    matched = self._nearest_provisional(matched)
                else:
                    matched = self._open_set(matched)
                    self._remember(matched)
                    if self._on_window is not None:
                        self._on_window(matched)
                self._emit(self.tracker.process(matched))
            return
        for item in items:
            self._last_decided = item.decided
            if isinstance(item, SpeechStart):
                self._publish(ev.SpeechStart(start=seconds(item.sample)), *item.decided)
                self.tracker.process(item)
                self._region_start = item.sample
            elif isinstance(item, SpeechEnd):
                self._emit(self.tracker.process(item))
                self._publish(
                    ev.SpeechEnd(start=seconds(self._region_start), end=seconds(item.sample)), *item.decided
                )

    def _open_set(self, mw: MatchedWindow) -> MatchedWindow:
        """Give a window no enrolled speaker matched a provisional label, relabelling as clustering says."""
        w = mw.window
        self._last_decided = w.decided
        if mw.match.known or mw.embedding is None:
            return mw
        found = self.provisional.observe(mw.embedding, w.start, w.end)
        if found.label is None:
            return mw
        if found.minted:
            self._emit(self.tracker.relabel(UNKNOWN, found.label, *w.decided))
        for r in found.relabels:
            self._apply(r)
        margin = found.margin if found.label.known else found.score - mw.match.score  # runner-up: best enrolled
        return replace(mw, label=found.label, label_score=found.score, label_margin=margin)

    def _nearest_provisional(self, mw: MatchedWindow) -> MatchedWindow:
        """A probe's nearest provisional speaker, as evidence beside its enrolled match (even a known
        one: the tracker weighs the two)."""
        if mw.embedding is None:
            return mw
        ref, score = self.provisional.nearest(mw.embedding)
        if ref is None:
            return mw
        return replace(mw, label=ref, label_score=score, label_margin=score - mw.match.score)

    def _score_enrolled(self, embedding: np.ndarray) -> Any:
        return self.matcher.match(embedding.reshape(1, -1))[0]

    def _remember(self, mw: MatchedWindow) -> None:
        """Keep recent windows (and embeddings) so "the last 10 s were Alice" can enroll from them."""
        history = to_samples(self.settings.control.history_s)
        self._recent.append(mw)
        while self._recent and self._recent[0].window.end < mw.window.end - history:
            self._recent.popleft()

    # -- control plane (any thread) ----------------------------------------------------------------

    def recent_windows(self, seconds_back: float) -> list[MatchedWindow]:
        """Windows that ended within the last ``seconds_back`` seconds of audio, oldest first."""
        with self._track_lock:
            if not self._recent:
                return []
            horizon = self._recent[-1].window.end - to_samples(seconds_back)
            return [mw for mw in self._recent if mw.window.start >= horizon]

    def relabel(self, old: ev.SpeakerRef, new: ev.SpeakerRef, cause: str | None = None) -> None:
        """Publish ``speaker.renamed`` (``cause`` None) or ``speaker.merged``, then make the tracker
        and later events use ``new``."""
        with self._track_lock:
            self._apply(Relabel(old, new, "renamed" if cause is None else cause))

    _CAUSES = {"merged": "clustering", "folded": "enrolled_match", "promoted": "control"}

    def _apply(self, r: Relabel) -> None:
        sample, wall = self._last_decided
        if r.kind == "renamed":
            payload: Any = ev.SpeakerRenamed(old=r.old, new=r.new)
        else:
            payload = ev.SpeakerMerged(old=r.old, new=r.new, cause=self._CAUSES.get(r.kind, r.kind))
        self.counters["relabels"] += 1
        self._publish(payload, sample, wall)
        self._emit(self.tracker.relabel(r.old, r.new, sample, wall))

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
            "probes": self.windower.probes_emitted,
            **self.worker.counters,
            **self.counters,
            **{k: v for k, v in self._source_stats.items() if isinstance(v, int)},
            **(self._extra_counters() if self._extra_counters is not None else {}),
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
