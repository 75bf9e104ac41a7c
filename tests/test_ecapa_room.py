"""End to end through the real CLI with the room model: voices enrolled from clean clips are named
across a simulated room by ecapa-speechbrain with its bundled decision values, where the default model
names far less of the same meeting (tests/test_room_decisions.py)."""

from __future__ import annotations

import pytest
from test_room_decisions import ROOM, _eval

pytest.importorskip("pyroomacoustics", reason="the room simulation needs pyroomacoustics (speakerd[eval])")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def conditions(librispeech, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: ANN001
    out = tmp_path_factory.mktemp("ecapa-room")
    config = out / "ecapa.toml"
    config.write_text('[embedding]\nmodel = "ecapa-speechbrain"\n')
    return _eval(librispeech, out, config)


def test_the_room_model_names_voices_enrolled_from_clean_clips_across_the_room(conditions: dict) -> None:
    enrolled = conditions["enrolled"]
    assert enrolled["identification"] >= 0.90
    assert enrolled["missed"] <= 0.03


def test_the_room_model_gives_one_provisional_speaker_per_unenrolled_voice(conditions: dict) -> None:
    nobody = conditions["nobody"]["provisional"]
    assert abs(nobody["speakers_per_meeting"] - nobody["voices_per_meeting"]) <= 1
    assert nobody["purity"] >= 0.9
