"""``speakerd bench --seconds 5 --json``: every figure present and positive (speed is measured, not asserted)."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import pytest

from speakerd import benchpeers
from speakerd.bench import BATCH_SIZES, WINDOW_LENGTHS_S, add_bench_arguments, main_bench

STAGES = ("capture_resample", "vad", "fbank_windows", "embedding", "match", "publish")


@pytest.mark.slow
def test_bench_json_smoke(librispeech: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # the real Resemblyzer and speakerd processes, alternated once instead of PEER_REPEATS (3) times:
    # each Resemblyzer process imports torch (~8 s); this test pins the peer figures' presence, and
    # test_bench_peers.py pins the comparison itself (also with one repeat). 36 s -> about 20 s.
    monkeypatch.setattr(benchpeers, "compare_default", functools.partial(benchpeers.compare_default, repeats=1))
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--seconds", "5", "--json", "--audio-seconds", "20", "--repeats", "3",
                              "--model", "ge2e-resemblyzer", "--data", str(librispeech)])
    assert main_bench(args) == 0
    result = json.loads(capsys.readouterr().out)
    stages = result["stages"]["ge2e-resemblyzer"]
    for key in STAGES:
        assert stages[key] > 0, key
    assert stages["total_stages"] == pytest.approx(sum(stages[k] for k in STAGES))
    assert stages["windows"] > 10 and stages["enrolled_speakers"] == 5
    pipe = result["pipeline"]["ge2e-resemblyzer"]
    assert pipe["no_realtime"]["real_time_factor"] > 0 and pipe["no_realtime"]["audio_s"] == pytest.approx(20, abs=0.1)
    rt = pipe["realtime"]
    assert rt["audio_s"] == pytest.approx(5, abs=0.1)
    assert rt["wall_s"] >= 4.5  # paced in real time, not read as fast as possible
    assert rt["live_cpu_percent"] > 0 and rt["rss_mb_max"] > 0
    # CPU over the audio clock, every thread: the per-thread shares add up to the whole
    assert rt["live_cpu_percent"] == pytest.approx(100 * rt["cpu_s"] / rt["audio_s"])
    threads = rt["cpu_percent_by_thread"]
    assert threads["speakerd-embed"] > 0 and "bench-sampler" not in threads
    assert sum(threads.values()) == pytest.approx(rt["live_cpu_percent"], abs=0.1 * rt["live_cpu_percent"] + 0.5)
    grid = {(r["window_s"], r["batch"]) for r in result["per_window"] if r["model"] == "ge2e-resemblyzer"}
    assert grid == {(w, b) for w in WINDOW_LENGTHS_S for b in BATCH_SIZES}
    assert all(r["ms_per_window"] > 0 for r in result["per_window"])
    assert result["sherpa_anchor"] is None or all(r["ratio"] > 0 for r in result["sherpa_anchor"])
    peer = result["peers"]["ge2e-resemblyzer"]  # Resemblyzer's offline pass, same run, as a ratio
    assert peer["peer"] == "resemblyzer" and peer["speed_ratio"] > 0 and peer["peer_windows"] > 50


def test_a_missing_microphone_is_a_note_not_a_failed_bench() -> None:
    from speakerd.bench import _microphone
    from speakerd.settings import Settings

    notes: list[str] = []
    args = argparse.Namespace(mic="no-such-microphone-xyz", seconds=1.0)
    assert _microphone(args, Settings(), None, None, None, notes) is None
    assert len(notes) == 1 and "microphone run skipped" in notes[0] and "no-such-microphone-xyz" in notes[0], notes
