"""Online clustering of unknown voices into provisional speakers, on synthetic embeddings with known voices."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from decision_values import GE2E

from speakerd.audio import SAMPLE_RATE
from speakerd.decisions.clustering import ProvisionalSettings, ProvisionalSpeakers
from speakerd.decisions.evidence import Match
from speakerd.decisions.values import DecisionValues
from speakerd.errors import ConfigError
from speakerd.events import SpeakerRef

DIM = 32
HOP = SAMPLE_RATE // 2
WINDOW = 3 * SAMPLE_RATE // 2


def voice(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM)
    return v / np.linalg.norm(v)


def window_of(base: np.ndarray, rng: np.random.Generator, noise: float = 0.2) -> np.ndarray:
    """A window embedding of a voice: cosine to the voice about 0.98 at the default noise."""
    v = base + rng.normal(scale=noise / np.sqrt(DIM), size=DIM)
    return v / np.linalg.norm(v)


class Feed:
    def __init__(self, settings: ProvisionalSettings | None = None, enrolled=None, values: DecisionValues = GE2E) -> None:
        self.p = ProvisionalSpeakers(settings or ProvisionalSettings(), values, DIM, enrolled)
        self.t = 0
        self.rng = np.random.default_rng(0)

    def turn(self, base: np.ndarray, windows: int, gap_s: float = 0.5):
        out = []
        for _ in range(windows):
            out.append(self.p.observe(window_of(base, self.rng), self.t, self.t + WINDOW))
            self.t += HOP
        self.t += int(gap_s * SAMPLE_RATE)
        return out


def test_a_voice_becomes_a_provisional_speaker_only_after_enough_speech() -> None:
    f = Feed()
    out = f.turn(voice(1), 6)
    # 4 windows of 1.5 s every 0.5 s cover 3.0 s: the 4th window mints
    assert [a.label for a in out[:3]] == [None, None, None]
    assert out[3].minted and out[3].label == SpeakerRef("unknown-1", None, False)
    assert all(a.label == out[3].label and not a.minted for a in out[4:])
    assert out[5].score > 0.8
    (p,) = f.p.speakers()
    assert (p.id, p.windows) == ("unknown-1", 6) and p.speech_s == pytest.approx(4.0)


def test_short_or_scattered_bits_never_mint() -> None:
    f = Feed()
    for _ in range(5):  # 2 windows (2.0 s) per bit, 10 s apart: never 3 s in one stretch
        assert all(a.label is None for a in f.turn(voice(1), 2, gap_s=10.0))
    assert f.p.speakers() == [] and f.p.minted == 0


def test_ids_are_stable_and_a_returning_voice_keeps_its_id() -> None:
    f = Feed()
    a, b = voice(1), voice(2)
    assert f.turn(a, 5)[-1].label.id == "unknown-1"
    assert f.turn(b, 5)[-1].label.id == "unknown-2"
    assert {x.label.id for x in f.turn(a, 4)} == {"unknown-1"}  # joins at once, no new candidate
    assert {x.label.id for x in f.turn(b, 4)} == {"unknown-2"}
    assert [p.id for p in f.p.speakers()] == ["unknown-1", "unknown-2"]


def test_two_provisional_speakers_that_are_one_voice_merge_into_the_older() -> None:
    # one voice heard two ways (say near and far): too far apart to join, close enough to merge
    base = voice(1)
    near, far = base + 0.45 * voice(2), base + 0.45 * voice(3)
    near, far = near / np.linalg.norm(near), far / np.linalg.norm(far)
    assert 0.8 < float(near @ far) < 0.9
    f = Feed(values=replace(GE2E, join_threshold=0.9, merge_threshold=0.8))
    f.rng = np.random.default_rng(1)
    first = f.turn(near, 5)
    assert first[-1].label.id == "unknown-1"
    second = f.turn(far, 5)
    minted = next(a for a in second if a.minted)
    (merge,) = minted.relabels
    assert (merge.old.id, merge.new.id, merge.kind) == ("unknown-2", "unknown-1", "merged")
    assert minted.label.id == "unknown-1" and second[-1].label.id == "unknown-1"
    assert f.p.resolve("unknown-2").id == "unknown-1"
    assert [(p.id, p.alias and p.alias.id) for p in f.p.speakers()] == [("unknown-1", None), ("unknown-2", "unknown-1")]


def test_a_group_that_matches_an_enrolled_voice_is_labelled_with_it_not_minted() -> None:
    alice = voice(7)
    ref = SpeakerRef("spk-alice", "Alice", True)

    def enrolled(centroid: np.ndarray) -> Match:
        score = float(centroid @ alice)
        known = score >= 0.8
        return Match(ref.id if known else None, ref.name if known else None, score, score, None, known, ref.id)

    f = Feed(enrolled=enrolled)
    out = f.turn(alice, 6)
    assert out[0].label is None  # one window is not enough evidence
    assert all(a.label == ref for a in out[1:]) and not any(a.minted for a in out)
    assert f.p.speakers() == []
    # a guest is still a guest
    assert f.turn(voice(8), 5)[-1].label.id == "unknown-1"


def test_promote_and_forget_keep_ids_resolvable() -> None:
    f = Feed()
    f.turn(voice(1), 5)
    f.turn(voice(2), 5)
    alice = SpeakerRef("spk-alice", "Alice", True)
    r = f.p.promote("unknown-1", alice)
    assert (r.old.id, r.new, r.kind) == ("unknown-1", alice, "promoted")
    assert f.p.resolve("unknown-1") == alice
    assert f.turn(voice(1), 2)[-1].label == alice  # later windows of that voice carry the name
    assert f.p.embeddings("unknown-2").shape == (5, DIM)
    assert f.p.forget("unknown-2") and not f.p.forget("unknown-9")
    assert f.p.resolve("unknown-9") is None
    assert f.turn(voice(2), 6)[-1].label.id == "unknown-3"  # a forgotten id is never reused


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"join_threshold": 1.5}, "decision.join_threshold"),
        ({"min_speech_s": 0.1}, "provisional.min_speech_s"),
        ({"min_windows": 0}, "provisional.min_windows"),
        ({"fold_min_windows": 9}, "provisional.fold_min_windows"),
        ({"max_embeddings": 2}, "provisional.max_embeddings"),
    ],
)
def test_settings_validation_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        if key.startswith("decision."):
            replace(GE2E, **kwargs)
        else:
            ProvisionalSettings(**kwargs)
    assert err.value.key == key


def test_nearest_scores_a_probe_against_provisional_speakers_without_clustering_it() -> None:
    f = Feed()
    assert f.p.nearest(voice(1)) == (None, 0.0), "nobody minted yet: no evidence"
    f.turn(voice(1), 6)
    before = [(s.id, s.windows) for s in f.p.speakers()]
    ref, score = f.p.nearest(window_of(voice(1), f.rng))
    assert ref == SpeakerRef("unknown-1", None, False) and score > 0.9
    other, low = f.p.nearest(voice(2))
    assert other == ref and low < 0.5, "the nearest is reported with its (low) score; the bar is the tracker's"
    assert [(s.id, s.windows) for s in f.p.speakers()] == before, "a probe never joins a cluster"
