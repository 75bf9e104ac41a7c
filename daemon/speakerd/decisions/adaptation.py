"""In-session adaptation: windows confidently named as an enrolled voice refine a session
voiceprint for that voice, so the second minute of a meeting scores better than the first.

The session voiceprint lives in the room the meeting is in: its cosine to the voice's next windows
does not suffer the channel change a voiceprint made elsewhere does. Bounded (the latest
``adapt_windows`` windows count, older ones decay away), gated on the enrolled voiceprint's own
score (``policy.adapts``: a session voiceprint cannot vouch for itself), and kept in memory only:
nothing here is written to the speaker store.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import policy
from .evidence import Candidate, Match
from .values import DecisionValues

MIN_WINDOWS = 3
"""A session voiceprint speaks once this many windows made it (one window is one guess)."""


class SessionVoiceprints:
    """Per enrolled voice: a decaying sum of its confidently named windows (unit embeddings)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._sum: dict[str, np.ndarray] = {}
        self._count: dict[str, float] = {}

    def __len__(self) -> int:
        return sum(1 for c in self._count.values() if c >= MIN_WINDOWS)

    def count(self, speaker_id: str) -> float:
        return self._count.get(speaker_id, 0.0)

    def lifted(self, v: DecisionValues, candidates: Sequence[Candidate], embedding: np.ndarray,
               level: float | None = None) -> list[Candidate]:
        """Candidates re-ranked with each voice's session score where it has one
        (``policy.with_session``; ``level``: the window's cohort level)."""
        if not self._sum or not policy.adapting(v):
            return list(candidates)
        x = _unit(embedding)
        session = {sid: float(_unit(s) @ x) for sid, s in self._sum.items() if self._count[sid] >= MIN_WINDOWS}
        return policy.with_session(v, candidates, session, level)

    def observe(self, v: DecisionValues, enrolled: Match, embedding: np.ndarray) -> bool:
        """Add a window to its voice's session voiceprint if ``policy.adapts``; True if it did."""
        if not policy.adapting(v) or not policy.adapts(v, enrolled) or enrolled.speaker_id is None:
            return False
        sid, cap = enrolled.speaker_id, float(v.adapt_windows)
        total = self._sum.get(sid)
        count = self._count.get(sid, 0.0)
        if total is None:
            total = np.zeros(self.dim)
        elif count >= cap:
            total = total * ((cap - 1.0) / cap)  # the oldest share decays: the latest cap windows count
        self._sum[sid] = total + _unit(embedding)
        self._count[sid] = min(count + 1.0, cap)
        return True

    def forget(self, speaker_id: str) -> None:
        self._sum.pop(speaker_id, None)
        self._count.pop(speaker_id, None)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return x / max(float(np.linalg.norm(x)), 1e-12)
