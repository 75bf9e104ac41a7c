"""CoreML backend: everything up to the macOS-only calls, with a stand-in coremltools injected
(both layouts: one enumerated package, and a directory of one fixed-shape package per window
length); the real compile/predict tests run only on macOS."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("coremltools")

from torch import nn  # noqa: E402

from speakerd.bundle import FeatureRecipe, ModelBundle  # noqa: E402
from speakerd.coreml.convert import convert_to_mlpackage  # noqa: E402
from speakerd.embedding.backend import BackendError, create_backend, window_frame_counts  # noqa: E402
from speakerd.embedding.coreml_backend import (  # noqa: E402
    COMPUTE_UNITS,
    CoreMLBackend,
    package_digest,
    parse_compute_units,
)
from speakerd.errors import ConfigError  # noqa: E402

WINDOWS = (98, 148)
EMBED_DIM = 16
BINS = 80


class PoolNet(nn.Module):
    """Tiny conv + TSTP + linear: enough for a real package with enumerated shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.seg_1 = nn.Linear(2 * 4 * (BINS // 2), EMBED_DIM)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(feats.permute(0, 2, 1).unsqueeze(1)))
        stats = torch.cat((x.mean(dim=-1).flatten(1), torch.sqrt(torch.var(x, dim=-1) + 1e-7).flatten(1)), dim=1)
        return self.seg_1(stats)


class FakeCompiledModel:
    """Stands in for coremltools.models.CompiledMLModel; embeddings are a fixed function of the input."""

    instances: list[FakeCompiledModel] = []

    def __init__(self, path: str, compute_units: Any = None) -> None:
        assert Path(path).is_dir(), "the backend must load a compiled model that exists"
        self.path = path
        self.compute_units = compute_units
        self.calls: list[list[dict[str, np.ndarray]]] = []
        FakeCompiledModel.instances.append(self)

    def predict(self, data: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        assert isinstance(data, list), "the batch API takes a list of dicts"
        self.calls.append(data)
        return [{"embs": fake_embedding(d["feats"])} for d in data]


def fake_embedding(feats: np.ndarray) -> np.ndarray:
    base = np.arange(1, EMBED_DIM + 1, dtype=np.float32)
    return (base * (1.0 + float(feats.sum()))).reshape(1, EMBED_DIM)


class FakeCoreML:
    """The slice of coremltools the backend calls on macOS, recording the compiles."""

    def __init__(self) -> None:
        self.compiled: list[tuple[str, str]] = []
        self.ComputeUnit = SimpleNamespace(**{name: f"unit:{name}" for name in COMPUTE_UNITS})
        self.models = SimpleNamespace(utils=SimpleNamespace(compile_model=self._compile), CompiledMLModel=FakeCompiledModel)

    def _compile(self, package: str, destination: str) -> str:
        assert Path(package).suffix == ".mlpackage"
        self.compiled.append((package, destination))
        Path(destination).mkdir(parents=True)
        (Path(destination) / "model.mil").write_text("compiled")
        return destination


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = PoolNet().eval()
    out = tmp_path_factory.mktemp("pkg")
    path = convert_to_mlpackage(model, out / "model.mlpackage", feat_dim=BINS, window_frames=WINDOWS)
    # an ONNX twin for the fallback test
    torch.onnx.export(
        model, (torch.zeros(1, 98, BINS),), str(out / "model.onnx"), input_names=["feats"], output_names=["embs"],
        dynamic_axes={"feats": {0: "batch", 1: "frames"}, "embs": {0: "batch"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def per_length(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GE2E layout: a directory with one fixed-shape package per window length."""
    torch.manual_seed(0)
    model = PoolNet().eval()
    out = tmp_path_factory.mktemp("per-length") / "coreml"
    for frames in WINDOWS:
        convert_to_mlpackage(model, out / f"frames-{frames}.mlpackage", feat_dim=BINS, window_frames=[frames])
    shutil.copy(package.parent / "model.onnx", out.parent / "model.onnx")
    return out


def make_bundle(root: Path, package: Path, window_frames: tuple[int, ...] = WINDOWS) -> ModelBundle:
    """A bundle around ``package``: an .mlpackage (one-package layout) or a directory of them."""
    root.mkdir(parents=True, exist_ok=True)
    rel = package.name
    if not (root / rel).exists():
        shutil.copytree(package, root / rel)
        shutil.copy(package.parent / "model.onnx", root / "model.onnx")
    return ModelBundle(
        path=root,
        name="tiny",
        sample_rate=16000,
        embedding_dim=EMBED_DIM,
        features=FeatureRecipe(),
        fingerprint="tiny:0",
        artifacts={"onnx": "model.onnx", "coreml": rel},
        window_frames=window_frames,
    )


@pytest.fixture(autouse=True)
def fresh_fake_models() -> None:
    FakeCompiledModel.instances.clear()


def test_compiles_once_across_instances_sharing_a_cache(package: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeCoreML()
    bundle = make_bundle(tmp_path / "bundle", package)
    cache = tmp_path / "cache"
    first = CoreMLBackend(bundle, cache_dir=cache, coremltools_module=fake)
    with caplog.at_level(logging.INFO, logger="speakerd.embedding.coreml_backend"):
        second = CoreMLBackend(bundle, cache_dir=cache, coremltools_module=fake)
    assert len(fake.compiled) == 1
    assert "using cached compiled model" in caplog.text
    compiled = sorted(p.name for p in cache.iterdir())
    assert compiled == [f"model-{package_digest(bundle.path / 'model.mlpackage')[:32]}.mlmodelc"]
    assert FakeCompiledModel.instances[0].path == FakeCompiledModel.instances[1].path == str(cache / compiled[0])
    first.close()
    second.close()


def test_cache_is_keyed_by_content(package: Path, tmp_path: Path) -> None:
    fake = FakeCoreML()
    cache = tmp_path / "cache"
    CoreMLBackend(make_bundle(tmp_path / "a", package), cache_dir=cache, coremltools_module=fake)
    # same bytes at another path: no recompile
    CoreMLBackend(make_bundle(tmp_path / "b", package), cache_dir=cache, coremltools_module=fake)
    assert len(fake.compiled) == 1
    # one weight byte changed: a new key, a new compile
    changed = make_bundle(tmp_path / "c", package)
    weights = changed.path / "model.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    CoreMLBackend(changed, cache_dir=cache, coremltools_module=fake)
    assert len(fake.compiled) == 2
    assert len([p for p in cache.iterdir() if p.suffix == ".mlmodelc"]) == 2
    assert not [p for p in cache.iterdir() if p.name.startswith(".compile-")]  # staging cleaned up


def test_warm_up_predicts_once_per_enumerated_shape(package: Path, tmp_path: Path) -> None:
    backend = CoreMLBackend(make_bundle(tmp_path / "b", package), cache_dir=tmp_path / "c", coremltools_module=FakeCoreML())
    (model,) = FakeCompiledModel.instances
    assert [[d["feats"].shape for d in call] for call in model.calls] == [[(1, 98, BINS)], [(1, 148, BINS)]]
    assert backend.window_frames == WINDOWS


def test_embed_uses_the_batch_api_one_dict_per_window(package: Path, tmp_path: Path) -> None:
    backend = CoreMLBackend(make_bundle(tmp_path / "b", package), cache_dir=tmp_path / "c", coremltools_module=FakeCoreML())
    (model,) = FakeCompiledModel.instances
    model.calls.clear()
    feats = np.random.default_rng(0).standard_normal((3, 148, BINS)).astype(np.float32)
    out = backend.embed(feats)
    assert len(model.calls) == 1
    (call,) = model.calls
    assert len(call) == 3
    for i, window in enumerate(call):
        assert window["feats"].shape == (1, 148, BINS) and window["feats"].dtype == np.float32
        np.testing.assert_array_equal(window["feats"][0], feats[i])
    assert out.shape == (3, EMBED_DIM) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    expected = np.arange(1, EMBED_DIM + 1) / np.linalg.norm(np.arange(1, EMBED_DIM + 1))
    np.testing.assert_allclose(np.abs(out[0]), expected, rtol=1e-5)


def test_embed_rejects_a_window_length_not_enumerated(package: Path, tmp_path: Path) -> None:
    backend = CoreMLBackend(make_bundle(tmp_path / "b", package), cache_dir=tmp_path / "c", coremltools_module=FakeCoreML())
    with pytest.raises(BackendError, match=r"120 frames: the CoreML model serves only \[98, 148\] frames"):
        backend.embed(np.zeros((2, 120, BINS), dtype=np.float32))
    with pytest.raises(BackendError, match="40 bins"):
        backend.embed(np.zeros((1, 98, 40), dtype=np.float32))
    with pytest.raises(BackendError, match="batch, frames, bins"):
        backend.embed(np.zeros((98, BINS), dtype=np.float32))


def test_bundle_windows_must_be_enumerated_by_the_package(package: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", package, window_frames=(98, 198))
    fake = FakeCoreML()
    with pytest.raises(BackendError, match=r"windows of \[198\] frames are not served .* serves \[98, 148\] frames"):
        CoreMLBackend(bundle, cache_dir=tmp_path / "c", coremltools_module=fake)
    assert fake.compiled == []  # refused before any compile


# --- the per-length layout (GE2E) ----------------------------------------------------------------


def compiled_name(package: Path) -> str:
    return f"{package.stem}-{package_digest(package)[:32]}.mlmodelc"


def test_per_length_compiles_each_package_once_and_caches(per_length: Path, tmp_path: Path) -> None:
    fake = FakeCoreML()
    bundle = make_bundle(tmp_path / "b", per_length)
    cache = tmp_path / "cache"
    first = CoreMLBackend(bundle, cache_dir=cache, coremltools_module=fake)
    second = CoreMLBackend(bundle, cache_dir=cache, coremltools_module=fake)
    assert sorted(Path(src).name for src, _ in fake.compiled) == ["frames-148.mlpackage", "frames-98.mlpackage"]
    expected = sorted(compiled_name(bundle.path / "coreml" / f"frames-{f}.mlpackage") for f in WINDOWS)
    assert sorted(p.name for p in cache.iterdir()) == expected
    assert first.window_frames == second.window_frames == WINDOWS
    assert len(FakeCompiledModel.instances) == 4  # two packages, two backends
    first.close()
    second.close()


def test_per_length_warms_up_and_routes_each_length_to_its_package(per_length: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", per_length)
    backend = CoreMLBackend(bundle, cache_dir=tmp_path / "c", coremltools_module=FakeCoreML())
    by_package = {Path(m.path).name.split("-")[1]: m for m in FakeCompiledModel.instances}
    assert sorted(by_package) == ["148", "98"]
    # warm-up: one window of its own length through each package
    for frames in WINDOWS:
        assert [[d["feats"].shape for d in call] for call in by_package[str(frames)].calls] == [[(1, frames, BINS)]]
        by_package[str(frames)].calls.clear()
    feats_98 = np.full((2, 98, BINS), 0.01, dtype=np.float32)
    feats_148 = np.full((3, 148, BINS), 0.02, dtype=np.float32)
    assert backend.embed(feats_148).shape == (3, EMBED_DIM)
    assert backend.embed(feats_98).shape == (2, EMBED_DIM)
    assert [len(c) for c in by_package["148"].calls] == [3]
    assert [len(c) for c in by_package["98"].calls] == [2]
    assert all(d["feats"].shape == (1, 148, BINS) for d in by_package["148"].calls[0])
    assert {f: p.name for f, p in backend.packages.items()} == {98: "frames-98.mlpackage", 148: "frames-148.mlpackage"}
    with pytest.raises(BackendError, match=r"window of 198 frames: the CoreML model serves only \[98, 148\] frames"):
        backend.embed(np.zeros((1, 198, BINS), dtype=np.float32))
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.embed(feats_98)


def test_daemon_windows_select_the_packages_to_load(per_length: Path, tmp_path: Path) -> None:
    fake = FakeCoreML()
    bundle = make_bundle(tmp_path / "b", per_length)
    backend = CoreMLBackend(bundle, cache_dir=tmp_path / "c", coremltools_module=fake, window_frames=[148])
    assert [Path(src).name for src, _ in fake.compiled] == ["frames-148.mlpackage"]
    assert backend.window_frames == (148,)
    with pytest.raises(BackendError, match=r"serves only \[148\] frames"):
        backend.embed(np.zeros((1, 98, BINS), dtype=np.float32))


def test_daemon_windows_not_served_fail_at_creation(per_length: Path, tmp_path: Path) -> None:
    fake = FakeCoreML()
    bundle = make_bundle(tmp_path / "b", per_length)
    with pytest.raises(BackendError) as err:
        CoreMLBackend(bundle, cache_dir=tmp_path / "c", coremltools_module=fake, window_frames=(98, 198))
    message = str(err.value)
    assert "windows of [198] frames are not served" in message
    assert "coreml serves [98, 148] frames" in message and "speakerd models build tiny" in message
    assert fake.compiled == []


def test_misnamed_per_length_package_is_refused(per_length: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", per_length)
    (bundle.path / "coreml" / "frames-148.mlpackage").rename(bundle.path / "coreml" / "frames-150.mlpackage")
    with pytest.raises(BackendError, match=r"frames-150.mlpackage takes \[148\] frames, not what its name says"):
        CoreMLBackend(bundle, cache_dir=tmp_path / "c", coremltools_module=FakeCoreML())


def test_setup_rebuilds_coreml_packages_that_miss_the_daemon_windows(per_length: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A Mac bundle converted before the daemon's windows changed (probes 0.6 -> 0.55 s): its
    packages lack a length, and ``scripts/setup`` (``ensure_artifacts``) builds it instead of leaving
    macOS on ONNX Runtime."""
    import dataclasses

    from speakerd.models import build

    current = make_bundle(tmp_path / "b", per_length)
    assert build.stale_coreml_frames(current) == []
    older = dataclasses.replace(current, window_frames=(53, *WINDOWS))
    assert build.stale_coreml_frames(older) == [53]
    built: list[str] = []
    monkeypatch.setattr(build, "load_bundle", lambda path: older)
    monkeypatch.setattr(build, "needs_stream", lambda bundle: False)
    monkeypatch.setattr(build, "build_bundle_rooms", lambda bundle: None)
    monkeypatch.setattr(build, "build_model", lambda name, *a, **k: built.append(name))
    monkeypatch.setattr(build, "coreml_by_default", lambda: False)
    build.ensure_artifacts("tiny")
    assert built == []  # off macOS the packages are not rebuilt
    monkeypatch.setattr(build, "coreml_by_default", lambda: True)
    build.ensure_artifacts("tiny")
    assert built == ["tiny"]


def test_window_frame_counts_follow_the_window_settings() -> None:
    from speakerd.models.build import GE2E_RECIPE
    from speakerd.windows import WindowSettings

    assert window_frame_counts(WindowSettings(), GE2E_RECIPE) == (53, 78, 98, 103, 148)  # probes 0.55 / 0.8 / 1.05 s too
    assert window_frame_counts(WindowSettings(), FeatureRecipe()) == (53, 78, 98, 103, 148)
    assert window_frame_counts(WindowSettings(probe_align="off"), GE2E_RECIPE) == (53, 78, 98, 148)
    assert window_frame_counts(WindowSettings(probe_hop_s=0), GE2E_RECIPE) == (98, 148)
    assert window_frame_counts(WindowSettings(length_s=2.0, first_length_s=1.0, probe_hop_s=0), GE2E_RECIPE) == (98, 198)
    assert window_frame_counts(WindowSettings(length_s=1.5, first_length_s=1.5, probe_hop_s=0), GE2E_RECIPE) == (148,)
    # probes cut at the region start: ends 0.5 and 0.75 s, then 0.8 s long, or from the window start before (1.25 s)
    assert window_frame_counts(WindowSettings(probe_start_s=0.5, probe_align="off"), GE2E_RECIPE) == (48, 73, 78, 98, 148)
    assert window_frame_counts(WindowSettings(probe_start_s=0.5), GE2E_RECIPE) == (48, 73, 98, 123, 148)
    # snip_edges false: one frame per 10 ms, rounded
    assert window_frame_counts(WindowSettings(probe_hop_s=0), FeatureRecipe(snip_edges=False)) == (100, 150)


def test_compute_units(package: Path, tmp_path: Path) -> None:
    assert parse_compute_units("cpu_and_ne") == "CPU_AND_NE"
    with pytest.raises(ConfigError, match="coreml_compute_units = 'NPU'.*ALL, CPU_AND_NE, CPU_ONLY, CPU_AND_GPU"):
        parse_compute_units("NPU")
    bundle = make_bundle(tmp_path / "b", package)
    with pytest.raises(ConfigError, match="'GPU_ONLY'"):
        CoreMLBackend(bundle, compute_units="GPU_ONLY", cache_dir=tmp_path / "c", coremltools_module=FakeCoreML())
    backend = CoreMLBackend(bundle, compute_units="CPU_AND_NE", cache_dir=tmp_path / "c", coremltools_module=FakeCoreML())
    assert backend.compute_units == "CPU_AND_NE"
    assert FakeCompiledModel.instances[-1].compute_units == "unit:CPU_AND_NE"


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal CoreML gives off macOS")
def test_off_macos_coreml_is_refused_clearly(package: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", package)
    with pytest.raises(BackendError, match="CoreML needs macOS"):
        CoreMLBackend(bundle)
    with pytest.raises(BackendError, match="CoreML backend unavailable: CoreML needs macOS"):
        create_backend(bundle, "coreml")


@pytest.mark.skipif(sys.platform == "darwin", reason="simulates a failing CoreML on a Mac from Linux")
def test_auto_falls_back_to_onnx_and_says_why(
    package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`auto` on a Mac whose CoreML cannot compile (here: the real coremltools on Linux posing as macOS)."""
    bundle = make_bundle(tmp_path / "b", package)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "platform", "darwin")
    with caplog.at_level(logging.WARNING, logger="speakerd.embedding.backend"):
        backend = create_backend(bundle, "auto", threads=1)
    monkeypatch.undo()
    assert backend.name == "onnx"
    assert "CoreML unavailable" in caplog.text and "falling back to ONNX Runtime" in caplog.text
    out = backend.embed(np.zeros((2, 98, BINS), dtype=np.float32))
    assert out.shape == (2, EMBED_DIM)
    backend.close()


@pytest.mark.parametrize("length_s, first_length_s", [(1.5, 1.0), (2.0, 1.0), (1.5, 1.5)])
def test_window_frame_counts_are_what_the_windower_emits(length_s: float, first_length_s: float) -> None:
    """Every window SpeechWindower makes, tail windows included, has one of the predicted lengths."""
    from speakerd.audio import SAMPLE_RATE, AudioChunk
    from speakerd.models.build import GE2E_RECIPE
    from speakerd.vad import SpeechAudio, SpeechEnd, SpeechStart
    from speakerd.windows import SpeechWindower, Window, WindowSettings

    settings = WindowSettings(length_s=length_s, first_length_s=first_length_s)
    expected = window_frame_counts(settings, GE2E_RECIPE)
    windower = SpeechWindower(settings, GE2E_RECIPE)
    rng = np.random.default_rng(0)
    seen: set[int] = set()
    start = 0
    for seconds in (0.9, 1.0, 1.33, 1.5, 1.77, 2.34, 4.01, 6.5):
        audio = (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
        events: list = [SpeechStart(start, start / SAMPLE_RATE)]
        for i in range(0, len(audio), 1600):
            chunk = AudioChunk(audio[i : i + 1600], start + i, (start + i) / SAMPLE_RATE)
            events.append(SpeechAudio(chunk, np.ones(len(chunk.samples), bool)))
        events.append(SpeechEnd(start + len(audio), (start + len(audio)) / SAMPLE_RATE))
        for event in events:
            seen |= {w.num_frames for w in windower.process(event) if isinstance(w, Window)}
        start += len(audio) + SAMPLE_RATE
    assert seen == set(expected)


@pytest.mark.skipif(sys.platform == "darwin", reason="simulates a Mac from Linux")
def test_auto_falls_back_when_the_daemon_windows_are_not_served(
    per_length: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`auto` checks the daemon's window lengths at creation: a package set that cannot serve them
    means ONNX, with the reason logged, rather than an error for every window later."""
    bundle = make_bundle(tmp_path / "b", per_length)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "platform", "darwin")
    with caplog.at_level(logging.WARNING, logger="speakerd.embedding.backend"):
        backend = create_backend(bundle, "auto", threads=1, window_frames=(98, 198))
    with pytest.raises(BackendError, match=r"CoreML backend unavailable: windows of \[198\] frames are not served"):
        create_backend(bundle, "coreml", window_frames=(98, 198))
    monkeypatch.undo()
    assert backend.name == "onnx"
    assert "CoreML unavailable (windows of [198] frames are not served" in caplog.text
    assert "falling back to ONNX Runtime" in caplog.text
    assert backend.embed(np.zeros((1, 198, BINS), dtype=np.float32)).shape == (1, EMBED_DIM)
    backend.close()
    assert not (tmp_path / "home").exists()  # refused before anything was compiled or cached


# --- macOS only: the real CoreML runtime ----------------------------------------------------------

MAC_ONLY = pytest.mark.skipif(sys.platform != "darwin", reason="CoreML compile and predict need macOS")


@MAC_ONLY
@pytest.mark.parametrize("units", ["CPU_ONLY", "ALL"])
def test_real_coreml_matches_torch(package: Path, tmp_path: Path, units: str) -> None:  # pragma: no cover - macOS
    torch.manual_seed(0)
    model = PoolNet().eval()  # same seed and init as the package's model
    bundle = make_bundle(tmp_path / "b", package)
    backend = CoreMLBackend(bundle, compute_units=units, cache_dir=tmp_path / "c")
    feats = np.random.default_rng(1).standard_normal((3, 148, BINS)).astype(np.float32)
    got = backend.embed(feats)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(torch.from_numpy(feats)), dim=1).numpy()
    assert np.sum(ref * got, axis=1).min() >= 0.999


@MAC_ONLY
def test_real_coreml_compiles_once(package: Path, tmp_path: Path) -> None:  # pragma: no cover - macOS
    bundle = make_bundle(tmp_path / "b", package)
    CoreMLBackend(bundle, cache_dir=tmp_path / "c").close()
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    CoreMLBackend(bundle, cache_dir=tmp_path / "c").close()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before and len(before) == 1


@MAC_ONLY
@pytest.mark.parametrize("units", ["CPU_ONLY", "ALL"])
def test_real_coreml_ge2e_bundle_matches_torch(units: str, tmp_path: Path, librispeech: Path) -> None:  # pragma: no cover - macOS
    """The default bundle's per-length packages on the real runtime, each length against torch."""
    from speakerd.bundle import resolve_bundle
    from speakerd.features import FeatureExtractor
    from speakerd.models.ge2e import load_encoder
    from speakerd.windows import WindowSettings

    import soundfile as sf

    bundle = resolve_bundle("ge2e-resemblyzer")
    if bundle.artifact("coreml") is None:
        pytest.skip("the GE2E bundle has no CoreML packages: run `speakerd models build ge2e-resemblyzer`")
    frames = window_frame_counts(WindowSettings(), bundle.features)
    backend = CoreMLBackend(bundle, compute_units=units, cache_dir=tmp_path / "c", window_frames=frames)
    model = load_encoder(bundle.path / "cache" / "pretrained.pt")
    clip = sorted((librispeech / "test-other").glob("*/*.flac"))[0]
    wave, _ = sf.read(str(clip), dtype="float32")
    extractor = FeatureExtractor(bundle.features, 16000)
    for n in frames:
        samples = (n - 1) * 160 + 400
        feats = np.stack([extractor.compute(wave[s : s + samples]) for s in (0, 8000, 16000)]).astype(np.float32)
        got = backend.embed(feats)
        with torch.no_grad():
            ref = model(torch.from_numpy(feats)).numpy()
        assert np.sum(ref * got, axis=1).min() >= 0.999
    backend.close()
