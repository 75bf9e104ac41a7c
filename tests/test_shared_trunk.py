"""One ResNet34 trunk pass per stretch of speech: the split reproduces the network, a lone window is
exact, and over real speech the shared-trunk embeddings agree with the per-window ones (figures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from speakerd.bundle import load_bundle  # noqa: E402
from speakerd.embedding.backend import create_backend  # noqa: E402
from speakerd.embedding.onnx_backend import OnnxBackend  # noqa: E402
from speakerd.embedding.trunk import SharedTrunkBackend  # noqa: E402
from speakerd.embedding.worker import EmbeddingSettings  # noqa: E402
from speakerd.errors import ConfigError  # noqa: E402
from speakerd.models.wespeaker import convert as conv  # noqa: E402
from speakerd.models.wespeaker.checkpoint import write_wespeaker_dir  # noqa: E402
from speakerd.windows import Window  # noqa: E402
from test_batching import real_windows  # noqa: E402
from test_wespeaker_convert import random_model  # noqa: E402

SHARED_MEDIAN_COSINE = 0.97
"""Measured 0.986 (random weights, these clips); real weights: docs/wespeaker.md."""


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trunk")
    ckpt = write_wespeaker_dir(random_model(0), root / "voxceleb_resnet34_LM")
    return conv.convert_wespeaker(ckpt, root / "bundle", window_seconds=(1.5,), progress=False, coreml=False).path


@pytest.fixture(scope="module")
def windows(bundle_dir: Path, librispeech: Path) -> list[Window]:
    return [w for w in real_windows(librispeech, load_bundle(bundle_dir).features) if isinstance(w, Window)]


def test_conversion_splits_trunk_and_head_that_reproduce_the_network(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert {"onnx_trunk", "head"} <= set(manifest["artifacts"])
    assert manifest["source"]["trunk_verify_min_cosine"] >= 0.99999


def test_a_lone_window_through_the_trunk_is_the_exact_embedding(bundle_dir: Path, windows: list[Window]) -> None:
    bundle = load_bundle(bundle_dir)
    exact = OnnxBackend(bundle)
    for w in (windows[0], next(w for w in windows if w.num_frames == 148)):
        shared = SharedTrunkBackend(bundle)  # fresh: the window is its segment, its mean the running mean
        cos = float(np.dot(shared.embed_windows([w])[0], exact.embed(w.feats[None])[0]))
        assert cos >= 0.9999, (w.num_frames, cos)
        shared.close()
    exact.close()


def test_shared_trunk_agrees_with_per_window_and_runs_the_trunk_about_once(bundle_dir: Path, windows: list[Window]) -> None:
    bundle = load_bundle(bundle_dir)
    exact = OnnxBackend(bundle)
    reference = np.concatenate([exact.embed(w.feats[None]) for w in windows])
    exact.close()
    for batch in (1, 32):  # live (one window at a time) and a file's backlog
        shared = SharedTrunkBackend(bundle)
        got = np.concatenate([shared.embed_windows(windows[i : i + batch]) for i in range(0, len(windows), batch)])
        cos = np.sum(got * reference, axis=1)
        assert np.median(cos) >= SHARED_MEDIAN_COSINE, (batch, np.median(cos))
        assert np.percentile(cos, 5) >= 0.9, (batch, np.percentile(cos, 5))
        assert shared.counters["exact_windows"] == 0
        per_window_frames = sum(w.num_frames for w in windows)
        if batch == 32:  # a backlog: the trunk sees each frame little more than once
            assert shared.counters["trunk_frames"] < 0.3 * per_window_frames, shared.counters
        else:  # live: each pass carries its left context and provisional frames: about what every window whole costs
            assert shared.counters["trunk_frames"] < 1.1 * per_window_frames, shared.counters
        shared.close()


def test_the_setting_chooses_the_exact_path(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert isinstance(create_backend(bundle, "onnx", trunk="shared"), SharedTrunkBackend)
    assert isinstance(create_backend(bundle, "onnx", trunk="per_window"), OnnxBackend)
    with pytest.raises(ConfigError, match="embedding.trunk"):
        EmbeddingSettings(trunk="sometimes")


def test_the_daemon_builds_its_backend_from_every_embedding_setting(bundle_dir: Path) -> None:
    import dataclasses

    from speakerd.lifecycle import default_backend
    from speakerd.settings import Settings

    bundle = load_bundle(bundle_dir)
    settings = Settings()
    shared = default_backend(bundle, settings)  # what `speakerd run` uses
    exact = default_backend(bundle, dataclasses.replace(settings, embedding=dataclasses.replace(settings.embedding, trunk="per_window")))
    assert isinstance(shared, SharedTrunkBackend) and isinstance(exact, OnnxBackend)
    shared.close()
    exact.close()
