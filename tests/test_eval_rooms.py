"""``speakerd eval`` in simulated rooms: every enrollment in its own rows, the nobody-enrolled
condition judged by its provisional speakers, and the VAD comparison."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from speakerd.evaluation.evaluate import add_eval_arguments, main_eval

pytest.importorskip("pyroomacoustics", reason="the room simulation needs pyroomacoustics (speakerd[eval])")

pytestmark = pytest.mark.slow


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def _in_unit(x: float | None) -> bool:
    return x is not None and 0.0 <= x <= 1.0


SMALL = ["--meetings", "1", "--enrolled", "3", "--unknown", "1", "--turns", "6", "--window-lengths", "1.5",
         "--room", "0.45", "--snr", "18"]


@pytest.fixture(scope="module")
def report(librispeech: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("eval-room")
    argv = [str(librispeech), *SMALL, "--enrollment", "clean,room,multi", "--room-versions", "1", "--nobody", "3",
            "--overlap", "0.3", "--interjections", "0.3", "--out", str(out)]
    assert main_eval(_args(argv)) == 0
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_each_enrollment_has_its_own_rows(report: tuple[dict, str]) -> None:
    data, md = report
    conditions = data["results"][0]["conditions"]
    assert set(conditions) == {"enrolled", "open", "nobody", "enrolled, room enrollment", "open, room enrollment",
                               "enrolled, multi enrollment", "open, multi enrollment"}
    for name, a in conditions.items():
        if name != "nobody":
            assert _in_unit(a["identification"]), name
    # enrolled in the meeting's own room, the voices are known there; from clean clips, far less so
    assert conditions["enrolled, room enrollment"]["identification"] > conditions["enrolled"]["identification"] + 0.2
    assert set(data["results"][0]["windows_by_enrollment"]) == {"clean", "room", "multi"}
    assert "Room: one simulated room per meeting" in md and "| 1.5 s | enrolled, room enrollment |" in md


def test_never_enrolled_voices_are_followed_to_provisional_speakers(report: tuple[dict, str]) -> None:
    data, md = report
    nobody = data["results"][0]["conditions"]["nobody"]
    p = nobody["provisional"]
    assert p["voices_per_meeting"] == 3
    assert p["speakers_per_meeting"] >= 1 and _in_unit(p["coverage"]) and _in_unit(p["purity"])
    assert nobody["identification"] is None and nobody["unknown_speech_s"] > 10
    opened = data["results"][0]["conditions"]["open"]
    assert _in_unit(opened["unknown_false_accept"]) and _in_unit(opened["provisional"]["coverage"])
    assert "| 1.5 s | nobody |" in md.split("Never-enrolled voices")[1]


def test_overlapping_handovers_are_their_own_kind(report: tuple[dict, str]) -> None:
    data, _ = report
    kinds = data["results"][0]["conditions"]["enrolled, room enrollment"]["latency_by_kind"]
    assert set(kinds) == {"after_pause", "direct", "overlap"}


def test_vad_comparison_on_the_rooms(librispeech: Path, tmp_path: Path) -> None:
    assert main_eval(_args([str(librispeech), *SMALL, "--vad-compare", "--out", str(tmp_path)])) == 0
    figures = json.loads((tmp_path / "vad.json").read_text())["vad"]
    assert len(figures) == 3
    for f in figures.values():
        assert all(_in_unit(f[k]) for k in ("regions_missed", "regions_admitted", "frames_missed", "frames_admitted", "babble_admitted"))
    silero = next(f for name, f in figures.items() if name.startswith("silero"))
    webrtc = next(f for name, f in figures.items() if name.startswith("webrtc (aggressiveness 2)"))
    assert silero["babble_admitted"] <= webrtc["babble_admitted"]
    assert silero["regions_missed"] < 0.1
    assert "| silero (threshold 0.5) |" in (tmp_path / "vad.md").read_text()


def test_room_enrollment_without_a_room_is_refused(librispeech: Path, tmp_path: Path) -> None:
    argv = [str(librispeech), "--meetings", "1", "--enrollment", "room", "--out", str(tmp_path)]
    assert main_eval(_args(argv)) == 2
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("flags", [["--overlap", "1.5"], ["--interjections", "-0.1"], ["--room-versions", "99"], ["--nobody", "1"]])
def test_bad_room_flags_are_refused_before_any_work(librispeech: Path, tmp_path: Path, flags: list[str]) -> None:
    assert main_eval(_args([str(librispeech), "--room", *flags, "--out", str(tmp_path)])) == 2
    assert not list(tmp_path.iterdir())
