"""Model bundles: manifest errors, name resolution, the recipe's frame count and the fingerprint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from speakerd.audio import SAMPLE_RATE
from speakerd.bundle import (
    BundleError,
    FeatureRecipe,
    ModelBundle,
    fingerprint_of,
    load_bundle,
    resolve_bundle,
    write_manifest,
)
from speakerd.features import FeatureStream

SHA = "0" * 64
RECIPE = FeatureRecipe(num_mel_bins=40, gain_normalize_dbfs=-30.0, cmn=False)


def manifest(**changes: object) -> dict:
    data = {
        "format": 1,
        "name": "toy",
        "sample_rate": 16000,
        "embedding_dim": 8,
        "features": RECIPE.to_dict(),
        "fingerprint": fingerprint_of("toy", SHA, RECIPE, 8),
        "artifacts": {"onnx": "model.onnx"},
        "window_frames": [98, 148],
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def bundle_dir(tmp_path: Path, data: object, name: str = "toy") -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "manifest.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_a_good_manifest_loads(tmp_path: Path) -> None:
    b = load_bundle(bundle_dir(tmp_path, manifest()))
    assert (b.name, b.sample_rate, b.embedding_dim, b.features) == ("toy", 16000, 8, RECIPE)
    assert b.window_frames == (98, 148)
    assert b.io == {"input": "feats", "output": "embs"}
    assert b.artifact("onnx") is None  # declared but not built
    with pytest.raises(BundleError, match=r"no built onnx artifact .*speakerd models build toy"):
        b.require_artifact("onnx")
    (b.path / "model.onnx").write_bytes(b"x")
    assert b.require_artifact("onnx") == b.path / "model.onnx"
    assert b.artifact("coreml") is None


def test_write_manifest_round_trips(tmp_path: Path) -> None:
    original = load_bundle(bundle_dir(tmp_path, manifest(description="d", source={"weights_sha256": SHA})))
    copy = dataclasses.replace(original, path=tmp_path / "copy")
    write_manifest(copy)
    assert load_bundle(tmp_path / "copy") == copy


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", r"manifest.json is not valid JSON"),
        (manifest(format=2), r"unsupported manifest format 2"),
        (manifest(format=None), r"unsupported manifest format None"),
        (manifest(name=None), r"missing key 'name'"),
        (manifest(fingerprint=None), r"missing key 'fingerprint'"),
        (manifest(features=None), r"missing key 'features'"),
        (manifest(features={**RECIPE.to_dict(), "n_mels": 40, "hop": 1}), r"unknown feature recipe keys: hop, n_mels"),
        (manifest(features={"kind": "mfcc"}), r"unsupported feature kind 'mfcc'"),
        ("[1, 2]", r"manifest.json: must be a JSON object"),
        (manifest(sample_rate="fast"), r"manifest.json: bad value"),
    ],
)
def test_manifest_errors_are_bundle_errors_that_say_what_is_wrong(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir(tmp_path, data))


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no manifest.json in .*: not a model bundle"):
        load_bundle(tmp_path)


def test_resolve_by_directory_or_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = bundle_dir(tmp_path, manifest())
    assert resolve_bundle(str(path)).path == path
    monkeypatch.setenv("SPEAKERD_MODELS", str(tmp_path))
    assert resolve_bundle("toy").path == path
    with pytest.raises(BundleError, match=rf"no model 'nope': not a directory and not a bundle in {tmp_path}"):
        resolve_bundle("nope")


def test_shipped_bundle_fingerprint_is_what_its_manifest_declares() -> None:
    b = resolve_bundle(str(Path(__file__).resolve().parents[1] / "models" / "ge2e-resemblyzer"))
    assert b.fingerprint == fingerprint_of(b.name, b.source["weights_sha256"], b.features, b.embedding_dim)


@pytest.mark.parametrize("snip_edges", [True, False])
def test_recipe_frame_count_matches_the_stream(snip_edges: bool) -> None:
    recipe = dataclasses.replace(RECIPE, snip_edges=snip_edges)
    audio = (np.random.default_rng(5).standard_normal(2 * SAMPLE_RATE) * 0.1).astype(np.float32)
    sizes = [0, 1, 79, 80, 81, 159, 160, 161, 239, 240, 241, 399, 400, 401, 559, 560, 561, 16000, 15920, 24000]
    sizes += np.random.default_rng(6).integers(0, 16000, size=30).tolist()
    for n in sizes:
        stream = FeatureStream(recipe, SAMPLE_RATE)
        stream.process(audio[:n])
        assert stream.finish() == recipe.num_frames(n, SAMPLE_RATE), n
    assert [recipe.num_frames(n, SAMPLE_RATE) for n in (399, 400, 559, 560, 16000, 24000)] == (
        [0, 1, 1, 2, 98, 148] if snip_edges else [2, 3, 3, 4, 100, 150]
    )


def test_fingerprint_tracks_weights_recipe_and_dim_only() -> None:
    base = fingerprint_of("toy", SHA, RECIPE, 8)
    assert base.startswith("toy:") and len(base) == len("toy:") + 16
    same_recipe = FeatureRecipe.from_dict(json.loads(json.dumps(RECIPE.to_dict())))
    assert same_recipe is not RECIPE
    assert fingerprint_of("toy", SHA, same_recipe, 8) == base
    assert fingerprint_of("toy", SHA, FeatureRecipe(**dataclasses.asdict(RECIPE)), 8) == base
    changed = {
        "weights": fingerprint_of("toy", "1" + SHA[1:], RECIPE, 8),
        "dim": fingerprint_of("toy", SHA, RECIPE, 16),
        "mel bins": fingerprint_of("toy", SHA, dataclasses.replace(RECIPE, num_mel_bins=80), 8),
        "gain": fingerprint_of("toy", SHA, dataclasses.replace(RECIPE, gain_normalize_dbfs=None), 8),
        "cmn": fingerprint_of("toy", SHA, dataclasses.replace(RECIPE, cmn=True), 8),
        "snip": fingerprint_of("toy", SHA, dataclasses.replace(RECIPE, snip_edges=False), 8),
    }
    assert base not in changed.values()
    assert len(set(changed.values())) == len(changed)


def test_fingerprint_ignores_what_does_not_change_the_embedding_space(tmp_path: Path) -> None:
    a = load_bundle(bundle_dir(tmp_path, manifest(), "a"))
    b = load_bundle(bundle_dir(tmp_path, manifest(description="other words", artifacts={}, window_frames=[160]), "b"))
    assert fingerprint_of(a.name, SHA, a.features, a.embedding_dim) == fingerprint_of(b.name, SHA, b.features, b.embedding_dim)
    assert isinstance(a, ModelBundle)
