"""INT8 ECAPA-TDNN (models/ecapa_int8.py): built with the ecapa-speechbrain bundle, checked against
FP32 on speech neither its calibration nor its build check heard, and taken only when asked for."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime.quantization")

from test_ge2e_int8 import assert_only_int8_takes_it, cosines, held_out_windows  # noqa: E402

from speakerd.bundle import resolve_bundle  # noqa: E402
from speakerd.embedding import create_backend  # noqa: E402
from speakerd.embedding.backend import INT8_ARTIFACT  # noqa: E402
from speakerd.models.ecapa_int8 import CALIBRATION_SPEECH_S, INT8_FILE  # noqa: E402
from speakerd.models.ge2e_int8 import needs_int8  # noqa: E402

BUILD_CHECK_END_S = CALIBRATION_SPEECH_S + 10.0 + 180.0
"""Calibration took test-other's first 70 s of speech, the build's check the next 180 s at most."""


@pytest.fixture(scope="module")
def bundle():  # noqa: ANN201
    built = resolve_bundle("ecapa-speechbrain")
    assert built.artifact("onnx") is not None, "scripts/setup builds ecapa-speechbrain; run it"
    return built


def test_the_bundle_records_its_int8_agreement_and_only_int8_takes_it(bundle) -> None:  # noqa: ANN001
    record = bundle.source["int8"]
    # measured at build (2026-12-07): worst 0.9817, median 0.9926 over 64 windows and 64 probes
    assert record["windows"] == 128 and record["lengths_s"] == [1.5, 0.8], record
    assert record["min_cosine"] >= 0.97 and record["median_cosine"] >= 0.99, record
    assert bundle.artifacts[INT8_ARTIFACT] == INT8_FILE and not needs_int8(bundle)
    assert record["auto"] is False and "0.99" in record["why"]
    assert_only_int8_takes_it(bundle)


def test_int8_agrees_with_fp32_on_held_out_windows_and_probes(bundle, librispeech) -> None:  # noqa: ANN001
    windows = held_out_windows(librispeech, bundle.features, seconds=40.0, after_s=BUILD_CHECK_END_S)
    assert {81, 151} <= {w.num_frames for w in windows} and len(windows) > 100
    fp32 = create_backend(bundle, "onnx", precision="fp32")
    int8 = create_backend(bundle, "onnx", precision="int8")
    try:
        ref = np.concatenate([fp32.embed(w.feats[None]) for w in windows])
        got = np.concatenate([int8.embed(w.feats[None]) for w in windows])
    finally:
        fp32.close()
        int8.close()
    cos = cosines(got, ref)
    assert np.median(cos) >= 0.99 and np.percentile(cos, 5) >= 0.975 and cos.min() >= 0.95, (
        f"median {np.median(cos):.4f}, 5th percentile {np.percentile(cos, 5):.4f}, worst {cos.min():.4f}")
