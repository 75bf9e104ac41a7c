"""Live: the PulseAudio null sink's monitor is the microphone of both PocketSphinx and the daemon.

The conversation is played into the sink; examples/live_captions.py's ``MicWords`` times each
recognised word by its own capture clock, a ``Subscriber`` feeds the daemon's events into a
``SpeakerTimeline``, and the words are named on the wall clock, as a live transcriber would.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pulse
import pytest
from daemon_harness import REPO, Enrolled, make_conversation, popen_speakerd
from test_client_subscriber import free_port
from test_mic_live import sink  # noqa: F401 - the null sink as the microphone, PortAudio rescanned

from speakerd.client import SpeakerTimeline, Subscriber
from speakerd.evaluation.words import TimedLabel, word_attribution

pytest.importorskip("pocketsphinx", reason="the recogniser of these tests: pip install 'speakerd[dev]'")
sys.path.insert(0, str(REPO / "examples"))
from live_captions import MicWords  # noqa: E402
from sphinx_words import Word  # noqa: E402

pytestmark = [pytest.mark.live, pytest.mark.slow]

SPEAKERS = ["1688", "1998", "2033", "3080"]
START_TIMEOUT_S = 30.0
SETTLE_S = 3.0
"""After the recording ends: the daemon's last window, the end of speech and its segment."""


def test_words_heard_live_are_named_on_the_wall_clock(sink: pulse.PulseSink, enrolled: Enrolled, tmp_path: Path) -> None:
    conv = make_conversation(enrolled, SPEAKERS, tmp_path / "m.wav", turns=6, turn_s=(4.0, 6.0), seed=11)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    timeline = SpeakerTimeline()
    statuses = threading.Event()
    words: list[Word] = []
    stop = threading.Event()
    mic = MicWords("pulse")
    recogniser = threading.Thread(target=mic.run, args=(words.append, stop), name="mic-words")
    daemon = popen_speakerd("run", "--source", "mic:pulse", "--store", str(enrolled.store), "--pub", endpoint,
                            stderr=subprocess.PIPE)
    sub = Subscriber(endpoint, timeline=timeline, on_event=lambda e: e["type"] == "status" and statuses.set())
    try:
        with sub:
            recogniser.start()
            # both hear the microphone before anything is played (status: the daemon's audio flows)
            assert statuses.wait(START_TIMEOUT_S), "the daemon published no status: no audio from the microphone"
            assert mic.started.wait(START_TIMEOUT_S), "PocketSphinx got no audio from the microphone"
            played_at = time.time()
            player = sink.play(tmp_path / "m.wav")
            player.wait(timeout=conv.duration + 30)
            threading.Event().wait(SETTLE_S)  # the tail of the recording through both programs
            stop.set()
            recogniser.join(30)
            assert daemon.poll() is None, daemon.stderr.read()[-3000:] if daemon.stderr else ""
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
    finally:
        stop.set()
        if recogniser.is_alive():
            recogniser.join(30)
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
    assert mic.dropped == 0
    named = [(w, timeline.who(w.start, w.end, "wall", reach=0.5)) for w in words]
    # the words' wall times -> seconds into the played file, to judge them against its turns
    score = word_attribution(conv, [TimedLabel(w.start - played_at, w.end - played_at, who.label) for w, who in named],
                             enrolled.names)
    assert score.judged >= 0.7 * len(words) and score.judged >= 50, score
    # the words agree with the daemon's segments; what misses is the daemon's, live and on a shared
    # CPU beside the recogniser (measured 0.86 and 0.89: two changes placed 2 s late); from a file, >= 97 %
    assert score.accuracy >= 0.85, score
