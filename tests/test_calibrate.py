"""Threshold calibration: the table arithmetic on hand-made scores, and the command on real speech."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import speakerd
from decision_values import GE2E
from test_decision_values import bundle_copy

from speakerd.bundle import load_bundle
from speakerd.calibrate import CalibrationError, Row, Scores, choose, score_groups, table
from speakerd.decisions.values import DecisionValues
from speakerd.settings import load_settings


def test_table_counts_false_accepts_and_rejects() -> None:
    scores = Scores(
        genuine=np.array([0.9, 0.8, 0.7, 0.75]),
        genuine_named=np.array([True, True, True, False]),  # the last one's best speaker is someone else
        impostor=np.array([0.5, 0.65, 0.72, 0.6]),
    )
    rows = {r.threshold: r for r in table(scores, (0.6, 0.7, 0.76))}
    assert rows[0.6] == Row(0.6, 0.75, 0.25)
    assert rows[0.7] == Row(0.7, 0.25, 0.25)
    assert rows[0.76] == Row(0.76, 0.0, 0.5)
    assert choose(list(rows.values()), 0.3).threshold == 0.7
    assert choose(list(rows.values()), 0.0).threshold == 0.76
    with pytest.raises(CalibrationError, match="cannot tell"):
        choose([Row(0.9, 0.2, 0.9)], 0.01)


def test_groups_score_the_centroid_of_neighbouring_windows() -> None:
    known = {"a": [np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])]}
    seen = []

    def centroid_score(v: np.ndarray):
        seen.append(tuple(v))
        return "a", 0.5, {"a": 0.5}

    s = score_groups(known, [np.array([[2.0, 0.0], [0.0, 2.0]])], centroid_score, 2)
    assert seen == [(0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
    assert len(s.genuine) == 2 and len(s.impostor) == 1 and s.genuine_named.all()


@pytest.mark.slow
def test_calibrate_on_shared_speech_reproduces_the_defaults(librispeech: Path, default_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "calibrated.toml"
    uncalibrated = bundle_copy(tmp_path, None)  # the default model, its decision values gone
    proc = speakerd(
        "calibrate", "--known", str(librispeech / "test-other"), "--unknown", str(librispeech / "train-clean-100"),
        "--write", str(out), "--write-bundle", str(uncalibrated),
    )
    assert "| 0.70 |" in proc.stdout and "<- chosen" in proc.stdout
    chosen = tomllib.loads(out.read_text())
    assert chosen["decision"]["threshold"] == GE2E.threshold
    assert chosen["decision"]["fold_threshold"] == GE2E.fold_threshold
    # the file is a valid --config
    assert load_settings(out).decision.threshold == chosen["decision"]["threshold"]
    # the bundle now carries the model's values: measured, and the rest moved with the threshold;
    # the optional room values (cohort, adaptation) are not calibrate's to carry over
    required = DecisionValues.required()
    assert load_bundle(uncalibrated).decision == {k: v for k, v in GE2E.to_dict().items() if k in required}
    # the figures behind the choice (docs/calibration.md): per window FA <= 3.5 %, FR <= 2.5 %
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| 0.70 |"))
    fa, fr = (float(x.strip().rstrip("%")) for x in row.split("|")[2:4])
    assert fa <= 3.5 and fr <= 2.5, row
