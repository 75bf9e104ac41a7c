"""Every threshold check of the decision layer, as pure functions of (values, evidence, state).

``DecisionValues`` (values.py) holds the model's bars; nothing else in the decision layer compares
a score or a margin with a number. Grouped by who asks: the matcher's verdict for one window, the
tracker's reading of a window as evidence for a change, and open-set clustering's joins and folds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from ..audio import SAMPLE_RATE
from ..events import SpeakerChange, SpeakerRef
from .evidence import UNKNOWN, UNKNOWN_EMPTY, Candidate, Match, MatchedWindow, is_anonymous, score_of
from .values import DecisionValues

RELAXED_MIN_SPEAKERS = 3
"""The relaxed rule needs this many enrolled speakers: a margin over a single other speaker says
little (measured: with 2 enrolled it let 15-19 % of never-enrolled speech through on 2 of 6
conversations, against 0-5.5 % with 4)."""
OWN_LEVEL_MIN_PROBES = 3
"""The current speaker's own level (median of their latest probes) counts once there are this many."""


# -- one window against the enrolled speakers ------------------------------------------------------


def normalising(v: DecisionValues) -> bool:
    """Scores are compensated against the background cohort."""
    return v.cohort_top_n >= 1 and v.cohort_gain > 0


def compensated(v: DecisionValues, candidates: Sequence[Candidate], level: float, enrolled: Mapping[str, float],
                room: float | None = None) -> list[Candidate]:
    """Candidates with every score raised by ``cohort_gain`` times how far the window's cohort
    ``level`` lies under the enrolled voices' level (the mean over the candidates of each voice's
    enrollment embeddings' mean level).

    A voice enrolled from clean recordings heard through a room: the window's level sinks, its
    score sinks with it, and the difference comes back. Window and enrollment in the same channel
    (clean speech, or a voice enrolled in the room) have the same level, and scores stay as they
    were: the shared colouring of a room is not rewarded twice. One lift for every voice, so the
    ranking stays the model's: lifting each voice by its own enrollment's level re-ranked voices by
    how generic they sound (measured in the room, seed 0: nearest voice right 83.5 -> 79.8 % of
    windows, 91.2 -> 83.3 % of whole turns). ``room``: the session's level, for ``shared_room``
    (None: no penalty yet). Kept within -1 to 1."""
    known = [enrolled[sid] for sid, _, _ in candidates if sid in enrolled]
    if not known:
        return list(candidates)
    voices = float(np.mean(known))
    penalty = shared_room(v, max(voices, room)) if room is not None else 0.0
    lift = v.cohort_gain * max(0.0, voices - level) - penalty
    return [(sid, name, max(-1.0, min(1.0, score + lift))) for sid, name, score in candidates]


def with_rooms(v: DecisionValues, candidates: Sequence[Candidate], rooms: Sequence[Candidate]) -> list[Candidate]:
    """Each voice scored by the better of its (compensated) score and its room versions' cosine
    less ``room_version_penalty``, best first.

    The room versions are a voiceprint of the voice heard across simulated rooms (multi-condition
    enrollment): they carry the score across a real room, where the clean voiceprint's sinks, while
    clean speech keeps scoring against the clean one, as before. No cohort compensation and no
    ``shared_room``: their rooms are not the session's, so they share only reverberation's generic
    colouring with it, which the penalty prices (prototype, eval's room, seed 0, penalty 0.05:
    identification 84 % without ``shared_room``, 62 % with it as well)."""
    if not rooms:
        return list(candidates)
    best = {sid: (name, score) for sid, name, score in candidates}
    for sid, name, score in rooms:
        lowered = score - v.room_version_penalty
        if sid not in best or lowered > best[sid][1]:
            best[sid] = (name, lowered)
    return sorted(((sid, name, score) for sid, (name, score) in best.items()), key=lambda c: -c[2])


def shared_room(v: DecisionValues, level: float) -> float:
    """How much lower a window's scores stand when the session and the enrolled voices are both
    heard through a room (``level``: the higher of the session's and the voices' cohort levels):
    ``room_score_penalty`` times how far that level lies under ``cohort_clean_level``; 0 in a clean
    channel on either side. The session's level, not the window's: a voice unlike any cohort voice
    has a low level of its own in any channel, and one window's level would penalise it as a room."""
    if v.room_score_penalty <= 0 or v.cohort_clean_level <= 0:
        return 0.0
    return v.room_score_penalty * max(0.0, v.cohort_clean_level - level)


def adapting(v: DecisionValues) -> bool:
    """In-session adaptation is on."""
    return v.adapt_windows >= 1


def adapts(v: DecisionValues, enrolled: Match) -> bool:
    """A window the enrolled voiceprints alone name, at the threshold and ahead of the runner-up
    by ``adapt_margin``, refines that voice's session voiceprint."""
    return enrolled.known and enrolled.score >= v.threshold and enrolled.margin >= v.adapt_margin


def with_session(v: DecisionValues, candidates: Sequence[Candidate], session: Mapping[str, float], level: float | None = None) -> list[Candidate]:
    """Each voice scored by the better of its enrolled score and its session voiceprint's cosine
    less ``adapt_penalty`` (the session voiceprint shares the room with every voice in it) and, for
    a window of cohort ``level``, less ``shared_room`` (the voiceprint was made in that room), best first."""
    less = v.adapt_penalty + (shared_room(v, level) if level is not None else 0.0)
    out = [(sid, name, max(score, session[sid] - less) if sid in session else score) for sid, name, score in candidates]
    out.sort(key=lambda c: -c[2])
    return out


def verdict(v: DecisionValues, candidates: Sequence[Candidate], threshold: float | None = None) -> Match:
    """Known, relaxed-known, unknown and uncertain, from the candidates ranked best first."""
    if not candidates:
        return UNKNOWN_EMPTY
    limit = v.threshold if threshold is None else threshold
    best, best_name, score = candidates[0]
    runner_up, runner_up_name, second = candidates[1] if len(candidates) > 1 else (None, None, None)
    margin = score - second if second is not None else score
    relaxed = (
        second is not None
        and len(candidates) >= RELAXED_MIN_SPEAKERS
        and score >= v.relaxed_threshold
        and margin >= v.relaxed_margin
    )
    known = score >= limit or relaxed
    uncertain = abs(score - limit) < v.uncertain_band or (known and margin < v.uncertain_margin)
    return Match(
        speaker_id=best if known else None,
        name=best_name if known else None,
        score=score,
        margin=margin,
        runner_up=runner_up,
        known=known,
        nearest=best,
        uncertain=uncertain,
        nearest_name=best_name,
        runner_up_name=runner_up_name,
    )


# -- the tracker: is this window evidence for a change? -------------------------------------------


def decisive(v: DecisionValues, mw: MatchedWindow) -> bool:
    """A certain named window far enough ahead of the runner-up changes the speaker alone."""
    return mw.ref.known and not mw.uncertain and mw.margin >= v.decisive_margin


def placed(v: DecisionValues, change: SpeakerChange) -> bool:
    """A tentative change whose evidence cleared ``tentative_margin``: its ``at`` is trusted as the
    change point. One announced on a known probe's narrower margin is only early."""
    return change.margin >= v.tentative_margin


def firmer(v: DecisionValues, mw: MatchedWindow) -> bool:
    """A probe firm enough to place a change announced earlier on a narrower margin."""
    return mw.margin >= v.tentative_margin


def returning(v: DecisionValues, mw: MatchedWindow) -> bool:
    """A probe nearest a provisional speaker's centroid, by the same bar an enrolled voiceprint
    must clear, announces that voice's return (measured on eval's open meetings, seeds 0-2:
    never-enrolled speech named as enrolled 9.8/3.3/4.3 % -> 8.2/2.5/3.1 %)."""
    label = mw.label
    return (
        mw.window.probe
        and label is not None
        and not label.known
        and mw.label_score >= v.tentative_score
        and mw.label_margin >= v.tentative_margin
    )


def speaks_for(v: DecisionValues, mw: MatchedWindow, current: SpeakerRef | None) -> bool:
    """A probe the matcher names as the current enrolled speaker, or that returns to the current
    provisional one."""
    if current is None or is_anonymous(current):
        return False
    if current.known:
        return mw.match.known and mw.match.speaker_id == current.id and not mw.uncertain
    return returning(v, mw) and mw.label == current


def nearer_enrolled(v: DecisionValues, mw: MatchedWindow, current: SpeakerRef | None) -> bool:
    """A probe nearer an enrolled voiceprint than every provisional centroid (so than the current
    unnamed voice's), by the margin a runner-up must be beaten by, is evidence against that voice."""
    return (
        mw.window.probe
        and current is not None
        and not is_anonymous(current)
        and mw.label is not None
        and mw.match.score - mw.label_score >= v.tentative_margin
    )


def evidence_for(v: DecisionValues, mw: MatchedWindow, current: SpeakerRef | None) -> SpeakerRef | None:
    """The speaker a probe, or a window the matcher left unnamed, is evidence for, if enough for a
    tentative change: an enrolled speaker, or (a probe only) a provisional one heard before."""
    m = mw.match
    # a probe is judged by the tentative bar alone: the matcher's threshold band is for full windows
    if mw.uncertain and not mw.window.probe:
        return None
    if current is not None and not current.known and not nearer_enrolled(v, mw, current):
        return None  # an unnamed voice is speaking: a near miss on an enrolled one is most likely it
    if returning(v, mw):
        return mw.label
    if m.nearest is None or m.nearest_name is None:
        return None
    # a probe the matcher names needs only the margin a regular window needs to act alone
    bar = v.decisive_margin if m.known else v.tentative_margin
    if not (m.known or m.score >= v.tentative_score) or m.margin < bar:
        return None
    return SpeakerRef(id=m.nearest, name=m.nearest_name, known=True)


def agreeing(v: DecisionValues, mw: MatchedWindow, other: MatchedWindow | None, current: SpeakerRef | None) -> SpeakerRef | None:
    """The enrolled voice both an unnamed piece of evidence and the one just before it (an unnamed
    window and the probe before it, or a probe and the weak window before it: unnamed, or too close
    to call, the tracker's ``lead``) have nearest, each at ``tentative_score`` or more: enough for
    a tentative change though neither clears a margin alone.

    In a room a new voice is usually nearest from its first window on, but by margins under every
    bar (docs/BENCHMARKS.md, session 11: 20 of 22 late changes on eval's seed 0). Two overlapping
    pieces that agree announce it a window sooner. Not while an unnamed voice speaks (a near miss on
    an enrolled voice is most likely that voice, as in :func:`evidence_for`)."""
    m = mw.match
    if other is None or m.nearest is None or m.nearest_name is None or other.match.nearest != m.nearest:
        return None
    if current is not None and (not current.known or current.id == m.nearest):
        return None
    if min(m.score, other.match.score) < v.tentative_score:
        return None
    return SpeakerRef(id=m.nearest, name=m.nearest_name, known=True)


def departure(v: DecisionValues, mw: MatchedWindow, current: SpeakerRef | None, own: Sequence[float]) -> SpeakerRef | None:
    """Anonymous speech, when a probe near no enrolled voice falls well below the current one's level."""
    m = mw.match
    if current is None or not current.known:
        return None
    if len(own) < OWN_LEVEL_MIN_PROBES or m.score >= v.tentative_score:
        return None
    drop = float(np.median(own)) - score_of(m, current.id)
    return UNKNOWN if drop > v.departure_drop else None


def lead_in(v: DecisionValues, lead: Sequence[MatchedWindow], new: SpeakerRef, region_start: int) -> list[MatchedWindow]:
    """The windows just before a change to enrolled ``new`` that were too weak to name anyone but
    were nearest to ``new``: a voice often scores low in its first, shorter window."""
    if not new.known:
        return []
    out: list[MatchedWindow] = []
    for mw in reversed(lead):
        if mw.match.nearest != new.id or mw.match.score < v.lead_in_score or mw.window.region_start != region_start:
            break
        out.insert(0, mw)
    return out


def tail_voice(v: DecisionValues, tail: Sequence[MatchedWindow], speaking: SpeakerRef) -> SpeakerChange | None:
    """Another enrolled voice the probes ending a region score at least ``threshold``, as a tentative
    change from the earliest of them on (score and margin: the latest's).

    Another voice heard as the runner-up counts only while it trails the speaking voice by less than
    ``relaxed_margin``, the lead that names a window alone: a probe that far ahead is the speaking
    voice's, whatever the runner-up scores. GE2E's runner-ups never reach ``threshold`` that far
    behind (eval seed 0 clean, room seeds 0-1: 0 of 43 probes), ECAPA-TDNN's scores spread wider
    and did on 103 of 151 clean probes, each a change that was not there (docs/BENCHMARKS.md, session 13)."""
    found: SpeakerChange | None = None
    for mw in reversed(tail):
        m = mw.match
        other = m.nearest if m.nearest != speaking.id else m.runner_up
        if other is None or found is not None and other != found.speaker.id:
            break
        nearest = other == m.nearest
        if not nearest and m.margin >= v.relaxed_margin:
            break
        score = score_of(m, other)
        if score < v.threshold:
            break
        at = mw.window.center / SAMPLE_RATE
        if found is None:
            who = SpeakerRef(id=other, name=m.nearest_name if nearest else m.runner_up_name, known=True)
            margin = m.margin if nearest else -m.margin  # behind the nearest when the runner-up
            found = SpeakerChange(speaker=who, previous=speaking, score=score, margin=margin, at=at, tentative=True)
        else:
            found = replace(found, at=at)
    return found


# -- open-set clustering ---------------------------------------------------------------------------


def room_lift(v: DecisionValues, session_level: float | None) -> float:
    """How much higher clustering's bars stand in this session's room: ``room_join_lift`` times
    how far the session's cohort level lies under a clean session's; 0 without a level."""
    if session_level is None or v.room_join_lift <= 0 or v.cohort_clean_level <= 0:
        return 0.0
    return v.room_join_lift * max(0.0, v.cohort_clean_level - session_level)


def joins(v: DecisionValues, cosine: float, lift: float = 0.0) -> bool:
    """A window this near a group's centroid joins the group (``lift``: ``room_lift``)."""
    return cosine >= v.join_threshold + lift


def merges(v: DecisionValues, cosine: float, lift: float = 0.0) -> bool:
    """Two provisional speakers' centroids this near are one voice."""
    return cosine >= v.merge_threshold + lift


def folds(v: DecisionValues, centroid_match: Match) -> bool:
    """A group whose centroid the matcher names this firmly is that enrolled speaker."""
    return centroid_match.known and centroid_match.speaker_id is not None and centroid_match.score >= v.fold_threshold


def claims(match: Match, provisional: SpeakerRef | None, cosine: float) -> bool:
    """A window the enrolled voiceprints name, but at least as near a voice heard unnamed in this
    session (``cosine``: to that provisional speaker's centroid, less the shared-room term, on the
    same scale as the enrolled score), is that voice's: in a room a voice nobody enrolled scores
    high against enrolled voiceprints too, and it is its own nearest voice once it has spoken.
    No bar of its own: the two scores are compared (eval, seeds 0 / 1 / 2, never-enrolled speech
    named as enrolled: room, default enrollment 3.0 / 4.7 / 19.4 -> 3.0 / 2.3 / 13.0 %, clean
    speech 9.1 / 2.2 / 5.6 -> 4.1 / 0.7 / 1.5 %; identification within -1.7 to +3.5 points; a
    margin of 0.04 changed nothing; docs/BENCHMARKS.md, session 8)."""
    return match.known and provisional is not None and not provisional.known and cosine >= match.score


def yielded(match: Match) -> Match:
    """``match`` as a window no enrolled speaker names (``claims``): its nearest stays for diagnostics."""
    return replace(match, speaker_id=None, name=None, known=False)


def label_margin(label: SpeakerRef, score: float, margin: float, match: Match) -> float:
    """A clustering label's lead: over the next enrolled speaker for an enrolled label, over the
    best enrolled score for a provisional one."""
    return margin if label.known else score - match.score
