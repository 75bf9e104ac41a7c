"""The daemon with real sockets and a real (virtual) microphone.

A subscriber process receives every event the daemon publishes; and with a PulseAudio null sink's
monitor as the microphone, the daemon names the speakers of a conversation played into it.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pulse
import pytest
from daemon_harness import Enrolled, make_conversation, popen_speakerd, read_events, score_events

SPEAKERS = ["1688", "1998", "2033", "3080"]
EXIT_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = EXIT_TIMEOUT_S) -> tuple[int, float]:
    started = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise AssertionError(f"process did not exit within {timeout} s of {signal.Signals(sig).name}") from None
    return code, time.monotonic() - started


@pytest.mark.slow
def test_a_subscriber_receives_every_event(enrolled: Enrolled, tmp_path: Path) -> None:
    conv = make_conversation(enrolled, SPEAKERS, tmp_path / "m.wav", turns=4, turn_s=(3.0, 4.0), seed=5)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    listener = popen_speakerd("listen", "--sub", endpoint, "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = tmp_path / "events.jsonl"
        daemon = popen_speakerd(
            "run", "--source", f"file:{tmp_path / 'm.wav'}", "--realtime", "--store", str(enrolled.store),
            "--pub", endpoint, "--events-out", str(out), stderr=subprocess.PIPE,
        )
        _, err = daemon.communicate(timeout=conv.duration + 60)
        assert daemon.returncode == 0, err[-3000:]
    finally:
        code, _ = _stop(listener, signal.SIGINT)
    received = [json.loads(line) for line in listener.stdout.read().splitlines() if line.strip()]
    written = read_events(out)
    assert code == 0
    assert [e["seq"] for e in received] == [e["seq"] for e in written], "the subscriber saw every event, in order"
    assert received == written
    # tentative changes from probes may come and go; the confirmed ones tell the turns
    names = [
        e["speaker"]["name"] for e in received
        if e["type"] == "speaker.change" and not e["tentative"] and e["speaker"] != e["previous"]
    ]
    assert names == [enrolled.names[t.speaker] for t in conv.turns]


@pytest.fixture(scope="module")
def sink():
    missing = pulse.missing_tools()
    if missing:
        pytest.skip(f"live test needs {', '.join(missing)} (apt-get install pulseaudio pulseaudio-utils)")
    s = pulse.ensure_pulse()
    yield s
    s.close()


@pytest.mark.live
@pytest.mark.slow
def test_daemon_names_speakers_heard_through_the_microphone(sink, enrolled: Enrolled, tmp_path: Path) -> None:
    conv = make_conversation(enrolled, SPEAKERS, tmp_path / "m.wav", turns=6, turn_s=(3.0, 5.0), seed=11)
    out = tmp_path / "events.jsonl"
    daemon = popen_speakerd(
        "run", "--source", "mic:pulse", "--store", str(enrolled.store), "--pub", "tcp://127.0.0.1:*",
        "--events-out", str(out), stderr=subprocess.PIPE,
    )
    try:
        # the first status event proves the microphone delivers audio before anything is played
        deadline = time.monotonic() + 30
        while not (out.exists() and '"status"' in out.read_text()):
            assert daemon.poll() is None, daemon.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no audio from the microphone within 30 s"
            time.sleep(0.2)
        played_at = time.time()
        player = sink.play(tmp_path / "m.wav")
        player.wait(timeout=conv.duration + 30)
        time.sleep(2.0)  # let the last window and the end of speech through
    finally:
        code, took = _stop(daemon)
    err = daemon.stderr.read()
    assert code == 0, err[-3000:]
    assert took < 2.0 + 1.0, f"SIGTERM to exit took {took:.2f} s"
    events = read_events(out)
    assert events[-1]["type"] == "status"
    # stream seconds -> seconds into the played file, through the capture clock
    e0 = events[0]
    offset = played_at - (e0["wall_time"] - e0["stream_time"])
    s = score_events(conv, events, enrolled.names, offset=offset)
    assert s.accuracy >= 0.9, s
    assert s.recall >= 0.8 and s.precision >= 0.8, s
