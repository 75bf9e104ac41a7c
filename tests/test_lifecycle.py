"""The daemon's lifecycle in-process: stop (request and signal), SIGHUP reload, reload errors, enroll.

``Daemon.run()`` runs in the main thread, as in ``speakerd run``, so its signal handlers are real; a
helper thread plays the operator. Speakers are synthetic unit vectors enrolled straight into the
store: these tests are about the lifecycle, not recognition.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from speakerd.bundle import resolve_bundle
from speakerd.daemon import Daemon, LifecycleTiming, ReloadResult, changed_keys
from speakerd.settings import load_settings
from speakerd.store import SpeakerStore

CLIP = "test-other/1688/1688-142285-0003.flac"
WAIT_S = 30.0
STOP_BOUND_S = 2.0


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)  # polling a condition under a deadline


def write_config(path: Path, clip: Path, events_out: Path, extra: str = "") -> Path:
    path.write_text(
        f'[daemon]\nsource = "file:{clip}"\nrealtime = true\nstatus_interval_s = 1.0\n'
        f'[publish]\nendpoint = "tcp://127.0.0.1:*"\nevents_out = "{events_out}"\n'
        f'[control]\nendpoint = "ipc://{path.parent / "control.sock"}"\n{extra}'
    )
    return path


@pytest.fixture
def clip(librispeech: Path) -> Path:
    return librispeech / CLIP


@pytest.fixture
def setup(tmp_path: Path, clip: Path, default_model: Path) -> Iterator[dict[str, Any]]:
    out = tmp_path / "events.jsonl"
    config = write_config(tmp_path / "speakerd.toml", clip, out)
    yield {"config": config, "events": out, "store": tmp_path / "store"}


def make_daemon(setup: dict[str, Any], **kwargs: Any) -> Daemon:
    config = setup["config"]
    settings = load_settings(config)
    return Daemon(settings, store_dir=setup["store"], load_settings=lambda: load_settings(config), **kwargs)


def operate(daemon: Daemon, action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` beside the daemon once it is up; the daemon is stopped whatever happens."""

    def body() -> None:
        try:
            wait_for(lambda: daemon.pipeline is not None and daemon.pipeline.worker.counters["embedded"] > 0,
                     "the daemon to embed its first window")
            action()
        finally:
            daemon.request_stop()

    thread = threading.Thread(target=body, name="test-operator")
    thread.start()
    return thread


def synthetic_speaker(dim: int, seed: int, n: int = 4) -> np.ndarray:
    """``n`` unit vectors close to one random direction: one consistent (made-up) voice."""
    rng = np.random.default_rng(seed)
    v = (rng.normal(size=dim) + 0.1 * rng.normal(size=(n, dim))).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_request_stop_ends_run_cleanly_within_bounds(setup: dict[str, Any]) -> None:
    daemon = make_daemon(setup)
    stopped_at: list[float] = []
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)

    def stop() -> None:
        stopped_at.append(time.monotonic())

    operator = operate(daemon, stop)
    code = daemon.run()
    took = time.monotonic() - stopped_at[0]
    operator.join(WAIT_S)
    assert code == 0
    assert took < STOP_BOUND_S, f"stop request to return took {took:.2f} s"
    evs = events(setup["events"])
    assert evs[-1]["type"] == "status", "a final status event is the last thing published"
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before, "handlers restored"
    assert daemon.reload() == ReloadResult(False, 0, error="the daemon is not running")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_in_the_main_thread_exits_zero(setup: dict[str, Any], sig: signal.Signals) -> None:
    daemon = make_daemon(setup, timing=LifecycleTiming(stop_drain_s=0.5))
    sent: list[float] = []

    def send() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), sig)

    operator = operate(daemon, send)
    code = daemon.run()
    took = time.monotonic() - sent[0]
    operator.join(WAIT_S)
    assert code == 0 and took < STOP_BOUND_S
    final = events(setup["events"])[-1]
    assert final["type"] == "status"
    assert final["stream_time"] < 20.0, "stopped early, not at the end of the clip"


def test_sighup_reloads_settings_and_speakers_without_restarting(setup: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    bundle = resolve_bundle("ge2e-resemblyzer")
    daemon = make_daemon(setup)
    results: list[ReloadResult] = []
    caplog.set_level("INFO", logger="speakerd.daemon")

    def change_and_hup() -> None:
        # another process enrolls a speaker and the operator edits the config, then sends SIGHUP
        with SpeakerStore(setup["store"], fingerprint=bundle.fingerprint, dim=bundle.embedding_dim) as other:
            other.enroll("Ada", synthetic_speaker(bundle.embedding_dim, 1), source="test")
        write_config(setup["config"], Path(daemon.settings.daemon.source[5:]), setup["events"],
                     "[decision]\nthreshold = 0.71\n[vad]\naggressiveness = 3\n")
        source_before = daemon.source
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: daemon.counters()["reloads"] == 1, "the reload")
        assert daemon.source is source_before, "capture was not restarted"
        results.append(daemon.reload())  # a second reload from this (control) thread: nothing new

    operator = operate(daemon, change_and_hup)
    assert daemon.run() == 0
    operator.join(WAIT_S)
    assert daemon.settings.decision.threshold == 0.71, "decision values apply live"
    assert daemon.pipeline.decisions.values.threshold == 0.71 and daemon.pipeline.decisions.tracker.values.threshold == 0.71
    assert daemon.settings.vad.aggressiveness == 2, "the VAD does not change under a running stream"
    assert daemon.index.speakers and list(daemon.index.speakers.values()) == ["Ada"]
    assert daemon.pipeline.decisions.ranker is daemon.index
    assert results == [ReloadResult(True, 1, applied=(), restart_needed=("vad.aggressiveness",))]
    assert "vad.aggressiveness changed from 2 to 3; that takes effect after a restart" in caplog.text
    assert "added Ada" in caplog.text
    final = events(setup["events"])[-1]
    assert final["counters"]["reloads"] == 2 and final["counters"]["reload_errors"] == 0


def test_bad_config_on_reload_keeps_running(setup: dict[str, Any]) -> None:
    daemon = make_daemon(setup)
    results: list[ReloadResult] = []

    def break_config() -> None:
        setup["config"].write_text("[decision]\nthreshold = 7\n")
        results.append(daemon.reload())
        setup["config"].write_text("[matching\n")
        results.append(daemon.reload())
        assert not daemon.stopping

    operator = operate(daemon, break_config)
    assert daemon.run() == 0
    operator.join(WAIT_S)
    assert [r.ok for r in results] == [False, False]
    assert "decision.threshold = 7" in (results[0].error or "")
    assert "not valid TOML" in (results[1].error or "")
    assert daemon.settings.decision == load_settings().decision  # the running values, kept
    assert daemon.pipeline.decisions.values.threshold == 0.70
    assert events(setup["events"])[-1]["counters"]["reload_errors"] == 2


def test_enroll_through_the_daemon_is_matched_at_once(setup: dict[str, Any]) -> None:
    bundle = resolve_bundle("ge2e-resemblyzer")
    daemon = make_daemon(setup)
    voice = synthetic_speaker(bundle.embedding_dim, 2)
    found: list[Any] = []

    def enroll() -> None:
        speaker = daemon.enroll("Grace", voice, source="control")
        found.append((speaker.name, speaker.num_embeddings))
        found.append(daemon.pipeline.decisions.verdict(voice[0]).name)

    operator = operate(daemon, enroll)
    assert daemon.run() == 0
    operator.join(WAIT_S)
    assert found == [("Grace", 4), "Grace"]


def test_changed_keys_names_each_setting() -> None:
    a = load_settings()
    b = dataclasses.replace(a, decision=dataclasses.replace(a.decision, threshold=0.5))
    assert changed_keys(a, b) == [("decision.threshold", None, 0.5)]
    assert changed_keys(a, a) == []


# ---------------------------------------------------------------- the real CLI, with real signals


def _send_when(proc: subprocess.Popen[str], events_path: Path, ready: Callable[[list[dict[str, Any]]], bool],
               sig: signal.Signals, what: str, timeout: float) -> float:
    """Send ``sig`` once the events written so far satisfy ``ready``; returns time.time() at sending."""
    deadline = time.monotonic() + timeout
    while not (events_path.exists() and ready(events(events_path))):
        assert proc.poll() is None, f"the daemon exited early ({proc.returncode})"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # polling the daemon's output under a deadline
    sent = time.time()
    proc.send_signal(sig)
    return sent


@pytest.mark.slow
def test_sigterm_during_a_realtime_run_exits_0_within_2_s(enrolled: Any, tmp_path: Path) -> None:
    from daemon_harness import make_conversation, popen_speakerd

    make_conversation(enrolled, ["1688", "1998", "2033", "3080"], tmp_path / "m.wav", turns=10, seed=12)
    out = tmp_path / "events.jsonl"
    proc = popen_speakerd("run", "--source", f"file:{tmp_path / 'm.wav'}", "--realtime", "--store", str(enrolled.store),
                          "--pub", "tcp://127.0.0.1:*", "--events-out", str(out),
                          "--control", f"ipc://{tmp_path / 'control.sock'}", stderr=subprocess.PIPE)
    try:
        # mid-turn: the second speaker has just been named, so a segment is open
        _send_when(proc, out, lambda evs: sum(e["type"] == "speaker.change" for e in evs) >= 2,
                   signal.SIGTERM, "two speaker changes", 120)
        t0 = time.monotonic()
        code = proc.wait(10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    err = proc.stderr.read()
    assert code == 0, err[-3000:]
    assert took < STOP_BOUND_S, f"SIGTERM to exit took {took:.2f} s"
    evs = events(out)
    assert evs[-1]["type"] == "status", "the final status event is last"
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    changes = [e for e in evs if e["type"] == "speaker.change"]
    segments = [e for e in evs if e["type"] == "speaker.segment"]
    assert segments[-1]["end"] >= changes[-1]["stream_time"], "the open segment was closed"
    assert segments[-1]["speaker"] == changes[-1]["speaker"]
    assert evs[-1]["stream_time"] < 30, "stopped by the signal, not by the end of the file"


@pytest.mark.slow
def test_a_cli_enrollment_beside_the_daemon_makes_it_name_the_new_speaker(enrolled: Any, librispeech: Path, tmp_path: Path) -> None:
    from daemon_harness import ENROLL_CLIPS, make_conversation, popen_speakerd, speakerd

    from speakerd.evaluation.conversation import librispeech_speakers, split_enrollment

    store = tmp_path / "store"
    shutil.copytree(enrolled.store, store)
    newcomer = "3080"
    speakerd("speakers", "remove", enrolled.names[newcomer], "--store", str(store))
    conv = make_conversation(enrolled, ["1688", "1998", newcomer], tmp_path / "m.wav", turns=24, turn_s=(3.0, 5.0), seed=2)
    out = tmp_path / "events.jsonl"
    proc = popen_speakerd("run", "--source", f"file:{tmp_path / 'm.wav'}", "--realtime", "--store", str(store),
                          "--pub", "tcp://127.0.0.1:*", "--events-out", str(out),
                          "--control", f"ipc://{tmp_path / 'control.sock'}", stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        # reload mid-conversation, after the daemon has named people with the old index
        while not (out.exists() and any(e["stream_time"] >= 10.0 for e in events(out))):
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.1)  # polling the daemon's output under a deadline
        clips = split_enrollment(librispeech_speakers(librispeech), ENROLL_CLIPS)[0]
        # the enrollment finds the daemon holding the store and sends it SIGHUP itself
        enrolled_out = speakerd("enroll", enrolled.names[newcomer], *map(str, clips[newcomer]), "--store", str(store)).stdout
        hup_at = time.time()
        assert f"(pid {proc.pid}) serves this store: asked it to reload (SIGHUP)" in enrolled_out

        def newcomer_named_after_the_hup(evs: list[dict[str, Any]]) -> bool:
            offset = evs[0]["wall_time"] - evs[0]["stream_time"]
            return any(e["type"] == "speaker.change" and e["speaker"]["name"] == enrolled.names[newcomer]
                       and e["stream_time"] > hup_at - offset for e in evs)

        # what this test pins is over once the newcomer is named: stop the daemon there (SIGTERM
        # exits 0 with a final status, as test_sigterm_during_a_realtime_run pins) rather than play
        # the rest of the meeting in real time (101 s before, about 35 s now)
        deadline = time.monotonic() + conv.duration + 60
        while proc.poll() is None and not newcomer_named_after_the_hup(events(out)):
            assert time.monotonic() < deadline, "timed out waiting for the newcomer to be named"
            time.sleep(0.1)  # polling the daemon's output under a deadline
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)  # the end of the file without the newcomer named fails on the events below
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    err = proc.stderr.read()
    assert code == 0, err[-3000:]
    assert "SIGHUP: reloading" in err and f"added {enrolled.names[newcomer]}" in err
    evs = events(out)
    offset = evs[0]["wall_time"] - evs[0]["stream_time"]
    hup_stream = hup_at - offset
    assert hup_stream < conv.duration - 20, "the reload happened with enough conversation left"
    named = [(e["stream_time"], e["speaker"]["name"]) for e in evs if e["type"] == "speaker.change"]
    # windows queued at the signal are matched with the new index: allow the worker a second's lag
    assert enrolled.names[newcomer] not in {n for t, n in named if t < hup_stream - 1.0}, (hup_stream, named)
    assert enrolled.names[newcomer] in {n for t, n in named if t > hup_stream}, named
    assert evs[-1]["counters"]["reloads"] == 1
