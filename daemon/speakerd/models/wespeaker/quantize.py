"""INT8 ResNet34 for the CPU path: ONNX Runtime static quantization, calibrated and checked on real speech.

Static QDQ quantization (int8 weights per channel, uint8 activations calibrated on real fbank
windows) lets ONNX Runtime run the convolutions as QLinearConv, which uses VNNI where the CPU has
it: about 4x faster than FP32 per 1.5 s window on this project's 2-core machines. Dynamic
quantization was not used: its ConvInteger kernels are slower than FP32 convolutions.

Agreement with FP32 is measured on windows the calibration never saw and recorded in the manifest
(``int8``); ``embedding.precision = "auto"`` uses the INT8 file only when the worst cosine there is
at least :data:`MIN_AGREEMENT`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...bundle import ModelBundle, load_bundle, write_manifest
from ...embedding.backend import INT8_ARTIFACT

logger = logging.getLogger(__name__)

INT8_FILE = "wespeaker_resnet34.int8.onnx"
TRUNK_INT8_FILE = "wespeaker_resnet34.trunk.int8.onnx"
CALIBRATION_WINDOWS = 32
CHECK_WINDOWS = 64


class QuantizeError(Exception):
    """The INT8 model cannot be built or disagrees with FP32."""


def real_windows(bundle: ModelBundle, data: Path, count: int) -> list[np.ndarray]:
    """``count`` 1.5 s windows of real speech (LibriSpeech test-other), through the daemon's windower."""
    from ...bench import speech, windows_of
    from ...settings import Settings

    audio = speech(data, max(60.0, count * 0.6))
    return [w.feats for w in windows_of(audio, Settings(), bundle.features, 1.5, count)]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of windows."""

    def __init__(self, feats: Sequence[np.ndarray], name: str) -> None:
        self._items = iter([{name: f[None].astype(np.float32)} for f in feats])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def quantize_onnx(src: Path, dst: Path, calibration: Sequence[np.ndarray], input_name: str = "feats", *,
                  op_types: Sequence[str] = (), exclude: Sequence[str] = ()) -> Path:
    """Static QDQ INT8 of ``src`` calibrated on ``calibration`` windows (each (T, bins)); ``op_types``:
    only these kinds of node (all that can be, if empty), ``exclude``: nodes kept in float."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

    class Reader(_Reader, CalibrationDataReader):
        pass

    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre))
        quantize_static(
            str(pre), str(dst), Reader(calibration, input_name), quant_format=QuantFormat.QDQ,
            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
            op_types_to_quantize=list(op_types) or None, nodes_to_exclude=list(exclude) or None,
        )  # fmt: skip
    finally:
        pre.unlink(missing_ok=True)
    return dst


def agreement(fp32: Path, int8: Path, feats: Sequence[np.ndarray], names: tuple[str, str] = ("feats", "embs")) -> dict[str, float]:
    """Cosine between FP32 and INT8 embeddings of each window: worst, median, count."""
    from ...embedding.onnx_backend import make_session

    a_session, b_session = make_session(fp32, 1), make_session(int8, 1)
    cos = []
    for f in feats:
        x = {names[0]: f[None].astype(np.float32)}
        a = a_session.run([names[1]], x)[0][0]
        b = b_session.run([names[1]], x)[0][0]
        cos.append(float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
    return {"min_cosine": float(np.min(cos)), "median_cosine": float(np.median(cos)), "windows": len(cos)}


def add_int8(bundle_dir: Path, data: Path) -> ModelBundle:
    """Build the INT8 file beside the FP32 one, measure its agreement, record both in the manifest."""
    bundle = load_bundle(bundle_dir)
    src = bundle.require_artifact("onnx")
    windows = real_windows(bundle, data, CALIBRATION_WINDOWS + CHECK_WINDOWS)
    calibration, held_out = windows[:CALIBRATION_WINDOWS], windows[CALIBRATION_WINDOWS:]
    dst = Path(bundle.path) / INT8_FILE
    quantize_onnx(src, dst, calibration, bundle.io.get("input", "feats"))
    agree = agreement(src, dst, held_out, (bundle.io.get("input", "feats"), bundle.io.get("output", "embs")))
    logger.info("INT8 against FP32 on %d real windows: worst cosine %.4f, median %.4f",
                agree["windows"], agree["min_cosine"], agree["median_cosine"])  # fmt: skip
    record = {**agree, "calibration_windows": len(calibration), "data": "librispeech test-other"}
    artifacts = {INT8_ARTIFACT: INT8_FILE}
    trunk = bundle.artifact("onnx_trunk")
    if trunk is not None:  # the shared trunk's INT8 twin, checked through the head the same way
        trunk8 = quantize_onnx(trunk, Path(bundle.path) / TRUNK_INT8_FILE, calibration)
        record["trunk"] = trunk_agreement(bundle, trunk, trunk8, held_out)
        artifacts["onnx_trunk_int8"] = TRUNK_INT8_FILE
    return record_int8(bundle, artifacts, record)


def record_int8(bundle: ModelBundle, artifacts: dict[str, str], record: dict[str, Any]) -> ModelBundle:
    """``bundle`` with its INT8 files (``artifacts``: artifact name -> file) and their agreement with
    FP32 (``source.int8``, which ``precision = "auto"`` reads) written to its manifest, reloaded."""
    write_manifest(dataclasses.replace(bundle, artifacts={**bundle.artifacts, **artifacts}, source={**bundle.source, "int8": record}))
    return load_bundle(bundle.path)


def trunk_agreement(bundle: ModelBundle, fp32: Path, int8: Path, feats: Sequence[np.ndarray]) -> dict[str, float]:
    """Cosine between FP32 and INT8 trunk outputs pooled by the head, per window."""
    from ...embedding.onnx_backend import make_session
    from ...embedding.trunk import HEAD_ARTIFACT, Head

    head = Head.load(bundle.require_artifact(HEAD_ARTIFACT), float(bundle.source.get("pooling_eps", 1e-7)))
    a_session, b_session = make_session(fp32, 1), make_session(int8, 1)
    cos = []
    for f in feats:
        x = {"feats": f[None].astype(np.float32)}
        a, b = head.embed([a_session.run(None, x)[0][0], b_session.run(None, x)[0][0]])
        cos.append(float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
    return {"min_cosine": float(np.min(cos)), "median_cosine": float(np.median(cos)), "windows": len(cos)}

