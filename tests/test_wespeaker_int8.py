"""INT8 ResNet34 for the CPU: built from a converted bundle, checked against FP32 on real speech,
chosen by ``embedding.precision``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")

from speakerd.bundle import load_bundle  # noqa: E402
from speakerd.embedding.backend import BackendError, MIN_INT8_AGREEMENT, create_backend  # noqa: E402
from speakerd.embedding.worker import EmbeddingSettings  # noqa: E402
from speakerd.errors import ConfigError  # noqa: E402
from speakerd.models.wespeaker import convert as conv  # noqa: E402
from speakerd.models.wespeaker.checkpoint import write_wespeaker_dir  # noqa: E402
from speakerd.models.wespeaker.quantize import add_int8, agreement, real_windows  # noqa: E402
from test_wespeaker_convert import random_model  # noqa: E402


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("int8")
    ckpt = write_wespeaker_dir(random_model(0), root / "voxceleb_resnet34_LM")
    return conv.convert_wespeaker(ckpt, root / "bundle", window_seconds=(1.5,), progress=False, coreml=False).path


def test_int8_agrees_with_fp32_on_real_speech_and_auto_takes_it(fp32_bundle: Path, librispeech: Path) -> None:
    without = load_bundle(fp32_bundle)
    assert create_backend(without, "onnx", precision="auto").name == "onnx"  # nothing to take yet
    with pytest.raises(BackendError, match="no INT8 file"):
        create_backend(without, "onnx", precision="int8")

    bundle = add_int8(fp32_bundle, librispeech)
    record = bundle.source["int8"]
    assert record["windows"] == 64 and record["min_cosine"] >= MIN_INT8_AGREEMENT, record
    assert record["trunk"]["min_cosine"] >= MIN_INT8_AGREEMENT, record  # the shared trunk's INT8 twin
    assert bundle.artifact("onnx_trunk_int8") is not None
    # measured again here, on other real windows than the build used
    feats = real_windows(bundle, librispeech, 140)[-40:]
    again = agreement(bundle.require_artifact("onnx"), bundle.require_artifact("onnx_int8"), feats)
    assert again["min_cosine"] >= MIN_INT8_AGREEMENT and again["median_cosine"] >= 0.995, again

    auto = create_backend(bundle, "onnx", precision="auto")
    fp32 = create_backend(bundle, "onnx", precision="fp32")
    assert auto.name == "onnx (onnx_int8)" and fp32.name == "onnx"
    batch = np.stack(feats[:4])
    cos = np.sum(auto.embed(batch) * fp32.embed(batch), axis=1)
    assert cos.min() >= MIN_INT8_AGREEMENT
    auto.close()
    fp32.close()


def test_auto_keeps_fp32_when_the_recorded_agreement_is_too_low(fp32_bundle: Path, librispeech: Path) -> None:
    import dataclasses

    bundle = load_bundle(fp32_bundle)
    if bundle.artifact("onnx_int8") is None:
        bundle = add_int8(fp32_bundle, librispeech)
    poor = dataclasses.replace(bundle, source={**bundle.source, "int8": {**bundle.source["int8"], "min_cosine": 0.95}})
    assert create_backend(poor, "onnx", precision="auto").name == "onnx"
    assert create_backend(poor, "onnx", precision="int8").name == "onnx (onnx_int8)"


def test_precision_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="embedding.precision"):
        EmbeddingSettings(precision="int4")
