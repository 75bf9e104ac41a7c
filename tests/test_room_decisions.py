"""End to end through the real CLI: a voice enrolled from clean clips is still named when heard
through a simulated room (the cohort compensation of decisions.cohort), and a same-room
conversation with nobody enrolled gets one provisional speaker per voice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pyroomacoustics", reason="the room simulation needs pyroomacoustics (speakerd[eval])")

pytestmark = pytest.mark.slow

DAEMON = Path(__file__).resolve().parents[1] / "daemon"
ROOM = ["--meetings", "1", "--enrolled", "4", "--unknown", "0", "--turns", "10", "--window-lengths", "1.5",
        "--room", "0.45", "--snr", "18", "--nobody", "3", "--seed", "0"]


def _eval(librispeech: Path, out: Path, config: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(DAEMON), "XDG_CONFIG_HOME": str(out / "xdg"), "XDG_DATA_HOME": str(out / "xdg")}
    argv = [sys.executable, "-m", "speakerd.cli", "eval", str(librispeech), *ROOM, "--out", str(out / "eval")]
    if config is not None:
        argv += ["--config", str(config)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "eval" / "report.json").read_text())["results"][0]["conditions"]


@pytest.fixture(scope="module")
def conditions(librispeech: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _eval(librispeech, tmp_path_factory.mktemp("room-decisions"))


def test_voices_enrolled_from_clean_clips_are_named_across_the_room(conditions: dict) -> None:
    enrolled = conditions["enrolled"]
    # without the cohort (cohort_top_n = 0) this meeting names 0-10 % (every score under 0.70)
    assert enrolled["identification"] >= 0.35
    assert enrolled["missed"] <= 0.05


def test_nobody_enrolled_gets_one_provisional_speaker_per_voice(conditions: dict) -> None:
    nobody = conditions["nobody"]["provisional"]
    assert abs(nobody["speakers_per_meeting"] - nobody["voices_per_meeting"]) <= 1
    # 3 speakers for 3 voices, purity 0.93 (0.94 with the room's clustering bars off); the raised
    # bars leave more of this short meeting's speech anonymous: coverage 0.67 (0.85 off)
    assert nobody["purity"] >= 0.9 and nobody["coverage"] >= 0.6
