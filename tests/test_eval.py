"""A small ``speakerd eval`` through the real enrollment, the real pipeline and the real file source."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from speakerd.evaluation.evaluate import add_eval_arguments, main_eval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def report(librispeech: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval")
    argv = [str(librispeech), "--meetings", "1", "--enrolled", "3", "--unknown", "1", "--turns", "6",
            "--window-lengths", "1.5,2.0", "--out", str(out)]
    assert main_eval(_args(argv)) == 0
    return json.loads((out / "report.json").read_text()), out


def len_detected(a: dict) -> int:
    """True changes the daemon announced within its 0.5 s before / 3 s after window."""
    return round(a["change_detection"]["recall"] * a["change_detection"]["true"])


def _in_unit(x: float | None) -> bool:
    return x is not None and 0.0 <= x <= 1.0


def test_every_figure_is_reported_for_each_window_length(report: tuple[dict, Path]) -> None:
    data, _ = report
    assert [r["window_length_s"] for r in data["results"]] == [1.5, 2.0]
    for res in data["results"]:
        assert set(res["conditions"]) == {"enrolled", "open"}
        for cond, a in res["conditions"].items():
            for key in ("der", "missed", "false_alarm", "confusion", "identification"):
                assert _in_unit(a[key]), (cond, key, a[key])
            assert a["missed"] + a["false_alarm"] + a["confusion"] == pytest.approx(a["der"])
            for kind in ("change_boundary", "change_detection"):
                assert all(_in_unit(a[kind][k]) for k in ("precision", "recall", "f1"))
                assert a[kind]["true"] >= 1
            assert a["latency_median_s"] is not None and -0.5 <= a["latency_median_s"] <= 3.0
            assert a["latency_p95_s"] >= a["latency_median_s"]
            assert a["audio_s"] > 10
            shares = a["enrolled_speech_as"]
            assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
            assert shares["right"] == pytest.approx(a["identification"], abs=0.02)  # exact vs 10 ms grid
            kinds = a["latency_by_kind"]
            # each kind is matched on its own, so it can only find as many changes as the joint matching or more
            assert kinds["overlap"]["count"] == 0  # no overlapping hand-overs unless asked (--overlap)
            assert len_detected(a) <= kinds["after_pause"]["count"] + kinds["direct"]["count"] <= a["change_detection"]["true"]
        assert res["conditions"]["enrolled"]["unknown_false_accept"] is None  # no unknown voice in it
        assert _in_unit(res["conditions"]["open"]["unknown_false_accept"])
        w = res["windows"]
        assert _in_unit(w["eer"]) and w["target_trials"] > 10 and w["nontarget_trials"] > w["target_trials"]
        assert len(w["thresholds"]) == 12
        assert w["unknown_pure"] > 0 and _in_unit(w["unknown_window_accept"])
        assert all(_in_unit(row["false_accept"]) and _in_unit(row["false_reject"]) for row in w["thresholds"])
        fa = [row["false_accept"] for row in w["thresholds"]]
        assert fa == sorted(fa, reverse=True)  # a higher threshold never accepts more


def test_daemon_names_enrolled_speakers_on_this_small_run(report: tuple[dict, Path]) -> None:
    """A floor far below the target (97 %), so only a broken path fails it: a wrong mapping or label."""
    data, _ = report
    assert data["results"][0]["conditions"]["enrolled"]["identification"] > 0.6
    assert data["results"][0]["windows"]["eer"] < 0.3


def test_markdown_and_plots_are_written(report: tuple[dict, Path]) -> None:
    data, out = report
    md = (out / "report.md").read_text()
    assert "| 1.5 s | enrolled |" in md and "| 2.0 s | open |" in md and "EER" in md
    for name in ("timeline.png", "det.png"):
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 10_000, name
    assert not math.isnan(data["elapsed_s"])
