"""``speakerd eval``: judge the daemon on reproducible conversations built from real speech.

Everything the figures come from is the real thing: enrollment through ``prepare_enrollment`` and
``SpeakerStore``, and the full ``Pipeline`` reading a WAV through ``FileSource`` (``run_file``).
Only the conversations are synthetic, so the truth is known to the sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..audio import SAMPLE_RATE
from ..rooms import MAX_VERSIONS, RoomSettings
from ..vad import VAD_BACKENDS
from .conversation import (
    UNKNOWN_PREFIX,
    Conversation,
    ConversationSettings,
    NOISE_COLORS,
    build_conversation,
    librispeech_speakers,
    pick_speakers,
    split_enrollment,
    unknown_pool,
)
from .der import DEFAULT_COLLAR_S, EMPTY, DerResult, Labelled, diarization_error, speech_share_labelled
from .eer import equal_error_rate, threshold_table
from .metrics import Segment, attribution_accuracy, change_scores
from .room_eval import ENROLLMENTS, PROVISIONAL_PREFIX, add_room_arguments, enroll_in_room, pool_provisional, provisional_figures, room_line
from .runner import FileRun, run_file

logger = logging.getLogger(__name__)

UNKNOWN_LABEL = "(unknown)"
"""Hypothesis label of speech the daemon attributes to nobody enrolled."""
NAME_PREFIX = "spk-"
"""Enrolled names are ``spk-<librispeech id>`` (a bare number would look like a speaker id)."""
PURE_SHARE = 0.9
"""A window is a verification trial when one speaker has at least this share of its reference speech."""
MIN_SPEECH_SHARE = 0.5
"""... and reference speech covers at least this share of it."""
DETECTION_WINDOW_S = (0.5, 3.0)
"""The daemon's own change criterion: decided no earlier than 0.5 s before and within 3 s after."""
THRESHOLDS = tuple(round(0.40 + 0.05 * i, 2) for i in range(12))
CONDITIONS = ("enrolled", "open")
"""Conversations among enrolled speakers only, and with never-enrolled voices mixed in."""
NOBODY = "nobody"
"""Conversations among voices nobody enrolled (``--nobody N``): judged by the provisional speakers."""
NOBODY_SEED = 500
"""Seed offset of the nobody-enrolled meetings, clear of the other conditions' seeds."""
ROOM_LEVEL_DB = (-4.0, 0.0)
"""Per-turn level in a room: distance already makes the differences, this is only effort."""


@dataclass(frozen=True)
class EvalSettings:
    audio_dir: Path
    meetings: int = 4
    enrolled: int = 4
    unknown: int = 2
    turns: int = 16
    enroll_clips: int = 3
    snr_db: float | None = None
    noise_color: str = "pink"
    rt60_s: float | None = None
    seed: int = 0
    window_lengths: tuple[float, ...] = (1.5, 2.0)
    collar_s: float = DEFAULT_COLLAR_S
    tolerance_s: float = 0.5
    room_rt60_s: float | None = None
    """One simulated room per meeting (pyroomacoustics) with this RT60, a table microphone."""
    room_snr_db: float | None = 18.0
    """SNR of the room's noise bed (coloured noise and babble); None: no bed."""
    room_noise: str = "pink"
    babble: int = 4
    """Voices (never in the meeting) in the room's babble."""
    overlap: float = 0.0
    """Share of hand-overs that overlap by 0.2 to 1 s."""
    interjections: float = 0.0
    """Share of turns with a 0.3 to 1 s interjection of another speaker."""
    enrollment: tuple[str, ...] = ("clean",)
    room_versions: int = 2
    """Room versions per recording of the "multi" enrollment (2: docs/BENCHMARKS.md, Rooms)."""
    nobody: int = 0
    """Voices in conversations nobody is enrolled in (0: no such condition)."""

    def __post_init__(self) -> None:
        if self.meetings < 1 or self.enrolled < 2 and self.unknown == 0 or self.enrolled < 1:
            raise ValueError("need at least one meeting and two voices per conversation")
        if self.unknown < 0 or self.turns < 2 or not self.window_lengths:
            raise ValueError("unknown must be >= 0, turns >= 2, and at least one window length given")
        if not self.enrollment or any(e not in ENROLLMENTS for e in self.enrollment):
            raise ValueError(f"enrollment must be some of {', '.join(ENROLLMENTS)}, got {self.enrollment}")
        if "room" in self.enrollment and self.room_rt60_s is None:
            raise ValueError("enrollment in the room needs a room: give --room")
        if not (0.0 <= self.overlap <= 1.0 and 0.0 <= self.interjections <= 1.0):
            raise ValueError(f"--overlap and --interjections are shares within 0 to 1, got {self.overlap} and {self.interjections}")
        if self.babble < 0 or not 0 <= self.room_versions <= MAX_VERSIONS:
            raise ValueError(f"--babble must be >= 0 and --room-versions within 0 to {MAX_VERSIONS}")
        if self.nobody == 1 or self.nobody < 0:
            raise ValueError(f"a conversation nobody is enrolled in needs at least two voices, got {self.nobody}")

    def room(self) -> RoomSettings | None:
        if self.room_rt60_s is None:
            return None
        snr = None if self.room_snr_db is None else (self.room_snr_db, self.room_snr_db)
        return RoomSettings(rt60_s=(self.room_rt60_s, self.room_rt60_s), snr_db=snr, noise_color=self.room_noise)

    def conversation(self, meeting: int, condition: str) -> ConversationSettings:
        room = self.room()
        seed = self.seed * 1000 + (NOBODY_SEED + meeting if condition == NOBODY else meeting * 2 + CONDITIONS.index(condition))
        return ConversationSettings(
            turns=self.turns,
            snr_db=self.snr_db,
            noise_color=self.noise_color,
            rt60_s=self.rt60_s,
            room=room,
            level_db=ROOM_LEVEL_DB if room is not None else ConversationSettings.level_db,
            overlap_share=self.overlap,
            interjections=self.interjections,
            seed=seed,
        )


@dataclass
class Meeting:
    condition: str
    index: int
    conversation: Conversation
    wav: Path
    names: dict[str, str]
    """Conversation speaker id -> enrolled name (enrolled speakers only)."""
    settings: ConversationSettings | None = None
    babble: tuple[Path, ...] = ()
    """Clips of the voices in the room's babble."""

    def label(self, speaker: str) -> str:
        return self.names.get(speaker, speaker)

    def conversation_speakers(self) -> set[str]:
        return {t.speaker for t in [*self.conversation.turns, *self.conversation.interjections]}


# -- truth and output as labelled intervals -----------------------------------------------------------


def reference_intervals(meeting: Meeting) -> list[Labelled]:
    conv = meeting.conversation
    return [(a, b, meeting.label(t.speaker)) for t in [*conv.turns, *conv.interjections] for a, b in t.speech]


def hypothesis_label(speaker: dict[str, Any]) -> str:
    """An enrolled name; else a provisional speaker, a cluster DER maps by assignment; else unknown."""
    if speaker.get("known") and speaker.get("name"):
        return str(speaker["name"])
    return PROVISIONAL_PREFIX + speaker["id"] if speaker.get("id") else UNKNOWN_LABEL


def named_label(speaker: dict[str, Any]) -> str:
    """The name, or unknown for anyone not enrolled (provisional speakers included)."""
    return str(speaker["name"]) if speaker.get("known") and speaker.get("name") else UNKNOWN_LABEL


def hypothesis_intervals(run: FileRun) -> list[Labelled]:
    return [(e["start"], e["end"], hypothesis_label(e["speaker"])) for e in run.events if e["type"] == "speaker.segment"]


def true_changes(meeting: Meeting) -> list[float]:
    """First speech of every turn whose nameable speaker differs from the last turn's.

    The daemon calls every never-enrolled voice "unknown", so a hand-over between two unknown
    voices is no change it could report, and is not counted.
    """
    out: list[float] = []
    turns = meeting.conversation.turns
    for a, b in zip(turns, turns[1:]):
        la = meeting.names.get(a.speaker, UNKNOWN_LABEL)
        lb = meeting.names.get(b.speaker, UNKNOWN_LABEL)
        if la != lb:
            out.append(b.speech[0][0] if b.speech else b.start)
    return out


HANDOVER_GAP_S = 0.1
"""A change with less silence than this before it is a direct hand-over (with none, overlapping)."""
OVERLAP_S = 0.01
"""A change whose speech begins this much before the last speaker's ends overlaps it (less: rounding)."""
CHANGE_KINDS = ("after_pause", "direct", "overlap")


def change_kinds(meeting: Meeting) -> list[tuple[float, str]]:
    """Each true change with its kind: after a pause (a new speech region) or a direct hand-over."""
    turns = meeting.conversation.turns
    out = []
    for a, b in zip(turns, turns[1:]):
        if meeting.names.get(a.speaker, UNKNOWN_LABEL) != meeting.names.get(b.speaker, UNKNOWN_LABEL):
            start = b.speech[0][0] if b.speech else b.start
            end = a.speech[-1][1] if a.speech else a.end
            out.append((start, "after_pause" if start - end >= HANDOVER_GAP_S else "direct" if start > end - OVERLAP_S else "overlap"))
    return out


def reported_changes(run: FileRun) -> tuple[list[float], list[float]]:
    """(estimated change points ``at``, decision times ``stream_time``) of every announced change of label.

    The first announcement of the stream is no change; an event that repeats the current label (a
    confirmation of a tentative change) is no new one, but its ``at`` is the estimate a subscriber
    ends up with (it supersedes the tentative one's), so it is the one scored; the decision time
    stays the first announcement's. Nor is an event that names someone else at the very ``at`` of
    a tentative change just announced: it revises who that change is to (a subscriber relabels the
    line it began). Provisional speakers all count as unknown, as in ``true_changes``.
    """
    at: list[float] = []
    decided: list[float] = []
    current: str | None = None
    confirmable = False  # the last event announced a change that a confirmation may refine
    for e in run.events:
        if e["type"] != "speaker.change":
            continue
        label = named_label(e["speaker"])
        revises = confirmable and float(e["at"]) == at[-1] and e.get("previous") is not None
        if revises and label != current and label != named_label(e["previous"]):
            confirmable = bool(e["tentative"])  # the same change, now to ``label``
        elif current is not None and label != current:
            at.append(float(e["at"]))
            decided.append(float(e["stream_time"]))
            confirmable = bool(e["tentative"])
        elif confirmable and label == current and not e["tentative"]:
            at[-1] = float(e["at"])
            confirmable = False
        current = label
    return at, decided


# -- per-window scores ----------------------------------------------------------------------------------


def window_trials(
    meeting: Meeting, run: FileRun, embeddings: Sequence[np.ndarray], index: Any
) -> dict[str, Any]:
    """Target and non-target scores of the pure windows; mixed windows (at hand-overs) are only counted.

    Every pure window is scored against every enrolled speaker over all of their embeddings
    (``SpeakerIndex.score_of``), the same score the matcher's verdict uses.
    """
    if len(embeddings) != len(run.windows) or any(e is None for e in embeddings):
        raise RuntimeError(f"{len(embeddings)} embeddings for {len(run.windows)} windows: every window needs one")
    speakers = index.speakers  # id -> name
    ref = reference_intervals(meeting)
    targets: list[float] = []
    nontargets: list[float] = []
    pure = mixed = silent = correct = 0
    enrolled_pure = unknown_pure = unknown_accepted = 0
    threshold = run.decision.threshold if run.decision is not None else math.inf
    for mw, emb in zip(run.windows, embeddings, strict=True):
        a, b = mw.window.start / SAMPLE_RATE, mw.window.end / SAMPLE_RATE
        share: dict[str, float] = {}
        for s, e, label in ref:
            o = min(b, e) - max(a, s)
            if o > 0:
                share[label] = share.get(label, 0.0) + o
        speech = sum(share.values())
        if speech < MIN_SPEECH_SHARE * (b - a):
            silent += 1
            continue
        top = max(share, key=share.__getitem__)
        if share[top] < PURE_SHARE * speech:
            mixed += 1
            continue
        pure += 1
        scores = {name: index.score_of(sid, emb) for sid, name in speakers.items()}
        for name, score in scores.items():
            (targets if name == top else nontargets).append(score)
        if top in scores:
            enrolled_pure += 1
            correct += max(scores, key=scores.__getitem__) == top
        elif scores:
            unknown_pure += 1
            unknown_accepted += max(scores.values()) >= threshold
    return {
        "targets": targets,
        "nontargets": nontargets,
        "pure": pure,
        "mixed": mixed,
        "little_speech": silent,
        "enrolled_pure": enrolled_pure,
        "nearest_correct": correct,
        "unknown_pure": unknown_pure,
        "unknown_accepted": unknown_accepted,
    }


# -- one meeting ------------------------------------------------------------------------------------


@dataclass
class MeetingScore:
    der: DerResult
    identification: float
    enrolled_speech_s: float
    unknown_accepted_s: float
    unknown_speech_s: float
    boundary: Any
    detection: Any
    trials: dict[str, Any]
    run_s: float
    audio_s: float
    hypothesis: list[Labelled] = field(default_factory=list)
    decisions: list[float] = field(default_factory=list)
    enrolled_as: dict[str, float] = field(default_factory=dict)
    """Seconds of enrolled speech labelled right, with another name, unknown, or not at all."""
    latency_by_kind: dict[str, list[float]] = field(default_factory=dict)
    """Decision latencies of changes after a pause, of direct and of overlapping hand-overs."""
    provisional: dict[str, float] = field(default_factory=dict)
    """What became of never-enrolled speech: ``room_eval.provisional_figures``."""


def score_meeting(meeting: Meeting, run: FileRun, embeddings: Sequence[np.ndarray], index: Any, es: EvalSettings, run_s: float) -> MeetingScore:
    conv = meeting.conversation
    ref = reference_intervals(meeting)
    hyp = hypothesis_intervals(run)
    enrolled_names = set(meeting.names.values())
    der = diarization_error(ref, hyp, collar=es.collar_s, fixed=enrolled_names, uem=(0.0, conv.duration))
    segments = [Segment(a, b, lab if lab in enrolled_names else "") for a, b, lab in hyp]
    unnamed = {lab for *_, lab in hyp if lab not in enrolled_names}
    ident = attribution_accuracy(conv.turns, segments, meeting.names, conv.duration)
    enrolled_s = sum(b - a for a, b, lab in ref if lab in enrolled_names)
    unknown_labels = {lab for *_, lab in ref if lab not in enrolled_names}
    accepted, unknown_s = speech_share_labelled(ref, hyp, unknown_labels, enrolled_names)
    truth = true_changes(meeting)
    at, decided = reported_changes(run)
    boundary = change_scores(truth, at, before=es.tolerance_s, after=es.tolerance_s)
    detection = change_scores(truth, decided, before=DETECTION_WINDOW_S[0], after=DETECTION_WINDOW_S[1])
    trials = window_trials(meeting, run, embeddings, index)
    enrolled_as = {"right": 0.0, "other_name": 0.0, "unknown": 0.0, "unlabelled": 0.0}
    for name in enrolled_names:
        right, speech_s = speech_share_labelled(ref, hyp, {name}, {name})
        other, _ = speech_share_labelled(ref, hyp, {name}, enrolled_names - {name})
        unk, _ = speech_share_labelled(ref, hyp, {name}, unnamed)
        enrolled_as["right"] += right
        enrolled_as["other_name"] += other
        enrolled_as["unknown"] += unk
        enrolled_as["unlabelled"] += speech_s - right - other - unk
    kinds = change_kinds(meeting)
    by_kind = {
        kind: change_scores([t for t, k in kinds if k == kind], decided, before=DETECTION_WINDOW_S[0], after=DETECTION_WINDOW_S[1]).latencies
        for kind in CHANGE_KINDS
    }
    return MeetingScore(der, ident, enrolled_s, accepted, unknown_s, boundary, detection, trials, run_s, conv.duration,
                        hyp, decided, enrolled_as, by_kind, provisional_figures(ref, hyp, unknown_labels))


def _f1(tp: int, reported: int, true: int) -> dict[str, float]:
    p = tp / reported if reported else 1.0
    r = tp / true if true else 1.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "true": true, "reported": reported}


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def aggregate(scores: Sequence[MeetingScore]) -> dict[str, Any]:
    """Pool meetings by time (DER, accuracies) and by count (changes), as a corpus figure should."""
    der = sum((s.der for s in scores), EMPTY)
    enrolled_s = sum(s.enrolled_speech_s for s in scores)
    ident = sum(s.identification * s.enrolled_speech_s for s in scores if not math.isnan(s.identification))
    unknown_s = sum(s.unknown_speech_s for s in scores)
    boundary_tp = sum(len(s.boundary.latencies) for s in scores)
    detection_tp = sum(len(s.detection.latencies) for s in scores)
    true = sum(s.boundary.true_changes for s in scores)
    latencies = [x for s in scores for x in s.detection.latencies]
    audio_s = sum(s.audio_s for s in scores)
    return {
        "meetings": len(scores),
        "audio_s": audio_s,
        "der": _finite(der.der),
        "missed": _finite(der.rate("missed")),
        "false_alarm": _finite(der.rate("false_alarm")),
        "confusion": _finite(der.rate("confusion")),
        "scored_speech_s": der.total,
        "identification": _finite(ident / enrolled_s) if enrolled_s else None,
        "unknown_false_accept": _finite(sum(s.unknown_accepted_s for s in scores) / unknown_s) if unknown_s else None,
        "unknown_speech_s": unknown_s,
        "change_boundary": _f1(boundary_tp, sum(s.boundary.reported_changes for s in scores), true),
        "change_detection": _f1(detection_tp, sum(s.detection.reported_changes for s in scores), true),
        "latency_median_s": _finite(float(np.median(latencies))) if latencies else None,
        "latency_p95_s": _finite(float(np.percentile(latencies, 95))) if latencies else None,
        "real_time_factor": sum(s.run_s for s in scores) / audio_s if audio_s else None,
        "enrolled_speech_as": {k: sum(s.enrolled_as.get(k, 0.0) for s in scores) / enrolled_s for k in
                               ("right", "other_name", "unknown", "unlabelled")} if enrolled_s else None,
        "latency_by_kind": {kind: _latency([x for s in scores for x in s.latency_by_kind.get(kind, [])])
                            for kind in CHANGE_KINDS},
        "provisional": pool_provisional([s.provisional for s in scores]),
    }


def _latency(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "count": len(values),
        "median_s": float(np.median(values)) if values else None,
        "p95_s": float(np.percentile(values, 95)) if values else None,
    }


def window_summary(scores: Sequence[MeetingScore]) -> dict[str, Any]:
    targets = [x for s in scores for x in s.trials["targets"]]
    nontargets = [x for s in scores for x in s.trials["nontargets"]]
    eer = equal_error_rate(targets, nontargets)
    counts = {k: sum(s.trials[k] for s in scores) for k in (
        "pure", "mixed", "little_speech", "enrolled_pure", "nearest_correct", "unknown_pure", "unknown_accepted")}
    return {
        "eer": _finite(eer.eer),
        "eer_threshold": _finite(eer.threshold),
        "target_trials": eer.targets,
        "nontarget_trials": eer.nontargets,
        **counts,
        "nearest_accuracy": counts["nearest_correct"] / counts["enrolled_pure"] if counts["enrolled_pure"] else None,
        "unknown_window_accept": counts["unknown_accepted"] / counts["unknown_pure"] if counts["unknown_pure"] else None,
        "thresholds": threshold_table(targets, nontargets, THRESHOLDS),
        "_targets": targets,
        "_nontargets": nontargets,
    }


# -- the run --------------------------------------------------------------------------------------------


def build_meetings(es: EvalSettings, work: Path) -> tuple[dict[str, list[Path]], list[Meeting]]:
    """Enrollment clips of the K enrolled speakers, and every meeting written to ``work``."""
    test = librispeech_speakers(es.audio_dir, "test-other")
    if len(test) < es.enrolled:
        raise ValueError(f"{es.audio_dir}/test-other has {len(test)} speakers, {es.enrolled} asked to be enrolled")
    chosen = pick_speakers(test, es.enrolled, es.seed)
    enroll, rest = split_enrollment(chosen, es.enroll_clips)
    names = {spk: NAME_PREFIX + spk for spk in chosen}
    room = es.room_rt60_s is not None
    pool = unknown_pool(es.audio_dir) if es.unknown or (room and es.babble) else {}
    meetings: list[Meeting] = []
    conditions = [c for c in CONDITIONS if c == "enrolled" or es.unknown > 0] + ([NOBODY] if es.nobody else [])
    for condition in conditions:
        for m in range(es.meetings):
            cs = es.conversation(m, condition)
            if condition == NOBODY:
                clips, meeting_names = pick_speakers(test, es.nobody, cs.seed), {}
            else:
                clips, meeting_names = dict(rest), names
                if condition == "open":
                    clips.update(pick_speakers(pool, es.unknown, cs.seed))
            babble = _babble(pool, set(clips), es.babble, cs.seed) if room else ()
            conv = build_conversation(clips, cs, babble)
            wav = conv.write(work / f"{condition}-{m}.wav")
            meetings.append(Meeting(condition, m, conv, wav, meeting_names, cs, babble))
    return enroll, meetings


def meeting_voices(meeting: Meeting) -> set[str]:
    """LibriSpeech speaker ids of everyone heard in a meeting (its voices and its babble)."""
    voices = {s.removeprefix(UNKNOWN_PREFIX) for s in meeting.conversation_speakers()}
    return voices | {Path(clip).name.split("-")[0] for clip in meeting.babble}


def _babble(pool: dict[str, list[Path]], meeting: set[str], count: int, seed: int) -> tuple[Path, ...]:
    """Clips of ``count`` never-enrolled voices that are not in the meeting, for its babble."""
    others = {k: v for k, v in pool.items() if k not in meeting}
    return tuple(clip for clips in pick_speakers(others, min(count, len(others)), seed + 1).values() for clip in clips)


def enroll_store(directory: Path, enroll: dict[str, list[Path]], settings: Any, bundle: Any, backend: Any,
                 room_versions: int = 0) -> Any:
    """A fresh store with every enrolled speaker, through the real enrollment path; its index.

    ``room_versions``: multi-condition enrollment, each clip also through that many of the bundle's
    room responses (simulated anew when it has none), as ``speakerd enroll`` does by default.
    """
    from ..enroll import add_room_versions, enrollment_rooms, prepare_enrollment
    from ..matcher import SpeakerIndex
    from ..rooms import MultiConditionSettings
    from ..store import SpeakerStore

    multi, responses = enrollment_rooms(bundle, MultiConditionSettings(versions=room_versions), asked=True)
    with SpeakerStore(directory, fingerprint=bundle.fingerprint, dim=bundle.embedding_dim) as store:
        for spk, paths in sorted(enroll.items()):
            report = prepare_enrollment(NAME_PREFIX + spk, paths, settings, bundle.features, backend.embed)
            report = add_room_versions(report, settings, bundle.features, backend.embed, multi, responses)
            store.enroll(NAME_PREFIX + spk, report.embeddings_matrix(), ",".join(map(str, paths)), report.rooms_matrix())
        return SpeakerIndex.from_store(store, settings.matching)


def condition_key(condition: str, enrollment: str) -> str:
    """Report key of a condition: clean enrollment keeps the bare name the report always had."""
    return condition if enrollment == "clean" or condition == NOBODY else f"{condition}, {enrollment} enrollment"


class _Indexes:
    """The speaker index each meeting is judged against, built once per window length and enrollment."""

    def __init__(self, es: EvalSettings, enroll: dict[str, list[Path]], bundle: Any, backend: Any, work: Path) -> None:
        self.es, self.enroll, self.bundle, self.backend, self.work = es, enroll, bundle, backend, work
        self._built: dict[tuple[float, str, str], Any] = {}
        self._in_room: dict[str, dict[str, list[Path]]] = {}  # meeting -> its enrollment clips (any window length)

    def get(self, settings: Any, enrollment: str, meeting: Meeting) -> Any:
        name = f"{meeting.condition}-{meeting.index}"
        if meeting.condition == NOBODY:
            enrollment, name = NOBODY, ""
        elif enrollment != "room":
            name = ""
        key = (settings.windows.length_s, enrollment, name)
        if key not in self._built:
            clips = {} if enrollment == NOBODY else self._room_clips(meeting) if enrollment == "room" else self.enroll
            self._built[key] = enroll_store(self.work / "stores" / "-".join(map(str, key)).rstrip("-"), clips, settings,
                                            self.bundle, self.backend, self.es.room_versions if enrollment == "multi" else 0)
        return self._built[key]

    def _room_clips(self, meeting: Meeting) -> dict[str, list[Path]]:
        name = f"{meeting.condition}-{meeting.index}"
        if name not in self._in_room:
            assert meeting.settings is not None
            self._in_room[name] = enroll_in_room(meeting.settings, sorted(meeting.conversation_speakers()), self.enroll,
                                                 meeting.babble, self.work / "enroll-in-room" / name)
        return self._in_room[name]


def evaluate(es: EvalSettings, settings: Any, bundle: Any, backend: Any, out: Path, work: Path) -> dict[str, Any]:
    """Every window length over every meeting; returns the report (also what report.json holds)."""
    from tqdm import tqdm

    enroll, meetings = build_meetings(es, work)
    logger.info("%d meetings, %.0f s of audio, enrolled: %s", len(meetings), sum(m.conversation.duration for m in meetings), ", ".join(sorted(enroll)))
    results: list[dict[str, Any]] = []
    timeline: dict[str, Any] = {}
    runs = [(e, m) for e in es.enrollment for m in meetings if m.condition != NOBODY or e == es.enrollment[0]]
    bar = tqdm(total=len(es.window_lengths) * len(runs), desc="eval", unit="meeting", file=sys.stderr)
    indexes = _Indexes(es, enroll, bundle, backend, work)
    for length in es.window_lengths:
        windows = dataclasses.replace(settings.windows, length_s=length, first_length_s=min(settings.windows.first_length_s, length))
        s_len = dataclasses.replace(settings, windows=windows)
        by_condition: dict[str, list[MeetingScore]] = {}
        by_enrollment: dict[str, list[MeetingScore]] = {}
        per_meeting: list[dict[str, Any]] = []
        for enrollment, meeting in runs:
            index = indexes.get(s_len, enrollment, meeting)
            started = time.perf_counter()
            run = run_file(meeting.wav, s_len, bundle=bundle, backend=backend, matcher=index, strangers=meeting_voices(meeting))
            elapsed = time.perf_counter() - started
            score = score_meeting(meeting, run, [mw.embedding for mw in run.windows], index, es, elapsed)
            key = condition_key(meeting.condition, enrollment)
            by_condition.setdefault(key, []).append(score)
            if meeting.condition != NOBODY:
                by_enrollment.setdefault(enrollment, []).append(score)
            row = aggregate([score])
            per_meeting.append({"condition": key, "meeting": meeting.index, **{k: row[k] for k in (
                "audio_s", "der", "missed", "false_alarm", "confusion", "identification", "unknown_false_accept",
                "latency_median_s", "latency_p95_s")}, "change_f1": row["change_boundary"]["f1"]})
            if (not timeline and (meeting.condition == "open" or es.unknown == 0) and length == es.window_lengths[0]
                    and enrollment == es.enrollment[0]):
                timeline = {"meeting": f"{meeting.condition}-{meeting.index}", "window_length_s": length,
                            "reference": reference_intervals(meeting), "hypothesis": score.hypothesis,
                            "true_changes": true_changes(meeting), "decisions": score.decisions,
                            "duration": meeting.conversation.duration}
            bar.update(1)
        first = by_enrollment[es.enrollment[0]]
        results.append({
            "window_length_s": length,
            "conditions": {c: aggregate(v) for c, v in by_condition.items()},
            "all": aggregate(first),
            "windows": window_summary(first),
            "windows_by_enrollment": {e: window_summary(v) for e, v in by_enrollment.items()},
            "per_meeting": per_meeting,
        })
    bar.close()
    return {"results": results, "timeline": timeline, "enrolled": sorted(NAME_PREFIX + s for s in enroll)}


# -- output -------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def biggest_error(agg: dict[str, Any]) -> str:
    parts = {k: agg[k] for k in ("missed", "false_alarm", "confusion") if agg.get(k) is not None}
    if not parts:
        return "n/a"
    worst = max(parts, key=parts.__getitem__)
    return f"{worst.replace('_', ' ')} ({_pct(parts[worst])} of {_pct(agg['der'])} DER)"


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# speakerd eval",
        "",
        f"Model `{report['model']}` ({report['fingerprint']}), backend {report['backend']}; "
        f"{cfg['meetings']} meetings per condition, {cfg['enrolled']} enrolled, {cfg['unknown']} unknown voices, "
        f"{cfg['turns']} turns; noise {cfg['snr_db'] if cfg['snr_db'] is not None else 'none'} dB SNR; "
        f"reverb RT60 {cfg['rt60_s'] if cfg['rt60_s'] is not None else 'none'} s; seed {cfg['seed']}; "
        f"collar {cfg['collar_s']} s; change tolerance {cfg['tolerance_s']} s.",
        *room_line(cfg, report["settings"]["vad"]),
        "",
        "| window | condition | audio | DER | missed | false alarm | confusion | identification | unknown FA | "
        f"change P / R / F1 (±{cfg['tolerance_s']} s) | detection P / R / F1 (0.5 s before, 3 s after) | latency median / p95 | RTF |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in report["results"]:
        several = len(res["windows_by_enrollment"]) > 1
        all_label = f"all, {next(iter(res['windows_by_enrollment']))} enrollment" if several else "all"
        for cond, a in [*res["conditions"].items(), (all_label, res["all"])]:
            b, d = a["change_boundary"], a["change_detection"]
            lines.append(
                f"| {res['window_length_s']} s | {cond} | {a['audio_s']:.0f} s | {_pct(a['der'])} | {_pct(a['missed'])} | "
                f"{_pct(a['false_alarm'])} | {_pct(a['confusion'])} | {_pct(a['identification'])} | "
                f"{_pct(a['unknown_false_accept'])} | {b['precision']:.2f} / {b['recall']:.2f} / {b['f1']:.2f} | "
                f"{d['precision']:.2f} / {d['recall']:.2f} / {d['f1']:.2f} | "
                f"{_num(a['latency_median_s'])} / {_num(a['latency_p95_s'])} s | {_num(a['real_time_factor'], '{:.3f}')} |"
            )
    lines += ["", "Never-enrolled voices: their speech named as someone enrolled, given a provisional speaker, and the "
              "provisional speakers made (per meeting, against the voices that spoke; purity: share of their time that is "
              "their main voice):", "",
              "| window | condition | named as enrolled | provisional coverage | provisional speakers / voices | purity |",
              "|---|---|---|---|---|---|"]
    for res in report["results"]:
        for cond, a in res["conditions"].items():
            p = a["provisional"]
            if not a["unknown_speech_s"]:
                continue
            lines.append(f"| {res['window_length_s']} s | {cond} | {_pct(a['unknown_false_accept'])} | {_pct(p['coverage'])} | "
                         f"{_num(p['speakers_per_meeting'], '{:.1f}')} / {_num(p['voices_per_meeting'], '{:.1f}')} | {_pct(p['purity'])} |")
    lines += ["", "Where enrolled speech went, and change latency by kind of hand-over (decision time minus true change):", "",
              "| window | condition | right name | other name | unknown | unlabelled | after a pause: n, median / p95 | direct: n, median / p95 | overlapping: n, median / p95 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for res in report["results"]:
        for cond, a in res["conditions"].items():
            e = a["enrolled_speech_as"] or {}
            lk = a["latency_by_kind"]
            if cond == NOBODY:
                continue
            cells = [f"{lk[k]['count']}, {_num(lk[k]['median_s'])} / {_num(lk[k]['p95_s'])} s" for k in CHANGE_KINDS]
            lines.append(f"| {res['window_length_s']} s | {cond} | {_pct(e.get('right'))} | {_pct(e.get('other_name'))} | "
                         f"{_pct(e.get('unknown'))} | {_pct(e.get('unlabelled'))} | {' | '.join(cells)} |")
    lines += ["", "Window-level verification (pure windows scored against every enrolled speaker):", "",
              "| window | EER | at threshold | target / non-target trials | pure / mixed windows | nearest speaker right | unknown-voice windows accepted |",
              "|---|---|---|---|---|---|---|"]
    for res in report["results"]:
        for enrollment, w in res["windows_by_enrollment"].items():
            label = "" if len(res["windows_by_enrollment"]) == 1 else f", {enrollment} enrollment"
            lines.append(f"| {res['window_length_s']} s{label} | {_pct(w['eer'])} | {_num(w['eer_threshold'])} | "
                         f"{w['target_trials']} / {w['nontarget_trials']} | {w['pure']} / {w['mixed']} | {_pct(w['nearest_accuracy'])} | "
                         f"{_pct(w['unknown_window_accept'])} of {w['unknown_pure']} |")
    lines += ["", "False accepts / false rejects of single windows by threshold:", "",
              "| threshold | " + " | ".join(f"FA / FR ({r['window_length_s']} s)" for r in report["results"]) + " |",
              "|---" * (1 + len(report["results"])) + "|"]
    for i, t in enumerate(THRESHOLDS):
        cells = [f"{_pct(r['windows']['thresholds'][i]['false_accept'])} / {_pct(r['windows']['thresholds'][i]['false_reject'])}" for r in report["results"]]
        lines.append(f"| {t:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Biggest DER component per window length and condition:", ""]
    for res in report["results"]:
        for cond, a in res["conditions"].items():
            lines.append(f"- {res['window_length_s']} s, {cond}: {biggest_error(a)}")
    lines += ["", "Per meeting (first window length):", "",
              "| meeting | audio | DER | missed | FA | confusion | identification | unknown FA | change F1 | latency p95 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m in report["results"][0]["per_meeting"]:
        lines.append(f"| {m['condition']}-{m['meeting']} | {m['audio_s']:.0f} s | {_pct(m['der'])} | {_pct(m['missed'])} | "
                     f"{_pct(m['false_alarm'])} | {_pct(m['confusion'])} | {_pct(m['identification'])} | "
                     f"{_pct(m['unknown_false_accept'])} | {m['change_f1']:.2f} | {_num(m['latency_p95_s'])} s |")
    lines += ["", f"Unknown-voice windows accepted: share of pure windows of never-enrolled voices whose best enrolled "
              f"score reaches the decision threshold ({report['settings']['decision']['threshold']}).", "",
              "Plots: `timeline.png` (truth against output, one meeting), `det.png` (window-level DET curve).", ""]
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], out: Path) -> dict[str, Path]:
    from .plots import plot_det, plot_timeline

    out.mkdir(parents=True, exist_ok=True)
    curves = {f"{r['window_length_s']} s windows": (r["windows"]["_targets"], r["windows"]["_nontargets"]) for r in report["results"]}
    paths = {
        "timeline": plot_timeline(report["timeline"], out / "timeline.png"),
        "det": plot_det(curves, out / "det.png"),
    }
    public = json.loads(json.dumps(report, default=float))
    for r in public["results"]:
        r["windows"] = {k: v for k, v in r["windows"].items() if not k.startswith("_")}
        r["windows_by_enrollment"] = {e: {k: v for k, v in w.items() if not k.startswith("_")} for e, w in r["windows_by_enrollment"].items()}
    public["plots"] = {k: str(v) for k, v in paths.items()}
    (out / "report.json").write_text(json.dumps(public, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    paths.update({"json": out / "report.json", "markdown": out / "report.md"})
    return paths


# -- command line -------------------------------------------------------------------------------------


def _lengths(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("no window length given")
    return values


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("audio_dir", metavar="AUDIO_DIR", type=Path, help="LibriSpeech-layout folder with test-other/ (and train-clean-100/ for unknown voices)")
    parser.add_argument("--meetings", type=int, default=4, metavar="N", help="conversations per condition (default 4)")
    parser.add_argument("--enrolled", type=int, default=4, metavar="K", help="speakers enrolled, from test-other (default 4)")
    parser.add_argument("--unknown", type=int, default=2, metavar="U", help="never-enrolled voices mixed into the 'open' conversations (default 2; 0: enrolled-only)")
    parser.add_argument("--turns", type=int, default=16, metavar="T", help="turns per conversation (default 16)")
    parser.add_argument("--enroll-clips", type=int, default=3, metavar="C", help="clips per enrolled speaker used to enroll (default 3)")
    parser.add_argument("--noise", type=float, default=None, metavar="SNR", help="add noise at this SNR in dB")
    parser.add_argument("--noise-color", choices=NOISE_COLORS, default="pink", help="colour of --noise (default pink)")
    parser.add_argument("--reverb", type=float, nargs="?", const=0.5, default=None, metavar="RT60", help="simulate a room; RT60 in s (default 0.5 when given)")
    parser.add_argument("--out", type=Path, default=Path("eval-out"), metavar="DIR", help="where report.json, report.md and the plots go (default ./eval-out)")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--window-lengths", type=_lengths, default=(1.5, 2.0), metavar="L1,L2", help="window lengths to evaluate, seconds (default 1.5,2.0)")
    parser.add_argument("--collar", type=float, default=DEFAULT_COLLAR_S, metavar="S", help="DER collar either side of reference boundaries (default 0.25)")
    parser.add_argument("--tolerance", type=float, default=0.5, metavar="S", help="change-point tolerance (default 0.5)")
    parser.add_argument("--config", metavar="F", help="TOML settings file")
    parser.add_argument("--model", metavar="NAME_OR_DIR", help="model bundle (default from settings)")
    parser.add_argument("--backend", choices=("auto", "onnx", "coreml"), help="embedding backend (default from settings)")
    parser.add_argument("--keep-audio", action="store_true", help="keep the conversations' WAV files in DIR/audio")
    add_room_arguments(parser)
    parser.add_argument("--vad", choices=VAD_BACKENDS, help="voice activity detector (default from settings)")
    parser.add_argument("--vad-compare", action="store_true",
                        help="only compare the voice activity detectors on the meetings (missed speech, noise and babble "
                             "admitted): DIR/vad.md and vad.json, no model needed")


def eval_settings_from(args: argparse.Namespace) -> EvalSettings:
    return EvalSettings(
        audio_dir=Path(args.audio_dir),
        meetings=args.meetings,
        enrolled=args.enrolled,
        unknown=args.unknown,
        turns=args.turns,
        enroll_clips=args.enroll_clips,
        snr_db=args.noise,
        noise_color=args.noise_color,
        rt60_s=args.reverb,
        seed=args.seed,
        window_lengths=tuple(args.window_lengths),
        collar_s=args.collar,
        tolerance_s=args.tolerance,
        room_rt60_s=args.room,
        room_snr_db=args.snr,
        room_noise=args.room_noise,
        babble=args.babble,
        overlap=args.overlap,
        interjections=args.interjections,
        enrollment=tuple(args.enrollment),
        room_versions=args.room_versions,
        nobody=args.nobody,
    )


def main_eval(args: argparse.Namespace) -> int:
    from ..bundle import resolve_bundle
    from ..decisions.values import for_bundle
    from ..embedding import backend_for
    from ..embedding.backend import windows_for
    from ..settings import load_settings

    try:
        es = eval_settings_from(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    if not (es.audio_dir / "test-other").is_dir():
        logger.error("%s has no test-other/ folder (LibriSpeech layout expected)", es.audio_dir)
        return 2
    overrides: dict[str, dict[str, Any]] = {}
    if args.model:
        overrides.setdefault("embedding", {})["model"] = args.model
    if args.backend:
        overrides.setdefault("embedding", {})["backend"] = args.backend
    if args.vad:
        overrides.setdefault("vad", {})["backend"] = args.vad
    settings = load_settings(Path(args.config) if args.config else None, overrides)
    if args.vad_compare:
        from .vad_compare import main_vad_compare

        return main_vad_compare(es, settings, Path(args.out), args.keep_audio)
    bundle = resolve_bundle(settings.embedding.model)
    backend = backend_for(bundle, settings.embedding, settings.windows)
    out = Path(args.out)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="speakerd-eval-") as tmp:
            work = out / "audio" if args.keep_audio else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            report = evaluate(es, settings, bundle, backend, out, work)
    finally:
        backend.close()
    report.update({
        "model": bundle.name,
        "fingerprint": bundle.fingerprint,
        "backend": backend.name,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(es).items()},
        "settings": {"windows": dataclasses.asdict(windows_for(bundle, settings.windows)), "matching": dataclasses.asdict(settings.matching),
                     "tracker": dataclasses.asdict(settings.tracker), "vad": dataclasses.asdict(settings.vad),
                     "decision": for_bundle(bundle, settings.decision).values.to_dict()},
        "arguments": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                      for k, v in vars(args).items() if k != "func"},
        "elapsed_s": time.perf_counter() - started,
    })
    paths = write_outputs(report, out)
    print(paths["markdown"].read_text())
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0
