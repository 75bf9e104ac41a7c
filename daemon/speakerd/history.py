"""The stream's recent windows, kept so "the last 10 s were Alice" can enroll from them."""

from __future__ import annotations

import collections
import threading

from .audio import to_samples
from .decisions.evidence import MatchedWindow


class WindowHistory:
    """Regular windows (with embeddings and labels) of the last ``history_s`` seconds of audio.

    The pipeline's worker adds; the control plane reads. Thread-safe (one lock)."""

    def __init__(self, history_s: float) -> None:
        self._horizon = to_samples(history_s)
        self._lock = threading.Lock()
        self._windows: collections.deque[MatchedWindow] = collections.deque()

    def add(self, mw: MatchedWindow) -> None:
        with self._lock:
            self._windows.append(mw)
            while self._windows and self._windows[0].window.end < mw.window.end - self._horizon:
                self._windows.popleft()

    def recent(self, seconds_back: float) -> list[MatchedWindow]:
        """Windows that began within the last ``seconds_back`` seconds of audio, oldest first."""
        with self._lock:
            if not self._windows:
                return []
            horizon = self._windows[-1].window.end - to_samples(seconds_back)
            return [mw for mw in self._windows if mw.window.start >= horizon]
