"""The peers ``speakerd bench`` measures in the same run as speakerd, so a shared machine's load
moves both sides alike and the ratios mean something.

- **Resemblyzer** (default model): its own ``VoiceEncoder.embed_utterance`` over the whole file,
  1.6 s partials every 0.25 s (``rate=4``), in a fresh process, timed whole (Python start, torch
  import, model load, file read) and for the pass alone. It runs from the Resemblyzer wheel the
  ge2e bundle was built from (``<bundle>/cache``); without librosa installed, its mel spectrogram
  is speakerd's numpy re-statement of ``librosa.feature.melspectrogram`` (models/ge2e.py).
- **speakerd** as a user runs it: ``speakerd run --no-realtime`` on the same file in a fresh
  process, isolated (own store, XDG folders, an ephemeral port, a private control socket).
- **sherpa-onnx** (ResNet34): its ``SpeakerEmbeddingExtractor`` on the bundle's own ONNX file over
  non-overlapping 1.5 s windows of the same audio, in this process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .audio import SAMPLE_RATE, to_samples

logger = logging.getLogger(__name__)

RESEMBLYZER_WHEEL = "Resemblyzer-0.1.4-py3-none-any.whl"
RESEMBLYZER_RATE = 4
"""Partials per second: 1.6 s windows every 0.25 s, the density of speakerd's probe grid."""
SHERPA_WINDOW_S = 1.5
PROCESS_TIMEOUT_S = 900.0

_RESEMBLYZER_SCRIPT = r"""
import json, sys, time, types, zipfile
from pathlib import Path
wheel, weights, wav_path, unpack, rate = sys.argv[1:6]
if not Path(unpack, "resemblyzer").is_dir():
    zipfile.ZipFile(wheel).extractall(unpack)
sys.path.insert(0, unpack)
try:
    import librosa  # noqa: F401
    mel_source = "librosa"
except ImportError:  # Resemblyzer only needs librosa's melspectrogram on 16 kHz input
    from speakerd.models.ge2e import reference_mel
    feature = types.SimpleNamespace(melspectrogram=lambda y, sr, n_fft, hop_length, n_mels: reference_mel(y).T)
    sys.modules["librosa"] = types.SimpleNamespace(feature=feature)
    mel_source = "speakerd numpy re-statement"
import soundfile as sf
from resemblyzer import VoiceEncoder, normalize_volume
encoder = VoiceEncoder("cpu", verbose=False, weights_fpath=weights)
wav, _ = sf.read(wav_path, dtype="float32")
started = time.perf_counter()
wav = normalize_volume(wav, -30, increase_only=True)
_, partials, _ = encoder.embed_utterance(wav, return_partials=True, rate=float(rate))
print(json.dumps({"pass_s": time.perf_counter() - started, "windows": len(partials), "mel": mel_source}))
"""


class PeerUnavailable(Exception):
    """A peer cannot run here; the bench notes why and goes on."""


def _run_process(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise PeerUnavailable(f"{' '.join(args[:4])} ... exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return wall, done.stdout


def _env(work: Path) -> dict[str, str]:
    """The environment of a child process: this package first on its path, its own user folders."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        (work / var.lower()).mkdir(parents=True, exist_ok=True)
        env[var] = str(work / var.lower())
    runtime = work / "xdg_runtime_dir"
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    env["XDG_RUNTIME_DIR"] = str(runtime)
    return env


def resemblyzer_pass(wav: Path, bundle: Any, work: Path) -> dict[str, Any]:
    """Resemblyzer's offline pass over ``wav`` in a fresh process: whole-process and pass seconds."""
    cache = Path(bundle.path) / "cache"
    wheel, weights = cache / RESEMBLYZER_WHEEL, cache / "pretrained.pt"
    if not wheel.is_file() or not weights.is_file():
        raise PeerUnavailable(f"no Resemblyzer wheel and weights in {cache} (`speakerd models build ge2e-resemblyzer` keeps them)")
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise PeerUnavailable("Resemblyzer needs torch, which is not installed") from exc
    args = [sys.executable, "-c", _RESEMBLYZER_SCRIPT, str(wheel), str(weights), str(wav), str(work / "resemblyzer"), str(RESEMBLYZER_RATE)]
    wall, out = _run_process(args, _env(work))
    result = json.loads(out.strip().splitlines()[-1])
    return {"process_s": wall, "pass_s": result["pass_s"], "windows": result["windows"], "mel": result["mel"]}


def speakerd_process(wav: Path, model: str, work: Path, config: Path | None = None) -> dict[str, Any]:
    """``speakerd run --no-realtime`` on ``wav`` in a fresh, isolated process: whole-process seconds."""
    env = _env(work)
    args = [
        sys.executable, "-m", "speakerd.cli", "--quiet", "run", "--no-realtime",
        "--source", f"file:{wav}", "--model", model, "--store", str(work / "store"),
        "--pub", "tcp://127.0.0.1:0", "--control", f"ipc://{env['XDG_RUNTIME_DIR']}/control.sock",
    ]  # fmt: skip
    if config is not None:
        args[5:5] = ["--config", str(config)]
    wall, _ = _run_process(args, env)
    return {"process_s": wall}


def sherpa_pass(audio: np.ndarray, bundle: Any, threads: int) -> dict[str, Any]:
    """sherpa-onnx's extractor on the bundle's ONNX over non-overlapping 1.5 s windows of ``audio``."""
    try:
        import sherpa_onnx
    except ImportError as exc:
        raise PeerUnavailable("sherpa-onnx is not installed") from exc
    config = sherpa_onnx.SpeakerEmbeddingExtractorConfig(
        model=str(bundle.require_artifact("onnx")), num_threads=max(threads, 1) if threads else 2, provider="cpu"
    )
    extractor = sherpa_onnx.SpeakerEmbeddingExtractor(config)
    step = to_samples(SHERPA_WINDOW_S)
    starts = range(0, len(audio) - step + 1, step)
    started = time.perf_counter()
    for s in starts:
        stream = extractor.create_stream()
        stream.accept_waveform(SAMPLE_RATE, audio[s : s + step])
        stream.input_finished()
        extractor.compute(stream)
    return {"pass_s": time.perf_counter() - started, "windows": len(starts)}


PEER_REPEATS = 3
"""Alternating runs of each side; medians, so one burst of another process's load moves neither."""


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def compare_default(wav: Path, bundle: Any, work: Path, repeats: int = PEER_REPEATS) -> dict[str, Any]:
    """speakerd ``run --no-realtime`` against Resemblyzer's offline pass, both whole processes,
    alternated; ``speed_ratio`` > 1 means speakerd is faster."""
    ours: list[dict[str, Any]] = []
    peer: list[dict[str, Any]] = []
    for _ in range(repeats):
        ours.append(speakerd_process(wav, str(bundle.path), work))
        peer.append(resemblyzer_pass(wav, bundle, work))
    seconds = _audio_seconds(wav)
    speakerd_s, peer_s, pass_s = _median(ours, "process_s"), _median(peer, "process_s"), _median(peer, "pass_s")
    return {
        "peer": "resemblyzer",
        "audio_s": seconds,
        "speakerd_process_s": speakerd_s,
        "peer_process_s": peer_s,
        "peer_pass_s": pass_s,
        "peer_windows": peer[0]["windows"],
        "peer_mel": peer[0]["mel"],
        "speakerd_x_real_time": seconds / speakerd_s,
        "peer_x_real_time": seconds / peer_s,
        "peer_pass_x_real_time": seconds / pass_s,
        "speed_ratio": peer_s / speakerd_s,
        "speed_ratio_vs_pass": pass_s / speakerd_s,
        "load_avg_1m": os.getloadavg()[0],
    }


def compare_sherpa(audio: np.ndarray, bundle: Any, threads: int, pipeline: Any, repeats: int = PEER_REPEATS) -> dict[str, Any]:
    """speakerd's whole pipeline (``pipeline()`` -> wall seconds, probes on) against sherpa-onnx
    embedding the same audio in non-overlapping 1.5 s windows, alternated; ratio > 1: speakerd faster."""
    ours: list[float] = []
    peer: list[dict[str, Any]] = []
    for _ in range(repeats):
        ours.append(float(pipeline()))
        peer.append(sherpa_pass(audio, bundle, threads))
    seconds = len(audio) / SAMPLE_RATE
    speakerd_s, peer_s = float(np.median(ours)), _median(peer, "pass_s")
    return {
        "peer": "sherpa-onnx",
        "audio_s": seconds,
        "speakerd_pipeline_s": speakerd_s,
        "peer_pass_s": peer_s,
        "peer_windows": peer[0]["windows"],
        "speakerd_x_real_time": seconds / speakerd_s,
        "peer_x_real_time": seconds / peer_s,
        "speed_ratio": peer_s / speakerd_s,
        "load_avg_1m": os.getloadavg()[0],
    }


def _audio_seconds(wav: Path) -> float:
    import soundfile as sf

    return float(sf.info(str(wav)).duration)


GE2E_MODEL = "ge2e-resemblyzer"
RESNET_MODEL = "wespeaker-resnet34"


class PipelineRun(Protocol):
    """``bench.run_pipeline``: the real pipeline over a file, returning its figures."""

    def __call__(self, path: Path, settings: Any, bundle: Any, backend: Any, index: Any, *, realtime: bool) -> dict[str, Any]: ...


def bench_peers(wav: Path, audio: np.ndarray, settings: Any, bundle: Any, backend: Any, index: Any, work: Path,
                run_pipeline: PipelineRun) -> dict[str, Any] | None:  # fmt: skip
    """The peer of this model, in the same run: Resemblyzer for GE2E (whole processes), sherpa-onnx
    for ResNet34 (our whole pipeline against its extractor on 1.5 s windows). None: no peer."""
    try:
        if bundle.name == GE2E_MODEL:
            return compare_default(wav, bundle, work / "peers")
        if bundle.name == RESNET_MODEL and backend.name.startswith("onnx"):
            def pipeline() -> float:
                return float(run_pipeline(wav, settings, bundle, backend, index, realtime=False)["wall_s"])

            return compare_sherpa(audio, bundle, settings.embedding.threads, pipeline)
    except PeerUnavailable as exc:
        logger.warning("peer of %s skipped: %s", bundle.name, exc)
        return {"skipped": str(exc)}
    return None


def render_peers(peers_by_model: dict[str, Any]) -> list[str]:
    """The peers' table (Markdown lines) for ``speakerd bench``'s text output."""
    lines: list[str] = []
    peers = {m: p for m, p in peers_by_model.items() if "skipped" not in p}
    if peers:
        load = next(iter(peers.values()))["load_avg_1m"]
        lines += ["", f"Peers, same run (median of alternated runs; load average {load:.1f}):", "",
                  "| model | speakerd | x real time | peer | x real time | speakerd speed / peer speed |", "|---|---|---|---|---|---|"]  # fmt: skip
        for model, p in peers.items():
            if p["peer"] == "resemblyzer":
                lines.append(f"| {model} | `run --no-realtime`, whole process {p['speakerd_process_s']:.2f} s | {p['speakerd_x_real_time']:.0f}x | "
                             f"Resemblyzer offline pass ({p['peer_windows']} windows of 1.6 s), whole process {p['peer_process_s']:.2f} s "
                             f"(pass alone {p['peer_pass_s']:.2f} s, {p['peer_pass_x_real_time']:.0f}x) | {p['peer_x_real_time']:.0f}x | "
                             f"{p['speed_ratio']:.2f} (against the pass alone {p['speed_ratio_vs_pass']:.2f}) |")  # fmt: skip
            else:
                lines.append(f"| {model} | whole pipeline, probes on, {p['speakerd_pipeline_s']:.2f} s | {p['speakerd_x_real_time']:.0f}x | "
                             f"sherpa-onnx, {p['peer_windows']} windows of 1.5 s, {p['peer_pass_s']:.2f} s | {p['peer_x_real_time']:.0f}x | {p['speed_ratio']:.2f} |")  # fmt: skip
    for model, p in peers_by_model.items():
        if "skipped" in p:
            lines.append(f"\nNote: peer of {model} skipped: {p['skipped']}")
    return lines
