"""Turn a WeSpeaker ResNet34 checkpoint into a speakerd model bundle (ONNX + manifest [+ CoreML]).

The ONNX file is the one WeSpeaker's own export_onnx.py would give (input ``feats`` (B, T, 80) with
dynamic batch and time, output ``embs`` (B, 256)) plus sherpa-onnx's metadata, so the very same
file also loads in ``sherpa_onnx.SpeakerEmbeddingExtractor`` (our speed and sanity peer).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from ...bundle import ModelBundle, fingerprint_of, kept_decision, models_root, sha256_file, write_manifest
from ...errors import SpeakerdError

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

BUNDLE_NAME = "wespeaker-resnet34"
ONNX_FILE = "wespeaker_resnet34.onnx"
ONNX_OPSET = 17
INPUT_NAME = "feats"
OUTPUT_NAME = "embs"
DEFAULT_WINDOW_SECONDS = (1.0, 1.5, 2.0, 3.0)
COREML_HOOK = "speakerd.models.wespeaker.coreml"
EXPORT_FRAMES = 200
"""Length of the dummy input traced for export (WeSpeaker's num_frms); time stays dynamic."""
VERIFY_MIN_COSINE = 0.99999
"""ONNX vs PyTorch on the same input; below this the export is wrong, not merely imprecise."""
SHERPA_URL = "https://github.com/wenet-e2e/wespeaker/blob/master/docs/pretrained.md"


class ConversionError(SpeakerdError):
    """The exported model does not reproduce the PyTorch one, or an artifact could not be written."""


def convert_wespeaker(
    checkpoint: Path,
    out_dir: Path,
    *,
    window_seconds: Sequence[float] = DEFAULT_WINDOW_SECONDS,
    progress: bool = True,
    coreml: bool = True,
    name: str = BUNDLE_NAME,
) -> ModelBundle:
    """Load ``checkpoint`` (WeSpeaker dir or pyannote ``.bin``), write ``out_dir``, return its manifest.

    The CoreML package is built by ``speakerd.models.wespeaker.coreml.convert_coreml`` when that
    module exists and ``coreml`` is true; its absence is logged, never an error.
    """
    import torch
    from tqdm import tqdm

    from .checkpoint import load_checkpoint

    checkpoint = Path(checkpoint).expanduser()
    out_dir = Path(out_dir).expanduser()
    steps = ["load checkpoint", "export ONNX", "verify ONNX", "CoreML", "manifest"]
    with tqdm(total=len(steps), desc="convert wespeaker", unit="step", disable=not progress) as bar:
        bar.set_postfix_str(steps[0])
        loaded = load_checkpoint(checkpoint)
        model = loaded.model.eval()
        recipe = loaded.recipe
        window_frames = tuple(
            recipe.num_frames(int(round(s * loaded.sample_rate)), loaded.sample_rate) for s in window_seconds
        )
        if not window_frames or min(window_frames) < 8:
            raise ConversionError(f"window seconds {tuple(window_seconds)} give too few frames {window_frames}")
        weights_sha = sha256_file(loaded.weights_path)
        bar.update()

        bar.set_postfix_str(steps[1])
        out_dir.mkdir(parents=True, exist_ok=True)
        onnx_path = out_dir / ONNX_FILE
        export_onnx(model, onnx_path, comment=f"{loaded.layout} checkpoint {checkpoint.name} sha256 {weights_sha[:16]}")
        bar.update()

        bar.set_postfix_str(steps[2])
        worst = verify_onnx(model, onnx_path, window_frames, feat_dim=recipe.num_mel_bins)
        logger.info("ONNX matches PyTorch: worst cosine %.7f over %s frames", worst, window_frames)
        bar.update()

        bar.set_postfix_str(steps[3])
        artifacts = {"onnx": ONNX_FILE}
        trunk_cosine = _export_trunk(model, out_dir, artifacts)
        if coreml:
            hook = _coreml_hook()
            if hook is not None:
                with torch.no_grad():
                    package = Path(hook.convert_coreml(model, out_dir, window_frames))
                artifacts["coreml"] = os.path.relpath(package, out_dir)
                convert_trunk = getattr(hook, "convert_coreml_trunk", None)
                if convert_trunk is not None:  # the shared trunk on the Neural Engine (docs/coreml.md)
                    with torch.no_grad():
                        trunk_package, head_package = convert_trunk(model, out_dir)
                    artifacts["coreml_trunk"] = os.path.relpath(trunk_package, out_dir)
                    artifacts["coreml_head"] = os.path.relpath(head_package, out_dir)
        bar.update()

        bar.set_postfix_str(steps[4])
        dim = int(model.embed_dim)
        bundle = ModelBundle(
            path=out_dir,
            name=name,
            sample_rate=loaded.sample_rate,
            embedding_dim=dim,
            features=recipe,
            fingerprint=fingerprint_of(name, weights_sha, recipe, dim),
            decision=kept_decision(out_dir, fingerprint_of(name, weights_sha, recipe, dim)),
            artifacts=artifacts,
            io={"input": INPUT_NAME, "output": OUTPUT_NAME},
            window_frames=window_frames,
            description=(
                f"WeSpeaker ResNet34 (VoxCeleb, {loaded.layout} checkpoint), TSTP pooling "
                f"eps={model.pooling_eps:g}, {dim}-d embeddings"
            ),
            source={
                "checkpoint": checkpoint.name,
                "weights_file": loaded.weights_path.name,
                "sha256": weights_sha,
                "layout": loaded.layout,
                "pooling_eps": model.pooling_eps,
                "onnx_opset": ONNX_OPSET,
                "onnx_verify_min_cosine": round(worst, 7),
                "trunk_verify_min_cosine": round(trunk_cosine, 7),
                **{k: v for k, v in loaded.notes.items() if v not in (None, [], "")},
            },
        )
        write_manifest(bundle)
        bar.update()
    logger.info("wrote bundle %s to %s (%s)", name, out_dir, ", ".join(artifacts))
    return bundle


def export_onnx(model: nn.Module, path: Path, *, language: str = "English", comment: str = "") -> Path:
    """WeSpeaker-style export (legacy TorchScript exporter) plus sherpa-onnx's metadata keys."""
    import onnx
    import torch

    feat_dim = int(getattr(model, "feat_dim", 80))
    dummy = torch.randn(1, EXPORT_FRAMES, feat_dim)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        # The dynamo exporter needs onnxscript (not a dependency); the TorchScript one is deprecated
        # but exact for this graph, and the export is verified against PyTorch right after.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(tmp),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "B", 1: "T"}, OUTPUT_NAME: {0: "B"}},
            do_constant_folding=True,
        )
    proto = onnx.load(str(tmp))
    meta = {
        "framework": "wespeaker",
        "language": language,
        "url": SHERPA_URL,
        "comment": comment or "converted by speakerd",
        "sample_rate": 16000,
        "output_dim": int(getattr(model, "embed_dim", 256)),
        # WeSpeaker models expect int16-range samples; sherpa-onnx must not rescale to [-1, 1].
        "normalize_samples": 0,
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def verify_onnx(model: nn.Module, path: Path, window_frames: Sequence[int], *, feat_dim: int) -> float:
    """Worst cosine between ONNX Runtime and PyTorch over every window length (batch of 2)."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 1.0
    for frames in window_frames:
        feats = rng.standard_normal((2, frames, feat_dim)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(feats)).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: feats})
        cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        worst = min(worst, float(cos.min()))
    if worst < VERIFY_MIN_COSINE:
        raise ConversionError(f"{path}: ONNX output differs from PyTorch (cosine {worst:.6f} < {VERIFY_MIN_COSINE})")
    return worst


def _export_trunk(model: nn.Module, out_dir: Path, artifacts: dict[str, str]) -> float:
    """The trunk ONNX and the pooling/linear head for ``embedding.trunk = "shared"``, checked to
    reproduce the whole network on a window; returns the worst cosine."""
    from .trunk import MIN_TRUNK_COSINE, export_trunk, verify_trunk

    trunk_path, head_path = export_trunk(model, out_dir, ONNX_OPSET)
    worst = verify_trunk(model, trunk_path, head_path)
    if worst < MIN_TRUNK_COSINE:
        raise ConversionError(f"{trunk_path}: trunk + head differ from the whole network (cosine {worst:.6f})")
    artifacts["onnx_trunk"] = trunk_path.name
    artifacts["head"] = head_path.name
    return worst


def _coreml_hook() -> ModuleType | None:
    """The CoreML converter module if it is present; a missing coremltools only skips CoreML."""
    try:
        return importlib.import_module(COREML_HOOK)
    except ModuleNotFoundError as exc:
        if exc.name == COREML_HOOK:
            logger.info("no CoreML converter (%s) in this checkout; bundle gets ONNX only", COREML_HOOK)
        else:
            logger.warning("CoreML package skipped: %s is not installed (pip install 'speakerd[build]')", exc.name)
        return None


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``speakerd models convert wespeaker``."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        metavar="PATH",
        help="WeSpeaker model directory (avg_model.pt + config.yaml) or pyannote pytorch_model.bin",
    )
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help=f"bundle folder (default: <models>/{BUNDLE_NAME})")
    parser.add_argument(
        "--windows",
        type=float,
        nargs="+",
        default=list(DEFAULT_WINDOW_SECONDS),
        metavar="SECONDS",
        help="window lengths the fixed-shape artifacts are built for",
    )
    parser.add_argument("--no-coreml", action="store_true", help="do not build the CoreML package")
    parser.add_argument("--int8", type=Path, default=None, metavar="LIBRISPEECH_DIR",
                        help="also build an INT8 ONNX file for the CPU, calibrated and checked against FP32 on this "
                             "LibriSpeech folder's test-other speech (embedding.precision = auto uses it if it agrees)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main_convert(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else models_root() / BUNDLE_NAME
    bundle = convert_wespeaker(
        args.checkpoint,
        out,
        window_seconds=tuple(args.windows),
        progress=not args.no_progress,
        coreml=not args.no_coreml,
    )
    if args.int8 is not None:
        from .quantize import add_int8

        bundle = add_int8(bundle.path, args.int8)
    logger.info("model %s ready in %s (fingerprint %s)", bundle.name, bundle.path, bundle.fingerprint)
    return 0
