"""The decision layer: embedded windows and speech boundaries in, event payloads out, in stream order.

One place decides who is speaking. Each window's ranked candidates become a ``Match`` once
(``policy.verdict``); a window the matcher names nobody goes to open-set clustering, whose label and
relabels (merged, folded, a new provisional id) come back here as events; the tracker turns the
evidence into changes and segments. Nothing here publishes: the pipeline hands what ``process``
returns to the publisher, so the data walks one way. Not thread-safe: the pipeline serialises
``process`` and ``relabel`` (a relabel and the events after it must leave in order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from .. import events as ev
from ..audio import seconds
from ..embedding.worker import EmbeddedWindow
from ..vad import SpeechEnd, SpeechStart
from . import policy
from .clustering import ProvisionalSettings, ProvisionalSpeakers, Relabel
from .adaptation import SessionVoiceprints
from .cohort import Cohort
from .evidence import UNKNOWN, Candidate, Match, MatchedWindow
from .tracker import SpeakerTracker, TrackerSettings
from .turns import Decision
from .values import DecisionValues

SESSION_LEVEL_WEIGHT = 0.05
"""Weight of each new window in the session's cohort level: about the last 20 windows (10 s)."""
CAUSES = {"merged": "clustering", "folded": "enrolled_match", "promoted": "control"}
"""``speaker.merged`` cause of each kind of relabel (a user's rename is ``speaker.renamed``)."""


Embedded = EmbeddedWindow | SpeechStart | SpeechEnd
"""What the embedding worker hands on, in stream order."""


class Ranker(Protocol):
    """Enrolled speakers ranked per embedding, best first (``matcher.SpeakerIndex``). A ranker that
    also has ``embeddings_of(speaker_id) -> ndarray | None`` lets the cohort compensate its scores,
    and one with ``rank_rooms(embeddings)`` adds its voices' room versions (``policy.with_rooms``)."""

    def rank(self, embeddings: np.ndarray) -> list[list[Candidate]]: ...


@dataclass(frozen=True)
class Decided:
    """What one batch decided: events to publish, and the regular windows with their evidence."""

    events: list[Decision]
    windows: list[MatchedWindow] = field(default_factory=list)


class DecisionLayer:
    def __init__(
        self,
        values: DecisionValues,
        tracker: TrackerSettings,
        provisional: ProvisionalSettings,
        *,
        ranker: Ranker,
        dim: int,
        hop_samples: int,
        cohort: Cohort | None = None,
    ) -> None:
        self.values = values
        self.ranker = ranker
        self.cohort = cohort
        """Background voices whose level compensates every score (``policy.compensated``), if any."""
        self._levels: dict[str, float] = {}
        """Enrolled voice -> its enrollment's cohort level (``_enrolled_levels``)."""
        self._session_level: float | None = None
        """Running mean of the session's regular windows' cohort levels (``_room``)."""
        self.session = SessionVoiceprints(dim)
        """Enrolled voices as heard in this session (in-session adaptation; memory only)."""
        self.tracker = SpeakerTracker(tracker, values, hop_samples)
        self.provisional = ProvisionalSpeakers(provisional, values, dim, self.verdict)
        self._last_decided = (0, 0.0)
        self._region_start = 0
        """Start of the speech region in progress, for the speech.end event."""
        self.counters: dict[str, int] = {"changes": 0, "segments": 0, "relabels": 0}

    def swap_ranker(self, ranker: Ranker) -> Ranker:
        """Rank against ``ranker`` from the next batch on (a reload); returns the old one."""
        old, self.ranker = self.ranker, ranker
        self._levels = {}
        return old

    def swap_values(self, values: DecisionValues) -> None:
        """Decide with ``values`` from now on (a reload); the tracker's and clustering's state stay."""
        self.values = self.tracker.values = self.provisional.values = values

    def verdict(self, embedding: np.ndarray) -> Match:
        """One pooled embedding (dim,: a provisional group's centroid) against the enrolled speakers."""
        return policy.verdict(self.values, self._mean_rank(embedding))

    def rank(self, embeddings: np.ndarray) -> list[list[Candidate]]:
        """Ranked candidates per embedding, compensated for the channel when there is a cohort
        (``policy.compensated``)."""
        return self._rank(embeddings)[0]

    def _mean_rank(self, embedding: np.ndarray) -> list[Candidate]:
        """Ranked candidates of a mean of windows, compensated at the session's level: averaging
        takes the noise out of a mean and lifts its own cohort level above its windows', which
        undid the room's compensation (eval's room, voices enrolled in it, seed 0: 23 of 96
        never-enrolled windows were folded into an enrolled voice by their group's centroid scored
        at its own level; none at the session's)."""
        level = None if self._session_level is None else np.array([self._session_level])
        return self._rank(embedding.reshape(1, -1), level)[0][0]

    def _rank(self, embeddings: np.ndarray, level: np.ndarray | None = None,
              regular: Sequence[bool] = ()) -> tuple[list[list[Candidate]], np.ndarray | None]:
        """``rank``, and each embedding's cohort level (None without a cohort); ``level`` given:
        compensate at that level instead of the embeddings' own. The levels of the ``regular``
        ones (a window's, not a probe's) join the session's level first (``_room``)."""
        rankings, level = self._compensated(embeddings, level, regular)
        rank_rooms = getattr(self.ranker, "rank_rooms", None)
        if rank_rooms is not None:
            rankings = [policy.with_rooms(self.values, r, rooms) for r, rooms in zip(rankings, rank_rooms(embeddings), strict=True)]
        return rankings, level

    def _compensated(self, embeddings: np.ndarray, level: np.ndarray | None,
                     regular: Sequence[bool]) -> tuple[list[list[Candidate]], np.ndarray | None]:
        """The ranker's candidates compensated for the channel (``_rank``'s first half)."""
        rankings = self.ranker.rank(embeddings)
        v = self.values
        if self.cohort is None or v.cohort_top_n < 1:
            return rankings, None
        top_n = int(v.cohort_top_n)
        if level is None:
            level, _ = self.cohort.level(embeddings, top_n)
        self._room([float(lv) for lv, r in zip(level, regular) if r])
        if not policy.normalising(v) or not any(rankings):
            return rankings, level
        enrolled = self._enrolled_levels({sid for r in rankings for sid, _, _ in r}, top_n)
        room = self._session_level
        return [policy.compensated(v, r, float(m), enrolled, room) for r, m in zip(rankings, level, strict=True)], level

    def _room(self, levels: list[float]) -> None:
        """The session's cohort level (a slow running mean over its regular windows) sets how much
        higher clustering's bars stand (``policy.room_lift``)."""
        for level in levels:
            self._session_level = level if self._session_level is None else (
                (1.0 - SESSION_LEVEL_WEIGHT) * self._session_level + SESSION_LEVEL_WEIGHT * level)
        self.provisional.lift = policy.room_lift(self.values, self._session_level)

    def _enrolled_levels(self, speakers: set[str], top_n: int) -> dict[str, float]:
        """Mean cohort level of each enrolled voice's embeddings, computed once per ranker."""
        assert self.cohort is not None
        embeddings_of = getattr(self.ranker, "embeddings_of", None)
        for sid in speakers - self._levels.keys():
            emb = embeddings_of(sid) if embeddings_of is not None else None
            if emb is not None and len(emb):
                self._levels[sid] = float(self.cohort.level(emb, top_n)[0].mean())
        return self._levels

    # -- the worker's side -------------------------------------------------------------------------

    def process(self, items: Sequence[Embedded]) -> Decided:
        """A batch of embedded windows, or of speech boundaries, from the embedding worker (which
        never mixes the two in one batch)."""
        windows = [i for i in items if isinstance(i, EmbeddedWindow)]
        if windows:
            return self._windows(windows)
        out: list[Decision] = []
        for item in items:
            self._last_decided = item.decided
            if isinstance(item, SpeechStart):
                # a turn's end held over the pause is settled before the next region begins
                out += self._count(self.tracker.process(item))
                out.append(Decision(ev.SpeechStart(start=seconds(item.sample)), *item.decided))
                self._region_start = item.sample
            elif isinstance(item, SpeechEnd):
                out += self._count(self.tracker.process(item))
                out.append(Decision(ev.SpeechEnd(start=seconds(self._region_start), end=seconds(item.sample)), *item.decided))
        return Decided(out)

    def _windows(self, windows: list[EmbeddedWindow]) -> Decided:
        rankings, _ = self._rank(np.stack([w.embedding for w in windows]), regular=[not w.window.probe for w in windows])
        out: list[Decision] = []
        regular: list[MatchedWindow] = []
        session = self._session_level
        room = policy.shared_room(self.values, session) if session is not None else 0.0
        for embedded, ranking in zip(windows, rankings, strict=True):
            matched = MatchedWindow(embedded.window, self._verdict(ranking, embedded, session), embedded.embedding)
            if embedded.window.probe:  # probes are short-lived evidence for the tracker only
                matched = self._nearest_provisional(matched, room)
            else:
                matched, relabels = self._open_set(matched, room)
                out += relabels
                regular.append(matched)
            out += self._count(self.tracker.process(matched))
        return Decided(out, regular)

    def _verdict(self, ranking: list[Candidate], embedded: EmbeddedWindow, level: float | None = None) -> Match:
        """The window's verdict with its voices' session voiceprints (``level``: the session's
        cohort level); a regular window the enrolled voiceprints alone name firmly refines its
        voice's session voiceprint."""
        v = self.values
        enrolled = policy.verdict(v, ranking)
        lifted = self.session.lifted(v, ranking, embedded.embedding, level)
        match = enrolled if lifted == ranking else policy.verdict(v, lifted)
        if not embedded.window.probe:
            self.session.observe(v, enrolled, embedded.embedding)
        return match

    def _open_set(self, mw: MatchedWindow, room: float = 0.0) -> tuple[MatchedWindow, list[Decision]]:
        """A window no enrolled speaker matched, or one a provisional speaker claims back
        (``policy.claims``), gets a provisional label; clustering's relabels come back as events.
        ``room``: the shared-room term its enrolled scores lost
        (``policy.shared_room``), taken off its cosine to a provisional centroid too: that centroid
        was made in the same room, and weighed raw against penalised enrolled scores it won back
        the windows of voices enrolled in the room."""
        w = mw.window
        self._last_decided = w.decided
        if mw.embedding is None:
            return mw, []
        if mw.match.known:
            ref, cosine = self.provisional.nearest(mw.embedding)
            if not policy.claims(mw.match, ref, cosine - room):
                return mw, []
            mw = replace(mw, match=policy.yielded(mw.match))
        found = self.provisional.observe(mw.embedding, w.start, w.end)
        if found.label is None:
            return mw, []
        out: list[Decision] = []
        if found.minted:
            out += self._count(self.tracker.relabel(UNKNOWN, found.label, *w.decided))
        for r in found.relabels:
            out += self.relabel(r)
        score = found.score if found.label.known else found.score - room
        margin = policy.label_margin(found.label, score, found.margin, mw.match)
        return replace(mw, label=found.label, label_score=score, label_margin=margin), out

    def _nearest_provisional(self, mw: MatchedWindow, room: float = 0.0) -> MatchedWindow:
        """A probe's nearest provisional speaker, as evidence beside its enrolled match (even a known
        one: the tracker weighs the two); its cosine less ``room``, as in ``_open_set``."""
        if mw.embedding is None:
            return mw
        ref, cosine = self.provisional.nearest(mw.embedding)
        if ref is None:
            return mw
        score = cosine - room
        return replace(mw, label=ref, label_score=score, label_margin=score - mw.match.score)

    # -- relabels and the end --------------------------------------------------------------------

    def relabel(self, r: Relabel) -> list[Decision]:
        """``speaker.renamed`` (kind ``renamed``) or ``speaker.merged``, then the tracker's events
        under the new label, dated at the latest decision."""
        sample, wall = self._last_decided
        if r.kind == "renamed":
            payload: ev.Payload = ev.SpeakerRenamed(old=r.old, new=r.new)
        else:
            payload = ev.SpeakerMerged(old=r.old, new=r.new, cause=CAUSES.get(r.kind, r.kind))
        self.counters["relabels"] += 1
        return [Decision(payload, sample, wall), *self._count(self.tracker.relabel(r.old, r.new, sample, wall))]

    def flush(self, end: int, wall_time: float) -> list[Decision]:
        """End of stream: close whatever turn is open."""
        return self._count(self.tracker.flush(end, wall_time))

    def _count(self, decisions: list[Decision]) -> list[Decision]:
        for d in decisions:
            if isinstance(d.payload, ev.SpeakerChange):
                self.counters["changes"] += 1
            elif isinstance(d.payload, ev.SpeakerSegment):
                self.counters["segments"] += 1
        return decisions
