"""``speakerd listen`` for a person: who speaks, finished turns and problems; every figure with -v
(issue 18: a one-speaker file showed `Alice <- Alice (margin 0.00)` and ~20 counters every 5 s)."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from daemon_harness import Enrolled, popen_speakerd, speakerd
from speakerd.events import (
    Heartbeat,
    SpeakerChange,
    SpeakerRef,
    SpeakerSegment,
    SpeechEnd,
    SpeechStart,
    Status,
    make_event,
)
from speakerd.listen import Digest, format_event

ALICE = SpeakerRef("spk-alice", "Alice", True)
BOB = SpeakerRef("spk-bob", "Bob", True)


def event(payload, t: float = 3.0, session: str = "s1", seq: int = 1) -> dict:  # noqa: ANN001
    return make_event(payload, seq=seq, session=session, stream_time=t, wall_time=1.0)


def status(session: str = "s1", **counters: int) -> dict:
    return event(Status(uptime_s=5.0, backend="onnx", model="ge2e", counters={"windows": 40, "embedded": 40, **counters}),
                 session=session)


def test_the_digest_shows_who_speaks_turns_and_problems_only() -> None:
    digest = Digest()
    first = SpeakerChange(speaker=ALICE, previous=None, score=0.9, margin=0.0, at=1.1)
    tentative = SpeakerChange(speaker=BOB, previous=ALICE, score=0.7, margin=0.1, at=2.5, tentative=True)
    withdrawn = SpeakerChange(speaker=ALICE, previous=ALICE, score=0.9, margin=0.0, at=2.5)
    assert digest.line(event(first)) == "   3.00s  change   Alice"
    assert digest.line(event(tentative)) == "   3.00s  change   Bob <- Alice  [tentative]"
    assert digest.line(event(withdrawn)) == "   3.00s  change   withdrawn: still Alice"
    segment = SpeakerSegment(start=1.1, end=2.9, speaker=ALICE, score=0.88, windows=4)
    assert digest.line(event(segment)) == "   3.00s  segment  Alice  1.10-2.90s"
    for quiet in (SpeechStart(1.0), SpeechEnd(1.0, 2.0), Heartbeat(uptime_s=3.0, subscriptions=1, interval_s=2.0)):
        assert digest.line(event(quiet)) is None
    assert digest.line(status()) is None  # counters only with -v
    assert digest.line(status(dropped_windows=3, overflows=0)) == "   3.00s  problem  dropped_windows +3 (3 in all)"
    assert digest.line(status(dropped_windows=3)) is None  # no growth, nothing to say
    assert digest.line(status(dropped_windows=5, device_down=1)) == (
        "   3.00s  problem  dropped_windows +2 (5 in all), microphone lost, reopening it"
    )
    assert digest.line(status(dropped_windows=5)) == "   3.00s  problem  microphone back"
    assert digest.line(status(session="s2", dropped_windows=1)) == "   3.00s  problem  dropped_windows +1 (1 in all)"


def test_verbose_lines_keep_every_figure() -> None:
    change = SpeakerChange(speaker=ALICE, previous=BOB, score=0.82, margin=0.21, at=2.0)
    assert format_event(event(change)) == "   3.00s  speaker.change  Alice (score 0.82, margin 0.21) <- Bob"
    assert format_event(status()).startswith("   3.00s  status  up 5s  onnx/ge2e  embedded=40 windows=40")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listen_to_a_file(enrolled: Enrolled, tmp_path: Path, *listen_args: str) -> list[str]:
    """`speakerd listen` on a real daemon reading one enrolled reader's recording."""
    audio = np.concatenate([sf.read(str(p), dtype="float32")[0] for p in enrolled.conversation_clips["1688"][:2]])
    sf.write(tmp_path / "one.wav", audio, 16000)
    config = tmp_path / "d.toml"
    config.write_text("[daemon]\nstatus_interval_s = 1.0\n[publish]\nwait_for_subscriber_s = 30.0\n")
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    listener = popen_speakerd("listen", "--sub", endpoint, *listen_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        speakerd("run", "--config", str(config), "--source", f"file:{tmp_path / 'one.wav'}", "--no-realtime",
                 "--store", str(enrolled.store), "--pub", endpoint, "--control", f"ipc://{tmp_path / 'c.sock'}", timeout=120)
    finally:
        listener.send_signal(signal.SIGINT)
        out, err = listener.communicate(timeout=30)
    assert listener.returncode == 0, err
    return out.splitlines()


@pytest.mark.slow
def test_listen_on_a_one_speaker_file_shows_the_speaker_and_the_turns(enrolled: Enrolled, tmp_path: Path) -> None:
    lines = _listen_to_a_file(enrolled, tmp_path)
    name = enrolled.names["1688"]
    # the reader is named first: tentatively when the first window and the probe before it agree
    # on them (policy.agreeing), then confirmed
    assert lines and f"change   {name}" in lines[0], lines
    assert any(line.endswith(f"change   {name}") for line in lines), lines
    assert any(f"segment  {name}" in line for line in lines), lines
    for line in lines:
        assert " change " in line or " segment " in line, f"not a change or a turn: {line}"
        assert f"{name} <- {name}" not in line and "margin" not in line and "windows=" not in line, line


def test_sigint_stops_a_listener_started_with_sigint_ignored() -> None:
    """A script's `speakerd listen ... &` inherits an ignored SIGINT from its shell; kill -INT must still stop it."""
    listener = popen_speakerd("listen", "--sub", f"tcp://127.0.0.1:{_free_port()}", stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert "Ctrl-C to stop" in listener.stderr.readline()  # it is listening
        listener.send_signal(signal.SIGINT)
        assert listener.wait(15) == 0
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(5)
