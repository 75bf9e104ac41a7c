"""Converting WeSpeaker checkpoints into bundles: manifest, ONNX contract, ONNX == PyTorch on real
fbank for every window length, sherpa-onnx compatibility, the CoreML hook and the CLI entry."""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from speakerd.bundle import fingerprint_of, load_bundle, sha256_file  # noqa: E402
from speakerd.embedding.onnx_backend import OnnxBackend  # noqa: E402
from speakerd.features import FeatureExtractor  # noqa: E402
from speakerd.models.wespeaker import convert as conv  # noqa: E402
from speakerd.models.wespeaker.checkpoint import (  # noqa: E402
    load_checkpoint,
    wespeaker_recipe,
    write_pyannote_bin,
    write_wespeaker_dir,
)
from speakerd.models.wespeaker.resnet import resnet34  # noqa: E402

SAMPLE_RATE = 16000
MIN_COSINE = 0.99999
EXPECTED_FRAMES = (98, 148, 198, 298)
SHERPA_META = {"framework", "language", "url", "comment", "sample_rate", "output_dim", "normalize_samples"}


def random_model(seed: int, eps: float = 1e-7) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = resnet34(pooling_eps=eps)
    with torch.no_grad():  # non-trivial BN statistics so they are exercised by the export
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                t.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def wespeaker_bundle(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("convert")
    ckpt = write_wespeaker_dir(random_model(0), root / "voxceleb_resnet34_LM")
    return ckpt, conv.convert_wespeaker(ckpt, root / "bundle", progress=False, coreml=False)


@pytest.fixture(scope="module")
def real_windows(librispeech: Path) -> dict[int, np.ndarray]:
    """Two windows of real speech per window length, through the WeSpeaker recipe: frames -> (2, T, 80)."""
    clips = sorted((librispeech / "test-other").rglob("*.flac"))[:2]
    waves = [sf.read(c, dtype="float32")[0] for c in clips]
    extractor = FeatureExtractor(wespeaker_recipe(), SAMPLE_RATE)
    out = {}
    for seconds in conv.DEFAULT_WINDOW_SECONDS:
        n = int(seconds * SAMPLE_RATE)
        out_w = [extractor.compute(w[SAMPLE_RATE : SAMPLE_RATE + n]) for w in waves]
        out[out_w[0].shape[0]] = np.stack(out_w)
    return out


def test_manifest_records_recipe_windows_source_and_fingerprint(wespeaker_bundle) -> None:
    ckpt, bundle = wespeaker_bundle
    loaded = load_bundle(bundle.path)
    assert loaded == bundle
    assert loaded.name == "wespeaker-resnet34"
    assert loaded.sample_rate == 16000 and loaded.embedding_dim == 256
    assert loaded.window_frames == EXPECTED_FRAMES
    assert loaded.features == wespeaker_recipe()
    assert loaded.io == {"input": "feats", "output": "embs"}
    sha = sha256_file(ckpt / "avg_model.pt")
    assert loaded.source["checkpoint"] == "voxceleb_resnet34_LM"
    assert loaded.source["weights_file"] == "avg_model.pt"
    assert loaded.source["sha256"] == sha
    assert loaded.source["layout"] == "wespeaker"
    assert loaded.source["pooling_eps"] == 1e-7
    assert loaded.source["onnx_verify_min_cosine"] >= MIN_COSINE
    assert loaded.fingerprint == fingerprint_of("wespeaker-resnet34", sha, wespeaker_recipe(), 256)
    assert loaded.artifact("onnx") == bundle.path / "wespeaker_resnet34.onnx"
    assert loaded.artifact("coreml") is None


def test_onnx_contract_and_sherpa_metadata(wespeaker_bundle) -> None:
    _, bundle = wespeaker_bundle
    proto = onnx.load(str(bundle.require_artifact("onnx")))
    opset = {o.domain: o.version for o in proto.opset_import}[""]
    assert opset >= 14
    (inp,) = proto.graph.input
    (out,) = proto.graph.output

    def dims(value: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert (inp.name, dims(inp)) == ("feats", ["B", "T", 80])
    assert (out.name, dims(out)) == ("embs", ["B", 256])
    meta = {p.key: p.value for p in proto.metadata_props}
    assert set(meta) == SHERPA_META
    assert meta["framework"] == "wespeaker"
    assert meta["sample_rate"] == "16000" and meta["output_dim"] == "256" and meta["normalize_samples"] == "0"


def test_onnx_matches_pytorch_on_real_fbank_for_every_window(wespeaker_bundle, real_windows) -> None:
    """Issue 3 part 4c: cosine >= 0.99999 per window length, through the daemon's ONNX backend."""
    ckpt, bundle = wespeaker_bundle
    model = load_checkpoint(ckpt).model
    backend = OnnxBackend(bundle, threads=1)
    try:
        assert sorted(real_windows) == list(EXPECTED_FRAMES)
        for frames, feats in real_windows.items():
            with torch.no_grad():
                ref = model(torch.from_numpy(feats)).numpy()
            ref /= np.linalg.norm(ref, axis=1, keepdims=True)
            got = backend.embed(feats)
            assert got.shape == (2, 256)
            cos = np.sum(ref * got, axis=1)
            assert cos.min() >= MIN_COSINE, f"{frames} frames: cosine {cos.min():.7f}"
    finally:
        backend.close()


def test_same_file_loads_in_sherpa_onnx(wespeaker_bundle, librispeech: Path) -> None:
    sherpa_onnx = pytest.importorskip("sherpa_onnx")
    _, bundle = wespeaker_bundle
    config = sherpa_onnx.SpeakerEmbeddingExtractorConfig(model=str(bundle.require_artifact("onnx")), num_threads=1)
    extractor = sherpa_onnx.SpeakerEmbeddingExtractor(config)
    assert extractor.dim == 256
    wave = sf.read(sorted((librispeech / "test-other").rglob("*.flac"))[0], dtype="float32")[0][: 2 * SAMPLE_RATE]
    stream = extractor.create_stream()
    stream.accept_waveform(SAMPLE_RATE, wave)
    stream.input_finished()
    assert extractor.is_ready(stream)
    emb = np.asarray(extractor.compute(stream))
    assert emb.shape == (256,) and np.all(np.isfinite(emb)) and np.linalg.norm(emb) > 0


def test_pyannote_checkpoint_bundle_records_no_epsilon(tmp_path: Path) -> None:
    ckpt = write_pyannote_bin(random_model(1, eps=0.0), tmp_path / "pytorch_model.bin")
    bundle = conv.convert_wespeaker(ckpt, tmp_path / "bundle", window_seconds=(1.5,), progress=False, coreml=False)
    assert bundle.window_frames == (148,)
    assert bundle.source["layout"] == "pyannote"
    assert bundle.source["checkpoint"] == "pytorch_model.bin"
    assert bundle.source["pooling_eps"] == 0.0
    assert "eps=0" in bundle.description
    assert bundle.fingerprint == fingerprint_of("wespeaker-resnet34", sha256_file(ckpt), wespeaker_recipe(), 256)


def test_coreml_hook_is_called_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    calls = []

    def convert_coreml(model: torch.nn.Module, out_dir: Path, window_frames: tuple[int, ...]) -> Path:
        calls.append((type(model).__name__, out_dir, window_frames))
        package = out_dir / "wespeaker_resnet34.mlpackage"
        package.mkdir()
        return package

    hook = types.ModuleType(conv.COREML_HOOK)
    hook.convert_coreml = convert_coreml  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, conv.COREML_HOOK, hook)
    ckpt = write_wespeaker_dir(random_model(2), tmp_path / "ws")
    bundle = conv.convert_wespeaker(ckpt, tmp_path / "bundle", window_seconds=(1.0, 2.0), progress=True)
    assert calls == [("ResNetSpeaker", tmp_path / "bundle", (98, 198))]
    assert bundle.artifacts == {
        "onnx": "wespeaker_resnet34.onnx",
        "onnx_trunk": "wespeaker_resnet34.trunk.onnx",  # the shared trunk's split (embedding/trunk.py)
        "head": "wespeaker_resnet34.head.onnx",
        "coreml": "wespeaker_resnet34.mlpackage",
    }
    assert load_bundle(bundle.path).artifact("coreml") == tmp_path / "bundle" / "wespeaker_resnet34.mlpackage"
    assert "convert wespeaker: 100%" in capfd.readouterr().err  # the tqdm bar reached the end


def test_cli_entry_point(tmp_path: Path) -> None:
    ckpt = write_pyannote_bin(random_model(3, eps=0.0), tmp_path / "pytorch_model.bin")
    parser = argparse.ArgumentParser()
    conv.add_convert_arguments(parser)
    args = parser.parse_args(
        ["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--windows", "1.5", "--no-coreml", "--no-progress"]
    )
    assert conv.main_convert(args) == 0
    assert load_bundle(tmp_path / "out").window_frames == (148,)
