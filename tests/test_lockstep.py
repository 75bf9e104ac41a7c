"""GE2E windows advanced through the LSTM together (embedding/lockstep.py): the windower's grids,
the streaming graph, and embeddings equal to the whole-window path on real speech, live and in a
backlog, with scaled, dropped and off-grid windows taking the whole-window path."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from speakerd.audio import AudioChunk
from speakerd.bench import speech
from speakerd.bundle import load_bundle
from speakerd.embedding import backend_for
from speakerd.embedding.backend import STREAM_ARTIFACT, STREAM_INT8_ARTIFACT, windows_for
from speakerd.embedding.lockstep import BACKLOG, LockstepBackend, OnnxLockstepBackend
from speakerd.embedding.onnx_backend import OnnxBackend
from speakerd.models.ge2e_stream import STREAM_FILE, STREAM_INT8_FILE, add_stream, needs_stream
from speakerd.settings import Settings
from speakerd.vad import SpeechEnd, VadSegmenter
from speakerd.windows import SpeechWindower, Window, WindowSettings, grid_windows

EXACT = 0.9999
"""The issue's bar for an exact method: every embedding equal to the whole-window one to this cosine."""


def windows_of(audio: np.ndarray, recipe, settings: WindowSettings | None = None) -> tuple[list[Window], int]:
    """Every window and probe the daemon makes of ``audio``, and how many speech regions it had."""
    base = Settings()
    seg, windower = VadSegmenter(base.vad), SpeechWindower(settings or base.windows, recipe)
    out: list[Window] = []
    regions = 0
    events = [e for i in range(0, len(audio), 1600) for e in seg.process(AudioChunk(audio[i : i + 1600], i, i / 16000))]
    for event in events + seg.flush():
        for item in windower.process(event):
            out += [item] if isinstance(item, Window) else []
            regions += isinstance(item, SpeechEnd)
    return out, regions


def with_pauses(audio: np.ndarray, every_s: float = 9.0, pause_s: float = 1.0) -> np.ndarray:
    """Speech with a silence every ``every_s``: regions end, and the next starts afresh."""
    step, pause = int(every_s * 16000), np.zeros(int(pause_s * 16000), dtype=np.float32)
    return np.concatenate([part for i in range(0, len(audio), step) for part in (audio[i : i + step], pause)])


@pytest.fixture(scope="module")
def speech_windows(librispeech: Path, default_model: Path) -> list[Window]:
    return windows_of(with_pauses(speech(librispeech, 60.0)), load_bundle(default_model).features)[0]


@pytest.fixture(scope="module")
def lockstep(default_model: Path) -> OnnxLockstepBackend:
    backend = backend_for(load_bundle(default_model), Settings().embedding, Settings().windows)
    assert isinstance(backend, OnnxLockstepBackend), backend.name
    return backend


def whole(backend: LockstepBackend, windows: list[Window]) -> np.ndarray:
    return np.concatenate([backend.exact.embed(w.feats[None]) for w in windows])


def run(backend: LockstepBackend, windows: list[Window], size: int) -> np.ndarray:
    backend.reset()
    backend.counters = dict.fromkeys(backend.counters, 0)
    return np.concatenate([backend.embed_windows(windows[i : i + size]) for i in range(0, len(windows), size)])


@pytest.mark.parametrize("settings", [
    WindowSettings(),
    WindowSettings(probe_align="off"),
    WindowSettings(first_length_s=1.2, hop_s=0.3, probe_hop_s=0.2, probe_start_s=0.7),
    WindowSettings(first_length_s=1.3, hop_s=0.4, probe_hop_s=0.2, probe_start_s=0.6),  # regular starts 0, 0.2, 0.6, ...
])
def test_every_window_but_a_regions_tail_is_on_the_grids(librispeech: Path, default_model: Path, settings: WindowSettings) -> None:
    windows, regions = windows_of(with_pauses(speech(librispeech, 40.0)), load_bundle(default_model).features, settings)
    starts = {w.start - w.region_start for w in windows}
    grid = grid_windows(settings, 0, max(starts) + 1)
    off = [w for w in windows if w.end - w.start not in grid.get(w.start - w.region_start, ())]
    assert len(windows) > 150 and regions >= 4
    assert len(off) <= 2 * regions, [(w.start - w.region_start, w.end - w.start) for w in off]  # a tail window and a tail probe each
    # asking in pieces gives the same starts as asking at once
    pieces: dict[int, tuple[int, ...]] = {}
    for a in range(0, max(starts) + 1, 1234):
        pieces.update(grid_windows(settings, a, min(a + 1234, max(starts) + 1)))
    assert pieces == grid


def test_the_streaming_graph_carries_state_across_calls(lockstep: OnnxLockstepBackend, speech_windows: list[Window]) -> None:
    w = next(w for w in speech_windows if w.num_frames == 148 and w.gain_db == 0)
    zeros = np.zeros((3, 1, 256), dtype=np.float32)
    x = w.feats[:, None, :]
    h, c, _ = lockstep._step(np.ascontiguousarray(x[:61]), zeros, zeros, np.zeros(0, dtype=np.int64))
    _, _, (emb,) = lockstep._step(np.ascontiguousarray(x[61:]), h, c, np.array([147 - 61], dtype=np.int64))
    assert float(emb @ lockstep.exact.embed(w.feats[None])[0]) >= EXACT


@pytest.mark.parametrize("size", [1, 3])
def test_lockstep_embeddings_equal_the_whole_window_ones(lockstep: OnnxLockstepBackend, speech_windows: list[Window], size: int) -> None:
    """Live: one window per call, or a few when the worker woke late."""
    got = run(lockstep, speech_windows, size)
    cos = np.sum(got * whole(lockstep, speech_windows), axis=1)
    assert cos.min() >= EXACT, cos.min()
    counted = lockstep.counters
    # test-other is loud: almost every window is unscaled and on the grids, so rows serve it
    assert counted["lockstep_windows"] >= 0.9 * len(speech_windows), counted
    assert counted["lockstep_windows"] + counted["exact_windows"] == len(speech_windows)
    # the cost: every probe starts on the regular windows' grid and shares a row, so rows step through
    # fewer than half the frames of the whole-window path (0.45 here; 0.74 with 0.8 s probes
    # throughout), several rows per LSTM step (2.8)
    assert counted["row_steps"] <= 0.5 * sum(w.num_frames for w in speech_windows), counted
    assert counted["row_steps"] >= 2.5 * counted["steps"], counted
    assert counted["passes"] <= 2.5 * len(speech_windows), counted


def test_aligned_probes_open_no_rows_of_their_own(lockstep: OnnxLockstepBackend, speech_windows: list[Window],
                                                  librispeech: Path, default_model: Path) -> None:
    """``probe_align``: a probe between regular starts begins at the one before, so only regular
    starts open rows: half the rows, a third fewer row-steps than with 0.8 s probes throughout."""
    settings = WindowSettings(probe_align="off")
    bundle = load_bundle(default_model)
    unaligned, _ = windows_of(with_pauses(speech(librispeech, 60.0)), bundle.features, settings)
    backend = backend_for(bundle, Settings().embedding, settings)
    assert isinstance(backend, OnnxLockstepBackend)
    try:
        run(backend, unaligned, 1)
    finally:
        backend.close()
    before = backend.counters
    run(lockstep, speech_windows, 1)
    after = lockstep.counters
    # 60 s of test-other: 253 -> 127 rows, 26,892 -> 17,542 row-steps (a region's last grid starts open rows too)
    assert after["rows"] <= 0.55 * before["rows"], (after, before)
    assert after["row_steps"] <= 0.7 * before["row_steps"], (after, before)
    assert after["steps"] == before["steps"], "the same frames, fewer rows"


def test_probes_align_by_default_only_where_a_streaming_graph_serves_them(default_model: Path) -> None:
    """``probe_align = "auto"``: on for GE2E (its rows take the longer probes for free), off for a
    bundle that embeds every window whole (ECAPA-TDNN: a 1.05 s probe would only cost more)."""
    ge2e = load_bundle(default_model)
    whole = dataclasses.replace(ge2e, artifacts={k: v for k, v in ge2e.artifacts.items() if not k.startswith("onnx_stream")})
    assert windows_for(ge2e, WindowSettings()).probe_align == "on"
    assert windows_for(whole, WindowSettings()).probe_align == "off"
    assert windows_for(whole, WindowSettings(probe_align="on")).probe_align == "on"
    assert windows_for(ge2e, WindowSettings(probe_align="off")).probe_align == "off"
    assert windows_for(whole, WindowSettings()).probe_lengths() == (0.55, 0.8)
    # the lockstep backend's grid follows the bundle's choice: a probe 1.05 s long from a window's start
    backend = backend_for(ge2e, Settings().embedding, WindowSettings())
    try:
        assert isinstance(backend, OnnxLockstepBackend)
        assert backend._grid(0, 8000) == {0: (8800, 12800, 16000, 16800, 24000)}
    finally:
        backend.close()


def test_a_backlog_goes_whole_and_rows_start_again_after_it(lockstep: OnnxLockstepBackend, speech_windows: list[Window]) -> None:
    backlog = BACKLOG
    sizes = [1] * 40 + [backlog + 2] + [1] * 30 + [3 * backlog] + [2] * 200
    lockstep.reset()
    lockstep.counters = dict.fromkeys(lockstep.counters, 0)
    got, i = [], 0
    for size in sizes:
        if i < len(speech_windows):
            got.append(lockstep.embed_windows(speech_windows[i : i + size]))
            i += size
    cos = np.sum(np.concatenate(got) * whole(lockstep, speech_windows[:i]), axis=1)
    assert cos.min() >= EXACT, cos.min()
    assert lockstep.counters["exact_windows"] >= 4 * backlog + 2 and lockstep.counters["lockstep_windows"] >= 0.7 * i, lockstep.counters


def test_scaled_dropped_and_foreign_windows_stay_exact(lockstep: OnnxLockstepBackend, speech_windows: list[Window],
                                                       librispeech: Path, default_model: Path) -> None:
    # a live queue that dropped every fifth window: rows stranded by the gap end, the rest go on
    kept = [w for i, w in enumerate(speech_windows) if i % 5 != 3]
    cos = np.sum(run(lockstep, kept, 1) * whole(lockstep, kept), axis=1)
    assert cos.min() >= EXACT and lockstep.counters["lockstep_windows"] >= 0.5 * len(kept), lockstep.counters
    # quiet speech (-45 dBFS): every window is scaled, so rows stop opening and windows go whole
    audio = speech(librispeech, 20.0)
    quiet, _ = windows_of(audio * np.float32(10 ** (-45 / 20) / np.sqrt(np.mean(audio**2))), load_bundle(default_model).features)
    assert all(w.gain_db > 0 for w in quiet)
    cos = np.sum(run(lockstep, quiet, 1) * whole(lockstep, quiet), axis=1)
    assert cos.min() >= EXACT
    assert lockstep.counters["exact_windows"] == len(quiet) and lockstep.counters["rows"] <= 12, lockstep.counters


def test_int8_rows_agree_with_fp32_as_the_int8_whole_windows_do(default_model: Path, speech_windows: list[Window]) -> None:
    """``precision = "int8"`` runs rows on the INT8 streaming graph: not exact (activations are
    quantised per step over the rows in it), but as close to FP32 as the INT8 whole-window file
    (worst 0.9990, median 0.9995 here; the issue's bar for INT8 is 0.99), and closer still to it."""
    bundle = load_bundle(default_model)
    settings = Settings()
    int8 = backend_for(bundle, dataclasses.replace(settings.embedding, precision="int8"), settings.windows)
    fp32 = backend_for(bundle, dataclasses.replace(settings.embedding, precision="fp32"), settings.windows)
    try:
        assert isinstance(int8, OnnxLockstepBackend) and int8.name == "onnx (onnx_int8), lockstep", int8.name
        exact, whole8, rows = whole(fp32, speech_windows), whole(int8, speech_windows), run(int8, speech_windows, 1)
        assert int8.counters["lockstep_windows"] >= 0.9 * len(speech_windows), int8.counters
        to_fp32, to_whole = np.sum(rows * exact, axis=1), np.sum(rows * whole8, axis=1)
        assert to_fp32.min() >= 0.99 and np.median(to_fp32) >= 0.998, (to_fp32.min(), np.median(to_fp32))
        assert to_whole.min() >= 0.995 and np.median(to_whole) >= 0.999, (to_whole.min(), np.median(to_whole))
        assert to_fp32.min() >= np.sum(whole8 * exact, axis=1).min() - 0.002
    finally:
        int8.close()
        fp32.close()


def test_per_window_setting_and_a_bundle_without_the_graphs_run_whole_windows(default_model: Path, tmp_path: Path) -> None:
    bundle = load_bundle(default_model)
    settings = Settings()
    int8 = dataclasses.replace(settings.embedding, precision="int8")
    assert isinstance(backend_for(bundle, dataclasses.replace(settings.embedding, trunk="per_window"), settings.windows), OnnxBackend)
    # a bundle that never had a streaming graph (ECAPA, ResNet34: INT8 file, no LSTM) needs none
    other = dataclasses.replace(bundle, artifacts={k: v for k, v in bundle.artifacts.items() if not k.startswith("onnx_stream")})
    assert other.artifact("onnx_int8") is not None and not needs_stream(other)
    copy = tmp_path / "ge2e"
    shutil.copytree(default_model, copy, ignore=shutil.ignore_patterns("coreml", "cache", STREAM_FILE, STREAM_INT8_FILE))
    stale = load_bundle(copy)
    assert needs_stream(stale)
    assert isinstance(backend_for(stale, settings.embedding, settings.windows), OnnxBackend)
    assert isinstance(backend_for(stale, int8, settings.windows), OnnxBackend)
    # scripts/setup adds both (models.build.ensure_artifacts): the graphs are rebuilt from model.onnx
    added = add_stream(copy)
    assert not needs_stream(added)
    assert added.artifact(STREAM_ARTIFACT) is not None and added.artifact(STREAM_INT8_ARTIFACT) is not None
    assert isinstance(backend_for(added, settings.embedding, settings.windows), OnnxLockstepBackend)
    assert backend_for(added, int8, settings.windows).name == "onnx (onnx_int8), lockstep"
