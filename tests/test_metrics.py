"""The eval figures on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from speakerd.evaluation.conversation import ConversationSettings, Turn, build_conversation, room_response, speech_intervals
from speakerd.evaluation.der import diarization_error, speech_share_labelled
from speakerd.evaluation.eer import equal_error_rate, error_rates, threshold_table
from speakerd.evaluation.evaluate import reported_changes
from speakerd.evaluation.metrics import Segment, attribution_accuracy, change_scores
from speakerd.evaluation.runner import FileRun

# -- DER -------------------------------------------------------------------------------------------


def test_perfect_hypothesis_has_zero_der() -> None:
    ref = [(0.0, 5.0, "A"), (5.0, 10.0, "B")]
    r = diarization_error(ref, ref, collar=0.0, fixed={"A", "B"})
    assert (r.total, r.missed, r.false_alarm, r.confusion, r.der) == (10.0, 0.0, 0.0, 0.0, 0.0)


def test_der_parts_without_collar() -> None:
    # A speaks 0-4, B 4-10. Hypothesis: A 1-5 (1 s missed at start, 1 s of B called A), nothing 5-6
    # (1 s missed), B 6-10, and A 10-11 where nobody speaks (1 s false alarm).
    ref = [(0.0, 4.0, "A"), (4.0, 10.0, "B")]
    hyp = [(1.0, 5.0, "A"), (6.0, 10.0, "B"), (10.0, 11.0, "A")]
    r = diarization_error(ref, hyp, collar=0.0, fixed={"A", "B"})
    assert r.total == pytest.approx(10.0)
    assert r.missed == pytest.approx(2.0)
    assert r.false_alarm == pytest.approx(1.0)
    assert r.confusion == pytest.approx(1.0)
    assert r.der == pytest.approx(0.4)
    assert r.rate("missed") + r.rate("false_alarm") + r.rate("confusion") == pytest.approx(r.der)


def test_collar_removes_boundary_errors_either_side() -> None:
    ref = [(0.0, 4.0, "A"), (4.0, 10.0, "B")]
    late = [(0.0, 4.2, "A"), (4.2, 10.0, "B")]  # the change 0.2 s late: inside a 0.25 s collar
    r = diarization_error(ref, late, collar=0.25, fixed={"A", "B"})
    assert r.der == 0.0
    # scored: 10 s minus 0.25 after 0, 0.5 around 4, 0.25 before 10
    assert r.total == pytest.approx(9.0)
    too_late = [(0.0, 4.5, "A"), (4.5, 10.0, "B")]  # 0.5 s late: 0.25 s of it is outside the collar
    r = diarization_error(ref, too_late, collar=0.25, fixed={"A", "B"})
    assert r.confusion == pytest.approx(0.25)


def test_unknown_labels_are_mapped_by_hungarian_assignment() -> None:
    # two never-enrolled voices U1, U2; the hypothesis has clusters x and y, with x mostly U2
    ref = [(0.0, 4.0, "U1"), (4.0, 10.0, "U2")]
    hyp = [(0.0, 3.0, "y"), (3.0, 10.0, "x")]
    r = diarization_error(ref, hyp, collar=0.0)
    assert r.mapping == {"x": "U2", "y": "U1"}
    assert r.confusion == pytest.approx(1.0)  # 3-4: x over U1


def test_named_labels_are_fixed_not_reassigned() -> None:
    # the daemon calls A's speech "B": with names fixed, that is confusion, however the times line up
    ref = [(0.0, 5.0, "A")]
    hyp = [(0.0, 5.0, "B")]
    assert diarization_error(ref, hyp, collar=0.0, fixed={"A", "B"}).confusion == pytest.approx(5.0)
    assert diarization_error(ref, hyp, collar=0.0).confusion == 0.0  # free labels would map B -> A


def test_unknown_speech_counts_as_false_accept_when_named() -> None:
    ref = [(0.0, 4.0, "unknown-1"), (4.0, 8.0, "A")]
    hyp = [(0.0, 1.0, "A"), (1.0, 8.0, "A")]
    accepted, total = speech_share_labelled(ref, hyp, {"unknown-1"}, {"A"})
    assert (accepted, total) == (pytest.approx(4.0), pytest.approx(4.0))


def test_der_agrees_with_pyannote_metrics() -> None:
    pytest.importorskip("pyannote.metrics", reason="pyannote.metrics is an optional cross-check")
    from pyannote.core import Annotation, Segment as PSegment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate

    rng = np.random.default_rng(3)
    ref, hyp, t = [], [], 0.0
    for i in range(30):
        d = float(rng.uniform(0.5, 4.0))
        ref.append((t, t + d, f"S{i % 3}"))
        t += d + float(rng.choice([0.0, 0.7]))
    for a, b, lab in ref:
        shift = float(rng.normal(0, 0.3))
        wrong = rng.random() < 0.2
        hyp.append((max(0.0, a + shift), b + shift * 0.5, f"S{(int(lab[1]) + 1) % 3}" if wrong else lab))
    hyp = sorted(hyp)
    hyp = [(a, min(b, hyp[i + 1][0]) if i + 1 < len(hyp) else b, lab) for i, (a, b, lab) in enumerate(hyp)]
    mine = diarization_error(ref, hyp, collar=0.25, uem=(0.0, t + 2))
    r, h = Annotation(), Annotation()
    for a, b, lab in ref:
        r[PSegment(a, b)] = lab
    for a, b, lab in hyp:
        if b > a:
            h[PSegment(a, b)] = lab
    theirs = DiarizationErrorRate(collar=0.5)(r, h, uem=Timeline([PSegment(0.0, t + 2)]), detailed=True)
    assert mine.total == pytest.approx(theirs["total"], abs=1e-6)
    assert mine.missed == pytest.approx(theirs["missed detection"], abs=1e-6)
    assert mine.false_alarm == pytest.approx(theirs["false alarm"], abs=1e-6)
    assert mine.confusion == pytest.approx(theirs["confusion"], abs=1e-6)


# -- identification and changes ------------------------------------------------------------------


def test_attribution_accuracy_counts_speech_time() -> None:
    turns = [Turn("a", 0.0, 4.0, "x", ((0.0, 4.0),)), Turn("u", 4.0, 6.0, "y", ((4.0, 6.0),)), Turn("b", 6.0, 10.0, "z", ((6.0, 10.0),))]
    segments = [Segment(0.0, 4.0, "A"), Segment(4.0, 8.0, "A"), Segment(8.0, 10.0, "B")]
    # a: 4/4 right, b: 2/4 right; the unknown voice is not scored here
    assert attribution_accuracy(turns, segments, {"a": "A", "b": "B"}, 10.0) == pytest.approx(6 / 8, abs=0.01)


def test_change_scores_tolerance_and_latency() -> None:
    truth = [10.0, 20.0, 30.0]
    reported = [10.3, 19.8, 25.0, 31.0]
    s = change_scores(truth, reported, before=0.5, after=0.5)
    assert (s.precision, s.recall) == (pytest.approx(2 / 4), pytest.approx(2 / 3))
    assert s.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert sorted(s.latencies) == pytest.approx([-0.2, 0.3])
    late = change_scores(truth, reported, before=0.5, after=3.0)  # the daemon's window takes 31.0 too
    assert (late.precision, late.recall) == (pytest.approx(3 / 4), 1.0)
    assert late.median_latency == pytest.approx(0.3)


def _ref(name: str | None) -> dict:
    return {"id": name, "name": name, "known": name is not None}


def _change(name: str | None, at: float, decided: float, tentative: bool = False, previous: str | None = None) -> dict:
    return {"type": "speaker.change", "speaker": _ref(name), "previous": _ref(previous), "at": at,
            "stream_time": decided, "tentative": tentative}


def test_reported_changes_decide_at_the_first_announcement_and_place_at_the_confirmation() -> None:
    events = [
        _change("Ann", 0.0, 1.0),
        _change("Bob", 10.6, 11.0, tentative=True),  # a probe: early, change point guessed late
        _change("Bob", 10.1, 11.5),  # the confirmation moves the change point back
        _change("Bob", 9.0, 12.0),  # a later repeat is no refinement of the announcement
        _change("Ann", 20.2, 20.8, tentative=True),
        _change("Bob", 20.2, 21.3, previous="Bob"),  # withdrawn: a change back, at the first decision time
    ]
    at, decided = reported_changes(FileRun(events, [], {}))
    assert at == [10.1, 20.2, 20.2]
    assert decided == [11.0, 20.8, 21.3]


def test_a_change_at_the_same_point_as_a_tentative_one_names_it_and_is_no_new_change() -> None:
    events = [
        _change("Ann", 0.0, 1.0),
        _change(None, 10.2, 10.8, tentative=True, previous="Ann"),  # a voice fell away from Ann's
        _change("Bob", 10.2, 11.3, tentative=True, previous="Ann"),  # ... and it is Bob's
        _change("Bob", 10.1, 11.8, previous="Ann"),  # confirmed, a little earlier
        _change(None, 20.0, 20.5, tentative=True, previous="Bob"),
        _change("Ann", 20.6, 21.2, previous="Bob"),  # another point: a second change
    ]
    at, decided = reported_changes(FileRun(events, [], {}))
    assert at == [10.1, 20.0, 20.6]
    assert decided == [10.8, 20.5, 21.2]


# -- EER ------------------------------------------------------------------------------------------


def test_eer_of_separable_scores_is_zero() -> None:
    e = equal_error_rate([0.8, 0.9, 0.85], [0.1, 0.3, 0.5])
    assert e.eer == 0.0
    assert 0.5 < e.threshold <= 0.8


def test_eer_of_gaussian_scores_matches_theory() -> None:
    # unit-variance classes two standard deviations apart cross at 0: EER = Phi(-1) = 0.1587
    rng = np.random.default_rng(0)
    e = equal_error_rate(rng.normal(1, 1, 50_000), rng.normal(-1, 1, 50_000))
    assert e.eer == pytest.approx(0.1587, abs=0.005)
    assert e.threshold == pytest.approx(0.0, abs=0.03)


def test_false_accept_reject_table_counts_at_or_above() -> None:
    far, frr = error_rates(np.array([0.5, 0.7, 0.9]), np.array([0.2, 0.5, 0.6]), np.array([0.5, 0.65]))
    assert far.tolist() == pytest.approx([2 / 3, 0.0])
    assert frr.tolist() == pytest.approx([0.0, 1 / 3])
    rows = threshold_table([0.5, 0.7, 0.9], [0.2, 0.5, 0.6], [0.5])
    assert rows == [{"threshold": 0.5, "false_accept": pytest.approx(2 / 3), "false_reject": 0.0}]
    assert math.isnan(equal_error_rate([], [0.1]).eer)


# -- conversations ------------------------------------------------------------------------------------


def _tone(seconds: float, dbfs: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    voiced = np.sin(2 * np.pi * 180 * t) * (1 + 0.3 * np.sin(2 * np.pi * 4 * t))  # a syllable-rate hum
    return (voiced * 10 ** (dbfs / 20) * np.sqrt(2) + rng.normal(0, 1e-4, len(t))).astype(np.float32)


@pytest.mark.parametrize("floor_dbfs", [-80.0, -50.0])
def test_reference_speech_skips_room_tone_pauses_and_clicks(floor_dbfs: float) -> None:
    """Room tone 30 dB under the voice is not speech (it was, for every frame, before the noise-floor
    rule), and neither is a 20 ms click; a 0.6 s pause between two phrases stays a pause."""
    rng = np.random.default_rng(0)
    room = lambda s: rng.normal(0, 10 ** (floor_dbfs / 20), int(s * 16_000)).astype(np.float32)  # noqa: E731
    click = room(1.0)
    click[8_000:8_320] += np.float32(10 ** (-30 / 20))  # 20 ms, 0.5 s after the last phrase
    piece = np.concatenate([room(0.8), _tone(1.5, -20, rng), room(0.6), _tone(1.0, -20, rng), click])
    got = speech_intervals(piece, 10.0)
    assert [(round(a, 2), round(b, 2)) for a, b in got] == [(10.8, 12.3), (12.9, 13.9)]


def test_room_response_decays_by_60_db_over_rt60() -> None:
    h = room_response(0.5, np.random.default_rng(0), drr_db=0.0)
    assert h[0] == 1.0
    tail = h[1:].astype(np.float64) ** 2
    assert tail.sum() == pytest.approx(1.0, rel=1e-3)  # DRR 0 dB: reverberant energy equals direct
    n = len(h) // 10
    first, last = tail[:n].mean(), tail[-n:].mean()
    assert 10 * np.log10(first / last) > 40  # most of the 60 dB decay is between the first and last tenths


def test_noise_and_reverb_keep_the_reference_turns(librispeech) -> None:  # noqa: ANN001
    from speakerd.evaluation.conversation import librispeech_speakers, split_enrollment

    _, rest = split_enrollment(librispeech_speakers(librispeech), 3)
    clips = {k: rest[k] for k in sorted(rest)[:2]}
    dry = build_conversation(clips, ConversationSettings(turns=4, seed=1))
    wet = build_conversation(clips, ConversationSettings(turns=4, seed=1, snr_db=10.0, noise_color="pink", rt60_s=0.6))
    assert wet.turns == dry.turns
    assert len(wet.audio) == len(dry.audio)
    noise = wet.audio - dry.audio
    assert 20 * np.log10(np.std(noise) / np.std(dry.audio)) > -12  # clearly changed by noise and reverb
