"""``speakerd bench``: what each stage costs per second of audio, and what the whole daemon costs.

Every figure is measured on real speech from the LibriSpeech clips, through the daemon's own
classes: each stage alone (capture/resample, VAD, fbank windows, embedding, match, publish), then
the whole pipeline as fast as it goes (real-time factor) and paced in real time (CPU and memory).
Timings on a shared machine are noisy, so repeated figures are medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from .audio import SAMPLE_RATE, AudioChunk, to_samples

logger = logging.getLogger(__name__)

WINDOW_LENGTHS_S = (1.0, 1.5, 2.0, 3.0)
BATCH_SIZES = (1, 4, 8)
DEFAULT_MODELS = ("ge2e-resemblyzer", "wespeaker-resnet34")
ANCHOR_MODEL = "wespeaker-resnet34"
"""The model whose ONNX sherpa-onnx also runs, as an outside reference for our speed."""
CAPTURE_RATE = 48000
"""Capture is timed on a 48 kHz stereo file, the common microphone format, so resampling is included."""
STAGE_REPEATS = 3
RSS_SAMPLE_S = 0.5
ENROLLED_SPEAKERS = 5


def default_data_dir() -> Path:
    return Path(os.environ.get("SPEAKERD_LIBRISPEECH", Path(__file__).resolve().parents[3] / "shared" / "data" / "librispeech"))


def speech(data: Path, seconds: float) -> np.ndarray:
    """At least ``seconds`` of real speech: test-other clips end to end (repeated if too few)."""
    clips = sorted((data / "test-other").rglob("*.flac"))
    if not clips:
        raise FileNotFoundError(f"no LibriSpeech clips under {data}/test-other")
    need = int(seconds * SAMPLE_RATE)
    parts: list[np.ndarray] = []
    total = 0
    i = 0
    while total < need:
        audio, rate = sf.read(str(clips[i % len(clips)]), dtype="float32")
        if rate != SAMPLE_RATE:
            raise ValueError(f"{clips[i % len(clips)]}: {rate} Hz, expected {SAMPLE_RATE}")
        parts.append(audio)
        total += len(audio)
        i += 1
    return np.concatenate(parts)[:need]


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _chunks(audio: np.ndarray, block: int) -> list[AudioChunk]:
    now = time.time()
    return [AudioChunk(audio[i : i + block], i, now + i / SAMPLE_RATE) for i in range(0, len(audio), block)]


# -- stages alone ---------------------------------------------------------------------------------


def bench_stages(audio: np.ndarray, settings: Any, bundle: Any, backend: Any, index: Any, work: Path, repeats: int) -> dict[str, Any]:
    """Milliseconds of work per second of audio, for each stage run alone on the same speech."""
    from scipy.signal import resample_poly

    from . import events as ev
    from .embedding.backend import windows_for
    from .publisher import EventPublisher
    from .sources import FileSource
    from .vad import VadSegmenter
    from .windows import SpeechWindower, Window

    seconds = len(audio) / SAMPLE_RATE
    out: dict[str, Any] = {"audio_s": seconds}

    wide = resample_poly(audio, CAPTURE_RATE // 1000, SAMPLE_RATE // 1000).astype(np.float32)
    wav = work / "capture-48k.wav"
    sf.write(str(wav), np.stack([wide, wide], axis=1), CAPTURE_RATE, subtype="PCM_16")

    def capture() -> None:
        with FileSource(wav, settings.audio, realtime=False) as src:
            while not src.finished:
                src.read(1.0)

    out["capture_resample"] = _median_time(capture, repeats) / seconds * 1000

    chunks = _chunks(audio, to_samples(settings.audio.block_ms / 1000))
    vad_events: list[Any] = []

    def vad() -> None:
        vad_events.clear()
        seg = VadSegmenter(settings.vad)
        for c in chunks:
            vad_events.extend(seg.process(c))
        vad_events.extend(seg.flush())

    out["vad"] = _median_time(vad, repeats) / seconds * 1000

    windows: list[Window] = []

    def fbank() -> None:
        windows.clear()
        windower = SpeechWindower(windows_for(bundle, settings.windows), bundle.features, bundle.sample_rate)
        for e in vad_events:
            windows.extend(w for w in windower.process(e) if isinstance(w, Window))

    out["fbank_windows"] = _median_time(fbank, repeats) / seconds * 1000
    out["windows"] = len(windows)

    backend.embed(np.stack([windows[0].feats]))  # warm-up
    embs: list[np.ndarray] = []

    def embed() -> None:
        embs.clear()
        for w in windows:  # one at a time, as live audio arrives
            embs.extend(backend.embed(w.feats[None]))

    out["embedding"] = _median_time(embed, repeats) / seconds * 1000

    def match() -> None:
        for e in embs:
            index.rank(e[None])

    out["match"] = _median_time(match, repeats) / seconds * 1000
    out["enrolled_speakers"] = len(index)

    from .evaluation.runner import run_file

    file16 = work / "speech-16k.wav"
    sf.write(str(file16), audio, SAMPLE_RATE, subtype="PCM_16")
    run = run_file(file16, settings, bundle=bundle, backend=backend, matcher=index)
    payloads = [ev.decode_payload(e) for e in run.events]
    out["events"] = len(payloads)
    burst = max(1, 2000 // max(len(payloads), 1))
    stream = payloads * burst
    publish = dataclasses.replace(settings.publish, endpoint="tcp://127.0.0.1:*", events_out=None)

    def send() -> None:
        with EventPublisher(publish) as pub:
            for p in stream:
                pub.publish(p, stream_time=1.0, wall_time=time.time())
            drained = threading.Event()
            deadline = time.monotonic() + 10.0
            while pub.stats()["published"] < len(stream) and time.monotonic() < deadline:
                drained.wait(0.001)  # the socket thread sends; nothing to wait on but its counter

    per_event = _median_time(send, repeats) / len(stream)
    out["publish"] = per_event * len(payloads) / seconds * 1000
    out["publish_us_per_event"] = per_event * 1e6
    stages = ("capture_resample", "vad", "fbank_windows", "embedding", "match", "publish")
    out["total_stages"] = sum(out[k] for k in stages)
    return out


# -- per window ----------------------------------------------------------------------------------


def windows_of(audio: np.ndarray, settings: Any, recipe: Any, length: float, count: int) -> list[Any]:
    """Up to ``count`` full ``length``-second windows of real speech, through the daemon's VAD and windower."""
    from .vad import VadSegmenter
    from .windows import SpeechWindower, Window

    ws = dataclasses.replace(settings.windows, length_s=length, first_length_s=min(settings.windows.first_length_s, length))
    seg = VadSegmenter(settings.vad)
    windower = SpeechWindower(ws, recipe)
    full = to_samples(length)
    out: list[Window] = []
    for chunk in _chunks(audio, to_samples(0.1)):
        for e in seg.process(chunk):
            out.extend(w for w in windower.process(e) if isinstance(w, Window) and w.end - w.start == full)
        if len(out) >= count:
            break
    if not out:
        raise RuntimeError(f"no {length} s window in the bench audio")
    while len(out) < count:
        out = out + out
    return out[:count]


def bench_windows(audio: np.ndarray, settings: Any, bundle: Any, backend: Any, repeats: int, bar: Any) -> list[dict[str, Any]]:
    rows = []
    for length in WINDOW_LENGTHS_S:
        windows = windows_of(audio, settings, bundle.features, length, max(BATCH_SIZES))
        for batch in BATCH_SIZES:
            feats = np.stack([w.feats for w in windows[:batch]])
            backend.embed(feats)  # warm-up (first call allocates)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                backend.embed(feats)
                times.append(time.perf_counter() - t)
            rows.append({
                "model": bundle.name,
                "backend": backend.name,
                "window_s": length,
                "batch": batch,
                "ms_per_window": statistics.median(times) / batch * 1000,
                "ms_per_call_p90": float(np.percentile(times, 90)) * 1000,
            })
            bar.update(1)
    return rows


def bench_sherpa(audio: np.ndarray, settings: Any, bundle: Any, backend: Any, repeats: int) -> list[dict[str, Any]]:
    """Ours (fbank + embedding of one window) against sherpa-onnx's extractor on the same ONNX file."""
    import sherpa_onnx

    from .features import FeatureExtractor

    config = sherpa_onnx.SpeakerEmbeddingExtractorConfig(
        model=str(bundle.require_artifact("onnx")), num_threads=settings.embedding.threads, provider="cpu"
    )
    extractor = sherpa_onnx.SpeakerEmbeddingExtractor(config)
    extractor_features = FeatureExtractor(bundle.features, SAMPLE_RATE)
    rows = []
    for length in WINDOW_LENGTHS_S:
        samples = audio[SAMPLE_RATE : SAMPLE_RATE + to_samples(length)]

        def sherpa() -> None:
            stream = extractor.create_stream()
            stream.accept_waveform(SAMPLE_RATE, samples)
            stream.input_finished()
            extractor.compute(stream)

        def ours() -> None:
            backend.embed(extractor_features.compute(samples)[None])

        sherpa()
        ours()
        t_sherpa = _median_time(sherpa, repeats)
        t_ours = _median_time(ours, repeats)
        rows.append({"window_s": length, "speakerd_ms": t_ours * 1000, "sherpa_ms": t_sherpa * 1000, "ratio": t_ours / t_sherpa})
    return rows


# -- whole pipeline ------------------------------------------------------------------------------


class _Sampler:
    """CPU time of this whole process (every thread, user + system) and its RSS, sampled on its own
    thread until stopped. ``cpu_s`` leaves out the sampler's own thread: it is the bench, not the
    daemon. ``threads``: CPU seconds per thread, by name (ONNX Runtime's and ZeroMQ's threads by
    their native name), each from its last sample, so a thread that ends before the run misses up
    to ``interval`` of its time: the breakdown is approximate, ``cpu_s`` is exact."""

    def __init__(self, interval: float) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.rss: list[int] = []
        self.cpu: list[float] = []
        self.own_cpu_s = 0.0
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> _Sampler:
        self.load_start = os.getloadavg()[0]
        self._sample_threads()
        self._first = dict(self._last)
        self._wall0 = time.monotonic()
        self._cpu0 = sum(self._proc.cpu_times()[:2])
        self._proc.cpu_percent(None)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.wall = time.monotonic() - self._wall0
        self.cpu_s = sum(self._proc.cpu_times()[:2]) - self._cpu0 - self.own_cpu_s
        self._sample_threads()
        self.load_end = os.getloadavg()[0]

    @property
    def threads(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for tid, t in self._last.items():
            name = self._names.get(tid, "native")
            if name != "bench-sampler":
                out[name] = out.get(name, 0.0) + t - self._first.get(tid, 0.0)
        return out

    def _sample_threads(self) -> None:
        named = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        for t in self._proc.threads():
            self._last[t.id] = t.user_time + t.system_time
            if t.id not in self._names:
                self._names[t.id] = named.get(t.id) or _native_thread_name(t.id)

    def _run(self) -> None:
        start = time.thread_time()
        while not self._stop.wait(self._interval):
            self.cpu.append(self._proc.cpu_percent(None))
            self.rss.append(self._proc.memory_info().rss)
            self._sample_threads()
        self.own_cpu_s = time.thread_time() - start


def _native_thread_name(tid: int) -> str:
    """A thread Python did not start (ONNX Runtime's pool, ZeroMQ's I/O): its OS name where readable."""
    try:
        return "native " + Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    except OSError:
        return "native"


def _run(settings: Any, bundle: Any, backend: Any, index: Any, source: Any, stop: threading.Event, *,
         live: bool, per_s: Callable[[float], float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The real pipeline from ``source`` to a real PUB socket on an ephemeral loopback port, under the
    sampler: its CPU figures (``per_s``: the seconds they are shared over, given the wall time) and
    the pipeline's counters."""
    from .pipeline import Pipeline
    from .publisher import EventPublisher

    publish = dataclasses.replace(settings.publish, endpoint="tcp://127.0.0.1:*", events_out=None)
    with EventPublisher(publish) as publisher, _Sampler(RSS_SAMPLE_S) as sampler:
        pipeline = Pipeline(settings, bundle=bundle, backend=backend, matcher=index, publisher=publisher, live=live)
        pipeline.run(source, stop)
        counters = pipeline.status().counters
    seconds = per_s(sampler.wall)
    figures = {
        "wall_s": sampler.wall,
        "cpu_s": sampler.cpu_s,
        "live_cpu_percent": 100 * sampler.cpu_s / seconds,
        "cpu_percent_by_thread": {k: 100 * v / seconds for k, v in sorted(sampler.threads.items(), key=lambda kv: -kv[1])},
        "load_avg_1m": [sampler.load_start, sampler.load_end],
        "cpu_percent_p95": float(np.percentile(sampler.cpu, 95)) if sampler.cpu else None,
        "rss_mb_max": max(sampler.rss) / 2**20 if sampler.rss else None,
        "rss_mb_end": sampler.rss[-1] / 2**20 if sampler.rss else None,
        "windows": counters.get("windows"),
        "dropped_windows": counters.get("dropped_windows"),
    }
    return figures, counters


def run_pipeline(path: Path, settings: Any, bundle: Any, backend: Any, index: Any, *, realtime: bool) -> dict[str, Any]:
    """The real pipeline on a file, paced in real time or read as fast as it goes; CPU over the audio's seconds."""
    from .sources import FileSource

    seconds = sf.info(str(path)).duration
    figures, _ = _run(settings, bundle, backend, index, FileSource(path, settings.audio, realtime=realtime), threading.Event(),
                      live=realtime, per_s=lambda _wall: seconds)
    return {"audio_s": seconds, "real_time_factor": figures["wall_s"] / seconds, **figures}


def run_microphone(device: str | int | None, seconds: float, settings: Any, bundle: Any, backend: Any, index: Any) -> dict[str, Any]:
    """The real pipeline on a microphone for ``seconds``: the path a user runs, with PortAudio's
    callback thread, the device's own rate resampled and ``audio.mic_block_ms`` blocks. bench's
    real-time file (16 kHz, 100 ms blocks) costs about half of it (docs/BENCHMARKS.md, session 14).
    The CPU is over wall time, and depends on how much speech was heard: ``windows`` says.
    ``AudioError`` when the device cannot be opened."""
    from .sources import MicSource

    audio = settings.audio if device is None else dataclasses.replace(settings.audio, device=device)
    s = dataclasses.replace(settings, audio=audio)
    source = MicSource(s.audio)
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    try:
        figures, counters = _run(s, bundle, backend, index, source, stop, live=True, per_s=lambda wall: wall)
    finally:
        timer.cancel()
    return {"device": source.device_name, "device_rate": source.rate, "block_ms": s.audio.mic_block_ms, **figures,
            "speech_regions": counters.get("speech_regions"), "dropped_blocks": counters.get("dropped_blocks")}


def enrolled_index(data: Path, settings: Any, bundle: Any, backend: Any, work: Path) -> Any:
    """An index of the test-other speakers enrolled through the real path, so matching has real work.

    A bundle with random weights (a converted test bundle, for speed) fails enrollment's speech
    check; its windows are then enrolled without the check: the matching work is the same.
    """
    from .enroll import EnrollError
    from .evaluation.conversation import librispeech_speakers
    from .evaluation.evaluate import enroll_store

    clips = dict(sorted(librispeech_speakers(data).items())[:ENROLLED_SPEAKERS])
    chosen = {s: c[:3] for s, c in clips.items()}
    try:
        return enroll_store(work / f"store-{bundle.name}", chosen, settings, bundle, backend)
    except EnrollError as exc:
        logger.warning("enrolling without the speech check (random weights?): %s", exc)
        return _unchecked_index(work / f"store-{bundle.name}-unchecked", chosen, settings, bundle, backend)


def _unchecked_index(directory: Path, chosen: dict[str, list[Path]], settings: Any, bundle: Any, backend: Any) -> Any:
    from .enroll import embed_windows, file_speech
    from .matcher import SpeakerIndex
    from .store import SpeakerStore

    with SpeakerStore(directory, fingerprint=bundle.fingerprint, dim=bundle.embedding_dim) as store:
        for spk, paths in sorted(chosen.items()):
            windows = [w for p in paths for w in file_speech(p, settings, bundle.features)[0]]
            store.enroll(f"spk-{spk}", embed_windows(windows, backend.embed), source="bench")
        return SpeakerIndex.from_store(store, settings.matching)


# -- command line --------------------------------------------------------------------------------


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=_csv, default=None, metavar="M1,M2", help=f"model bundles (default: {', '.join(DEFAULT_MODELS)}, those that are built)")
    parser.add_argument("--backend", type=_csv, default=None, metavar="B1,B2", help="backends (default: every one available here: onnx, and coreml on macOS)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--seconds", type=float, default=60.0, metavar="N", help="length of the real-time run for CPU and memory (default 60)")
    parser.add_argument("--audio-seconds", type=float, default=120.0, metavar="N", help="speech used for stage costs and the real-time factor (default 120)")
    parser.add_argument("--repeats", type=int, default=20, metavar="R", help="timed calls per window length and batch (default 20)")
    parser.add_argument("--data", type=Path, default=None, metavar="DIR", help="LibriSpeech folder (default $SPEAKERD_LIBRISPEECH or ../shared/data/librispeech)")
    parser.add_argument("--config", metavar="F", help="TOML settings file")
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="skip the peers (Resemblyzer's offline pass, sherpa-onnx's extractor) run beside speakerd")
    parser.add_argument("--mic", nargs="?", const="", default=None, metavar="DEVICE",
                        help="also run the first model live on a microphone (DEVICE: index or name; none: the default "
                             "input) for --seconds, and report its CPU: the path a user runs, which the real-time file "
                             "understates; speak or play speech near it (the figure says how many windows it heard)")


def _with_stand_in_decision(settings: Any, bundle: Any, notes: list[str]) -> Any:
    """A bundle not yet calibrated (a converted test bundle) runs for speed on GE2E's decision values:
    what is decided does not change the work done per second."""
    from .models.build import GE2E_DECISION

    missing = {k: v for k, v in GE2E_DECISION.items() if k not in bundle.decision and getattr(settings.decision, k) is None}
    if not missing:
        return settings
    notes.append(f"{bundle.name} carries no decision values; benchmarked with ge2e-resemblyzer's (speed only)")
    return dataclasses.replace(settings, decision=dataclasses.replace(settings.decision, **missing))


def _available_backends(bundle: Any) -> list[str]:
    names = ["onnx"]
    if sys.platform == "darwin" and bundle.artifact("coreml") is not None:
        names.append("coreml")
    return names


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from .benchpeers import bench_peers
    from .bundle import BundleError, resolve_bundle
    from .embedding import backend_for
    from .settings import load_settings

    settings = load_settings(Path(args.config) if args.config else None)
    data = Path(args.data) if args.data else default_data_dir()
    asked = args.model or DEFAULT_MODELS
    notes: list[str] = []
    bundles = []
    for name in asked:
        try:
            bundle = resolve_bundle(name)
            if bundle.artifact("onnx") is None:
                raise BundleError(f"{name} has no built ONNX model")
            bundles.append(bundle)
        except (BundleError, FileNotFoundError, OSError) as exc:
            notes.append(f"model {name} skipped: {exc}")
            logger.warning("model %s skipped: %s", name, exc)
    if not bundles:
        raise SystemExit("no model bundle to benchmark: " + "; ".join(notes))
    audio = speech(data, args.audio_seconds)
    realtime_audio = speech(data, args.seconds)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform, "load_avg_1m": os.getloadavg()[0]},
        "settings": {"threads": settings.embedding.threads, "window_s": settings.windows.length_s, "hop_s": settings.windows.hop_s},
        "per_window": [],
        "stages": {},
        "pipeline": {},
        "sherpa_anchor": None,
        "peers": {},
        "notes": notes,
    }
    grid = sum(len(args.backend or _available_backends(b)) for b in bundles) * len(WINDOW_LENGTHS_S) * len(BATCH_SIZES)
    with tempfile.TemporaryDirectory(prefix="speakerd-bench-") as tmp:
        work = Path(tmp)
        bar = tqdm(total=grid + 2 * len(bundles), desc="bench", file=sys.stderr, disable=None)
        for bundle in bundles:
            backends = args.backend or _available_backends(bundle)
            for kind in backends:
                backend = backend_for(bundle, dataclasses.replace(settings.embedding, backend=kind), settings.windows)
                try:
                    result["per_window"] += bench_windows(audio, settings, bundle, backend, args.repeats, bar)
                    if kind != backends[0]:
                        continue
                    s = dataclasses.replace(settings, embedding=dataclasses.replace(settings.embedding, model=bundle.name))
                    s = _with_stand_in_decision(s, bundle, notes)
                    index = enrolled_index(data, s, bundle, backend, work)
                    result["stages"][bundle.name] = bench_stages(audio, s, bundle, backend, index, work, STAGE_REPEATS)
                    bar.update(1)
                    long_file = work / "long.wav"
                    sf.write(str(long_file), audio, SAMPLE_RATE, subtype="PCM_16")
                    runs = [run_pipeline(long_file, s, bundle, backend, index, realtime=False) for _ in range(STAGE_REPEATS)]
                    fast = sorted(runs, key=lambda r: r["real_time_factor"])[len(runs) // 2]
                    rt_file = work / "realtime.wav"
                    sf.write(str(rt_file), realtime_audio, SAMPLE_RATE, subtype="PCM_16")
                    live = run_pipeline(rt_file, s, bundle, backend, index, realtime=True)
                    result["pipeline"][bundle.name] = {"no_realtime": fast, "realtime": live, "backend": backend.name}
                    if args.mic is not None and bundle is bundles[0]:
                        result["pipeline"][bundle.name]["microphone"] = _microphone(args, s, bundle, backend, index, notes)
                    bar.update(1)
                    if bundle.name == ANCHOR_MODEL:
                        result["sherpa_anchor"] = bench_sherpa(audio, s, bundle, backend, args.repeats)
                    if args.peers:
                        peers = bench_peers(long_file, audio, s, bundle, backend, index, work, run_pipeline)
                        if peers is not None:
                            result["peers"][bundle.name] = peers
                finally:
                    backend.close()
        bar.close()
    if result["sherpa_anchor"] is None:
        result["notes"].append(f"sherpa-onnx anchor skipped: no {ANCHOR_MODEL} bundle benchmarked")
    return result


def _microphone(args: argparse.Namespace, settings: Any, bundle: Any, backend: Any, index: Any, notes: list[str]) -> dict[str, Any] | None:
    from .errors import AudioError

    device: str | int | None = None if not args.mic else (int(args.mic) if args.mic.isdigit() else args.mic)
    try:
        return run_microphone(device, args.seconds, settings, bundle, backend, index)
    except AudioError as exc:
        notes.append(f"microphone run skipped: {exc} (`speakerd devices` lists the inputs)")
        logger.warning("microphone run skipped: %s", exc)
        return None


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render(result: dict[str, Any]) -> str:
    lines = ["Stage cost, ms of work per second of audio (each stage alone, median of repeats):", ""]
    lines.append("| model | capture+resample | VAD | fbank+windows | embedding | match | publish | total |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for model, s in result["stages"].items():
        lines.append(f"| {model} | {_fmt(s['capture_resample'])} | {_fmt(s['vad'])} | {_fmt(s['fbank_windows'])} | "
                     f"{_fmt(s['embedding'])} | {_fmt(s['match'])} | {_fmt(s['publish'], '.3f')} | {_fmt(s['total_stages'])} |")
    lines += ["", "Whole pipeline. Live CPU: CPU seconds of the whole process (every thread, user + system; not the",
              "bench's sampler) over seconds of audio, paced in real time; p95 of its 0.5 s samples:", "",
              "| model | backend | real-time factor (--no-realtime) | live run | live CPU, % of a core | p95 | RSS max | load (1 min) |",
              "|---|---|---|---|---|---|---|---|"]
    for model, p in result["pipeline"].items():
        f, r = p["no_realtime"], p["realtime"]
        load = " -> ".join(f"{x:.1f}" for x in r["load_avg_1m"])
        lines.append(f"| {model} | {p['backend']} | {_fmt(f['real_time_factor'], '.4f')} on {f['audio_s']:.0f} s | {r['audio_s']:.0f} s | "
                     f"**{_fmt(r['live_cpu_percent'], '.2f')}** | {_fmt(r['cpu_percent_p95'], '.1f')} | {_fmt(r['rss_mb_max'], '.0f')} MB | {load} |")
    for model, p in result["pipeline"].items():
        shares = ", ".join(f"{name} {pct:.2f}" for name, pct in p["realtime"]["cpu_percent_by_thread"].items() if pct >= 0.005)
        lines.append(f"\nLive CPU of {model} by thread, % of a core: {shares}")
        if mic := p.get("microphone"):
            shares = ", ".join(f"{name} {pct:.2f}" for name, pct in mic["cpu_percent_by_thread"].items() if pct >= 0.005)
            lines.append(f"\nLive CPU of {model} on the microphone {mic['device']!r} ({mic['device_rate']} Hz, {mic['block_ms']} ms "
                         f"blocks, {mic['wall_s']:.0f} s, {mic['windows']} windows heard): **{_fmt(mic['live_cpu_percent'])}** % of a "
                         f"core, p95 {_fmt(mic['cpu_percent_p95'], '.1f')}; by thread: {shares}")
    lines += ["", "Embedding, ms per window (median):", "", "| model | backend | window | batch 1 | batch 4 | batch 8 |", "|---|---|---|---|---|---|"]
    keyed: dict[tuple[str, str, float], dict[int, float]] = {}
    for row in result["per_window"]:
        keyed.setdefault((row["model"], row["backend"], row["window_s"]), {})[row["batch"]] = row["ms_per_window"]
    for (model, backend, length), by_batch in keyed.items():
        lines.append(f"| {model} | {backend} | {length} s | " + " | ".join(_fmt(by_batch.get(b)) for b in BATCH_SIZES) + " |")
    if result["sherpa_anchor"]:
        lines += ["", "Anchor: sherpa-onnx SpeakerEmbeddingExtractor on the same ONNX (fbank + embedding, one window):", "",
                  "| window | speakerd ms | sherpa-onnx ms | ratio |", "|---|---|---|---|"]
        for row in result["sherpa_anchor"]:
            lines.append(f"| {row['window_s']} s | {row['speakerd_ms']:.2f} | {row['sherpa_ms']:.2f} | {row['ratio']:.2f} |")
    from .benchpeers import render_peers

    lines += render_peers(result.get("peers", {}))
    for note in result["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def main_bench(args: argparse.Namespace) -> int:
    result = bench(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return 0
