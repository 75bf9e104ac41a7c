"""CoreML packages proven on Linux: the static check (4a) and an FP16 numpy run of the saved program
against PyTorch on real fbank (4b), for a small stand-in net, WeSpeaker ResNet34 and GE2E (one
package per daemon window length, 98 and 148 frames, with the real weights)."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")

from torch import nn  # noqa: E402

from speakerd.bundle import FeatureRecipe, ModelBundle  # noqa: E402
from speakerd.coreml import convert as convert_module  # noqa: E402
from speakerd.coreml.check import CheckError, check_mlpackage  # noqa: E402
from speakerd.coreml.convert import (  # noqa: E402
    STAMP_KEY,
    ConversionError,
    UnrolledLSTMEncoder,
    convert_ge2e_coreml,
    convert_to_mlpackage,
    state_digest,
)
from speakerd.coreml.layout import package_metadata, read_package_set  # noqa: E402
from speakerd.coreml.mil_exec import (  # noqa: E402
    OPS,
    MilError,
    MilExecutor,
    UnsupportedOpError,
    load_program,
)
from speakerd.embedding.backend import window_frame_counts  # noqa: E402
from speakerd.features import FeatureExtractor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GE2E_WEIGHTS = REPO / "models" / "ge2e-resemblyzer" / "cache" / "pretrained.pt"
RESNET_WINDOWS = (98, 148, 198, 298)
GE2E_WINDOWS = (53, 78, 98, 103, 148)  # probes 0.55 / 0.8 / 1.05 s, windows 1.0 / 1.5 s
"""The daemon's default windows (1.0 s first, 1.5 s after) in GE2E frames."""
MIN_COSINE = 0.999
FP16_MAX = 65504.0
SAMPLE_RATE = 16000


class StatsNet(nn.Module):
    """The ResNet's op mix in miniature: conv/BN/ReLU, a strided residual stage, TSTP, linear."""

    def __init__(self, feat_dim: int = 80, channels: int = 8, embed_dim: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.shortcut = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1, stride=2, bias=False), nn.BatchNorm2d(2 * channels))
        self.seg_1 = nn.Linear(2 * 2 * channels * (feat_dim // 2), embed_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.permute(0, 2, 1).unsqueeze(1)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + self.shortcut(x))
        mean = x.mean(dim=-1)
        std = torch.sqrt(torch.var(x, dim=-1, unbiased=True) + 1e-7)
        return self.seg_1(torch.cat((mean.flatten(1), std.flatten(1)), dim=1))


class LstmNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(40, 16, 2, batch_first=True)
        self.linear = nn.Linear(16, 8)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(feats)
        return torch.relu(self.linear(hidden[-1]))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def speech_windows(root: Path, recipe: FeatureRecipe, frames: int, count: int) -> np.ndarray:
    """``count`` windows of real speech, the middle of different test-other clips, features by the recipe."""
    import soundfile as sf

    extractor = FeatureExtractor(recipe, SAMPLE_RATE)
    samples = (frames - 1) * 160 + 400
    out = []
    for clip in sorted((root / "test-other").glob("*/*.flac")):
        if sf.info(str(clip)).frames < samples:
            continue
        wave, sr = sf.read(str(clip), dtype="float32")
        assert sr == SAMPLE_RATE
        start = (len(wave) - samples) // 2
        feats = extractor.compute(wave[start : start + samples])
        assert feats.shape == (frames, recipe.num_mel_bins)
        out.append(feats)
        if len(out) == count:
            break
    assert len(out) == count, f"need {count} LibriSpeech clips of {samples} samples, found {len(out)}"
    return np.stack(out).astype(np.float32)


def calibrate_batchnorm(model: nn.Module, batches: list[np.ndarray]) -> nn.Module:
    """Default-init weights with BN running stats measured on real fbank, so activations have a
    realistic range (random BN stats would leave them nowhere near what trained weights produce)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(torch.from_numpy(batch))
    return model.eval()


def run_executor(program_exec: MilExecutor, feats: np.ndarray) -> np.ndarray:
    return np.concatenate([program_exec.run({"feats": feats[i : i + 1]})["embs"] for i in range(len(feats))])


# --- small stand-in net ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = StatsNet().eval()
    path = convert_to_mlpackage(model, tmp_path_factory.mktemp("small") / "model.mlpackage", feat_dim=80, window_frames=(98, 148))
    return model, path


def test_small_package_passes_the_static_check(small_package: tuple[nn.Module, Path]) -> None:
    _, path = small_package
    report = check_mlpackage(path, feat_dim=80, window_frames=(98, 148), embedding_dim=32)
    assert report.ok, report.problems
    assert report.flexibility == "enumerated"
    assert report.input_shapes == [(1, 98, 80), (1, 148, 80)]
    assert (report.input_dtype, report.output_dtype) == ("FLOAT32", "FLOAT32")
    assert report.output_shape == (1, 32)
    assert report.io_casts == 2
    assert report.op_counts["conv"] == 3 and report.op_counts["linear"] == 1
    assert "batch_norm" not in report.op_counts  # folded into the convs
    # the unbiased factor n/(n-1) is the only shape-derived computation
    assert report.shape_op_counts["shape"] == 1
    assert report.unknown_ops == []


def test_single_window_gives_a_fixed_shape(tmp_path: Path) -> None:
    path = convert_to_mlpackage(StatsNet().eval(), tmp_path / "m.mlpackage", feat_dim=80, window_frames=[148])
    report = check_mlpackage(path, feat_dim=80, window_frames=[148])
    assert report.ok, report.problems
    assert report.flexibility == "fixed"
    assert report.input_shapes == [(1, 148, 80)]
    assert sum(report.shape_op_counts.values()) == 0  # constant-folded away at a fixed shape


def test_check_fails_range_dim_and_fp16_io(tmp_path: Path) -> None:
    traced = torch.jit.trace(StatsNet().eval(), torch.zeros(1, 98, 80))
    mlmodel = ct.convert(
        traced,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.macOS13,
        inputs=[ct.TensorType(name="feats", shape=(1, ct.RangeDim(50, 300, default=98), 80))],  # no dtype: FP16 I/O
        outputs=[ct.TensorType(name="embs")],
    )
    mlmodel.save(str(tmp_path / "bad.mlpackage"))
    report = check_mlpackage(tmp_path / "bad.mlpackage", feat_dim=80)
    assert not report.ok
    assert report.flexibility == "range"
    text = "; ".join(report.problems)
    assert "RangeDim" in text
    assert "input dtype is FLOAT16" in text and "output dtype is FLOAT16" in text
    with pytest.raises(CheckError, match="RangeDim"):
        report.raise_for_problems()


def test_check_names_wrong_io_and_windows(small_package: tuple[nn.Module, Path]) -> None:
    _, path = small_package
    report = check_mlpackage(path, input_name="x", output_name="y", feat_dim=40, window_frames=(98, 198))
    text = "; ".join(report.problems)
    assert "input is named 'feats', expected 'x'" in text
    assert "output is named 'embs', expected 'y'" in text
    assert "expected 40" in text
    assert "enumerates frames [98, 148], expected [98, 198]" in text


def test_check_lists_ops_off_the_allowlist(tmp_path: Path) -> None:
    traced = torch.jit.trace(LstmNet().eval(), torch.zeros(1, 20, 40))
    mlmodel = ct.convert(
        traced,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.macOS13,
        inputs=[ct.TensorType(name="feats", shape=(1, 20, 40), dtype=np.float32)],
        outputs=[ct.TensorType(name="embs", dtype=np.float32)],
    )
    mlmodel.save(str(tmp_path / "lstm.mlpackage"))
    report = check_mlpackage(tmp_path / "lstm.mlpackage", feat_dim=40)
    assert "lstm" in report.unknown_ops
    assert any("RNN layers do not run on the ANE" in p for p in report.problems)
    # and the reference executor refuses the op by name rather than guessing
    with pytest.raises(UnsupportedOpError, match="'lstm'") as info:
        MilExecutor(load_program(tmp_path / "lstm.mlpackage"))
    assert info.value.op_type == "lstm"


def test_small_package_fp16_run_matches_torch(small_package: tuple[nn.Module, Path], librispeech: Path) -> None:
    model, path = small_package
    executor = MilExecutor(load_program(path))
    for frames in (98, 148):
        feats = speech_windows(librispeech, FeatureRecipe(), frames, 3)
        with torch.no_grad():
            ref = model(torch.from_numpy(feats)).numpy()
        got = run_executor(executor, feats)
        assert got.dtype == np.float32 and got.shape == (3, 32)
        assert cosine(ref, got).min() >= MIN_COSINE
        assert executor.stats.nonfinite_ops == []


def test_zero_variance_pooling_stays_finite(small_package: tuple[nn.Module, Path]) -> None:
    """Silence after CMN is all zeros: every channel's variance is 0 and sqrt must give 0, not NaN."""
    model, path = small_package
    executor = MilExecutor(load_program(path))
    out = executor.run({"feats": np.zeros((1, 98, 80), dtype=np.float32)})["embs"]
    with torch.no_grad():
        ref = model(torch.zeros(1, 98, 80)).numpy()
    assert np.all(np.isfinite(out))
    assert executor.stats.nonfinite_ops == []
    assert np.abs(out - ref).max() < 0.05


def test_executor_checks_input_shape(small_package: tuple[nn.Module, Path]) -> None:
    _, path = small_package
    with pytest.raises(MilError, match="shape"):
        MilExecutor(load_program(path)).run({"feats": np.zeros((1, 98, 40), dtype=np.float32)})


def test_blob_reader_rejects_a_corrupt_weights_file(small_package: tuple[nn.Module, Path], tmp_path: Path) -> None:
    _, path = small_package
    copy = tmp_path / "copy.mlpackage"
    shutil.copytree(path, copy)
    weights = copy / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(weights.read_bytes())
    assert struct.unpack_from("<I", data, 64)[0] == 0xDEADBEEF  # first blob_metadata after the header
    struct.pack_into("<I", data, 64, 0)
    weights.write_bytes(bytes(data))
    with pytest.raises(MilError, match="sentinel"):
        load_program(copy)


def test_executor_op_set_is_the_models_op_set() -> None:
    assert sorted(OPS) == sorted(
        [
            "add", "cast", "concat", "conv", "expand_dims", "linear", "mul", "real_div", "reduce_mean",
            "reduce_prod", "relu", "reshape", "shape", "sigmoid", "slice_by_index", "split", "sqrt",
            "square", "squeeze", "stack", "sub", "tanh", "transpose",
        ]
    )  # fmt: skip


# --- WeSpeaker ResNet34 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_package(tmp_path_factory: pytest.TempPathFactory, librispeech: Path) -> tuple[nn.Module, Path]:
    from speakerd.models.wespeaker.coreml import convert_coreml
    from speakerd.models.wespeaker.resnet import resnet34

    torch.manual_seed(0)
    calibration = [speech_windows(librispeech, FeatureRecipe(), frames, 6) for frames in (148, 198)]
    model = calibrate_batchnorm(resnet34(), calibration)
    path = convert_coreml(model, tmp_path_factory.mktemp("resnet34"), RESNET_WINDOWS)
    return model, path


def test_resnet34_package_passes_the_static_check(resnet_package: tuple[nn.Module, Path]) -> None:
    _, path = resnet_package
    assert path.name == "model.mlpackage"
    report = check_mlpackage(path, feat_dim=80, window_frames=RESNET_WINDOWS, embedding_dim=256)
    assert report.ok, report.problems
    assert report.input_shapes == [(1, f, 80) for f in RESNET_WINDOWS]
    assert report.op_counts["conv"] == 36  # 33 3x3 + 3 shortcut 1x1, BN folded
    assert report.op_counts["linear"] == 1
    assert set(report.op_counts) <= {
        "conv", "relu", "add", "reduce_mean", "sub", "square", "mul", "sqrt", "concat", "reshape",
        "linear", "transpose", "expand_dims",
    }  # fmt: skip


@pytest.mark.parametrize("frames", RESNET_WINDOWS)
def test_resnet34_fp16_run_matches_torch(resnet_package: tuple[nn.Module, Path], librispeech: Path, frames: int) -> None:
    model, path = resnet_package
    feats = speech_windows(librispeech, FeatureRecipe(), frames, 3)
    executor = MilExecutor(load_program(path))
    got = run_executor(executor, feats)
    with torch.no_grad():
        ref = model(torch.from_numpy(feats)).numpy()
    cos = cosine(ref, got)
    logging.getLogger(__name__).info("ResNet34 %d frames: FP16 program vs torch cosine min %.6f", frames, cos.min())
    assert cos.min() >= MIN_COSINE
    assert executor.stats.nonfinite_ops == []
    assert executor.stats.peak_fp16 < FP16_MAX / 16  # a wide margin below FP16 overflow


# --- GE2E: per-length packages (layout, reuse) on a small LSTM ----------------------------------


def tiny_lstm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LstmNet().eval()


def test_ge2e_conversion_writes_one_fixed_package_per_length(tmp_path: Path) -> None:
    out = convert_ge2e_coreml(tiny_lstm(), tmp_path, [9, 6, 9])
    assert out == tmp_path / "coreml"
    assert sorted(p.name for p in out.iterdir()) == ["frames-6.mlpackage", "frames-9.mlpackage"]
    assert [p.name for p in tmp_path.iterdir()] == ["coreml"]  # no staging left behind
    served = read_package_set(out, feat_dim=40, embedding_dim=8)
    assert served.layout == "per-length"
    assert served.window_frames == (6, 9)
    assert {p.name: f for p, f in served.packages.items()} == {"frames-6.mlpackage": (6,), "frames-9.mlpackage": (9,)}
    for frames in (6, 9):
        report = check_mlpackage(out / f"frames-{frames}.mlpackage", feat_dim=40, window_frames=[frames])
        assert report.ok and report.flexibility == "fixed"
        assert report.op_counts["linear"] == 2 * (frames - 1) + 2 + 1  # hidden per step, input per layer, output
        stamp = json.loads(package_metadata(out / f"frames-{frames}.mlpackage")[STAMP_KEY])
        assert stamp["frames"] == frames and stamp["feat_dim"] == 40


def test_ge2e_rebuild_reuses_matching_packages_and_drops_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_lstm()
    out = convert_ge2e_coreml(model, tmp_path, [6, 9])
    weights_6 = (out / "frames-6.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="speakerd.coreml.convert"):
        convert_ge2e_coreml(model, tmp_path, [6, 12])
    assert "reusing frames-6.mlpackage" in caplog.text
    assert "over 6 frames" not in caplog.text and "over 12 frames" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["frames-12.mlpackage", "frames-6.mlpackage"]
    assert (out / "frames-6.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_mtime_ns == weights_6
    # other weights: the stamp differs, so the package is converted again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="speakerd.coreml.convert"):
        convert_ge2e_coreml(tiny_lstm(seed=1), tmp_path, [6])
    assert "was built from something else" in caplog.text and "over 6 frames" in caplog.text
    assert json.loads(package_metadata(out / "frames-6.mlpackage")[STAMP_KEY])["weights"] == state_digest(tiny_lstm(seed=1))[:16]


def test_failed_ge2e_conversion_keeps_the_previous_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = convert_ge2e_coreml(tiny_lstm(), tmp_path, [6])
    before = package_digest_of(out)

    def failing(*args: object, **kwargs: object) -> Path:
        raise ConversionError("simulated converter failure")

    monkeypatch.setattr(convert_module, "convert_to_mlpackage", failing)
    with pytest.raises(ConversionError, match="simulated"):
        convert_ge2e_coreml(tiny_lstm(), tmp_path, [6, 9])
    assert package_digest_of(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["coreml"]


def package_digest_of(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def test_package_set_rejects_misnamed_duplicate_and_missing_packages(tmp_path: Path) -> None:
    out = convert_ge2e_coreml(tiny_lstm(), tmp_path / "a", [6])
    shutil.copytree(out / "frames-6.mlpackage", out / "frames-7.mlpackage")
    with pytest.raises(CheckError) as err:
        read_package_set(out, feat_dim=40)
    assert "frames-7.mlpackage takes [6] frames, not what its name says" in str(err.value)
    assert "6 frames served by both frames-6.mlpackage and frames-7.mlpackage" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckError, match="holds no frames-<T>.mlpackage packages"):
        read_package_set(tmp_path / "empty")


def test_single_enumerated_package_is_its_own_layout(small_package: tuple[nn.Module, Path]) -> None:
    _, path = small_package
    served = read_package_set(path, feat_dim=80)
    assert served.layout == "package"
    assert served.packages == {path: (98, 148)}
    assert served.package_for(148) == path and served.package_for(120) is None


# --- GE2E (real weights): the bundle's packages, one per daemon window length ------------------


@pytest.fixture(scope="module")
def ge2e_model() -> nn.Module:
    if not GE2E_WEIGHTS.is_file():
        pytest.skip(f"GE2E weights not at {GE2E_WEIGHTS}: run `speakerd models build ge2e-resemblyzer`")
    from speakerd.models.ge2e import load_encoder

    return load_encoder(GE2E_WEIGHTS)


@pytest.fixture(scope="module")
def ge2e_bundle(ge2e_model: nn.Module) -> ModelBundle:
    """The bundle as ``speakerd models build --coreml`` makes it (packages reused when their stamp
    matches, so this proves exactly what ships, converted by the current converter). The set-up
    builds no CoreML packages on Linux, so the first session here converts them (about 2 minutes)."""
    from speakerd.models.build import build_model

    return build_model("ge2e-resemblyzer", progress=False, coreml=True)


def test_ge2e_windows_are_the_daemon_windows() -> None:
    from speakerd.models.build import GE2E_RECIPE, ge2e_default_window_frames
    from speakerd.windows import WindowSettings

    assert ge2e_default_window_frames() == GE2E_WINDOWS
    assert window_frame_counts(WindowSettings(), GE2E_RECIPE) == GE2E_WINDOWS


def test_ge2e_bundle_serves_each_window_length(ge2e_bundle: ModelBundle) -> None:
    assert ge2e_bundle.window_frames == GE2E_WINDOWS
    assert ge2e_bundle.artifacts["coreml"] == "coreml"
    served = read_package_set(ge2e_bundle.require_artifact("coreml"), feat_dim=40, embedding_dim=256)
    assert served.layout == "per-length"
    assert served.window_frames == GE2E_WINDOWS
    assert sorted(p.name for p in served.packages) == sorted(f"frames-{f}.mlpackage" for f in GE2E_WINDOWS)


def test_unrolled_lstm_equals_nn_lstm(ge2e_model: nn.Module) -> None:
    unrolled = UnrolledLSTMEncoder(ge2e_model.lstm, ge2e_model.linear).eval()
    x = torch.rand(2, 30, 40)
    with torch.no_grad():
        ref = ge2e_model(x)
        got = torch.nn.functional.normalize(unrolled(x), dim=1)
    assert torch.abs(ref - got).max().item() < 1e-5


@pytest.mark.parametrize("frames", GE2E_WINDOWS)
def test_ge2e_package_passes_the_static_check(ge2e_bundle: ModelBundle, ge2e_model: nn.Module, frames: int) -> None:
    package = ge2e_bundle.require_artifact("coreml") / f"frames-{frames}.mlpackage"
    report = check_mlpackage(package, feat_dim=40, window_frames=[frames], embedding_dim=256)
    assert report.ok, report.problems
    assert report.flexibility == "fixed"
    assert report.input_shapes == [(1, frames, 40)]
    assert (report.input_dtype, report.output_dtype, report.output_shape) == ("FLOAT32", "FLOAT32", (1, 256))
    assert report.io_casts == 2
    steps = 3 * frames  # 3 layers
    assert dict(report.op_counts) == {
        "linear": 3 * (frames - 1) + 3 + 1,  # hidden per step after the first, input per layer, output
        "split": steps,
        "slice_by_index": steps,
        "sigmoid": 3 * steps - 3,  # i, f, o per step; no forget gate at step 0 (zero cell)
        "tanh": 2 * steps,
        "mul": 3 * steps - 3,
        "add": 2 * steps - 6,
        "stack": 2,  # the sequences passed to layers 2 and 3
        "relu": 1,
    }
    assert sum(report.shape_op_counts.values()) == 0
    stamp = json.loads(package_metadata(package)[STAMP_KEY])
    assert stamp["frames"] == frames and stamp["weights"] == state_digest(ge2e_model)[:16]


@pytest.mark.parametrize("frames", GE2E_WINDOWS)
def test_ge2e_fp16_run_matches_torch(
    ge2e_bundle: ModelBundle, ge2e_model: nn.Module, librispeech: Path, frames: int
) -> None:
    from speakerd.models.build import GE2E_RECIPE

    feats = speech_windows(librispeech, GE2E_RECIPE, frames, 4)
    executor = MilExecutor(load_program(ge2e_bundle.require_artifact("coreml") / f"frames-{frames}.mlpackage"))
    got = run_executor(executor, feats)
    with torch.no_grad():
        ref = ge2e_model(torch.from_numpy(feats)).numpy()
    cos = cosine(ref, got)
    logging.getLogger(__name__).info("GE2E %d frames: FP16 program vs torch cosine min %.6f", frames, cos.min())
    assert got.shape == (4, 256)
    assert cos.min() >= MIN_COSINE
    assert executor.stats.nonfinite_ops == []
    assert executor.stats.peak_fp16 < FP16_MAX / 16
