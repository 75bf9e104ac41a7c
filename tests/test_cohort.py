"""Cohort normalisation (decisions.cohort, policy.normalised): scores that survive a channel change."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from decision_values import GE2E
from speakerd.decisions import policy
from speakerd.decisions.cohort import Cohort
from speakerd.decisions.values import DecisionValues, DecisionValuesMissing, resolve, DecisionOverrides


LIFT = dataclasses.replace(GE2E, room_score_penalty=0.0)
"""The lift alone (no shared-room penalty)."""


def _cohort(n: int = 40, dim: int = 16, seed: int = 0) -> Cohort:
    x = np.random.default_rng(seed).normal(size=(n, dim))
    return Cohort(x / np.linalg.norm(x, axis=1, keepdims=True), tuple(str(i // 2) for i in range(n)))


def test_a_window_in_its_voiceprints_channel_keeps_its_scores() -> None:
    # clean speech against clean voiceprints, or room speech against voiceprints made in the room
    out = policy.compensated(LIFT, [("a", "A", 0.72), ("b", "B", 0.55)], level=0.58, enrolled={"a": 0.58, "b": 0.55})
    assert [round(s, 6) for *_, s in out] == [0.72, 0.55]


def test_a_window_whose_level_sank_under_the_enrollments_gets_the_difference_back() -> None:
    # a room pulled the window's cohort level 0.07 under the clean enrollment's: gain x 0.07 comes back
    out = policy.compensated(LIFT, [("a", "A", 0.60), ("b", "B", 0.45)], level=0.51, enrolled={"a": 0.58, "b": 0.58})
    lift = LIFT.cohort_gain * 0.07
    assert [(sid, round(s, 6)) for sid, _, s in out] == [("a", round(0.60 + lift, 6)), ("b", round(0.45 + lift, 6))]


def test_every_voice_is_lifted_alike_so_the_ranking_stays_the_models() -> None:
    # lifting each voice by its own enrollment's level re-ranked voices by how generic they sound
    out = policy.compensated(LIFT, [("a", "A", 0.60), ("b", "B", 0.55)], level=0.50, enrolled={"a": 0.50, "b": 0.56})
    lift = LIFT.cohort_gain * 0.03  # the voices' mean level 0.53, the window's 0.50
    assert [(sid, round(s, 6)) for sid, _, s in out] == [("a", round(0.60 + lift, 6)), ("b", round(0.55 + lift, 6))]
    # a voice without a known level, and a score near the top, stay in range
    out = policy.compensated(LIFT, [("c", "C", 0.99)], level=0.30, enrolled={"c": 0.60})
    assert out[0][2] == 1.0
    # no enrolled level known at all: the scores as they were
    assert policy.compensated(LIFT, [("d", "D", 0.4)], level=0.30, enrolled={}) == [("d", "D", 0.4)]


def test_a_window_and_voiceprints_that_share_a_room_score_lower() -> None:
    v = dataclasses.replace(GE2E, room_score_penalty=1.0, cohort_clean_level=0.585)
    # the session and the voiceprints both in the room (levels 0.505): 1.0 x (0.585 - 0.505) off every score
    out = policy.compensated(v, [("a", "A", 0.80), ("b", "B", 0.70)], level=0.505, enrolled={"a": 0.505, "b": 0.505}, room=0.505)
    assert [(sid, round(s, 6)) for sid, _, s in out] == [("a", 0.72), ("b", 0.62)]
    # clean voiceprints heard in the room: lifted, not penalised (the higher level is clean)
    out = policy.compensated(v, [("a", "A", 0.60)], level=0.505, enrolled={"a": 0.585}, room=0.505)
    assert round(out[0][2], 6) == round(0.60 + v.cohort_gain * 0.08, 6)
    # a voice unlike every cohort voice (level 0.45 in any channel) in a clean session: no penalty,
    # and none before the session has a level
    out = policy.compensated(v, [("c", "C", 0.75)], level=0.45, enrolled={"c": 0.45}, room=0.59)
    assert round(out[0][2], 6) == 0.75
    assert round(policy.compensated(v, [("c", "C", 0.75)], level=0.45, enrolled={"c": 0.45})[0][2], 6) == 0.75
    # a clean session is left alone
    assert policy.shared_room(v, 0.59) == 0.0 and policy.shared_room(LIFT, 0.40) == 0.0


def test_compensation_is_off_without_a_cohort_size_or_gain() -> None:
    assert policy.normalising(GE2E)
    assert not policy.normalising(dataclasses.replace(GE2E, cohort_top_n=0))
    assert not policy.normalising(dataclasses.replace(GE2E, cohort_gain=0.0))


def test_cohort_level_is_the_mean_and_spread_of_the_best_cosines() -> None:
    c = _cohort()
    x = c.embeddings[:3] * 5.0  # any norm
    level, spread = c.level(x, top_n=4)
    sims = np.sort((x / 5.0) @ c.embeddings.T, axis=1)[:, -4:]
    assert np.allclose(level, sims.mean(axis=1)) and np.allclose(spread, sims.std(axis=1))
    assert np.allclose(level[0], (1.0 + sims[0, :3].sum()) / 4)  # its own row counts: the cohort holds it


def test_an_evaluation_leaves_its_own_voices_out(tmp_path: Path) -> None:
    c = _cohort()
    rest = c.without({"0", "3"})
    assert len(rest.speakers) == 36 and not {"0", "3"} & set(rest.speakers)
    c.save(tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz") as data:
        assert data["embeddings"].shape == (40, 16) and list(data["speakers"][:2]) == ["0", "0"]


def test_cohort_values_are_optional_and_checked() -> None:
    required = {k: getattr(GE2E, k) for k in DecisionValues.required()}
    assert "cohort_top_n" not in required
    values = resolve("m", required, DecisionOverrides()).values
    assert values.cohort_top_n == 0 and not policy.normalising(values)
    with pytest.raises(Exception, match="cohort_top_n"):
        DecisionOverrides(cohort_top_n=-1)
    with pytest.raises(DecisionValuesMissing):
        resolve("m", {k: v for k, v in required.items() if k != "threshold"}, DecisionOverrides())


class _Fixed:
    """Ann scores 0.60 and Bob 0.40 on every window; each enrolled from one clean embedding."""

    def __init__(self, enrolled: np.ndarray) -> None:
        self.enrolled = enrolled

    def rank(self, embeddings: np.ndarray) -> list[list[tuple[str, str, float]]]:
        return [[("a", "Ann", 0.60), ("b", "Bob", 0.40)] for _ in embeddings]

    def embeddings_of(self, speaker_id: str) -> np.ndarray:
        return self.enrolled


def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)])


def test_the_layer_names_a_window_whose_scores_the_room_pulled_down() -> None:
    from speakerd.decisions.clustering import ProvisionalSettings
    from speakerd.decisions.layer import DecisionLayer
    from speakerd.decisions.tracker import TrackerSettings

    # one cohort voice on the x axis: the enrollment sits at cosine 0.58 to it, the window at 0.50
    cohort = Cohort(np.array([[1.0, 0.0]]), ("1",))
    enrolled = _unit(np.arccos(0.58)).reshape(1, -1)
    window = _unit(np.arccos(0.50))
    v = dataclasses.replace(LIFT, cohort_top_n=1)
    plain = DecisionLayer(v, TrackerSettings(), ProvisionalSettings(enabled=False), ranker=_Fixed(enrolled), dim=2, hop_samples=8000)
    assert not plain.verdict(window).known  # 0.60 < 0.70: unnamed without the cohort
    layer = DecisionLayer(v, TrackerSettings(), ProvisionalSettings(enabled=False), ranker=_Fixed(enrolled), dim=2,
                          hop_samples=8000, cohort=cohort)
    m = layer.verdict(window)
    assert m.known and m.speaker_id == "a" and m.score == pytest.approx(0.60 + v.cohort_gain * 0.08)
    # in the enrollment's own channel nothing moves
    assert layer.verdict(enrolled[0]).score == pytest.approx(0.60)


def test_models_build_makes_the_cohort_from_librispeech_clips(librispeech: Path, tmp_path: Path) -> None:
    import shutil

    from speakerd.bundle import load_bundle, resolve_bundle
    from speakerd.decisions.cohort import load_cohort
    from speakerd.models.build import build_bundle_cohort

    src = resolve_bundle("ge2e-resemblyzer")
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    for name in ("manifest.json", "model.onnx"):
        shutil.copy(src.path / name, bundle_dir / name)
    bundle = load_bundle(bundle_dir)
    assert bundle.artifacts["cohort"] == "cohort.npz" and load_cohort(bundle) is None  # named, not built
    clips = tmp_path / "clips"
    clips.mkdir()
    for clip in sorted((librispeech / "train-clean-100").glob("*.flac"))[:3]:
        shutil.copy(clip, clips / clip.name)
    assert build_bundle_cohort(bundle, tmp_path / "absent") is None  # no clips: no cohort, no failure
    assert build_bundle_cohort(bundle, clips) == bundle_dir / "cohort.npz"
    cohort = load_cohort(load_bundle(bundle_dir))
    assert cohort is not None and cohort.embeddings.shape == (6, bundle.embedding_dim)
    assert sorted(set(cohort.speakers)) == sorted(c.name.split("-")[0] for c in clips.glob("*.flac"))
    assert np.allclose(np.linalg.norm(cohort.embeddings, axis=1), 1.0, atol=1e-5)


def test_clustering_bars_rise_as_far_as_the_sessions_level_lies_under_a_clean_one() -> None:
    v = GE2E  # room_join_lift 0.4, cohort_clean_level 0.585
    assert policy.room_lift(v, None) == 0.0
    assert policy.room_lift(v, 0.60) == 0.0  # as clean or cleaner: the calibrated bars
    assert policy.room_lift(v, 0.51) == pytest.approx(0.03)
    assert policy.joins(v, 0.73) and not policy.joins(v, 0.73, policy.room_lift(v, 0.51))
    assert policy.merges(v, 0.83) and not policy.merges(v, 0.83, policy.room_lift(v, 0.51))
    assert policy.room_lift(dataclasses.replace(v, room_join_lift=0.0), 0.40) == 0.0


def test_the_layer_raises_clustering_bars_in_a_room_even_with_nobody_enrolled() -> None:
    from speakerd.audio import SAMPLE_RATE
    from speakerd.decisions.clustering import ProvisionalSettings
    from speakerd.decisions.layer import DecisionLayer
    from speakerd.decisions.tracker import TrackerSettings
    from speakerd.embedding.worker import EmbeddedWindow
    from speakerd.windows import Window

    class Nobody:
        def rank(self, embeddings: np.ndarray) -> list[list[tuple[str, str, float]]]:
            return [[] for _ in embeddings]

    cohort = Cohort(np.array([[1.0, 0.0]]), ("1",))
    v = dataclasses.replace(LIFT, cohort_top_n=1)
    layer = DecisionLayer(v, TrackerSettings(), ProvisionalSettings(), ranker=Nobody(), dim=2, hop_samples=8000, cohort=cohort)
    end = 2 * SAMPLE_RATE
    w = Window(end - SAMPLE_RATE, end, np.zeros((1, 1), np.float32), 1.0, 2.0, 0, True)
    layer.process([EmbeddedWindow(w, _unit(np.arccos(0.51)))])  # a room's level, 0.075 under clean
    assert layer.provisional.lift == pytest.approx(0.4 * 0.075)


def test_a_groups_centroid_is_compensated_at_the_sessions_level_not_its_own() -> None:
    """Averaging windows lifts a centroid's cohort level above its windows': scored at its own
    level, a group of room windows lost the room's compensation (and its penalty)."""
    from speakerd.decisions.clustering import ProvisionalSettings
    from speakerd.decisions.layer import DecisionLayer
    from speakerd.decisions.tracker import TrackerSettings

    dim = 8
    eye = np.eye(dim)
    cohort = Cohort(eye[:2], ("c0", "c1"))  # top 2 of 2: a unit vector's level is the mean of its first two components
    clean = 0.585 * (eye[0] + eye[1]) + np.sqrt(1 - 2 * 0.585**2) * eye[5]  # level 0.585

    class Fixed:
        def rank(self, embeddings: np.ndarray) -> list[list[tuple[str, str, float]]]:
            return [[("a", "Ann", 0.65)] for _ in embeddings]

        def embeddings_of(self, speaker_id: str) -> np.ndarray:
            return clean[None, :]

    v = dataclasses.replace(LIFT, cohort_top_n=2)
    layer = DecisionLayer(v, TrackerSettings(), ProvisionalSettings(), ranker=Fixed(), dim=dim, hop_samples=8000, cohort=cohort)
    assert layer.verdict(clean).score == pytest.approx(0.65)  # no session level yet: the centroid's own
    layer._room([0.505])  # the session's windows, heard in a room
    assert layer.verdict(clean).score == pytest.approx(0.65 + v.cohort_gain * 0.08)


def test_a_probes_cosine_to_a_provisional_voice_loses_the_shared_room_term_too() -> None:
    """Enrolled scores in a room lose the shared-room term; a provisional centroid was made in the
    same room, so its cosine must lose it too, or it wins every comparison with an enrolled voice."""
    from speakerd.audio import SAMPLE_RATE
    from speakerd.decisions.clustering import ProvisionalSettings
    from speakerd.decisions.layer import DecisionLayer
    from speakerd.decisions.tracker import TrackerSettings
    from speakerd.embedding.worker import EmbeddedWindow
    from speakerd.windows import Window

    dim, eye = 8, np.eye(8)
    cohort = Cohort(eye[:2], ("c0", "c1"))
    ann = 0.505 * (eye[0] + eye[1]) + np.sqrt(1 - 2 * 0.505**2) * eye[5]  # enrolled in the room: level 0.505
    guest = 0.505 * (eye[0] + eye[1]) + np.sqrt(1 - 2 * 0.505**2) * eye[6]  # heard in the same room

    class Ann:
        def rank(self, embeddings: np.ndarray) -> list[list[tuple[str, str, float]]]:
            x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
            return [[("a", "Ann", float(e @ ann))] for e in x]

        def embeddings_of(self, speaker_id: str) -> np.ndarray:
            return ann[None, :]

    end = 2 * SAMPLE_RATE
    window = EmbeddedWindow(Window(end - 3 * SAMPLE_RATE // 2, end, np.zeros((1, 1), np.float32), 1.0, 2.0, 0, True),
                            guest.astype(np.float32))

    v = dataclasses.replace(GE2E, cohort_top_n=2, adapt_windows=0)
    layer = DecisionLayer(v, TrackerSettings(), ProvisionalSettings(min_speech_s=0.5, min_windows=1, fold_min_windows=1),
                          ranker=Ann(), dim=dim, hop_samples=8000, cohort=cohort)
    first = layer.process([window]).windows[0]  # the guest's window makes provisional unknown-1
    room = policy.shared_room(v, 0.505)
    assert room == pytest.approx(v.room_score_penalty * 0.08)
    assert not first.match.known and first.label is not None and first.label.id == "unknown-1"
    assert first.label_score == pytest.approx(1.0 - room)  # its own centroid: cosine 1, less the room
    probe = layer._nearest_provisional(first, room)
    assert probe.label_score == pytest.approx(1.0 - room)
    assert probe.label_margin == pytest.approx(1.0 - room - first.match.score)


def test_a_voice_scores_the_better_of_its_voiceprint_and_its_room_versions_less_the_penalty() -> None:
    v = dataclasses.replace(GE2E, room_version_penalty=0.05)
    clean = [("a", "Ann", 0.62), ("b", "Bob", 0.58), ("c", "Cy", 0.40)]
    rooms = [("b", "Bob", 0.80), ("a", "Ann", 0.60)]  # Cy enrolled without room versions
    assert policy.with_rooms(v, clean, rooms) == [("b", "Bob", pytest.approx(0.75)), ("a", "Ann", 0.62), ("c", "Cy", 0.40)]
    assert policy.with_rooms(v, clean, []) == clean  # no room versions: the ranking as it was
    assert policy.with_rooms(dataclasses.replace(v, room_version_penalty=0.3), clean, rooms) == clean
