"""INT8 GE2E for the CPU path: ONNX Runtime dynamic quantization, checked against FP32 on real speech.

The live daemon embeds one window at a time, and a batch-of-one LSTM step is a matrix-vector
product that reads every recurrent weight once per frame: INT8 weights halve what is read and let
ONNX Runtime's DynamicQuantizeLSTM use integer kernels. Measured on this project's 2-core machine:
a 1.5 s window 11.8 -> 6.3 ms of CPU, a 0.8 s probe 6.4 -> 3.2 ms (batch of one, under load).

The agreement with FP32 is measured on real 1.5 s windows and 0.8 s probes and recorded in the
manifest (``source.int8``). It holds (worst cosine 0.994 with session 8's onnxruntime, 0.999 with
1.32's), and clean decisions do not move, but in the room (session 14, seeds 0-4) identification
falls 0.40 points on average, about what random noise of the same size does to FP32 (-0.44), and
with its own cohort, as a default would run it, 0.65 points and 1.06 points more never-enrolled
speech named as enrolled (docs/BENCHMARKS.md, issue 16). The room is this project's main job: the
record says ``"auto": false`` and ``embedding.precision = "auto"`` keeps FP32. ``embedding.precision = "int8"``
takes it, with INT8 lockstep rows (models/ge2e_stream.py): about a quarter less live CPU. Needs no torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..bundle import ModelBundle, load_bundle
from ..embedding.backend import INT8_ARTIFACT

logger = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
CHECK_SECONDS = ((1.5, 64), (0.8, 64))
"""Window lengths (the daemon's regular windows and probes) and how many of each the check embeds."""
CHECK_DATA = "librispeech test-other"
BY_DEFAULT = False
"""Whether ``precision = "auto"`` takes the INT8 file (recorded as ``source.int8.auto``)."""
NOT_DEFAULT_WHY = ("room decisions: with its own cohort, it named 1.06 points more never-enrolled speech as enrolled over "
                   "seeds 0-4 (identification -0.65; random noise of its size: -0.44); clean unchanged "
                   "(docs/BENCHMARKS.md, issue 16, session 14)")


class Int8Error(Exception):
    """The INT8 file cannot be built."""


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 with per-channel weights for LSTM layers 2-3 and the linear layer. Layer 1 stays
    float because its input is mel *power*, whose range per-tensor uint8 activations cannot hold
    (quantising it too took window EER from 6% to 38%)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    lstms = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "LSTM"]
    if not lstms:
        raise Int8Error(f"{src} has no LSTM node to keep in float")
    tmp = dst.with_name(f".{dst.name}.tmp")
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=[lstms[0]])
    tmp.replace(dst)
    return dst


def check_windows(bundle: ModelBundle, data: Path) -> list[np.ndarray]:
    """Real windows of each :data:`CHECK_SECONDS` length, through the daemon's VAD and windower."""
    from ..bench import speech, windows_of
    from ..settings import Settings

    audio = speech(data, 120.0)
    feats: list[np.ndarray] = []
    for seconds, count in CHECK_SECONDS:
        feats += [w.feats for w in windows_of(audio, Settings(), bundle.features, seconds, count)]
    return feats


def add_int8(bundle_dir: Path, data: Path | None) -> ModelBundle:
    """Build the INT8 file beside the FP32 one and record its agreement in the manifest.

    Without the LibriSpeech clips nothing is added (agreement must be measured on real speech), and
    the bundle runs FP32 as before.
    """
    from .wespeaker.quantize import agreement, record_int8

    bundle = load_bundle(bundle_dir)
    if data is None or not (data / "test-other").is_dir():
        logger.warning("no INT8 file for %s: no LibriSpeech test-other clips to check it on (%s)", bundle.name, data)
        return bundle
    src = bundle.require_artifact("onnx")
    dst = quantize_int8(src, Path(bundle.path) / INT8_FILE)
    agree = agreement(src, dst, check_windows(bundle, data), (bundle.io.get("input", "feats"), bundle.io.get("output", "embs")))
    agree = {k: round(v, 6) if isinstance(v, float) else v for k, v in agree.items()}
    logger.info("INT8 against FP32 on %d real windows and probes: worst cosine %.4f, median %.4f",
                agree["windows"], agree["min_cosine"], agree["median_cosine"])  # fmt: skip
    record = {**agree, "data": CHECK_DATA, "lengths_s": [s for s, _ in CHECK_SECONDS], "auto": BY_DEFAULT}
    if not BY_DEFAULT:
        record["why"] = NOT_DEFAULT_WHY
    return record_int8(bundle, {INT8_ARTIFACT: INT8_FILE}, record)


def needs_int8(bundle: ModelBundle) -> bool:
    """A built bundle whose manifest names an INT8 file that is not there (built before INT8 was added)."""
    return bundle.artifact("onnx") is not None and INT8_ARTIFACT in bundle.artifacts and bundle.artifact(INT8_ARTIFACT) is None
