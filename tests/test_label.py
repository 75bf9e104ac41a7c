"""``speakerd label``: transcript formats in, the same formats out with speakers (fast, no daemon)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import speakerd
from test_client_timeline import ALICE, BOB, WALL0, Stream, change, segment

from speakerd.events import SpeechEnd, SpeechStart
from speakerd.label import LabelError, label_transcript, parse_start_time, timeline_answer
from speakerd.transcripts import TranscriptError, read_transcript


def two_turns(session: str = "aaaaaaaaaaaa", wall0: float = WALL0) -> list[dict[str, Any]]:
    """Alice 1-5 s, Bob 5-9 s (stream time)."""
    ev = Stream(session, wall0)
    return [
        ev(SpeechStart(1.0), 1.2), ev(change(ALICE, None, 1.0), 2.0), ev(change(BOB, ALICE, 5.0, tentative=True), 5.6),
        ev(change(BOB, ALICE, 5.0), 6.0), ev(segment(ALICE, 1.0, 5.0), 6.0), ev(SpeechEnd(1.0, 9.0), 9.5),
        ev(segment(BOB, 5.0, 9.0), 9.5),
    ]


def whisper(segments: list[tuple[float, float, list[tuple[float, float, str]]]]) -> str:
    return json.dumps({"text": "...", "language": "en", "segments": [
        {"id": i, "seek": 0, "start": a, "end": b, "text": "".join(w for _, _, w in words) or " hello",
         "tokens": [1, 2, 3], **({"words": [{"word": w, "start": x, "end": y, "probability": 0.9} for x, y, w in words]} if words else {})}
        for i, (a, b, words) in enumerate(segments)
    ]})


def test_whisper_json_gets_a_speaker_per_segment_and_word_and_is_split_at_the_change() -> None:
    text = whisper([
        (1.0, 3.0, []),
        (3.5, 7.0, [(3.5, 4.0, " so"), (4.0, 4.8, " that"), (5.1, 5.6, " yes"), (5.7, 7.0, " indeed")]),
        (7.0, 8.5, [(7.0, 8.5, " right")]),
    ])
    out = json.loads(label_transcript(read_transcript(text), timeline_answer(two_turns())))
    segs = out["segments"]
    assert [(s["start"], s["end"], s["speaker"], s["text"]) for s in segs] == [
        (1.0, 3.0, "Alice", " hello"), (3.5, 5.1, "Alice", " so that"), (5.1, 7.0, "Bob", " yes indeed"), (7.0, 8.5, "Bob", " right"),
    ]
    assert [w["speaker"] for s in segs for w in s.get("words", [])] == ["Alice", "Alice", "Bob", "Bob", "Bob"]
    assert [s["id"] for s in segs] == [0, 1, 2, 3]  # renumbered after the split
    assert "tokens" not in segs[1] and segs[0]["tokens"] == [1, 2, 3]  # a split piece's tokens would lie
    assert out["language"] == "en"


def test_a_segment_without_words_takes_the_speaker_covering_most_of_it() -> None:
    out = json.loads(label_transcript(read_transcript(whisper([(4.0, 7.0, []), (4.5, 5.5, [])])), timeline_answer(two_turns())))
    assert [s["speaker"] for s in out["segments"]] == ["Bob", "Alice"]  # 4-7: Bob 2 s; 4.5-5.5: a tie goes to the first


SRT = """1
00:00:01,000 --> 00:00:04,000
Good morning.

2
00:00:05,500 --> 00:00:08,000
Morning, how are you?
Fine.
"""

VTT = """WEBVTT

NOTE made by a transcriber

intro
00:01.000 --> 00:04.000 align:start
<v Someone>Good morning.

00:00:05.500 --> 00:00:08.000
Morning.
"""


def test_srt_and_vtt_keep_everything_and_add_the_name() -> None:
    answer = timeline_answer(two_turns())
    assert label_transcript(read_transcript(SRT), answer) == SRT.replace("Good", "Alice: Good").replace("Morning,", "Bob: Morning,")
    assert label_transcript(read_transcript(VTT), answer) == VTT.replace("<v Someone>", "<v Alice>").replace("\nMorning.", "\n<v Bob>Morning.")


def test_offset_and_wall_clock_alignment(tmp_path: Path) -> None:
    # the transcript began 2 s into the daemon's stream
    shifted = timeline_answer(two_turns(), offset=2.0)
    assert shifted(0.0, 2.5).label == "Alice" and shifted(3.5, 6.0).label == "Bob"
    # two sessions: refused without a choice, then aligned by --start-time on the wall clock
    events = two_turns("111111111111", WALL0) + two_turns("222222222222", WALL0 + 100.0)
    with pytest.raises(LabelError, match="--session ID.*--start-time"):
        timeline_answer(events)
    by_wall = timeline_answer(events, start_time=WALL0 + 100.0)
    assert by_wall(1.5, 4.0).label == "Alice" and by_wall(6.0, 8.0).label == "Bob"
    assert timeline_answer(events, session="111111111111")(6.0, 8.0).label == "Bob"
    assert parse_start_time("2024-06-10T09:00:00+00:00") == 1718010000.0
    with pytest.raises(LabelError, match="ISO 8601"):
        parse_start_time("nine o'clock")


def test_bad_transcripts_are_refused_naming_the_place() -> None:
    with pytest.raises(TranscriptError, match="segments"):
        read_transcript('{"text": "no segments"}')
    with pytest.raises(TranscriptError, match="segment 0 word 0.*start"):
        read_transcript('{"segments": [{"start": 0, "end": 1, "text": "x", "words": [{"word": "x"}]}]}')
    with pytest.raises(TranscriptError, match="block 2"):
        read_transcript("1\n00:00:01,000 --> 00:00:02,000\nhi\n\njust text\n")


def test_the_cli_writes_the_labelled_file_and_errors_lose_nothing(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(e) + "\n" for e in two_turns()))
    srt = tmp_path / "t.srt"
    srt.write_text(SRT)
    out = tmp_path / "named.srt"
    speakerd("label", str(events), str(srt), "-o", str(out))
    assert "Alice: Good morning." in out.read_text() and "Bob: Morning," in out.read_text()
    events.write_text(events.read_text() + "not json\n")
    bad = speakerd("label", str(events), str(srt), "-o", str(tmp_path / "never.srt"), check=False)
    assert bad.returncode == 2 and "events.jsonl:8 is not a JSON event" in bad.stderr
    assert not (tmp_path / "never.srt").exists() and srt.read_text() == SRT
