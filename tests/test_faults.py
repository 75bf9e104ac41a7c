"""Each fault the daemon must survive, injected, with its outcome and its counters asserted.

The microphone is a fake stream factory injected into ``MicSource`` (no hardware, no patching):
it can stop, stall, raise, refuse to reopen, or come back as another device. The rest runs the
real pipeline, store and CLI.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_audio import FakeInputStream
import sounddevice as sd
import zmq
from daemon_harness import Enrolled, make_conversation, popen_speakerd, read_events, score_events, speakerd

from speakerd import cli
from speakerd.audio import SAMPLE_RATE, AudioChunk
from speakerd.bundle import resolve_bundle
from speakerd.daemon import Daemon, default_backend
from speakerd.devices import list_input_devices
from speakerd.errors import AudioError
from speakerd.matcher import SpeakerIndex
from speakerd.settings import SECTIONS, Settings, load_settings
from speakerd.sources import FileSource, MicSource, RecoveringSource, RecoverySettings, SourceSettings
from speakerd.store import SpeakerStore

CLIP = "test-other/1688/1688-142285-0003.flac"
SPEAKERS = ["1688", "1998", "2033", "3080"]
FAST = RecoverySettings(backoff_initial_s=0.02, backoff_max_s=0.1, stall_s=0.3, silence_chunk_s=0.05)
WAIT_S = 30.0
BLOCK = 1_600  # 0.1 s at 16 kHz


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # polling a condition under a deadline


# ---------------------------------------------------------------- a fake audio system


class FakeStream(FakeInputStream):
    """Also belongs to a fake audio system that can kill it or make its state raise."""

    def __init__(self, world: FakeAudio, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.world = world
        self.dead = False
        self.state_error: Exception | None = None

    @property
    def active(self) -> bool:
        if self.state_error is not None:
            raise self.state_error
        return self.started and not self.dead


@dataclass
class FakeAudio:
    """The machine's input devices, and a stream factory that can refuse (device gone or busy)."""

    devices: list[dict[str, Any]] = field(default_factory=lambda: [
        {"index": 0, "name": "MacBook Pro Microphone", "max_input_channels": 1, "default_samplerate": 16000.0},
        {"index": 2, "name": "USB Audio Headset", "max_input_channels": 1, "default_samplerate": 16000.0},
    ])
    default: int = 0
    refuse: int = 0
    """Opens to refuse before the next one succeeds."""
    opens: int = 0
    streams: list[FakeStream] = field(default_factory=list)
    stream_class: type[FakeStream] = FakeStream

    def list(self) -> list[dict[str, Any]]:
        return list_input_devices(self.devices, default_index=self.default)

    def open(self, **kwargs: Any) -> FakeStream:
        self.opens += 1
        if self.refuse > 0:
            self.refuse -= 1
            raise sd.PortAudioError("Error opening InputStream: Invalid device [PaErrorCode -9996]")
        stream = self.stream_class(self, **kwargs)
        self.streams.append(stream)
        return stream

    def mic(self, settings: SourceSettings | None = None) -> MicSource:
        return MicSource(settings or SourceSettings(), stream_factory=self.open, list_devices=self.list)

    def recovering(self, settings: SourceSettings | None = None, recovery: RecoverySettings = FAST) -> RecoveringSource:
        return RecoveringSource(self.mic(settings), lambda: self.mic(settings), recovery)


def read_for(src: RecoveringSource, seconds: float, until: Callable[[], bool] | None = None) -> list[AudioChunk]:
    """Read for ``seconds`` of real time (or until ``until()``), as the pipeline would."""
    chunks = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until()):
        chunk = src.read(0.05)
        if chunk is not None:
            chunks.append(chunk)
    return chunks


def contiguous(chunks: list[AudioChunk]) -> np.ndarray:
    expected = 0
    for c in chunks:
        assert c.start == expected, "the sample clock has no holes or overlaps"
        expected = c.end
    return np.concatenate([c.samples for c in chunks])


def tone(value: float, n: int = BLOCK) -> np.ndarray:
    return np.full(n, value, np.float32)


# ---------------------------------------------------------------- the microphone recovers


def test_stream_that_stops_mid_session_is_reopened_and_the_clock_counts_the_gap() -> None:
    world = FakeAudio()
    src = world.recovering()
    t0 = time.time()
    src.start()
    first = world.streams[-1]
    for _ in range(5):
        first.feed(tone(0.5))
    chunks = read_for(src, 0.2)
    first.dead = True  # the device vanished: PortAudio marks the stream inactive
    world.refuse = 2  # and it cannot be reopened at once
    chunks += read_for(src, WAIT_S, until=lambda: src.reconnects == 1)
    assert src.stats()["device_down"] == 0 and world.opens == 1 + 3
    second = world.streams[-1]
    assert first.closed and second is not first and second.started
    second.feed(tone(0.7))
    chunks += read_for(src, 0.3)
    elapsed = time.time() - t0
    src.stop()
    audio = contiguous(chunks)
    assert np.all(audio[: 5 * BLOCK] == 0.5)
    assert np.all(audio[5 * BLOCK : -BLOCK] == 0.0), "the outage is silence"
    assert np.all(audio[-BLOCK:] == np.float32(0.7)), "audio from the reopened device follows"
    assert abs(len(audio) / SAMPLE_RATE - elapsed) < 0.5, "the sample clock kept counting real time"
    assert abs(chunks[-1].wall_time_of(chunks[-1].end) - time.time()) < 0.5
    s = src.stats()
    assert (s["device_errors"], s["reconnects"]) == (1, 1)
    assert s["gap_samples"] == len(audio) - 6 * BLOCK and s["samples"] == len(audio) and s["blocks"] == 6
    assert second.closed


def test_a_new_default_device_is_used_when_the_old_one_is_gone() -> None:
    world = FakeAudio()
    src = world.recovering()
    src.start()
    assert world.streams[-1].kwargs["device"] == 0
    world.streams[-1].dead = True
    world.devices = world.devices[1:]  # the built-in microphone is gone; the headset is the default now
    world.default = 2
    read_for(src, WAIT_S, until=lambda: src.reconnects == 1)
    src.stop()
    assert world.streams[-1].kwargs["device"] == 2 and src.device_name == "USB Audio Headset"


def test_the_configured_device_is_waited_for_and_resumed_when_it_comes_back() -> None:
    world = FakeAudio()
    src = world.recovering(SourceSettings(device="usb"))
    src.start()
    headset = world.devices[1]
    world.streams[-1].dead = True
    world.devices = world.devices[:1]  # unplugged: lookups fail with "not found", and are retried
    read_for(src, 0.4)
    assert src.reconnects == 0 and src.stats()["device_down"] == 1 and world.opens == 1
    world.devices.append(headset)  # plugged back in
    read_for(src, WAIT_S, until=lambda: src.reconnects == 1)
    src.stop()
    assert world.streams[-1].kwargs["device"] == 2 and len(world.streams) == 2


def test_a_stream_whose_callbacks_stop_is_detected_as_lost() -> None:
    world = FakeAudio()
    src = world.recovering()
    src.start()
    world.streams[-1].feed(tone(0.1))
    started = time.monotonic()
    read_for(src, WAIT_S, until=lambda: src.device_errors == 1)  # no more callbacks, stream still "active"
    took = time.monotonic() - started
    read_for(src, WAIT_S, until=lambda: src.reconnects == 1)
    src.stop()
    assert FAST.stall_s <= took < FAST.stall_s + 1.0


def test_portaudio_error_from_the_stream_state_is_a_device_error() -> None:
    world = FakeAudio()
    src = world.recovering()
    src.start()
    world.streams[-1].state_error = sd.PortAudioError("Stream is not available [PaErrorCode -9988]")
    read_for(src, WAIT_S, until=lambda: src.reconnects == 1)
    src.stop()
    assert src.stats()["device_errors"] == 1


def test_start_failure_is_reported_not_retried() -> None:
    world = FakeAudio(refuse=1)
    src = world.recovering()
    with pytest.raises(AudioError, match="MacBook Pro Microphone.*Invalid device"):
        src.start()
    assert world.opens == 1


def test_stop_during_an_outage_returns_at_once() -> None:
    world = FakeAudio()
    src = world.recovering(recovery=RecoverySettings(backoff_initial_s=5.0, stall_s=0.3))
    src.start()
    world.streams[-1].dead = True
    read_for(src, WAIT_S, until=lambda: src.device_errors == 1)
    closer = threading.Timer(0.1, src.stop)
    closer.start()
    t0 = time.monotonic()
    while src.read(1.0) is not None:  # zeros until stop(), then None
        assert time.monotonic() - t0 < 2.0
    closer.join()
    assert time.monotonic() - t0 < 1.5


def test_overflows_are_counted_across_sessions_and_the_callback_never_blocks() -> None:
    world = FakeAudio()
    src = world.recovering(SourceSettings(queue_blocks=4))
    src.start()
    stream = world.streams[-1]
    t0 = time.monotonic()
    for i in range(1_000):  # nobody reads: the queue is full after 4
        stream.feed(tone(0.1, 320), overflow=i % 100 == 0)
    assert time.monotonic() - t0 < 2.0, "a full queue drops; the callback does not wait"
    assert src.stats()["dropped_blocks"] == 996 and src.stats()["overflows"] == 10
    stream.dead = True
    read_for(src, WAIT_S, until=lambda: src.reconnects == 1)
    world.streams[-1].feed(tone(0.1, 320), overflow=True)
    read_for(src, 0.1)
    src.stop()
    assert src.stats()["overflows"] == 11 and src.stats()["dropped_blocks"] == 996


# ---------------------------------------------------------------- the daemon keeps going


class LiveFile:
    """A file delivered as fast as it can be read but treated as live (drop, don't wait): overload."""

    def __init__(self, path: Path) -> None:
        self._file = FileSource(path, realtime=False)

    def __enter__(self) -> LiveFile:
        self._file.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.stop()

    def start(self) -> None:
        self._file.start()

    def stop(self) -> None:
        self._file.stop()

    def read(self, timeout: float) -> AudioChunk | None:
        return self._file.read(timeout)

    @property
    def finished(self) -> bool:
        return self._file.finished

    def stats(self) -> dict[str, int]:
        return self._file.stats()


class FlakyBackend:
    """The real backend, but every ``fail_every``-th call raises and every call takes ``delay_s`` more."""

    def __init__(self, inner: Any, *, fail_every: int = 0, delay_s: float = 0.0) -> None:
        self._inner = inner
        self.name = inner.name
        self.calls = 0
        self._fail_every = fail_every
        self._delay_s = delay_s

    def embed(self, feats: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self._delay_s:
            time.sleep(self._delay_s)  # simulated inference cost
        if self._fail_every and self.calls % self._fail_every == 0:
            raise RuntimeError("simulated backend failure")
        return self._inner.embed(feats)

    def close(self) -> None:
        self._inner.close()


def run_daemon(settings: Settings, store: Path, **kwargs: Any) -> tuple[Daemon, list[dict[str, Any]]]:
    daemon = Daemon(settings, store_dir=store, **kwargs)
    assert daemon.run() == 0
    return daemon, read_events(Path(settings.publish.events_out))


def file_settings(tmp_path: Path, clip: Path, **sections: dict[str, Any]) -> Settings:
    overrides = {
        "daemon": {"source": f"file:{clip}", "realtime": False},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "events_out": str(tmp_path / "events.jsonl")},
        "control": {"endpoint": f"ipc://{tmp_path / 'control.sock'}"},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_settings(None, overrides)


def test_backend_errors_are_counted_and_the_pipeline_continues(librispeech: Path, default_model: Path, tmp_path: Path) -> None:
    backends: list[FlakyBackend] = []

    def flaky(bundle: Any, settings: Settings) -> FlakyBackend:
        # every 4th call: a regular window and two probes come in threes, so every 3rd would be always the regular one
        backends.append(FlakyBackend(default_backend(bundle, settings), fail_every=4))
        return backends[-1]

    settings = file_settings(tmp_path, librispeech / CLIP, embedding={"batch_max": 1})
    _, evs = run_daemon(settings, tmp_path / "store", backend_factory=flaky)
    c = evs[-1]["counters"]
    assert evs[-1]["type"] == "status"
    assert c["embed_errors"] == backends[0].calls // 4 > 0
    assert c["embedded"] == c["windows"] + c["probes"] - c["embed_errors"] > 0, "windows after a failure are still embedded"
    assert any(e["type"] == "speaker.change" for e in evs)


def test_overload_drops_the_oldest_windows_and_counts_them(librispeech: Path, default_model: Path, tmp_path: Path) -> None:
    def slow(bundle: Any, settings: Settings) -> FlakyBackend:
        return FlakyBackend(default_backend(bundle, settings), delay_s=0.05)

    settings = file_settings(tmp_path, librispeech / CLIP, embedding={"batch_max": 1, "queue_windows": 2})
    _, evs = run_daemon(settings, tmp_path / "store", backend_factory=slow,
                        source_factory=lambda s: LiveFile(librispeech / CLIP))
    c = evs[-1]["counters"]
    assert c["dropped_windows"] > 0, c
    assert c["embedded"] + c["dropped_windows"] == c["windows"] + c["probes"], "every window and probe is embedded or counted as dropped"
    assert evs[-1]["type"] == "status" and [e["seq"] for e in evs] == list(range(1, len(evs) + 1))


class PlayingStream(FakeStream):
    """A microphone hearing a recording in real time: a thread calls the callback every 20 ms.

    The position in the recording is the time since the first stream started, so a reopened stream
    hears what is being said *now*, and what was said during an outage is lost, as in a real room.
    """

    def __init__(self, world: FakeAudio, **kwargs: Any) -> None:
        super().__init__(world, **kwargs)
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()

    def start(self) -> None:
        super().start()
        self._thread = threading.Thread(target=self._play, name="fake-mic")
        self._thread.start()

    def stop(self) -> None:
        super().stop()
        self._halt.set()
        if self._thread is not None:
            self._thread.join(5)

    def _play(self) -> None:
        world: PlayingWorld = self.world  # type: ignore[assignment]
        block = self.kwargs["blocksize"]
        pos = int((time.monotonic() - world.t0) * SAMPLE_RATE) // block * block
        while not self._halt.wait(max(0.0, world.t0 + (pos + block) / SAMPLE_RATE - time.monotonic())):
            if world.die_at is not None and self is world.streams[0] and time.monotonic() - world.t0 >= world.die_at:
                self.dead = True  # the device vanishes mid-session
                return
            piece = world.audio[pos : pos + block]
            self.feed(np.concatenate([piece, np.zeros(block - len(piece), np.float32)]))  # silence after the end
            pos += block


@dataclass
class PlayingWorld(FakeAudio):
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    t0: float = 0.0
    """When the first stream opened: the recording's time zero."""
    die_at: float | None = None
    refuse_reopens: int = 0
    stream_class: type[FakeStream] = PlayingStream

    def open(self, **kwargs: Any) -> FakeStream:
        if self.opens == 1:
            self.refuse = self.refuse_reopens  # the first attempts to reopen fail
        stream = super().open(**kwargs)
        self.t0 = self.t0 or time.monotonic()
        return stream


@pytest.mark.slow
def test_daemon_keeps_naming_speakers_across_a_lost_microphone(enrolled: Enrolled, tmp_path: Path) -> None:
    conv = make_conversation(enrolled, SPEAKERS, tmp_path / "m.wav", turns=8, turn_s=(3.0, 4.0), seed=21)
    die_at, refused = 10.0, 3
    world = PlayingWorld(audio=conv.audio, die_at=die_at, refuse_reopens=refused,
                         devices=[{"index": 0, "name": "fake mic", "max_input_channels": 1, "default_samplerate": 16000.0}])
    recovery = RecoverySettings(backoff_initial_s=0.5, backoff_max_s=1.0, stall_s=1.0)
    settings = file_settings(tmp_path, tmp_path / "m.wav", daemon={"source": "mic", "status_interval_s": 1.0})
    daemon = Daemon(settings, store_dir=enrolled.store,
                    source_factory=lambda _: RecoveringSource(world.mic(), world.mic, recovery))
    played = conv.duration + 1.5

    def stop_when_played() -> None:
        try:
            wait_for(lambda: world.t0 > 0 and time.monotonic() - world.t0 > played, "the conversation", played + 60)
        finally:
            daemon.request_stop()

    stopper = threading.Thread(target=stop_when_played, name="test-stopper")
    stopper.start()
    try:
        assert daemon.run() == 0
    finally:
        daemon.request_stop()
        stopper.join(played + 70)
    evs = read_events(tmp_path / "events.jsonl")
    statuses = [e for e in evs if e["type"] == "status"]
    lost = next(e for e in statuses if e["counters"]["device_errors"] == 1)
    back = next(e for e in statuses if e["counters"]["reconnects"] == 1)
    assert lost["counters"]["device_down"] == 1 and back["counters"]["device_down"] == 0
    assert die_at - 0.5 <= lost["stream_time"] < die_at + 3.0, "the loss is published as it happens"
    assert world.opens == 2 + refused
    final = evs[-1]
    assert final["type"] == "status" and final["counters"]["device_errors"] == 1
    assert abs(final["stream_time"] - played) < 2.0, "stream time kept counting through the gap"
    named_after = {e["speaker"]["name"] for e in evs if e["type"] == "speaker.change" and e["stream_time"] > back["stream_time"]}
    named_before = {e["speaker"]["name"] for e in evs if e["type"] == "speaker.change" and e["stream_time"] < die_at}
    assert named_before - {None} and named_after - {None}, "speakers are named before and after the outage"
    assert (named_before | named_after) - {None} <= set(enrolled.names.values())
    s = score_events(conv, [e for e in evs if e["stream_time"] < die_at or e["stream_time"] > back["stream_time"] + 2],
                     enrolled.names)
    assert s.precision >= 0.6, s


# ---------------------------------------------------------------- the store survives


@pytest.mark.slow
def test_corrupt_index_is_rebuilt_and_speakers_are_still_named(enrolled: Enrolled, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(enrolled.store, store)
    (store / "index.faiss").write_bytes(os.urandom(4096))
    conv = make_conversation(enrolled, SPEAKERS, tmp_path / "m.wav", turns=8, seed=4)
    out = tmp_path / "events.jsonl"
    proc = speakerd("run", "--source", f"file:{tmp_path / 'm.wav'}", "--no-realtime", "--store", str(store),
                    "--pub", "tcp://127.0.0.1:*", "--events-out", str(out), "--control", f"ipc://{tmp_path / 'c.sock'}")
    assert "rebuilding speaker index" in proc.stderr and "does not match its stamp" in proc.stderr
    s = score_events(conv, read_events(out), enrolled.names)
    assert s.accuracy >= 0.9, s
    bundle = resolve_bundle("ge2e-resemblyzer")
    with SpeakerStore(store, fingerprint=bundle.fingerprint, dim=bundle.embedding_dim) as reopened:
        assert (reopened.index_loads, reopened.index_rebuilds) == (1, 0), "the rebuilt index was saved"


def check_store(path: Path, per_enrollment: int) -> dict[str, int]:
    """Integrity, and every speaker complete: the embeddings of one enrollment, never part of them."""
    with sqlite3.connect(path / "speakers.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        counts = dict(db.execute("SELECT s.name, COUNT(e.id) FROM speakers s LEFT JOIN embeddings e "
                                 "ON e.speaker_id = s.id GROUP BY s.id").fetchall())
        orphans = db.execute("SELECT COUNT(*) FROM embeddings WHERE speaker_id NOT IN (SELECT id FROM speakers)").fetchone()
    db.close()
    assert orphans == (0,)
    assert all(n == per_enrollment for n in counts.values()), counts
    bundle = resolve_bundle("ge2e-resemblyzer")
    with SpeakerStore(path, fingerprint=bundle.fingerprint, dim=bundle.embedding_dim) as store:
        index = SpeakerIndex.from_store(store)  # the room versions of multi-condition enrollment apart
        assert index.num_embeddings + len(store.room_version_ids()) == per_enrollment * len(counts)
        assert sorted(index.speakers.values()) == sorted(counts)
    return counts


@pytest.mark.slow
def test_kill_9_during_enrollment_never_leaves_a_partial_speaker(librispeech: Path, default_model: Path, tmp_path: Path) -> None:
    from speakerd.evaluation.conversation import librispeech_speakers

    clips = [str(p) for p in librispeech_speakers(librispeech)["1998"][:3]]
    store = tmp_path / "store"
    t0 = time.monotonic()
    speakerd("enroll", "reference", *clips, "--store", str(store))
    full_s = time.monotonic() - t0
    with sqlite3.connect(store / "speakers.sqlite3") as db:
        per_enrollment = db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
    db.close()
    rng = random.Random(5)
    outcomes = []
    for i in range(8):
        # most kills land late, where the store is written; some early, during start-up and embedding
        delay = rng.uniform(0.5, 1.1) * full_s if i % 4 else rng.uniform(0.0, 0.5) * full_s
        proc = popen_speakerd("enroll", f"speaker-{i}", *clips, "--store", str(store),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(WAIT_S)
        outcomes.append(code)
        counts = check_store(store, per_enrollment)
        if code == 0:
            assert f"speaker-{i}" in counts
        else:
            assert code == -signal.SIGKILL, f"enroll exited {code}"  # killed: either all of it or none
    assert -signal.SIGKILL in outcomes, "at least one enrollment was killed"
    speakerd("enroll", "after", *clips, "--store", str(store))  # the store still takes writes
    assert "after" in check_store(store, per_enrollment)


# ---------------------------------------------------------------- outside the daemon's control


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_subscriber_that_never_reads_does_not_hold_the_daemon_up(enrolled: Enrolled, tmp_path: Path) -> None:
    make_conversation(enrolled, SPEAKERS, tmp_path / "m.wav", turns=10, seed=8)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.RCVBUF, 1024)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)  # and never recv()
    out = tmp_path / "events.jsonl"
    try:
        t0 = time.monotonic()
        speakerd("run", "--source", f"file:{tmp_path / 'm.wav'}", "--no-realtime", "--store", str(enrolled.store),
                 "--pub", endpoint, "--events-out", str(out), "--control", f"ipc://{tmp_path / 'c.sock'}", timeout=120)
        took = time.monotonic() - t0
    finally:
        sub.close(linger=0)
        ctx.term()
    evs = read_events(out)
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1)), "events_out is complete"
    assert evs[-1]["type"] == "status" and evs[-1]["counters"]["dropped_events"] == 0
    assert evs[-1]["counters"]["published"] == len(evs) - 1
    assert sum(e["type"] == "speaker.change" for e in evs) >= 5
    assert took < 120


# ---------------------------------------------------------------- bad input, named, before anything starts


def bad_value_for(section: str) -> tuple[str, Any]:
    """The first key of a section, with a value of the wrong type (a TOML table fits no setting)."""
    import dataclasses

    key = dataclasses.fields(SECTIONS[section])[0].name
    return key, {"oops": 1}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_a_bad_value_in_any_section_exits_2_naming_it(section: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key, _ = bad_value_for(section)
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[{section}]\n{key} = {{ oops = 1 }}\n")
    store = tmp_path / "s"
    assert cli.main(["run", "--config", str(cfg), "--store", str(store)]) == 2
    assert f"{section}.{key}" in caplog.text and "'oops'" in caplog.text
    assert not store.exists(), "nothing started"


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[daemon]\nsource = "speaker"\n', "config source = 'speaker'"),
        ('[daemon]\nsource = "mic:"\n', "config source = 'mic:'"),
        ('[publish]\nendpoint = "udp://1.2.3.4"\n', "config publish.endpoint = 'udp://1.2.3.4'"),
        ('[windows]\nhop_s = 7.0\n', "config windows.hop_s = 7.0"),
        ('[matching]\nthreshold = 2\n', "config matching.threshold = 2"),
        ('[decision]\nthreshold = 2\n', "config decision.threshold = 2"),
        ('[audio]\nchannels = 0\n', "config audio.channels = 0"),
        ('[nonsense]\nx = 1\n', "config nonsense = "),
    ],
)
def test_bad_config_values_are_named_before_anything_starts(toml: str, named: str, tmp_path: Path,
                                                             default_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    store = tmp_path / "s"
    assert cli.main(["run", "--config", str(cfg), "--store", str(store)]) == 2
    assert named in caplog.text
    assert not store.exists(), "nothing started"


def test_unreadable_audio_is_named_for_run_and_enroll(tmp_path: Path, default_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    missing = tmp_path / "nowhere.flac"
    assert cli.main(["run", "--source", f"file:{bad}", "--store", str(tmp_path / "s1")]) == 2
    assert f"cannot read audio file {bad}" in caplog.text
    caplog.clear()
    assert cli.main(["enroll", "Ada", str(bad), "--store", str(tmp_path / "s2")]) == 2
    assert f"cannot read audio file {bad}" in caplog.text
    caplog.clear()
    assert cli.main(["enroll", "Ada", str(missing), "--store", str(tmp_path / "s3")]) == 2
    assert f"cannot read audio file {missing}" in caplog.text


# ---------------------------------------------------------------- the control socket


def malformed_messages(n: int = 1_000, seed: int = 3) -> Iterator[list[bytes]]:
    """``n`` multipart messages no control protocol should accept, reproducibly: empty frames, binary
    noise, broken and wrongly typed JSON, unknown commands, huge and deeply nested payloads."""
    rng = random.Random(seed)
    fixed: list[list[bytes]] = [
        [b""], [b"", b""], [b"{"], [b"null"], [b"[]"], [b"42"], [b'"enroll"'], [b"{}"],
        [b'{"cmd": null}'], [b'{"cmd": 7}'], [b'{"cmd": "no-such-command"}'], [b'{"cmd": "rename"}'],
        [b'{"cmd": "rename", "old": 1, "new": []}'], [b'{"cmd": "enroll", "name": "' + b"x" * 100_000 + b'"}'],
        [b"[" * 10_000 + b"]" * 10_000], [b"\xff\xfe\x00garbage"], [b'{"cmd": "reload"}', b"extra", b"frames"],
        ["{\"cmd\": \"\u0000\ud800\"}".encode("utf-8", "surrogatepass")],
    ]
    for i in range(n):
        if i < len(fixed):
            yield fixed[i]
        else:
            yield [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))) for _ in range(rng.randint(1, 3))]


def test_malformed_messages_are_well_formed_test_data() -> None:
    msgs = list(malformed_messages())
    assert len(msgs) == 1_000 and msgs == list(malformed_messages()), "deterministic"


def test_malformed_control_messages(librispeech: Path, default_model: Path, tmp_path: Path) -> None:
    """1,000 malformed messages: each gets an error reply (one too big for the socket has its
    connection closed unread, by design), the daemon keeps streaming, and a valid request is still
    served afterwards."""
    endpoint = f"ipc://{tmp_path}/control.sock"  # tcp control needs CURVE (issue 18)
    settings = file_settings(tmp_path, librispeech / CLIP, daemon={"realtime": True}, control={"endpoint": endpoint})
    daemon = Daemon(settings, store_dir=tmp_path / "store")
    replies: list[dict[str, Any] | None] = []
    after: list[dict[str, Any]] = []

    def ask(sock: zmq.Socket, frames: list[bytes]) -> dict[str, Any] | None:
        sock.send_multipart([b"", *frames])  # a DEALER speaks to the REP socket through an empty delimiter
        try:
            return json.loads(sock.recv_multipart()[-1])
        except zmq.Again:
            return None

    def hammer() -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 2_000)
        sock.connect(endpoint)
        try:
            wait_for(lambda: daemon.pipeline is not None and daemon.pipeline.worker.counters["embedded"] > 0, "start")
            replies.extend(ask(sock, msg) for msg in malformed_messages())
            reply = ask(sock, [b'{"v": 1, "op": "status"}'])
            after.append(reply or {})
            assert not daemon.stopping
        finally:
            sock.close()
            ctx.term()
            daemon.request_stop()

    thread = threading.Thread(target=hammer, name="test-control-hammer")
    thread.start()
    assert daemon.run() == 0
    thread.join(WAIT_S * 4)
    assert not thread.is_alive()
    too_big = [sum(map(len, m)) > settings.control.max_request_bytes for m in malformed_messages()]
    assert [r is None for r in replies] == too_big, "every message the socket accepts is answered"
    assert all(r["ok"] is False and r["error"]["code"] for r in replies if r is not None)
    assert after[0]["ok"] is True and after[0]["result"]["counters"]["embedded"] > 0
    evs = read_events(tmp_path / "events.jsonl")
    assert evs[-1]["type"] == "status" and evs[-1]["counters"]["embedded"] > 0
