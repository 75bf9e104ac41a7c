"""The default bundle, GE2E from Resemblyzer: strict weights, a faithful ONNX export, features that
reproduce Resemblyzer's librosa mel, and embeddings that separate real speakers.

The built bundle comes from a session fixture that runs ``build_model`` into the repo's models dir;
the wheel cache there makes every build after the first offline (CI builds it before the tests).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

torch = pytest.importorskip("torch", reason="building the GE2E bundle needs torch (the build extra)")

from speakerd.bundle import KNOWN_MODELS, ModelBundle, fingerprint_of, load_bundle, models_root  # noqa: E402
from speakerd.embedding import create_backend  # noqa: E402
from speakerd.features import FeatureExtractor, finish_window  # noqa: E402
from speakerd.models import BUILDERS, BuildError, build_model, list_models  # noqa: E402
from speakerd.models.build import GE2E_RECIPE, GE2E_WEIGHTS_SHA256, fetch_wheel  # noqa: E402
from speakerd.models.ge2e import (  # noqa: E402
    CheckpointError,
    GE2EEncoder,
    load_encoder,
    normalize_volume,
    reference_mel,
)

NAME = "ge2e-resemblyzer"
SR = 16000
WINDOW = int(1.5 * SR)
REPO = Path(__file__).resolve().parents[1]

# Measured with tools/ge2e_feature_eer.py (docs/ge2e-features.md); bounds below keep a margin.
MIN_MEAN_RECIPE_COSINE = 0.98
"""knf vs librosa-reference embeddings of the same windows: measured mean 0.991 (grid 2.5 ms apart)."""
MIN_EXPORT_COSINE = 0.99999
MAX_SMALL_EER = 0.12
"""EER of the small test-other trial set below; measured 0.05-0.06 on the full set (see docs)."""
MIN_SCORE_GAP = 0.2


@pytest.fixture(scope="session")
def bundle() -> ModelBundle:
    return build_model(NAME, progress=False)


@pytest.fixture(scope="session")
def speakers(librispeech: Path) -> dict[str, list[np.ndarray]]:
    """test-other: speaker -> utterances (5 x 10)."""
    out: dict[str, list[np.ndarray]] = {}
    for path in sorted((librispeech / "test-other").glob("*/*.flac")):
        wave, sr = sf.read(str(path), dtype="float32")
        assert sr == SR
        out.setdefault(path.parent.name, []).append(wave)
    assert len(out) == 5 and all(len(v) == 10 for v in out.values())
    return out


def windows_of(wave: np.ndarray, count: int) -> list[np.ndarray]:
    starts = np.linspace(0, len(wave) - WINDOW, count).astype(int)
    return [wave[s : s + WINDOW] for s in starts]


def eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """Lowest max(FAR, FRR) over thresholds: an upper bound of the interpolated EER."""
    thresholds = np.unique(scores)
    far = np.array([(scores[~labels] >= t).mean() for t in thresholds])
    frr = np.array([(scores[labels] < t).mean() for t in thresholds])
    return float(np.min(np.maximum(far, frr)))


# --- strict loading -------------------------------------------------------------------------------


def test_strict_load_names_missing_and_unexpected_keys() -> None:
    state = dict(GE2EEncoder().state_dict())
    del state["linear.bias"]
    state["encoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_encoder(state)
    assert "missing keys: linear.bias" in str(err.value)
    assert "unexpected keys: encoder.extra.weight" in str(err.value)


def test_strict_load_names_shape_mismatch() -> None:
    state = dict(GE2EEncoder().state_dict())
    state["linear.weight"] = torch.zeros(128, 256)
    with pytest.raises(CheckpointError, match=r"wrong shapes: linear\.weight \(128, 256\) \(model \(256, 256\)\)"):
        load_encoder(state)


def test_checkpoint_loads_strictly_including_loss_scale(bundle: ModelBundle) -> None:
    model = load_encoder(bundle.path / "cache" / "pretrained.pt")
    # the GE2E loss scale is in the checkpoint; loading it proves the load really was strict
    assert model.similarity_weight.item() != 10.0 and not model.training


# --- the bundle -----------------------------------------------------------------------------------


def test_manifest_describes_the_bundle(bundle: ModelBundle) -> None:
    assert bundle.path == models_root() / NAME
    data = json.loads((bundle.path / "manifest.json").read_text())
    assert data["source"] == {
        "package": "resemblyzer==0.1.4",
        "file": "resemblyzer/pretrained.pt",
        "weights_sha256": GE2E_WEIGHTS_SHA256,
        "license": bundle.source["license"],
        "cohort": bundle.source["cohort"],
        "int8": bundle.source["int8"],  # its agreement with FP32: tests/test_ge2e_int8.py
        "rooms": bundle.source["rooms"],
    }
    assert "LibriSpeech train-clean-100" in bundle.source["cohort"]  # the background cohort names its voices
    assert "pyroomacoustics" in bundle.source["rooms"]  # the room responses say how they were made
    assert bundle.features == GE2E_RECIPE
    assert bundle.fingerprint == fingerprint_of(NAME, GE2E_WEIGHTS_SHA256, GE2E_RECIPE, 256)
    assert bundle.window_frames == (53, 78, 98, 103, 148)  # the daemon's probes (0.55, 0.8, 1.05 s), windows (1.0, 1.5 s)
    assert bundle.artifacts == {  # coreml/ is there once built
        "onnx": "model.onnx", "coreml": "coreml", "cohort": "cohort.npz", "rooms": "rooms.npz", "onnx_int8": "model.int8.onnx",
        "onnx_stream": "model.stream.onnx",  # embedding/lockstep.py: tests/test_lockstep.py
        "onnx_stream_int8": "model.stream.int8.onnx",
    }
    assert bundle.io == {"input": "feats", "output": "embs"}
    assert bundle.sample_rate == SR and bundle.embedding_dim == 256


def test_bundle_embeds_through_the_onnx_backend(bundle: ModelBundle, speakers: dict[str, list[np.ndarray]]) -> None:
    loaded = load_bundle(bundle.path)
    backend = create_backend(loaded, "onnx", threads=1)
    extractor = FeatureExtractor(loaded.features, SR)
    wave = next(iter(speakers.values()))[0]
    feats = np.stack([extractor.compute(w) for w in windows_of(wave, 3)])
    embs = backend.embed(feats)
    assert embs.shape == (3, 256) and embs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embs, axis=1), 1.0, atol=1e-5)
    assert (embs >= 0).all()  # ReLU before the norm
    # the batch does not change a window's embedding
    single = np.concatenate([backend.embed(feats[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(single, embs, atol=1e-5)
    backend.close()


def test_onnx_matches_torch_on_real_features(bundle: ModelBundle, speakers: dict[str, list[np.ndarray]]) -> None:
    model = load_encoder(bundle.path / "cache" / "pretrained.pt")
    backend = create_backend(bundle, "onnx", threads=1)
    extractor = FeatureExtractor(bundle.features, SR)
    for frames_seconds in (1.5, 1.6, 3.0):
        n = int(frames_seconds * SR)
        feats = np.stack([extractor.compute(utts[1][:n]) for utts in speakers.values()])
        with torch.no_grad():
            ref = model(torch.from_numpy(feats)).numpy()
        got = backend.embed(feats)
        assert np.sum(ref * got, axis=1).min() >= MIN_EXPORT_COSINE
    backend.close()


def test_list_models_reports_the_built_bundle(bundle: ModelBundle, tmp_path: Path) -> None:
    rows = {row["name"]: row for row in list_models()}
    row = rows[NAME]
    assert row["built"] and row["buildable"] and row["fingerprint"] == bundle.fingerprint
    assert row["artifacts"]["onnx"] is True
    empty = {row["name"]: row for row in list_models(tmp_path)}
    assert set(empty) == set(BUILDERS) | set(KNOWN_MODELS)
    assert empty["wespeaker-resnet34"]["get"].startswith("speakerd models fetch wespeaker-resnet34")
    assert empty[NAME]["built"] is False and empty[NAME]["fingerprint"] is None


def test_listing_models_does_not_import_torch() -> None:
    code = "import sys, speakerd.models as m; m.list_models(); sys.exit('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0


# --- build errors ---------------------------------------------------------------------------------


def test_offline_with_empty_cache_names_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(BuildError) as err:
        fetch_wheel(tmp_path / "cache", "resemblyzer==0.1.4", "resemblyzer-0.1.4-")
    message = str(err.value)
    assert "resemblyzer-0.1.4-*.whl" in message
    assert "pip download --no-deps resemblyzer==0.1.4" in message and str(tmp_path / "cache") in message


def _build_dir(bundle: ModelBundle, tmp_path: Path) -> Path:
    """A folder to build the bundle into offline: the wheel from the built bundle's cache, and its
    room responses (model-independent; simulating 32 rooms took 30-60 s of each build here)."""
    out = tmp_path / NAME
    (out / "cache").mkdir(parents=True)
    wheel = next((bundle.path / "cache").glob("*.whl"))
    (out / "cache" / wheel.name).symlink_to(wheel)
    shutil.copyfile(bundle.path / "rooms.npz", out / "rooms.npz")
    return out


def test_weights_that_differ_from_the_manifest_are_refused(bundle: ModelBundle, tmp_path: Path) -> None:
    out = _build_dir(bundle, tmp_path)
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    manifest["source"]["weights_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match="sha256"):
        build_model(NAME, out, progress=False)
    assert not (out / "model.onnx").exists()


def test_build_without_coremltools_skips_coreml_with_a_warning(
    bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from speakerd.models import build as build_module

    out = _build_dir(bundle, tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        build_module.importlib.util, "find_spec", lambda name, *a: None if name == "coremltools" else real_find_spec(name, *a)
    )
    with caplog.at_level(logging.WARNING, logger="speakerd.models.build"):
        built = build_model(NAME, out, progress=False, coreml=True)
    assert "coremltools is not installed" in caplog.text and "macOS will use ONNX Runtime" in caplog.text
    assert built.artifact("onnx") == out / "model.onnx" and built.artifact("coreml") is None
    assert built.window_frames == (53, 78, 98, 103, 148)
    assert (out / "model.onnx").is_file() and not (out / "coreml").exists()


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS builds the CoreML packages by default")
def test_build_converts_coreml_packages_only_on_request(
    bundle: ModelBundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Linux cannot run CoreML: converting its packages cost the set-up 2m21s of 5 minutes (issue 18).
    test_coreml_convert.py builds them with coreml=True, so they stay proven on Linux."""
    out = _build_dir(bundle, tmp_path)
    with caplog.at_level(logging.INFO, logger="speakerd.models.build"):
        built = build_model(NAME, out, progress=False)
    assert built.artifact("onnx") == out / "model.onnx"
    assert built.artifact("coreml") is None and not (out / "coreml").exists()
    assert "models build --coreml" in caplog.text


def test_unknown_model_name_is_an_error() -> None:
    with pytest.raises(BuildError, match="ge2e-resemblyzer"):
        build_model("no-such-model", progress=False)


# --- features -------------------------------------------------------------------------------------


def test_knf_recipe_reproduces_resemblyzer_mel_on_real_speech(speakers: dict[str, list[np.ndarray]]) -> None:
    """On librosa's own frame grid (its 200 zero samples of centre padding added by hand) the knf recipe
    with the window gain step gives the same mel power as Resemblyzer's normalised librosa mel."""
    raw = FeatureExtractor(replace(GE2E_RECIPE, gain_normalize_dbfs=None), SR)
    for utts in speakers.values():
        for window in windows_of(utts[2], 2):
            quiet = window * np.float32(0.05)  # below -30 dBFS, so the gain step matters
            for w in (window, quiet):
                ours = finish_window(GE2E_RECIPE, raw.compute(np.pad(w, 200)), w)
                ref = reference_mel(normalize_volume(w))
                assert ours.shape == ref.shape == (151, 40)
                assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


def test_knf_windows_embed_like_resemblyzer_windows(bundle: ModelBundle, speakers: dict[str, list[np.ndarray]]) -> None:
    """As the pipeline computes them (snip_edges, frames 2.5 ms off librosa's grid) the embeddings agree
    with those of Resemblyzer's features to the level a 2.5 ms shift of the audio itself causes."""
    backend = create_backend(bundle, "onnx", threads=1)
    extractor = FeatureExtractor(bundle.features, SR)
    windows = [w for utts in speakers.values() for w in windows_of(utts[3], 4)]
    ours = backend.embed(np.stack([extractor.compute(w) for w in windows]))
    ref = backend.embed(np.stack([reference_mel(normalize_volume(w)) for w in windows]))
    cos = np.sum(ours * ref, axis=1)
    assert cos.mean() >= MIN_MEAN_RECIPE_COSINE, cos
    backend.close()


# --- speaker separation ---------------------------------------------------------------------------


def test_same_speaker_windows_score_higher(bundle: ModelBundle, speakers: dict[str, list[np.ndarray]]) -> None:
    backend = create_backend(bundle, "onnx", threads=1)
    extractor = FeatureExtractor(bundle.features, SR)
    labels, utt_ids, feats = [], [], []
    for spk, utts in speakers.items():
        for u, wave in enumerate(utts):
            for w in windows_of(wave, 2):
                labels.append(spk)
                utt_ids.append(f"{spk}/{u}")
                feats.append(extractor.compute(w))
    embs = backend.embed(np.stack(feats))
    backend.close()
    spk_arr, utt_arr = np.array(labels), np.array(utt_ids)
    i, j = np.triu_indices(len(embs), k=1)
    keep = utt_arr[i] != utt_arr[j]
    i, j = i[keep], j[keep]
    target = spk_arr[i] == spk_arr[j]
    scores = np.sum(embs[i] * embs[j], axis=1)
    assert scores[target].mean() - scores[~target].mean() > MIN_SCORE_GAP
    assert eer(scores, target) < MAX_SMALL_EER
