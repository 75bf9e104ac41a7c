"""``speakerd bench`` runs the peers beside speakerd: Resemblyzer's offline pass and ``speakerd run``
as whole processes on the same file, sherpa-onnx on 1.5 s windows; reported as ratios (speed is
measured, never asserted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speakerd import benchpeers
from speakerd.bench import render, speech
from speakerd.bundle import load_bundle


def test_resemblyzer_and_speakerd_whole_processes_on_the_same_file(librispeech: Path, default_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    bundle = load_bundle(default_model)
    wav = tmp_path / "speech.wav"
    sf.write(str(wav), speech(librispeech, 8.0), 16000, subtype="PCM_16")
    result = benchpeers.compare_default(wav, bundle, tmp_path / "work", repeats=1)
    assert result["peer"] == "resemblyzer" and result["audio_s"] == pytest.approx(8.0, abs=0.01)
    # Resemblyzer's own slicing: 1.6 s partials every 0.25 s over the whole file
    assert result["peer_windows"] == pytest.approx((8.0 - 1.6) / 0.25 + 1, abs=2)
    assert 0 < result["peer_pass_s"] < result["peer_process_s"]
    assert result["speakerd_process_s"] > 0 and result["speed_ratio"] == pytest.approx(result["peer_process_s"] / result["speakerd_process_s"])
    assert not (tmp_path / "work" / "store").exists() or (tmp_path / "work" / "store").is_dir()  # its own store, not the user's
    text = render({"stages": {}, "pipeline": {}, "per_window": [], "sherpa_anchor": None, "notes": [], "peers": {bundle.name: result}})
    assert "Resemblyzer offline pass" in text and f"{result['speed_ratio']:.2f}" in text


def test_sherpa_on_non_overlapping_windows_against_a_pipeline(librispeech: Path, tmp_path: Path) -> None:
    pytest.importorskip("sherpa_onnx")
    pytest.importorskip("torch")
    from speakerd.models.wespeaker import convert as conv
    from speakerd.models.wespeaker.checkpoint import write_wespeaker_dir
    from test_wespeaker_convert import random_model

    ckpt = write_wespeaker_dir(random_model(0), tmp_path / "voxceleb_resnet34_LM")
    bundle = conv.convert_wespeaker(ckpt, tmp_path / "bundle", window_seconds=(1.5,), progress=False, coreml=False)
    audio = speech(librispeech, 6.2)
    result = benchpeers.compare_sherpa(audio, bundle, 1, lambda: 0.5, repeats=1)
    assert result["peer_windows"] == 4  # 6.2 s in whole 1.5 s windows
    assert result["speed_ratio"] == pytest.approx(result["peer_pass_s"] / 0.5)
    text = render({"stages": {}, "pipeline": {}, "per_window": [], "sherpa_anchor": None, "notes": [], "peers": {bundle.name: result}})
    assert "sherpa-onnx, 4 windows of 1.5 s" in text
    assert np.isfinite(result["peer_x_real_time"])
