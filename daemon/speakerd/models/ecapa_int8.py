"""INT8 ECAPA-TDNN for the CPU path: static QDQ convolutions, calibrated and checked on real speech.

ECAPA costs about 80 ms of CPU per 1.5 s window in FP32, eight times GE2E. Its convolutions as
QLinearConv halve that (measured on this project's 2-core machine, one thread: 78 -> 38 ms per 1.5 s
window, 46 -> 22 ms per 0.8 s probe). What was measured and left out (docs/BENCHMARKS.md, session 13):
dynamic quantization makes every Conv a ConvInteger, 2.4x *slower* than FP32; quantizing every kind
of node breaks the model (median cosine 0.21: the pooling's statistics); the first convolution,
over log mel, quantized alone costs most of the agreement (median 0.90), so it stays float.
Calibration mixes test-other windows with one window of each of 100 train-clean-100 voices: a
wider range of voices and levels lifts the worst windows.

The agreement with FP32 is recorded in the manifest (``source.int8``). Its worst cosine stays under
the 0.99 ``precision = "auto"`` asks for, so the record says ``"auto": false``; ``embedding.precision
= "int8"`` takes it. Needs no torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import soundfile as sf

from ..bundle import ModelBundle, load_bundle
from ..embedding.backend import INT8_ARTIFACT
from .wespeaker.quantize import agreement, quantize_onnx, record_int8

logger = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
FLOAT_NODES = ("/blocks.0/conv/conv/Conv",)
"""The first convolution (over log mel) stays float."""
CALIBRATION_SPEECH_S = 70.0
"""Calibration takes test-other's first seconds of speech ..."""
CALIBRATION_VOICES = 100
"""... and one window of each of this many train-clean-100 voices."""
CHECK = ((1.5, 64), (0.8, 64))
"""Held-out windows (length in seconds, count) of test-other speech after the calibration's."""
NOT_DEFAULT_WHY = "worst cosine to FP32 under 0.99 on real speech; its decisions in eval's room are in docs/BENCHMARKS.md (session 13)"


def calibration_windows(bundle: ModelBundle, data: Path) -> list[np.ndarray]:
    """1.5 s windows of test-other speech and of many train-clean-100 voices, through the daemon's windower."""
    from ..bench import speech, windows_of
    from ..settings import Settings

    settings = Settings()
    feats = [w.feats for w in windows_of(speech(data, CALIBRATION_SPEECH_S), settings, bundle.features, 1.5, 100)]
    for clip in sorted((data / "train-clean-100").glob("*.flac"))[:CALIBRATION_VOICES]:
        audio, _ = sf.read(str(clip), dtype="float32")
        try:
            feats.append(windows_of(audio, settings, bundle.features, 1.5, 1)[0].feats)
        except RuntimeError:  # a clip with no 1.5 s stretch of speech
            continue
    return feats


def check_windows(bundle: ModelBundle, data: Path) -> list[np.ndarray]:
    """Windows and probes of test-other speech the calibration did not hear."""
    from ..audio import SAMPLE_RATE
    from ..bench import speech, windows_of
    from ..settings import Settings

    later = speech(data, CALIBRATION_SPEECH_S + 180.0)[int((CALIBRATION_SPEECH_S + 10.0) * SAMPLE_RATE) :]
    feats: list[np.ndarray] = []
    for seconds, count in CHECK:
        feats += [w.feats for w in windows_of(later, Settings(), bundle.features, seconds, count)]
    return feats


def add_ecapa_int8(bundle_dir: Path, data: Path | None) -> ModelBundle:
    """Build the INT8 file beside the FP32 one and record its agreement in the manifest. Without the
    LibriSpeech clips nothing is added: the calibration and the check need real speech."""
    bundle = load_bundle(bundle_dir)
    if data is None or not (data / "test-other").is_dir():
        logger.warning("no INT8 file for %s: no LibriSpeech clips to calibrate and check it on (%s)", bundle.name, data)
        return bundle
    src = bundle.require_artifact("onnx")
    names = (bundle.io.get("input", "feats"), bundle.io.get("output", "embs"))
    calibration = calibration_windows(bundle, data)
    dst = quantize_onnx(src, Path(bundle.path) / INT8_FILE, calibration, names[0], op_types=("Conv",), exclude=FLOAT_NODES)
    agree = {k: round(v, 6) if isinstance(v, float) else v for k, v in agreement(src, dst, check_windows(bundle, data), names).items()}
    logger.info("INT8 against FP32 on %d real windows and probes: worst cosine %.4f, median %.4f",
                agree["windows"], agree["min_cosine"], agree["median_cosine"])  # fmt: skip
    record = {**agree, "calibration_windows": len(calibration), "data": "librispeech test-other, train-clean-100",
              "lengths_s": [s for s, _ in CHECK], "auto": False, "why": NOT_DEFAULT_WHY}
    return record_int8(bundle, {INT8_ARTIFACT: INT8_FILE}, record)
