"""WeSpeaker ResNet34: structure, equivalence with a literal re-statement of the reference forward
pass, checkpoint loaders, and WeSpeaker's fbank against an independent Kaldi implementation."""

from __future__ import annotations

import dataclasses
import enum
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

torch = pytest.importorskip("torch")
F = torch.nn.functional

from speakerd.features import FeatureExtractor  # noqa: E402
from speakerd.models.wespeaker.checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    wespeaker_recipe,
    write_pyannote_bin,
    write_wespeaker_dir,
)
from speakerd.models.wespeaker.resnet import (  # noqa: E402
    PYANNOTE_POOLING_EPS,
    RESNET34_NUM_PARAMETERS,
    RESNET34_NUM_TENSORS,
    WESPEAKER_POOLING_EPS,
    StatsPooling,
    resnet34,
)

SAMPLE_RATE = 16000
REF_TOLERANCE = 1e-5
FBANK_TOLERANCE = 1e-3
"""Max abs difference allowed on natural-log mel energies (kaldi-native-fbank float32 vs float64
numpy). Measured on these clips: max 8.4e-4, 99.9th percentile ~1e-4 (float32 FFT noise)."""


# ----------------------------------------------------------------------------------------------
# fixtures


def randomise(model: torch.nn.Module, seed: int = 0, calibrate: torch.Tensor | None = None) -> torch.nn.Module:
    """Random weights and BN statistics, so every tensor in the state_dict affects the output.

    With ``calibrate``, BN running statistics are measured on that input (as training would leave
    them), which keeps activations near unit scale: with made-up statistics the 34 random layers
    blow values up to ~1e5 and an absolute tolerance would test nothing.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif name.endswith("running_mean"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif tensor.ndim == 1 and name.replace(".weight", ".running_var") in model.state_dict():
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))  # BN gamma
            elif tensor.ndim == 4:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            else:
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))
        if calibrate is not None:
            bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average over the calibration pass
            model.train()
            model(calibrate)
            for bn in bns:
                bn.momentum = 0.1
    return model.eval()


def read_clip(librispeech: Path, seconds: float, offset_s: float = 1.0, index: int = 0) -> np.ndarray:
    clips = sorted((librispeech / "test-other").rglob("*.flac"))
    wave, sr = sf.read(clips[index], dtype="float32")
    assert sr == SAMPLE_RATE
    start = int(offset_s * sr)
    return wave[start : start + int(seconds * sr)]


@pytest.fixture(scope="module")
def real_feats(librispeech: Path) -> torch.Tensor:
    """Two 1.5 s windows of real speech through speakerd's WeSpeaker feature recipe: (2, 148, 80)."""
    extractor = FeatureExtractor(wespeaker_recipe(), SAMPLE_RATE)
    windows = [extractor.compute(read_clip(librispeech, 1.5, 1.0 + 2.0 * i, index=i)) for i in range(2)]
    return torch.from_numpy(np.stack(windows))


# ----------------------------------------------------------------------------------------------
# literal re-statement of wespeaker/models/resnet.py + pooling_layers.py (TSTP), driven by a state_dict


def reference_forward(sd: dict[str, torch.Tensor], feats: torch.Tensor, pooling: str) -> torch.Tensor:
    def bn(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(
            x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.1, 1e-5
        )

    x = feats.permute(0, 2, 1)  # (B,T,F) => (B,F,T)
    x = x.unsqueeze(1)
    out = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=1, padding=1), "bn1"))
    for layer, (blocks, first_stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2)), start=1):
        for i in range(blocks):
            p = f"layer{layer}.{i}"
            stride = first_stride if i == 0 else 1
            y = F.relu(bn(F.conv2d(out, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            y = bn(F.conv2d(y, sd[f"{p}.conv2.weight"], stride=1, padding=1), f"{p}.bn2")
            if f"{p}.shortcut.0.weight" in sd:
                y = y + bn(F.conv2d(out, sd[f"{p}.shortcut.0.weight"], stride=stride), f"{p}.shortcut.1")
            else:
                y = y + out
            out = F.relu(y)
    if pooling == "wespeaker":  # pooling_layers.TSTP
        pooling_mean = out.mean(dim=-1)
        pooling_std = torch.sqrt(torch.var(out, dim=-1) + 1e-7)
        stats = torch.cat((pooling_mean.flatten(start_dim=1), pooling_std.flatten(start_dim=1)), 1)
    else:  # pyannote: rearrange "b d c f -> b (d c) f", then StatsPool (mean, std correction=1)
        seq = out.reshape(out.shape[0], out.shape[1] * out.shape[2], out.shape[3])
        stats = torch.cat([seq.mean(dim=-1), seq.std(dim=-1, correction=1)], dim=-1)
    return F.linear(stats, sd["seg_1.weight"], sd["seg_1.bias"])


# ----------------------------------------------------------------------------------------------
# structure


def test_state_dict_matches_official_layout() -> None:
    model = resnet34()
    sd = model.state_dict()
    assert len(sd) == RESNET34_NUM_TENSORS == 218
    assert sum(p.numel() for p in model.parameters()) == RESNET34_NUM_PARAMETERS == 6_634_336
    assert sd["conv1.weight"].shape == (32, 1, 3, 3)
    assert sd["seg_1.weight"].shape == (256, 5120)
    assert sd["seg_1.bias"].shape == (256,)
    assert sd["layer4.2.conv2.weight"].shape == (256, 256, 3, 3)
    shortcuts = sorted({k.split(".shortcut")[0] for k in sd if ".shortcut." in k})
    assert shortcuts == ["layer2.0", "layer3.0", "layer4.0"]
    bns = [k[: -len(".running_var")] for k in sd if k.endswith(".running_var")]
    assert len(bns) == 1 + 2 * 16 + 3  # stem + two per block + three shortcut BNs
    for p in bns:
        assert {f"{p}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")} <= set(sd)
    assert [k for k in sd if not k.startswith(("conv1", "bn1", "layer", "seg_1"))] == []


def test_output_shape_is_batch_by_256_for_any_batch_and_length() -> None:
    model = resnet34().eval()
    with torch.no_grad():
        for batch, frames in ((1, 98), (3, 148), (2, 301)):
            assert model(torch.randn(batch, frames, 80)).shape == (batch, 256)
        assert model.frame_level(torch.randn(1, 148, 80)).shape == (1, 256, 10, 19)  # ceil(148/8)


@pytest.mark.parametrize("pooling,eps", [("wespeaker", WESPEAKER_POOLING_EPS), ("pyannote", PYANNOTE_POOLING_EPS)])
def test_matches_literal_reference_on_real_fbank(real_feats: torch.Tensor, pooling: str, eps: float) -> None:
    model = randomise(resnet34(pooling_eps=eps), seed=1, calibrate=real_feats)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ours = model(real_feats)
        ref = reference_forward(sd, real_feats, pooling)
    assert ours.shape == (2, 256)
    scale = float(ref.abs().max())
    assert 0.1 < scale < 100.0, f"reference output scale {scale:.3g}: the comparison would prove little"
    diff = float((ours - ref).abs().max())
    assert diff < REF_TOLERANCE, f"max abs diff {diff:.3g}"


def test_pooling_eps_is_a_constructor_parameter_with_negligible_effect(real_feats: torch.Tensor) -> None:
    a = randomise(resnet34(pooling_eps=WESPEAKER_POOLING_EPS), seed=2, calibrate=real_feats)
    b = resnet34(pooling_eps=PYANNOTE_POOLING_EPS).eval()
    b.load_state_dict(a.state_dict())
    assert (a.pool.eps, b.pool.eps) == (1e-7, 0.0)
    with torch.no_grad():
        cos = F.cosine_similarity(a(real_feats), b(real_feats)).min()
    assert float(cos) > 0.9999


def test_model_module_is_import_light() -> None:
    """The CoreML and ONNX converters import it; it must not drag in onnx, yaml or coremltools."""
    import subprocess

    code = (
        "import sys, speakerd.models.wespeaker as p; assert 'torch' not in sys.modules, 'package imports torch'; "
        "import speakerd.models.wespeaker.resnet; "
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'yaml', 'coremltools') if m in sys.modules))"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "daemon")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_traced_graph_generalises_over_batch_and_time(real_feats: torch.Tensor) -> None:
    model = randomise(resnet34(), seed=3)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 148, 80))
        for feats in (real_feats, torch.randn(3, 198, 80)):
            diff = float((traced(feats) - model(feats)).abs().max())
            assert diff < REF_TOLERANCE


def test_stats_pooling_is_two_pass_and_accurate_with_a_large_mean() -> None:
    """E[x^2]-E[x]^2 loses every digit here in float32; torch.var keeps them."""
    gen = torch.Generator().manual_seed(0)
    x = 1000.0 + 0.01 * torch.randn(2, 4, 3, 50, generator=gen)
    stats = StatsPooling(eps=0.0)(x)
    std_ref = x.double().std(dim=-1, correction=1).flatten(start_dim=1)
    rel = float(((stats[:, 12:].double() - std_ref).abs() / std_ref).max())
    assert rel < 1e-3
    assert stats.shape == (2, 24)


# ----------------------------------------------------------------------------------------------
# loaders


def test_wespeaker_dir_loads_strictly_and_drops_loss_head(tmp_path: Path, real_feats: torch.Tensor) -> None:
    source = randomise(resnet34(), seed=4)
    write_wespeaker_dir(source, tmp_path / "voxceleb_resnet34_LM")
    loaded = load_checkpoint(tmp_path / "voxceleb_resnet34_LM")
    assert loaded.layout == "wespeaker"
    assert loaded.model.pooling_eps == WESPEAKER_POOLING_EPS
    assert loaded.notes["dropped"] == ["projection.weight"]
    assert loaded.notes["training_dither"] == 1.0
    assert loaded.recipe == wespeaker_recipe()
    assert loaded.recipe.dither == 0.0 and loaded.recipe.cmn and loaded.recipe.input_scale == 32768.0
    with torch.no_grad():
        assert torch.equal(loaded.model(real_feats), source(real_feats))
    # the weights file itself is accepted too, when config.yaml sits beside it
    assert load_checkpoint(tmp_path / "voxceleb_resnet34_LM" / "avg_model.pt").layout == "wespeaker"


def test_pyannote_bin_loads_with_no_pooling_epsilon(tmp_path: Path, real_feats: torch.Tensor) -> None:
    source = randomise(resnet34(pooling_eps=PYANNOTE_POOLING_EPS), seed=5)
    loaded = load_checkpoint(write_pyannote_bin(source, tmp_path / "pytorch_model.bin"))
    assert loaded.layout == "pyannote"
    assert loaded.model.pooling_eps == 0.0
    with torch.no_grad():
        assert torch.equal(loaded.model(real_feats), source(real_feats))


def test_pyannote_bin_with_foreign_classes_loads_without_importing_them(tmp_path: Path) -> None:
    """The real file pickles pyannote/Lightning objects; they must not need importing (or run)."""
    names = ["pyannote", "pyannote.audio", "pyannote.audio.core", "pyannote.audio.core.task"]
    modules = {n: types.ModuleType(n) for n in names}
    task = modules[names[-1]]

    @dataclasses.dataclass
    class Specifications:
        problem: object
        duration: float

    class Problem(enum.Enum):
        REPRESENTATION = 3

    class AttributeDict(dict):
        pass

    for cls in (Specifications, Problem, AttributeDict):
        cls.__module__, cls.__qualname__ = task.__name__, cls.__name__
        setattr(task, cls.__name__, cls)
    model = resnet34(pooling_eps=0.0)
    path = tmp_path / "pytorch_model.bin"
    old = {n: sys.modules.get(n) for n in names}
    sys.modules.update(modules)
    try:
        hp = AttributeDict(sample_rate=16000, num_mel_bins=80, frame_length=25, frame_shift=10, dither=0.0)
        torch.save(
            {
                "state_dict": {f"resnet.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": hp,
                "pyannote.audio": {"specifications": Specifications(Problem.REPRESENTATION, 5.0)},
            },
            path,
        )
    finally:
        for n, m in old.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    assert "pyannote.audio.core.task" not in sys.modules or old["pyannote.audio.core.task"] is not None
    loaded = load_checkpoint(path)
    assert loaded.layout == "pyannote"
    assert loaded.recipe.num_mel_bins == 80


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    model = resnet34()
    d = write_wespeaker_dir(model, tmp_path / "ws")
    state = torch.load(d / "avg_model.pt", weights_only=True)
    del state["layer3.2.bn1.running_var"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, d / "avg_model.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(d)
    msg = str(err.value)
    assert "missing keys: layer3.2.bn1.running_var" in msg
    assert "unexpected keys: layer5.0.conv1.weight" in msg


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    model = resnet34()
    path = write_pyannote_bin(model, tmp_path / "pytorch_model.bin")
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["resnet.seg_1.weight"] = torch.zeros(192, 5120)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"wrong shapes: seg_1\.weight \(192, 5120\) \(model \(256, 5120\)\)"):
        load_checkpoint(path)


def test_pyannote_keys_outside_prefix_are_named(tmp_path: Path) -> None:
    path = write_pyannote_bin(resnet34(), tmp_path / "pytorch_model.bin")
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["classifier.weight"] = torch.zeros(3)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="unexpected keys outside 'resnet.\\*': classifier.weight"):
        load_checkpoint(path)


def test_directory_errors_name_the_problem(tmp_path: Path) -> None:
    d = write_wespeaker_dir(resnet34(), tmp_path / "ws")
    (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("ResNet34", "ECAPA_TDNN_GLOB_c512"))
    with pytest.raises(CheckpointError, match="model 'ECAPA_TDNN_GLOB_c512' is not supported"):
        load_checkpoint(d)
    (d / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="config.yaml is missing"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere.bin")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(junk)


# ----------------------------------------------------------------------------------------------
# features: speakerd's FeatureExtractor vs an independent numpy Kaldi compute-fbank


def kaldi_fbank_reference(wave: np.ndarray, *, num_bins: int = 80, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Kaldi compute-fbank (float64): snip_edges, DC removal, pre-emphasis 0.97, Hamming, 512-pt
    power spectrum, HTK-mel triangles 20 Hz..Nyquist, log with FLT_EPSILON floor, no energy."""
    x = wave.astype(np.float64) * 32768.0
    length, shift, nfft = int(0.025 * sample_rate), int(0.010 * sample_rate), 512
    n_frames = 1 + (len(x) - length) // shift
    idx = np.arange(length)[None, :] + shift * np.arange(n_frames)[:, None]
    frames = x[idx]
    frames = frames - frames.mean(axis=1, keepdims=True)
    emph = frames.copy()
    emph[:, 1:] -= 0.97 * frames[:, :-1]
    emph[:, 0] -= 0.97 * frames[:, 0]
    window = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(length) / (length - 1))
    power = np.abs(np.fft.rfft(emph * window, n=nfft)) ** 2

    def mel(f: np.ndarray | float) -> np.ndarray | float:
        return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)

    low, high = mel(20.0), mel(sample_rate / 2)
    delta = (high - low) / (num_bins + 1)
    fft_mel = mel(np.arange(nfft // 2) * sample_rate / nfft)
    banks = np.zeros((num_bins, nfft // 2 + 1))
    for b in range(num_bins):
        left, center, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
        up = (fft_mel - left) / (center - left)
        down = (right - fft_mel) / (right - center)
        inside = (fft_mel > left) & (fft_mel < right)
        banks[b, : nfft // 2] = np.where(inside, np.where(fft_mel <= center, up, down), 0.0)
    energies = power @ banks.T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps))


def test_feature_extractor_matches_kaldi_reference_on_real_speech(librispeech: Path) -> None:
    recipe = wespeaker_recipe()
    for index, seconds in ((0, 1.5), (7, 3.0)):
        wave = read_clip(librispeech, seconds, index=index)
        ref = kaldi_fbank_reference(wave)
        assert ref.shape == (recipe.num_frames(len(wave), SAMPLE_RATE), 80) == ((148, 80) if seconds == 1.5 else (298, 80))
        ours = FeatureExtractor(recipe, SAMPLE_RATE).compute(wave)
        ref_cmn = ref - ref.mean(axis=0, keepdims=True)
        diff = np.abs(ours - ref_cmn)
        assert float(diff.max()) < FBANK_TOLERANCE, f"clip {index}: max abs diff {diff.max():.3g} on log-mel after CMN"
        assert float(diff.mean()) < FBANK_TOLERANCE / 10, "float32 noise only: no systematic offset"
        # before CMN too: the same stream without the per-window mean subtraction
        raw = FeatureExtractor(dataclasses.replace(recipe, cmn=False), SAMPLE_RATE).compute(wave)
        assert float(np.abs(raw - ref).max()) < FBANK_TOLERANCE
