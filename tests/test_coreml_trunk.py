"""The shared ResNet34 trunk on CoreML, proven on Linux: the converter writes a chunk package (one
enumerated shape per pass length, a masked padding column) and a head package; both pass the static
check; and the CoreML shared-trunk backend, with its packages run by the FP16 numpy executor in
place of CoreML, agrees on real speech with the same shared trunk in PyTorch and on ONNX Runtime."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("coremltools")

from speakerd.bundle import ModelBundle, load_bundle  # noqa: E402
from speakerd.coreml.check import check_mlpackage  # noqa: E402
from speakerd.coreml.layout import HEAD_ARTIFACT, TRUNK_ARTIFACT  # noqa: E402
from speakerd.coreml.mil_exec import MilExecutor, load_program  # noqa: E402
from speakerd.coreml.trunk import MaskedChunkTrunk  # noqa: E402
from speakerd.embedding.backend import BackendError, create_backend  # noqa: E402
from speakerd.embedding.coreml_backend import COMPUTE_UNITS, shared_coreml_backend  # noqa: E402
from speakerd.embedding.onnx_backend import OnnxBackend  # noqa: E402
from speakerd.embedding.trunk import (  # noqa: E402
    CHUNK_FRAMES,
    MAX_PASS_FRAMES,
    Head,
    SharedTrunk,
    SharedTrunkBackend,
    pad_chunk,
)
from speakerd.models.wespeaker import convert as conv  # noqa: E402
from speakerd.models.wespeaker.checkpoint import write_wespeaker_dir  # noqa: E402
from speakerd.windows import Window  # noqa: E402
from test_batching import real_windows  # noqa: E402
from test_wespeaker_convert import random_model  # noqa: E402

WINDOW_SECONDS = (0.6, 0.8, 1.0, 1.5)
"""The daemon's default probes and windows: the exact per-window package must serve them all."""
FP16_MAX = 65504.0
MIN_MEDIAN_COSINE = 0.999
MIN_WORST_COSINE = 0.99
LIVE_WINDOWS = 16
"""Windows sent one by one (live); each pass costs the executor about 1 s."""
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_model(0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, model: torch.nn.Module) -> ModelBundle:
    root = tmp_path_factory.mktemp("coreml-trunk")
    ckpt = write_wespeaker_dir(model, root / "voxceleb_resnet34_LM")
    built = conv.convert_wespeaker(ckpt, root / "bundle", window_seconds=WINDOW_SECONDS, progress=False, coreml=True)
    return load_bundle(built.path)


@pytest.fixture(scope="module")
def windows(bundle: ModelBundle, librispeech: Path) -> list[Window]:
    return [w for w in real_windows(librispeech, bundle.features) if isinstance(w, Window)]


class ExecModel:
    """A compiled model whose ``predict`` runs the saved program with the FP16 numpy executor."""

    def __init__(self, package: Path) -> None:
        self.executor = MilExecutor(load_program(package))
        self.inputs: list[tuple[int, ...]] = []
        self.peak_fp16 = 0.0
        self.nonfinite_ops: list[str] = []

    def predict(self, data: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        assert isinstance(data, list), "the batch API takes a list of dicts"
        out = []
        for d in data:
            self.inputs.extend(v.shape for v in d.values())
            out.append(self.executor.run(d))
            self.peak_fp16 = max(self.peak_fp16, self.executor.stats.peak_fp16)
            self.nonfinite_ops.extend(self.executor.stats.nonfinite_ops)
        return out


class ExecCoreML:
    """The slice of coremltools the backend calls, with the executor in place of CoreML."""

    def __init__(self) -> None:
        self.loaded: dict[str, ExecModel] = {}
        self.ComputeUnit = SimpleNamespace(**{name: name for name in COMPUTE_UNITS})
        self.models = SimpleNamespace(utils=SimpleNamespace(compile_model=self._compile), CompiledMLModel=self._load)

    def _compile(self, package: str, destination: str) -> str:
        Path(destination).mkdir(parents=True)
        (Path(destination) / "package").write_text(package)
        return destination

    def _load(self, path: str, compute_units: Any = None) -> ExecModel:
        package = (Path(path) / "package").read_text()
        self.loaded[Path(package).name] = ExecModel(Path(package))
        return self.loaded[Path(package).name]


def torch_shared(bundle: ModelBundle, model: torch.nn.Module) -> SharedTrunk:
    """The same shared trunk with PyTorch (FP32) computing the trunk passes and ``seg_1``."""

    def trunk(feats: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.frame_level(torch.from_numpy(feats[None])).flatten(1, 2)[0].numpy()

    def linear(stats: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.seg_1(torch.from_numpy(stats)).numpy()

    head = Head(linear, model.seg_1.in_features, model.pooling_eps)
    return SharedTrunk(OnnxBackend(bundle), trunk, head, bundle=bundle, label="torch")


def embed_all(backend: Any, windows: list[Window], batch: int) -> np.ndarray:
    return np.concatenate([backend.embed_windows(windows[i : i + batch]) for i in range(0, len(windows), batch)])


def test_conversion_writes_chunk_and_head_packages_that_pass_the_static_check(bundle: ModelBundle) -> None:
    trunk, head = bundle.artifact(TRUNK_ARTIFACT), bundle.artifact(HEAD_ARTIFACT)
    assert trunk is not None and trunk.name == "trunk.mlpackage" and bundle.artifact("coreml") is not None
    assert head is not None and head.name == "head.mlpackage"
    report = check_mlpackage(trunk, input_name="feats", output_name="frames", feat_dim=81, window_frames=CHUNK_FRAMES)
    assert report.ok, report.problems
    assert report.flexibility == "enumerated" and report.input_shapes == [(1, f, 81) for f in CHUNK_FRAMES]
    assert max(CHUNK_FRAMES) == MAX_PASS_FRAMES
    # BN folded into 36 convs; the mask: 1 on the input, 1 after the stem, 2 per block (16 blocks);
    # slices: features, mask, and the mask at each of the 3 stride-2 stages
    assert report.op_counts["conv"] == 36 and report.op_counts["mul"] == 34 and report.op_counts["slice_by_index"] == 5
    assert set(report.op_counts) <= {"conv", "relu", "add", "mul", "slice_by_index", "transpose", "expand_dims", "reshape"}
    report = check_mlpackage(head, input_name="stats", output_name="embs", feat_dim=5120, embedding_dim=256, vector_input=True)
    assert report.ok, report.problems
    assert report.input_shapes == [(1, 5120)] and dict(report.op_counts) == {"linear": 1}


def test_padding_is_masked_away_exactly(model: torch.nn.Module) -> None:
    """A pass padded to a chunk length gives the unpadded pass's output frames (FP32)."""
    feats = np.random.default_rng(3).standard_normal((91, 80)).astype(np.float32)
    with torch.no_grad():
        ref = model.frame_level(torch.from_numpy(feats[None])).flatten(1, 2)[0].numpy()
        got = MaskedChunkTrunk(model)(torch.from_numpy(pad_chunk(feats, CHUNK_FRAMES)))[0].numpy()
    assert pad_chunk(feats, CHUNK_FRAMES).shape == (1, 112, 81) and got.shape[1] == 14 == ref.shape[1] + 2
    np.testing.assert_allclose(got[:, :12], ref, atol=2e-4 * np.abs(ref).max())
    with pytest.raises(BackendError, match="exceeds the longest chunk"):
        pad_chunk(np.zeros((MAX_PASS_FRAMES + 1, 80), dtype=np.float32), CHUNK_FRAMES)


def test_coreml_shared_trunk_agrees_with_torch_and_onnx_on_real_speech(
    bundle: ModelBundle, model: torch.nn.Module, windows: list[Window], tmp_path: Path
) -> None:
    """The backend's code path with each saved program run in FP16 by the executor: a file's backlog
    (batches of 32) and live windows one by one, against the PyTorch (FP32) and ONNX shared trunks."""
    ct = ExecCoreML()
    backend = shared_coreml_backend(bundle, coremltools_module=ct, cache_dir=tmp_path / "cache")
    assert backend.name == "coreml, shared trunk"
    trunk_calls = ct.loaded["trunk.mlpackage"].inputs
    assert sorted(s[1] for s in trunk_calls) == list(CHUNK_FRAMES)  # warmed up once per enumerated shape
    del trunk_calls[:]
    passes: set[int] = set()
    for batch, items in ((32, windows), (1, windows[:LIVE_WINDOWS])):
        backend.reset()  # the same stream again from its start
        got = embed_all(backend, items, batch)
        passes |= {s[1] for s in trunk_calls}
        assert backend.counters["exact_windows"] == 0
        for name, reference in (("torch", torch_shared(bundle, model)), ("onnx", SharedTrunkBackend(bundle))):
            ref = embed_all(reference, items, batch)
            cos = np.sum(got * ref, axis=1)
            log.info("CoreML (FP16 executor) vs %s shared trunk, batch %d, %d windows: cosine worst %.7f, median %.7f "
                     "(1 - cos: %.2e, %.2e)", name, batch, len(items), cos.min(), np.median(cos), 1 - cos.min(),
                     1 - np.median(cos))  # fmt: skip
            assert np.median(cos) >= MIN_MEDIAN_COSINE and cos.min() >= MIN_WORST_COSINE, (name, batch, cos.min())
            reference.close()
    backend.close()
    trunk_model = ct.loaded["trunk.mlpackage"]
    log.info("pass lengths used: %s; largest FP16 value in the trunk %.1f", sorted(passes), trunk_model.peak_fp16)
    assert passes <= set(CHUNK_FRAMES) and len(passes) >= 2
    assert trunk_model.nonfinite_ops == [] and trunk_model.peak_fp16 < FP16_MAX / 16


def test_the_setting_and_bundle_choose_the_coreml_trunk(bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from speakerd.embedding import coreml_backend

    made: list[str] = []

    def fake_shared(bundle: ModelBundle, **kwargs: Any) -> str:
        made.append("shared")
        return "shared"

    class FakeBackend:
        def __init__(self, bundle: ModelBundle, **kwargs: Any) -> None:
            made.append("per_window")

    monkeypatch.setattr(coreml_backend, "shared_coreml_backend", fake_shared)
    monkeypatch.setattr(coreml_backend, "CoreMLBackend", FakeBackend)
    assert create_backend(bundle, "coreml", trunk="shared") == "shared"
    assert isinstance(create_backend(bundle, "coreml", trunk="per_window"), FakeBackend)
    assert made == ["shared", "per_window"]


def test_a_chunk_package_too_short_for_a_pass_is_refused(bundle: ModelBundle, tmp_path: Path) -> None:
    import dataclasses

    from speakerd.coreml.trunk import convert_trunk_coreml

    short, head = convert_trunk_coreml(random_model(0), tmp_path, chunk_frames=(112,))
    artifacts = {**bundle.artifacts, TRUNK_ARTIFACT: str(short), HEAD_ARTIFACT: str(head)}
    with pytest.raises(BackendError, match=f"passes up to 112 frames, a pass takes up to {MAX_PASS_FRAMES}"):
        shared_coreml_backend(dataclasses.replace(bundle, artifacts=artifacts), coremltools_module=ExecCoreML(), cache_dir=tmp_path / "c")


@pytest.mark.skipif(sys.platform != "darwin", reason="CoreML compile and predict need macOS")
@pytest.mark.parametrize("units", ["CPU_ONLY", "ALL"])
def test_real_coreml_shared_trunk_matches_torch(
    bundle: ModelBundle, model: torch.nn.Module, windows: list[Window], units: str, tmp_path: Path
) -> None:  # pragma: no cover - macOS
    for batch, items in ((32, windows), (1, windows[:LIVE_WINDOWS])):
        backend = create_backend(bundle, "coreml", coreml_compute_units=units, trunk="shared")
        assert backend.name == "coreml, shared trunk"
        got = embed_all(backend, items, batch)
        cos = np.sum(got * embed_all(torch_shared(bundle, model), items, batch), axis=1)
        assert np.median(cos) >= MIN_MEDIAN_COSINE and cos.min() >= MIN_WORST_COSINE, (units, batch, cos.min())
        backend.close()
