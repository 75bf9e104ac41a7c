"""Online clustering of speech that matches no enrolled speaker into provisional speakers.

Why: a transcript that says "unknown" for every guest is of little use, and one that mints a
speaker per short segment is worse (screenpipe PR #6015: 489 speakers for 14 people). So unknown
windows first gather in *candidate* groups; a group becomes a provisional speaker (``unknown-1``,
``unknown-2``, ...) only after ``min_speech_s`` of speech over ``min_windows`` windows. A
provisional speaker keeps its embeddings (capped) so it can be enrolled later, merges with another
provisional speaker when their voices turn out to be one, and folds into an enrolled speaker whose
voiceprint its centroid matches. Ids are never reused within a session, so every id an event ever
carried stays resolvable (see ``resolve``).

Thread-safe: the embedding worker calls ``observe``; the control plane lists, promotes and forgets.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ..audio import SAMPLE_RATE
from ..errors import check
from ..events import SpeakerRef
from . import policy
from .evidence import Match
from .values import DecisionValues

logger = logging.getLogger(__name__)

PROVISIONAL_PREFIX = "unknown-"
"""Provisional speaker ids are this prefix and a session-wide counter."""


MINT_STRETCH = 2.0
"""A candidate's ``min_speech_s`` must fall within this many times ``min_speech_s`` of audio."""


def is_provisional_id(speaker_id: str | None) -> bool:
    return bool(speaker_id) and speaker_id.startswith(PROVISIONAL_PREFIX)  # type: ignore[union-attr]


@dataclass(frozen=True)
class ProvisionalSettings:
    """How unknown windows become provisional speakers. Defaults measured in docs/calibration.md;
    the cosine bars (join, merge, fold) are the model's ``DecisionValues``."""

    enabled: bool = True
    """Cluster unknown speech into provisional speakers; off leaves it anonymous."""
    min_speech_s: float = 3.0
    """Speech (union of window spans) a candidate needs before it becomes a provisional speaker."""
    min_windows: int = 4
    """Windows a candidate needs before it becomes a provisional speaker."""
    fold_min_windows: int = 2
    """Windows a candidate needs before its centroid is compared with enrolled speakers."""
    candidate_expiry_s: float = 30.0
    """Audio seconds after which a candidate that stopped growing is forgotten (noise, a cough)."""
    max_embeddings: int = 400
    """Embeddings kept per provisional speaker (the oldest go first; the centroid keeps them all)."""
    max_speakers: int = 100
    """Provisional speakers per session; past this no new one is made (a sign of a bad threshold)."""

    def __post_init__(self) -> None:
        check(0.5 <= self.min_speech_s <= 60.0, "provisional.min_speech_s", self.min_speech_s, "must be within 0.5 to 60 s")
        check(1 <= self.min_windows <= 200, "provisional.min_windows", self.min_windows, "must be within 1 to 200")
        check(
            1 <= self.fold_min_windows <= self.min_windows,
            "provisional.fold_min_windows",
            self.fold_min_windows,
            "must be within 1 and min_windows",
        )
        check(
            1.0 <= self.candidate_expiry_s <= 3600.0,
            "provisional.candidate_expiry_s",
            self.candidate_expiry_s,
            "must be within 1 to 3600 s",
        )
        check(self.max_embeddings >= self.min_windows, "provisional.max_embeddings", self.max_embeddings, "must be >= min_windows")
        check(1 <= self.max_speakers <= 10_000, "provisional.max_speakers", self.max_speakers, "must be within 1 to 10000")


@dataclass(frozen=True)
class Relabel:
    """Provisional speaker ``old`` is now ``new``: another provisional one (``merged``), an
    enrolled one it matched (``folded``), or one a user named (``promoted``)."""

    old: SpeakerRef
    new: SpeakerRef
    kind: str


@dataclass(frozen=True)
class Assignment:
    """What clustering made of one unknown window."""

    label: SpeakerRef | None
    """The provisional (or, once folded, enrolled) speaker of the window; None while anonymous."""
    score: float
    """Evidence for ``label``: cosine to a provisional speaker's centroid, or, for an enrolled
    speaker, the enrolled score of the group's centroid (0 when anonymous)."""
    margin: float = 0.0
    """``score`` minus the runner-up's: the best enrolled window score for a provisional label, the
    centroid's margin over the next enrolled speaker for an enrolled one."""
    minted: bool = False
    """This window made its candidate group a provisional speaker."""
    relabels: tuple[Relabel, ...] = ()


@dataclass(frozen=True)
class ProvisionalSpeaker:
    """A provisional speaker as the control plane lists it."""

    id: str
    windows: int
    speech_s: float
    first_s: float
    last_s: float
    alias: SpeakerRef | None
    """Set once merged or folded: who this id now is."""


@dataclass(eq=False)
class _Group:
    """A candidate (id None) or a provisional speaker."""

    id: str | None
    total: np.ndarray
    count: int = 0
    vectors: list[np.ndarray] = field(default_factory=list)
    spans: list[list[int]] = field(default_factory=list)
    first: int = 0
    last: int = 0
    enrolled: tuple[SpeakerRef, float, float] | None = None
    """A candidate whose centroid matched an enrolled speaker: (speaker, score, margin)."""

    @property
    def centroid(self) -> np.ndarray:
        return _unit(self.total)

    @property
    def speech_samples(self) -> int:
        return sum(b - a for a, b in self.spans)

    def recent_speech(self, horizon: int) -> int:
        """Speech samples within the ``horizon`` samples before the group's last window end."""
        lo = self.last - horizon
        return sum(max(0, b - max(a, lo)) for a, b in self.spans)

    def add(self, vector: np.ndarray, start: int, end: int, keep: int) -> None:
        self.total = self.total + vector
        self.count += 1
        self.vectors.append(vector)
        del self.vectors[:-keep]
        self.first = start if self.count == 1 else min(self.first, start)
        self.last = max(self.last, end)
        _add_span(self.spans, start, end)

    def absorb(self, other: _Group, keep: int) -> None:
        self.total = self.total + other.total
        self.count += other.count
        self.vectors = (self.vectors + other.vectors)[-keep:]
        for a, b in other.spans:
            _add_span(self.spans, a, b)
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)


def _unit(embedding: np.ndarray) -> np.ndarray:
    vector = np.asarray(embedding, dtype=np.float64).reshape(-1)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _add_span(spans: list[list[int]], start: int, end: int) -> None:
    """Union of sample spans, kept sorted and disjoint (windows overlap, speech is counted once)."""
    spans.append([start, end])
    spans.sort()
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    spans[:] = merged


EnrolledScorer = Callable[[np.ndarray], Match]
"""The verdict for one embedding (dim,) against the enrolled speakers."""


class ProvisionalSpeakers:
    """Candidate groups and provisional speakers of one session."""

    def __init__(
        self, settings: ProvisionalSettings, values: DecisionValues, dim: int, enrolled: EnrolledScorer | None = None
    ) -> None:
        self.settings = settings
        self.values = values
        self.dim = dim
        self._enrolled = enrolled
        self._lock = threading.RLock()
        self.lift = 0.0
        """How much higher the join and merge bars stand in this session's room
        (``policy.room_lift``, set by the decision layer)."""
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._speakers: dict[str, _Group] = {}
            self._candidates: list[_Group] = []
            self._alias: dict[str, SpeakerRef] = {}
            self._absorbed: set[str] = set()
            self._next = 1
            self.minted = 0

    # -- the worker's side -------------------------------------------------------------------------

    def observe(self, embedding: np.ndarray, start: int, end: int) -> Assignment:
        """Place one window that matched no enrolled speaker; returns its label, if it has one yet."""
        if not self.settings.enabled:
            return Assignment(None, 0.0)
        vector = _unit(embedding)
        with self._lock:
            self._expire(start)
            best, score = self._nearest(vector, self._joinable())
            if best is not None and policy.joins(self.values, score, self.lift):
                best.add(vector, start, end, self.settings.max_embeddings)
                relabels = self._after_growth(best)
                return Assignment(self._resolve(best.id), score, relabels=relabels)  # type: ignore[arg-type]
            cand, cscore = self._nearest(vector, self._candidates)
            if cand is None or not policy.joins(self.values, cscore, self.lift):
                cand = _Group(None, np.zeros(self.dim))
                self._candidates.append(cand)
            cand.add(vector, start, end, self.settings.max_embeddings)
            if cand.count >= self.settings.fold_min_windows:
                cand.enrolled = self._enrolled_match(cand)
            if cand.enrolled is not None:
                # Windows an enrolled voice scored too low on one by one: together they are them.
                ref, escore, emargin = cand.enrolled
                return Assignment(ref, escore, emargin)
            return self._maybe_mint(cand)

    def nearest(self, embedding: np.ndarray) -> tuple[SpeakerRef | None, float]:
        """The provisional speaker whose centroid is nearest ``embedding``, and the cosine; nothing
        changes (a probe's evidence, not a window to cluster)."""
        if not self.settings.enabled:
            return None, 0.0
        vector = _unit(embedding)
        with self._lock:
            best, score = self._nearest(vector, self._joinable())
            return (None, 0.0) if best is None else (self._resolve(best.id), score)  # type: ignore[arg-type]

    def _joinable(self) -> list[_Group]:
        """Provisional speakers a window may join: not merged away or forgotten (folded and
        promoted ones stay: their label resolves to the enrolled speaker)."""
        return [g for g in self._speakers.values() if g.id not in self._absorbed]

    def _nearest(self, vector: np.ndarray, groups: Iterable[_Group]) -> tuple[_Group | None, float]:
        best: _Group | None = None
        score = -2.0
        for g in groups:
            s = float(g.centroid @ vector)
            if s > score:
                best, score = g, s
        return best, score

    def _expire(self, now: int) -> None:
        horizon = now - int(self.settings.candidate_expiry_s * SAMPLE_RATE)
        self._candidates = [c for c in self._candidates if c.last >= horizon]

    def _enrolled_match(self, group: _Group) -> tuple[SpeakerRef, float, float] | None:
        """The enrolled speaker this group's centroid is, with its score and margin, if any."""
        if self._enrolled is None:
            return None
        match = self._enrolled(group.centroid.astype(np.float32))
        if policy.folds(self.values, match):
            assert match.speaker_id is not None
            return SpeakerRef(match.speaker_id, match.name, True), float(match.score), float(match.margin)
        return None

    def _maybe_mint(self, cand: _Group) -> Assignment:
        s = self.settings
        need = s.min_speech_s * SAMPLE_RATE
        # in one stretch: scattered low-scoring windows of an enrolled voice must not add up to a guest
        if cand.count < s.min_windows or cand.recent_speech(int(MINT_STRETCH * need)) < need:
            return Assignment(None, 0.0)
        self._candidates.remove(cand)
        if len(self._speakers) >= s.max_speakers:
            logger.warning("%d provisional speakers in this session; not making more", s.max_speakers)
            return Assignment(None, 0.0)
        cand.id = f"{PROVISIONAL_PREFIX}{self._next}"
        self._next += 1
        self.minted += 1
        self._speakers[cand.id] = cand
        logger.info(
            "new provisional speaker %s after %.1f s of speech in %d windows",
            cand.id,
            cand.speech_samples / SAMPLE_RATE,
            cand.count,
        )
        relabels = self._after_growth(cand)
        return Assignment(self._resolve(cand.id), float(cand.centroid @ cand.vectors[-1]), minted=True, relabels=relabels)

    def _after_growth(self, group: _Group) -> tuple[Relabel, ...]:
        """Fold a grown speaker into an enrolled one it matches, or merge it with a provisional twin."""
        assert group.id is not None
        if group.id in self._alias:
            return ()
        enrolled = self._enrolled_match(group)
        if enrolled is not None:
            return (self._set_alias(group.id, enrolled[0], "folded"),)
        others = [g for g in self._joinable() if g is not group and g.id not in self._alias]
        twin, score = self._nearest(group.centroid, others)
        if twin is None or not policy.merges(self.values, score, self.lift):
            return ()
        keep, gone = (twin, group) if _number(twin.id) < _number(group.id) else (group, twin)
        keep.absorb(gone, self.settings.max_embeddings)
        assert keep.id is not None and gone.id is not None
        self._absorbed.add(gone.id)
        logger.info("provisional speakers %s and %s are one voice (%.2f); keeping %s", gone.id, keep.id, score, keep.id)
        return (self._set_alias(gone.id, self._ref(keep.id), "merged"),)

    def _set_alias(self, speaker_id: str, target: SpeakerRef, kind: str) -> Relabel:
        self._alias[speaker_id] = target
        logger.info("provisional speaker %s %s into %s", speaker_id, kind, target.id)
        return Relabel(self._ref(speaker_id), target, kind)

    @staticmethod
    def _ref(speaker_id: str) -> SpeakerRef:
        return SpeakerRef(speaker_id, None, False)

    def _resolve(self, speaker_id: str) -> SpeakerRef:
        seen = set()
        ref = self._ref(speaker_id)
        while ref.id in self._alias and ref.id not in seen:
            seen.add(ref.id)
            ref = self._alias[ref.id]
        return ref

    # -- the control plane's side ------------------------------------------------------------------

    def resolve(self, speaker_id: str) -> SpeakerRef | None:
        """Who a provisional id (ever seen in this session) is now; None if never minted."""
        with self._lock:
            if speaker_id not in self._speakers:
                return None
            return self._resolve(speaker_id)

    def speakers(self) -> list[ProvisionalSpeaker]:
        with self._lock:
            return [
                ProvisionalSpeaker(
                    id=g.id,  # type: ignore[arg-type]
                    windows=g.count,
                    speech_s=g.speech_samples / SAMPLE_RATE,
                    first_s=g.first / SAMPLE_RATE,
                    last_s=g.last / SAMPLE_RATE,
                    alias=self._alias.get(g.id),  # type: ignore[arg-type]
                )
                for g in sorted(self._speakers.values(), key=lambda g: _number(g.id))
            ]

    def embeddings(self, speaker_id: str) -> np.ndarray:
        """The kept embeddings of a provisional speaker (merged twins included); KeyError if unknown."""
        with self._lock:
            group = self._speakers[speaker_id]
            return np.array(group.vectors, dtype=np.float32).reshape(-1, self.dim)

    def promote(self, speaker_id: str, target: SpeakerRef) -> Relabel:
        """``speaker_id`` is ``target`` from now on (its windows were just enrolled under it)."""
        with self._lock:
            if speaker_id not in self._speakers:
                raise KeyError(speaker_id)
            return self._set_alias(speaker_id, target, "promoted")

    def merge(self, source_id: str, target_id: str) -> Relabel:
        """A user says two provisional speakers are one voice: ``source_id`` joins ``target_id``."""
        with self._lock:
            if source_id == target_id or source_id not in self._speakers or target_id not in self._speakers:
                raise KeyError(source_id if source_id not in self._speakers else target_id)
            self._speakers[target_id].absorb(self._speakers[source_id], self.settings.max_embeddings)
            self._absorbed.add(source_id)
            return self._set_alias(source_id, self._resolve(target_id), "merged")

    def forget(self, speaker_id: str) -> bool:
        """Drop a provisional speaker's embeddings; its id is not reused. False if unknown."""
        with self._lock:
            group = self._speakers.get(speaker_id)
            if group is None:
                return False
            group.vectors.clear()
            group.total = np.zeros(self.dim)
            group.count = 0
            self._absorbed.add(speaker_id)
            self._alias.setdefault(speaker_id, SpeakerRef(None, None, False))
            return True


def _number(speaker_id: str | None) -> int:
    return int(str(speaker_id)[len(PROVISIONAL_PREFIX) :])
