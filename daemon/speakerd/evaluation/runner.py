"""Run the real pipeline over an audio file in-process and keep its events and per-window verdicts.

Evaluation and calibration need more than the wire shows (every window's match), so they run the
same ``Pipeline`` through the same ``FileSource`` with an in-memory sink instead of a socket.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import events as ev
from ..bundle import ModelBundle
from ..pipeline import Pipeline
from ..settings import Settings
from ..sources import FileSource
from ..decisions.cohort import load_cohort
from ..decisions.evidence import MatchedWindow
from ..decisions.values import DecisionValues, for_bundle


@dataclass
class CollectingPublisher:
    """The publisher's envelope and sequence numbers, kept in memory."""

    session: str = field(default_factory=ev.new_session_id)
    events: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, payload: Any, *, stream_time: float, wall_time: float) -> None:
        with self._lock:
            self.events.append(
                ev.make_event(payload, seq=len(self.events) + 1, session=self.session, stream_time=stream_time, wall_time=wall_time)
            )

    def stats(self) -> dict[str, int]:
        return {"published": len(self.events), "dropped_events": 0, "queue_depth": 0}


@dataclass(frozen=True)
class FileRun:
    events: list[dict[str, Any]]
    windows: list[MatchedWindow]
    status: dict[str, Any]
    decision: DecisionValues | None = None
    """The decision values the run used (the model's, under the config's overrides)."""


def run_file(path: Path, settings: Settings, *, bundle: ModelBundle, backend: Any, matcher: Any,
             strangers: Collection[str] = ()) -> FileRun:
    """``strangers``: voices (LibriSpeech speaker ids) the bundle's cohort must leave out because
    they speak in this file: in real use the cohort never holds the voices of the meeting."""
    publisher = CollectingPublisher()
    seen: list[MatchedWindow] = []
    decision = for_bundle(bundle, settings.decision).values
    cohort = load_cohort(bundle)
    pipeline = Pipeline(
        settings, bundle=bundle, backend=backend, matcher=matcher, publisher=publisher, live=False, on_window=seen.append,
        decision=decision, cohort=cohort.without(strangers) if cohort is not None else None,
    )
    pipeline.run(FileSource(path, settings.audio, realtime=False), threading.Event())
    status = next(e for e in reversed(publisher.events) if e["type"] == "status")
    return FileRun(publisher.events, seen, status, decision)
