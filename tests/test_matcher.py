"""The matcher: rankings (and the policy's verdicts on them) pinned against brute-force numpy, gating,
aggregation modes, store round trips."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from decision_values import GE2E
from speakerd.decisions import policy
from speakerd.decisions.evidence import Match
from speakerd.errors import ConfigError
from speakerd.matcher import MatchSettings, SpeakerIndex
from speakerd.store import SpeakerStore

DIM = 32
FP = "test-model:0123456789abcdef"


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clusters(rng: np.random.Generator, speakers: int, per: int, dim: int = DIM, spread: float = 0.35):
    """Unit embeddings scattered around ``speakers`` random unit centres."""
    centres = normalise(rng.standard_normal((speakers, dim)))
    embs = normalise(centres[:, None, :] + spread * rng.standard_normal((speakers, per, dim)) / np.sqrt(dim))
    return centres, embs.astype(np.float32)


class Verdicts:
    """An index and the policy's verdict on its rankings at ``threshold`` (the decision layer's path)."""

    def __init__(self, index: SpeakerIndex, threshold: float) -> None:
        self.index = index
        self.values = replace(GE2E, threshold=threshold)

    def match(self, embs: np.ndarray) -> list[Match]:
        return [policy.verdict(self.values, r) for r in self.index.rank(embs)]

    def search(self, emb: np.ndarray, threshold: float | None = None) -> Match:
        return policy.verdict(self.values, self.index.rank(np.asarray(emb).reshape(1, -1))[0], threshold)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.index, name)

    def __len__(self) -> int:
        return len(self.index)


def build(embs: np.ndarray, settings: MatchSettings, threshold: float = 0.7) -> Verdicts:
    index = SpeakerIndex(embs.shape[-1], settings)
    for s in range(embs.shape[0]):
        index.add(f"spk-{s:08x}", f"name{s}", embs[s])
    return Verdicts(index, threshold)


def brute(embs: np.ndarray, query: np.ndarray, mode: str, top_k: int | None = None) -> list[tuple[str, float]]:
    """Per-speaker scores computed the slow, obvious way, best first."""
    q = normalise(query)
    flat = embs.reshape(-1, embs.shape[-1])
    owner = np.repeat(np.arange(embs.shape[0]), embs.shape[1])
    sims = flat @ q
    allowed = np.ones(len(flat), bool)
    if top_k is not None and mode != "centroid":
        allowed[:] = False
        allowed[np.argsort(-sims)[:top_k]] = True
    scores = {}
    for s in range(embs.shape[0]):
        mine = np.sort(sims[(owner == s) & allowed])[::-1]
        if mode == "centroid":
            scores[s] = float(normalise(embs[s].mean(axis=0)) @ q)
        elif len(mine) == 0:
            continue
        elif mode == "max":
            scores[s] = float(mine[0])
        else:
            scores[s] = float(mine[:3].mean())
    return sorted(((f"spk-{s:08x}", v) for s, v in scores.items()), key=lambda kv: -kv[1])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"threshold": 1.5}, "decision.threshold"),
        ({"relaxed_margin": -0.1}, "decision.relaxed_margin"),
        ({"top_k": 0}, "matching.top_k"),
        ({"faiss_threads": 0}, "matching.faiss_threads"),
        ({"top_k": 2.5}, "matching.top_k"),
        ({"score": "mean"}, "matching.score"),
    ],
)
def test_settings_are_validated(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        replace(GE2E, **kwargs) if is_decision_value(kwargs) else MatchSettings(**kwargs)
    assert info.value.key == key and key in str(info.value)


def is_decision_value(kwargs: dict) -> bool:
    return set(kwargs) <= set(GE2E.names())


def test_no_speakers_means_unknown_with_zero_score(rng: np.random.Generator) -> None:
    index = Verdicts(SpeakerIndex(DIM), 0.7)
    expected = Match(speaker_id=None, name=None, score=0.0, margin=0.0, runner_up=None, known=False, nearest=None)
    assert index.search(rng.standard_normal(DIM)) == expected
    assert index.match(rng.standard_normal((3, DIM))) == [expected] * 3
    assert index.best_matches(rng.standard_normal(DIM), 5) == []
    assert len(index) == 0 and index.speakers == {}


@pytest.mark.parametrize("mode", ["max", "top3", "centroid"])
def test_verdicts_equal_brute_force(rng: np.random.Generator, mode: str) -> None:
    centres, embs = clusters(rng, speakers=6, per=7)
    settings = MatchSettings(score=mode, top_k=64)  # top_k >= all 42 embeddings
    index = build(embs, settings, 0.5)
    near = normalise(centres[rng.integers(0, 6, 20)] + 0.4 * rng.standard_normal((20, DIM)) / np.sqrt(DIM))
    queries = np.concatenate([near, rng.standard_normal((10, DIM)).astype(np.float32)])
    matches = index.match(queries)
    assert len(matches) == 30
    known = 0
    for q, m in zip(queries, matches, strict=True):
        ranked = brute(embs, q, mode)
        (best, score), (second, second_score) = ranked[0], ranked[1]
        assert m.nearest == best and m.runner_up == second
        assert (m.nearest_name, m.runner_up_name) == (f"name{int(best[4:], 16)}", f"name{int(second[4:], 16)}")
        assert m.score == pytest.approx(score, abs=1e-5)
        assert m.margin == pytest.approx(score - second_score, abs=1e-5)
        assert m.known == (score >= 0.5)
        if m.known:
            known += 1
            assert (m.speaker_id, m.name) == (best, f"name{int(best[4:], 16)}")
        else:
            assert m.speaker_id is None and m.name is None
        assert [s for s, _, _ in index.best_matches(q, 3)] == [s for s, _ in ranked[:3]]
    assert known >= 15  # the near queries are recognised...
    assert sum(m.known for m in matches[20:]) == 0  # ...random directions are not


def test_top_k_limits_candidates_like_brute_force(rng: np.random.Generator) -> None:
    _, embs = clusters(rng, speakers=5, per=6)
    index = build(embs, MatchSettings(score="top3", top_k=4), 0.0)
    queries = rng.standard_normal((25, DIM)).astype(np.float32)
    saw_single = 0
    for q, m in zip(queries, index.match(queries), strict=True):
        ranked = brute(embs, q, "top3", top_k=4)
        assert m.nearest == ranked[0][0] and m.score == pytest.approx(ranked[0][1], abs=1e-5)
        if len(ranked) == 1:  # no runner-up among the candidates: margin is the score itself
            saw_single += 1
            assert m.runner_up is None and m.runner_up_name is None and m.margin == pytest.approx(m.score)
        else:
            assert m.runner_up == ranked[1][0]
            assert m.margin == pytest.approx(ranked[0][1] - ranked[1][1], abs=1e-5)
    index_one = build(embs[:1], MatchSettings(), 0.0)
    only = index_one.search(embs[0, 0])
    assert only.runner_up is None and only.margin == pytest.approx(only.score) and only.known


def _at_cosines(query: np.ndarray, cosines: list[float], start_axis: int) -> np.ndarray:
    """Unit vectors whose cosine with ``query`` (= e0) are exactly ``cosines``."""
    out = np.zeros((len(cosines), DIM), np.float32)
    for i, c in enumerate(cosines):
        out[i, 0] = c
        out[i, start_axis + i] = np.sqrt(1 - c * c)
    return out


@pytest.mark.parametrize(
    "mode, winner, score",
    [("max", "a", 0.9), ("top3", "b", 0.79), ("centroid", "b", None)],
)
def test_aggregation_modes_pick_differently(mode: str, winner: str, score: float | None) -> None:
    query = np.eye(DIM, dtype=np.float32)[0]
    a = _at_cosines(query, [0.9, 0.5, 0.4, 0.3], start_axis=1)
    b = _at_cosines(query, [0.8, 0.79, 0.78], start_axis=10)
    index = Verdicts(SpeakerIndex(DIM, MatchSettings(score=mode)), 0.5)
    index.add("a", "Alice", a)
    index.add("b", "Bob", b)
    m = index.search(query)
    expected = {
        "a": {"max": 0.9, "top3": 0.6, "centroid": float(normalise(a.mean(0)) @ query)},
        "b": {"max": 0.8, "top3": 0.79, "centroid": float(normalise(b.mean(0)) @ query)},
    }
    loser = "b" if winner == "a" else "a"
    assert m.speaker_id == winner and m.runner_up == loser and m.known
    assert m.score == pytest.approx(score if score is not None else expected[winner][mode], abs=1e-5)
    assert m.margin == pytest.approx(expected[winner][mode] - expected[loser][mode], abs=1e-5)
    assert index.score_of(winner, query) == pytest.approx(m.score, abs=1e-5)
    assert expected["b"]["centroid"] == pytest.approx(0.9126, abs=1e-4)  # pins the centroid arithmetic


def test_threshold_and_margin_gating() -> None:
    query = np.eye(DIM, dtype=np.float32)[0]
    index = Verdicts(SpeakerIndex(DIM, MatchSettings(score="max")), 0.7)
    index.add("a", "Alice", _at_cosines(query, [0.75], start_axis=1))
    index.add("b", "Bob", _at_cosines(query, [0.70], start_axis=2))
    m = index.search(query)
    assert (m.known, m.speaker_id, m.name, m.nearest, m.runner_up) == (True, "a", "Alice", "a", "b")
    assert m.score == pytest.approx(0.75, abs=1e-6) and m.margin == pytest.approx(0.05, abs=1e-6)
    # At exactly the score: known (at or above). Just above it: unknown, nearest kept.
    assert index.search(query, threshold=float(np.float32(0.75))).known
    above = index.search(query, threshold=0.76)
    assert (above.known, above.speaker_id, above.name, above.nearest) == (False, None, None, "a")
    assert above.score == pytest.approx(0.75, abs=1e-6)
    # Margin: a named window whose lead is under uncertain_margin is too close to call (named, uncertain).
    close = Verdicts(SpeakerIndex(DIM, MatchSettings(score="max")), 0.7)
    close.add("a", "Alice", _at_cosines(query, [0.75], start_axis=1))
    close.add("b", "Bob", _at_cosines(query, [0.745], start_axis=2))
    m = close.search(query)
    assert (m.known, m.speaker_id, m.uncertain) == (True, "a", True)
    assert not index.search(query).uncertain


def test_inputs_are_normalised_and_shapes_checked(rng: np.random.Generator) -> None:
    _, embs = clusters(rng, speakers=4, per=5)
    index = build(embs, MatchSettings(), 0.3)
    scaled = build(embs * 17.0, MatchSettings(), 0.3)
    queries = rng.standard_normal((6, DIM)).astype(np.float32)
    batched = index.match(queries)
    for other in (index.match(queries * 0.01), scaled.match(queries * 3.0), [index.search(q) for q in queries]):
        assert [(m.speaker_id, m.nearest, m.runner_up, m.known) for m in other] == [
            (m.speaker_id, m.nearest, m.runner_up, m.known) for m in batched
        ]
        np.testing.assert_allclose([m.score for m in other], [m.score for m in batched], atol=1e-6)
        np.testing.assert_allclose([m.margin for m in other], [m.margin for m in batched], atol=1e-6)
    assert sum(m.known for m in batched) >= 1  # the comparison covers known verdicts too
    assert index.match(np.zeros((0, DIM), np.float32)) == []
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        index.match(queries[0])
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        index.match(np.zeros((2, DIM + 1), np.float32))
    bad = queries.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.match(bad)


def test_add_remove_rename_in_memory(rng: np.random.Generator) -> None:
    centres, embs = clusters(rng, speakers=3, per=4)
    index = build(embs, MatchSettings(), 0.5)
    assert len(index) == 3 and index.num_embeddings == 12
    probe = centres[1]
    assert index.search(probe).speaker_id == "spk-00000001"
    index.rename("spk-00000001", "Renamed")
    assert index.search(probe).name == "Renamed" and index.speakers["spk-00000001"] == "Renamed"
    with pytest.raises(ValueError, match="already belongs"):
        index.rename("spk-00000000", "Renamed")
    with pytest.raises(ValueError, match="already belongs"):
        index.add("spk-new", "Renamed", embs[0])
    with pytest.raises(KeyError):
        index.rename("spk-missing", "x")
    assert index.remove("spk-00000001") and not index.remove("spk-00000001")
    assert len(index) == 2 and index.num_embeddings == 8
    for m in index.match(embs[1]):
        assert "spk-00000001" not in (m.speaker_id, m.nearest, m.runner_up)
    # Appending to an existing speaker grows it; explicit ids must be fresh.
    index.add("spk-00000000", "name0", embs[1][:2])
    assert index.num_embeddings == 10
    with pytest.raises(ValueError, match="new and distinct"):
        index.add("spk-00000002", "name2", embs[2][:2], ids=np.array([5, 5]))


def test_verify_is_exact_over_the_speakers_embeddings(rng: np.random.Generator) -> None:
    centres, embs = clusters(rng, speakers=5, per=6)
    index = build(embs, MatchSettings(top_k=2, score="top3"), 0.6)
    for s in range(5):
        probe = centres[s]
        exact = dict(brute(embs, probe, "top3"))
        assert index.score_of(f"spk-{s:08x}", probe) == pytest.approx(exact[f"spk-{s:08x}"], abs=1e-5)
        assert index.verify(f"spk-{s:08x}", probe, threshold=0.6)
        assert not index.verify(f"spk-{(s + 1) % 5:08x}", probe, threshold=0.6)
        assert index.verify(f"spk-{(s + 1) % 5:08x}", probe, threshold=-1.0)
    assert not index.verify("spk-missing", centres[0], threshold=-1.0)
    with pytest.raises(KeyError):
        index.score_of("spk-missing", centres[0])


@pytest.mark.parametrize("mode", ["top3", "centroid"])
def test_from_store_uses_the_persisted_index_and_round_trips(
    tmp_path: Path, rng: np.random.Generator, mode: str
) -> None:
    centres, embs = clusters(rng, speakers=5, per=4)
    settings = MatchSettings(top_k=64, score=mode)
    with SpeakerStore(tmp_path, fingerprint=FP, dim=DIM) as store:
        enrolled = [store.enroll(f"name{s}", embs[s] * (s + 1), source="test") for s in range(5)]
        store.rename("name2", "Carol")
        store.remove("name4")
    queries = normalise(centres[[0, 1, 2, 3, 4, 0]] + 0.3 * rng.standard_normal((6, DIM)) / np.sqrt(DIM))
    with SpeakerStore(tmp_path, fingerprint=FP, dim=DIM) as store:
        index = Verdicts(SpeakerIndex.from_store(store, settings), 0.5)
        assert (store.index_loads, store.index_rebuilds) == (1, 0)
        assert index.speakers == {e.id: e.name if e.name != "name2" else "Carol" for e in enrolled[:4]}
        assert index.num_embeddings == 16
        reference = Verdicts(SpeakerIndex(DIM, settings), 0.5)
        for s, e in enumerate(enrolled[:4]):
            reference.add(e.id, index.speakers[e.id], embs[s])
        got, want = index.match(queries), reference.match(queries)
        for g, w in zip(got, want, strict=True):
            assert (g.speaker_id, g.name, g.nearest, g.runner_up, g.known) == (
                w.speaker_id, w.name, w.nearest, w.runner_up, w.known
            )
            assert g.score == pytest.approx(w.score, abs=1e-5) and g.margin == pytest.approx(w.margin, abs=1e-5)
        assert [g.name for g in got[:4]] == ["name0", "name1", "Carol", "name3"]
        assert not got[4].known  # name4 was removed: its centre is nobody now
        # Mirroring a later enrollment in memory with the store's row ids.
        new = store.enroll("name4", embs[4], source="test")
        ids, owners, _ = store.embeddings()
        index.add(new.id, new.name, embs[4], ids=ids[[o == new.id for o in owners]])
        assert index.search(queries[4]).name == "name4"
        with pytest.raises(ValueError, match="new and distinct"):
            index.add(new.id, new.name, embs[4], ids=ids[[o == new.id for o in owners]])
        # The store's own index was not changed by the in-memory matcher (it has its own copy).
        index.remove(enrolled[0].id)
        assert store.load_index().ntotal == 20


@pytest.mark.parametrize("mode", ["centroid", "top3"])
def test_room_versions_are_a_voiceprint_of_their_own(tmp_path: Path, rng: np.random.Generator, mode: str) -> None:
    """Multi-condition enrollment's room versions: stored marked, ranked apart from the recordings
    (which rank exactly as without them), gone with their speaker."""
    centres, embs = clusters(rng, speakers=3, per=4)
    _, rooms = clusters(rng, speakers=3, per=6)  # "heard in a room": centres of their own
    settings = MatchSettings(top_k=64, score=mode)
    with SpeakerStore(tmp_path / "multi", fingerprint=FP, dim=DIM) as store:
        speakers = [store.enroll(f"name{s}", embs[s], "a.wav", in_rooms=rooms[s] if s < 2 else None) for s in range(3)]
        assert [sp.num_embeddings for sp in speakers] == [10, 10, 4]
        assert len(store.room_version_ids()) == 12
        index = SpeakerIndex.from_store(store, settings)
    with SpeakerStore(tmp_path / "plain", fingerprint=FP, dim=DIM) as store:
        for s in range(3):
            store.enroll(f"name{s}", embs[s], "a.wav")
        plain = SpeakerIndex.from_store(store, settings)
    assert index.num_embeddings == 12
    queries = normalise(np.concatenate([centres, rooms.mean(axis=1)]))
    got, want = index.rank(queries), plain.rank(queries)
    assert [[(c[1], round(c[2], 5)) for c in r] for r in got] == [[(c[1], round(c[2], 5)) for c in r] for r in want]
    in_rooms = index.rank_rooms(queries)
    assert [sorted(c[1] for c in r) for r in in_rooms] == [["name0", "name1"]] * 6  # name2 has no room versions
    room_means = normalise(rooms[:2].mean(axis=1))
    for q, r in zip(queries, in_rooms, strict=True):
        assert dict((c[1], c[2]) for c in r) == pytest.approx({f"name{s}": float(room_means[s] @ q) for s in range(2)}, abs=1e-5)
    assert index.remove(speakers[0].id)
    assert [c[1] for c in index.rank_rooms(queries[:1])[0]] == ["name1"]
    assert SpeakerIndex(DIM).rank_rooms(queries[:2]) == [[], []]


def test_concurrent_updates_and_matching(rng: np.random.Generator) -> None:
    _, embs = clusters(rng, speakers=8, per=5)
    index = build(embs[:4], MatchSettings(), 0.5)
    queries = rng.standard_normal((8, DIM)).astype(np.float32)
    errors: list[BaseException] = []
    stop = threading.Event()

    def matcher() -> None:
        try:
            while not stop.is_set():
                assert len(index.match(queries)) == 8
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=matcher)
    thread.start()
    try:
        for _ in range(20):
            for s in range(4, 8):
                index.add(f"spk-{s:08x}", f"name{s}", embs[s])
            for s in range(4, 8):
                assert index.remove(f"spk-{s:08x}")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not errors and not thread.is_alive()
    assert len(index) == 4 and index.num_embeddings == 20


def test_batch_of_8_against_2000_embeddings_is_fast(rng: np.random.Generator, caplog) -> None:
    """100 speakers x 20 embeddings of 192 dims: a batch of 8 windows, one faiss call."""
    dim = 192
    centres, embs = clusters(rng, speakers=100, per=20, dim=dim)
    timings = {}
    for mode in ("top3", "centroid"):
        index = Verdicts(SpeakerIndex(dim, MatchSettings(score=mode)), 0.5)
        for s in range(100):
            index.add(f"spk-{s:08x}", f"name{s}", embs[s])
        batch = normalise(centres[:8] + 0.3 * rng.standard_normal((8, dim)) / np.sqrt(dim))
        index.match(batch)  # warm-up
        runs = []
        for _ in range(50):
            t0 = time.perf_counter()
            matches = index.match(batch)
            runs.append(time.perf_counter() - t0)
        assert [m.speaker_id for m in matches] == [f"spk-{s:08x}" for s in range(8)]
        timings[mode] = float(np.median(runs))
    logging.getLogger(__name__).info("median match time, batch 8 vs 100x20x192: %s", timings)
    assert timings["top3"] < 0.005 and timings["centroid"] < 0.005, timings
