"""PyTorch -> CoreML ML Program (``.mlpackage``) for the Neural Engine.

Choices, each for the Neural Engine (details and sources in docs/coreml.md):

- ML Program with FP16 compute (what the ANE runs) and FP32 inputs/outputs given explicitly (with a
  macOS 13+ target coremltools would otherwise make the I/O FP16 too).
- No RangeDim: a flexible range keeps a model off the ANE except at its default shape. One fixed
  shape per configured window length, as ``EnumeratedShapes`` when there are several.
- Batch fixed at 1. The backend feeds several windows through CoreML's batch API (one dict per
  window), so an enumerated batch axis would only multiply the shapes the ANE compiler must
  specialise (4 lengths x N batch sizes) for no gain in what the daemon can submit.
- ``torch.jit.trace``, no custom ops. Statistics pooling stays ``torch.var`` (two-pass: mean, then
  mean of squared deviations), which cannot go negative in FP16; see :data:`VARIANCE_NOTE`.
- LSTMs are unrolled into linear/sigmoid/tanh/mul/add per step (:class:`UnrolledLSTMEncoder`):
  the MIL ``lstm`` op is not run by the Neural Engine, so a GE2E package with it would run on CPU.
  An unrolled recurrence has one length, so GE2E gets one fixed-shape package per window length,
  in a directory (:mod:`speakerd.coreml.layout`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

PACKAGE_NAME = "model.mlpackage"
"""File name of the package inside a bundle (the manifest's ``artifacts.coreml``)."""
BATCH = 1
MIN_UNROLL_COSINE = 0.99999
"""The unrolled LSTM must match ``nn.LSTM`` this closely in FP32 before it is converted."""

VARIANCE_NOTE = (
    "Two-pass variance is a mean of squares, never negative in FP16, so sqrt never sees a negative "
    "number and no clamp is added. WeSpeaker's 1e-7 becomes the FP16 subnormal 1.19e-7 (possibly "
    "flushed to 0 on device); sqrt(0) = 0 is finite, so that changes nothing in the forward pass."
)


STAMP_KEY = "speakerd.build"
"""User-defined metadata key holding what a package was built from (see :func:`build_stamp`)."""


class ConversionError(Exception):
    """The model cannot be converted into a package the daemon accepts."""


@contextlib.contextmanager
def _quiet_coremltools() -> Iterator[None]:
    """coremltools logs every op it converts and removes at INFO (26,000 lines for a GE2E
    package); keep its logger at WARNING for the conversion so a verbose build stays readable."""
    ct_logger = logging.getLogger("coremltools")
    level = ct_logger.level
    ct_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        ct_logger.setLevel(level)


def _ct() -> Any:
    ct_logger = logging.getLogger("coremltools")
    level = ct_logger.level
    # its import warns, off macOS, that the prediction libraries are missing (expected here) and
    # that the installed torch/scikit-learn are untested: noise in every build log
    ct_logger.setLevel(max(level, logging.ERROR))
    try:
        import coremltools as ct
    except ImportError as exc:  # pragma: no cover - coremltools is in the build extra
        raise ConversionError("coremltools is needed to convert: pip install 'speakerd[build]'") from exc
    finally:
        ct_logger.setLevel(level)
    return ct


def input_shapes(feat_dim: int, window_frames: Sequence[int]) -> list[tuple[int, int, int]]:
    """One (batch, frames, bins) shape per distinct window length, in the order given."""
    frames = list(dict.fromkeys(int(f) for f in window_frames))
    if not frames or any(f <= 0 for f in frames):
        raise ConversionError(f"window_frames must be positive frame counts, got {list(window_frames)}")
    return [(BATCH, f, int(feat_dim)) for f in frames]


def convert_to_mlpackage(
    model: nn.Module,
    out_path: Path,
    *,
    feat_dim: int,
    window_frames: Sequence[int],
    input_name: str = "feats",
    output_name: str = "embs",
    minimum_deployment_target: Any = None,
    check: bool = True,
    metadata: Mapping[str, str] | None = None,
    vector_input: bool = False,
) -> Path:
    """Trace ``model`` ((B, T, feat_dim) -> (B, D)) and save an FP16 ML Program at ``out_path``.

    Several window lengths become ``EnumeratedShapes`` (default: the first); one becomes a fixed
    shape. The package is written beside ``out_path`` and moved into place, so a failed conversion
    never leaves a half-written package where the daemon would load it. With ``check`` the saved
    package must pass :func:`speakerd.coreml.check.check_mlpackage` before it is moved into place.
    ``metadata`` is stored as the package's user-defined metadata. ``vector_input``: the input is
    one fixed (1, feat_dim) vector instead (``window_frames`` is then ignored).
    """
    ct = _ct()
    out_path = Path(out_path)
    shapes: list[tuple[int, ...]] = [(BATCH, int(feat_dim))] if vector_input else list(input_shapes(feat_dim, window_frames))
    target = minimum_deployment_target if minimum_deployment_target is not None else ct.target.macOS13
    model = model.eval()
    example = torch.zeros(shapes[0], dtype=torch.float32)
    started = time.monotonic()
    logger.info("tracing %s at %s", type(model).__name__, shapes[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    shape: Any = ct.EnumeratedShapes(shapes=shapes, default=shapes[0]) if len(shapes) > 1 else shapes[0]
    logger.info("converting to an ML Program (FP16 compute, FP32 I/O, shapes %s)", [s[1] for s in shapes])
    with warnings.catch_warnings(), _quiet_coremltools():
        warnings.filterwarnings("ignore", message=".*has not been tested with coremltools.*")
        mlmodel = ct.convert(
            traced,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=target,
            inputs=[ct.TensorType(name=input_name, shape=shape, dtype=np.float32)],
            outputs=[ct.TensorType(name=output_name, dtype=np.float32)],
        )
    dims = f"1 x {feat_dim}" if vector_input else f"1 x T x {feat_dim}"
    mlmodel.short_description = f"{type(model).__name__}: ({input_name}: {dims}) -> {output_name}"
    for key, value in (metadata or {}).items():
        mlmodel.user_defined_metadata[key] = str(value)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_path.parent))
    try:
        staged = staging / out_path.name
        mlmodel.save(str(staged))
        if check:
            from .check import check_mlpackage

            report = check_mlpackage(
                staged,
                input_name=input_name,
                output_name=output_name,
                feat_dim=feat_dim,
                window_frames=None if vector_input else [s[1] for s in shapes],
                vector_input=vector_input,
            )
            if not report.ok:
                raise ConversionError(f"converted package fails the CoreML check: {'; '.join(report.problems)}")
        if out_path.exists():
            shutil.rmtree(out_path)
        staged.replace(out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("saved %s in %.1f s", out_path, time.monotonic() - started)
    return out_path


# --- GE2E: an LSTM the Neural Engine can run ------------------------------------------------------


class UnrolledLSTMEncoder(nn.Module):
    """GE2E's ``lstm -> hidden[-1] -> linear -> ReLU`` with the LSTM unrolled over a fixed length.

    Per step: one ``linear`` of the hidden state, gate ``split``, sigmoid/tanh, and the cell update;
    the input projection of each layer is one ``linear`` over all steps. Same weights and gate order
    (i, f, g, o) as ``nn.LSTM``; input and hidden biases are summed once. The output is the raw
    ReLU output: the backend L2-normalises in FP32, which avoids an FP16 sum of squares in-model.
    """

    def __init__(self, lstm: nn.LSTM, linear: nn.Linear) -> None:
        super().__init__()
        if not lstm.batch_first or lstm.bidirectional or lstm.proj_size or not lstm.bias:
            raise ConversionError("only a batch-first, unidirectional LSTM with biases and no projection unrolls")
        self.hidden = lstm.hidden_size
        self.input_proj = nn.ModuleList()
        self.hidden_proj = nn.ModuleList()
        for layer in range(lstm.num_layers):
            w_ih = getattr(lstm, f"weight_ih_l{layer}").detach()
            w_hh = getattr(lstm, f"weight_hh_l{layer}").detach()
            bias = (getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")).detach()
            proj_in = nn.Linear(w_ih.shape[1], w_ih.shape[0])
            proj_in.weight.data.copy_(w_ih)
            proj_in.bias.data.copy_(bias)
            proj_h = nn.Linear(w_hh.shape[1], w_hh.shape[0], bias=False)
            proj_h.weight.data.copy_(w_hh)
            self.input_proj.append(proj_in)
            self.hidden_proj.append(proj_h)
        self.linear = nn.Linear(linear.in_features, linear.out_features)
        self.linear.load_state_dict(linear.state_dict())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        seq = feats
        h = c = feats.new_zeros(())
        for layer, (proj_in, proj_h) in enumerate(zip(self.input_proj, self.hidden_proj)):
            gates_in = proj_in(seq)
            outputs = []
            for t in range(gates_in.shape[1]):
                gates = gates_in[:, t] if t == 0 else gates_in[:, t] + proj_h(h)
                i, f, g, o = torch.split(gates, self.hidden, dim=1)
                i, g, o = torch.sigmoid(i), torch.tanh(g), torch.sigmoid(o)
                c = i * g if t == 0 else torch.sigmoid(f) * c + i * g
                h = o * torch.tanh(c)
                outputs.append(h)
            if layer < len(self.input_proj) - 1:
                seq = torch.stack(outputs, dim=1)
        return torch.relu(self.linear(h))


def _unrolled_agrees(model: nn.Module, unrolled: nn.Module, frames: int, feat_dim: int) -> float:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, frames, feat_dim, generator=generator)
    with torch.no_grad():
        ref = model(x)
        got = unrolled(x)
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=1)
    return float(cos.min())


def state_digest(module: nn.Module) -> str:
    """sha256 over the module's tensors (name, dtype, shape, bytes): identifies the weights converted."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}\0{array.dtype}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def build_stamp(model: nn.Module, frames: int, feat_dim: int) -> str:
    """What a GE2E package is built from: this converter's source, the tool versions, the weights
    and the shape. A package whose stamp matches is reused by the next build instead of converted
    again (about a minute of CPU per length), after it passes the static check again."""
    ct = _ct()
    fields = {
        "converter": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
        "coremltools": str(ct.__version__),
        "torch": str(torch.__version__),
        "weights": state_digest(model)[:16],
        "frames": int(frames),
        "feat_dim": int(feat_dim),
    }
    return json.dumps(fields, sort_keys=True)


def _reusable(package: Path, stamp: str, *, feat_dim: int, frames: int) -> bool:
    from google.protobuf.message import DecodeError

    from .check import check_mlpackage
    from .layout import package_metadata
    from .mil_exec import MilError

    if not package.is_dir():
        return False
    try:
        if package_metadata(package).get(STAMP_KEY) != stamp:
            logger.info("%s was built from something else; converting again", package.name)
            return False
        report = check_mlpackage(package, feat_dim=feat_dim, window_frames=[frames])
    except (MilError, OSError, ValueError, DecodeError) as exc:  # unreadable: convert afresh
        logger.info("%s is unreadable (%s); converting again", package, exc)
        return False
    return report.ok


def _replace_dir(new: Path, target: Path, trash: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` goes to ``trash`` first (rename, not delete,
    so the swap is two renames on one file system). If a concurrent build put its own directory
    in place between the two renames, that one is kept: it was built from the same inputs."""
    if target.exists():
        os.rename(target, trash)
    try:
        os.rename(new, target)
    except OSError:
        if not target.is_dir():
            raise
        logger.info("another build replaced %s at the same time; keeping its packages", target)


def _convert_length(unrolled: nn.Module, path: Path, feat_dim: int, frames: int, stamp: str) -> float:
    """One length's package (run in a worker process when lengths are converted side by side)."""
    started = time.monotonic()
    convert_to_mlpackage(unrolled, path, feat_dim=feat_dim, window_frames=[frames], metadata={STAMP_KEY: stamp})
    return time.monotonic() - started


def _convert_lengths(unrolled: nn.Module, jobs: list[tuple[int, Path, str]], feat_dim: int, workers: int) -> None:
    """Convert each (frames, path, stamp); with ``workers`` > 1, that many lengths at once, each in
    its own (spawned) process: a conversion is single-threaded Python, about a minute per length."""
    if workers <= 1 or len(jobs) <= 1:
        for frames, path, stamp in jobs:
            _convert_length(unrolled, path, feat_dim, frames, stamp)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    longest_first = sorted(jobs, key=lambda job: -job[0])  # the longest takes longest: start it first
    spawn = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=spawn) as pool:
        futures = {frames: pool.submit(_convert_length, unrolled, path, feat_dim, frames, stamp)
                   for frames, path, stamp in longest_first}
        for frames, future in futures.items():
            logger.info("converted %s frames in a worker (%.1f s)", frames, future.result())


def convert_ge2e_coreml(
    model: nn.Module, out_dir: Path, window_frames: Sequence[int], feat_dim: int = 40, *, reuse: bool = True,
    workers: int = 1,
) -> Path:
    """Convert a GE2E encoder (``.lstm``: ``nn.LSTM``, ``.linear``: ``nn.Linear``) to one fixed-shape
    package per window length, ``out_dir/coreml/frames-<T>.mlpackage``; returns ``out_dir/coreml``.

    An unrolled recurrence has one length, hence one package per length (docs/coreml.md). Before
    each conversion the unrolled module is checked against the original in FP32 (cosine >=
    MIN_UNROLL_COSINE); each saved package must pass the static check. With ``reuse``, a package
    already in place whose :func:`build_stamp` matches is kept (after the static check again).
    The new directory is assembled beside the old one and swapped in whole: a failure leaves the
    previous packages untouched, and no package for a length no longer asked for survives.
    ``workers``: how many lengths to convert at once, each in its own process.
    """
    from .layout import PER_LENGTH_DIR, per_length_name

    frames_list = [s[1] for s in input_shapes(feat_dim, window_frames)]
    lstm, linear = getattr(model, "lstm", None), getattr(model, "linear", None)
    if not isinstance(lstm, nn.LSTM) or not isinstance(linear, nn.Linear):
        raise ConversionError(f"{type(model).__name__} has no .lstm (nn.LSTM) and .linear (nn.Linear)")
    unrolled = UnrolledLSTMEncoder(lstm, linear).eval()
    out_dir = Path(out_dir)
    target = out_dir / PER_LENGTH_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".coreml-", dir=out_dir))
    started = time.monotonic()
    try:
        assembled = staging / PER_LENGTH_DIR
        assembled.mkdir()
        jobs: list[tuple[int, Path, str]] = []
        for frames in frames_list:
            name = per_length_name(frames)
            stamp = build_stamp(model, frames, feat_dim)
            if reuse and _reusable(target / name, stamp, feat_dim=feat_dim, frames=frames):
                logger.info("reusing %s: built from the same weights, converter and tools", name)
                shutil.copytree(target / name, assembled / name)
                continue
            agreement = _unrolled_agrees(model.eval(), unrolled, frames, feat_dim)
            if not agreement >= MIN_UNROLL_COSINE:
                raise ConversionError(f"unrolled LSTM disagrees with the model at {frames} frames: cosine {agreement:.7f}")
            logger.info("unrolled %d-layer LSTM over %d frames (cosine to nn.LSTM %.7f)", lstm.num_layers, frames, agreement)
            jobs.append((frames, assembled / name, stamp))
        _convert_lengths(unrolled, jobs, feat_dim, workers)
        _replace_dir(assembled, target, staging / "previous")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("GE2E CoreML packages for %s frames in %s (%.1f s)", frames_list, target, time.monotonic() - started)
    return target


def convert_resnet_coreml(model: nn.Module, out_dir: Path, window_frames: Sequence[int], feat_dim: int = 80) -> Path:
    """A (B, T, feat_dim) -> (B, D) conv net (WeSpeaker ResNet) to ``out_dir/model.mlpackage``."""
    logger.info("stats pooling: %s", VARIANCE_NOTE)
    return convert_to_mlpackage(model, Path(out_dir) / PACKAGE_NAME, feat_dim=feat_dim, window_frames=window_frames)
