#!/usr/bin/env python3
"""Milliseconds per window for WeSpeaker ResNet34 on ONNX Runtime, fbank included, next to
sherpa-onnx's SpeakerEmbeddingExtractor running the very same ONNX file in the same process.

Random weights (same compute as the real ones). Audio is real LibriSpeech speech. Ours: per window
speakerd's FeatureExtractor (kaldi-native-fbank + CMN), then one OnnxBackend.embed call per batch.
sherpa-onnx: per window create_stream / accept_waveform / compute (it computes its own fbank and
has no batch call), timed the same way.

    PYTHONPATH=daemon python tools/bench_wespeaker.py --threads 2 --write-docs docs/wespeaker.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))

from speakerd.bundle import ModelBundle, load_bundle  # noqa: E402
from speakerd.embedding.onnx_backend import OnnxBackend  # noqa: E402
from speakerd.features import FeatureExtractor  # noqa: E402

SAMPLE_RATE = 16000
WINDOWS_S = (1.0, 1.5, 2.0, 3.0)
BATCHES = (1, 4, 8)
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def build_bundle(work: Path) -> ModelBundle:
    import torch

    from speakerd.models.wespeaker.checkpoint import write_wespeaker_dir
    from speakerd.models.wespeaker.convert import convert_wespeaker
    from speakerd.models.wespeaker.resnet import resnet34

    torch.manual_seed(0)
    ckpt = write_wespeaker_dir(resnet34().eval(), work / "ckpt")
    return convert_wespeaker(ckpt, work / "bundle", progress=False, coreml=False)


def speech(librispeech: Path, seconds: float, count: int) -> list[np.ndarray]:
    """``count`` distinct windows of real speech."""
    clips = sorted((librispeech / "test-other").rglob("*.flac"))
    out: list[np.ndarray] = []
    n = int(seconds * SAMPLE_RATE)
    for clip in clips:
        wave = sf.read(clip, dtype="float32")[0]
        for start in range(SAMPLE_RATE, len(wave) - n, n):
            out.append(wave[start : start + n])
            if len(out) == count:
                return out
    raise SystemExit(f"not enough speech in {librispeech} for {count} windows of {seconds} s")


def interleaved(
    fns: dict[str, Callable[[], None]], *, min_reps: int, min_seconds: float, block: int = 4
) -> dict[str, tuple[float, float]]:
    """(best, median) wall time in ms of each function, the contenders taking turns in blocks.

    The machine may be shared, so contenders alternate and see the same load. Not call by call:
    ONNX Runtime's worker threads keep spinning for a while after a run and would slow whichever
    contender runs next, so each block's first call (which absorbs that) is not counted. The best
    time estimates the cost on an idle machine; the median shows what the load made of it.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    t_end = time.perf_counter() + min_seconds
    while min(len(t) for t in times.values()) < min_reps or time.perf_counter() < t_end:
        for name, fn in fns.items():
            fn()
            for _ in range(block - 1):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1000.0)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="existing bundle (default: random weights, built now)")
    parser.add_argument("--librispeech", type=Path, default=REPO.parent / "shared" / "data" / "librispeech")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for both runtimes")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="minimum timing per cell")
    parser.add_argument("--write-docs", type=Path, default=None, help="replace the table between bench markers in this file")
    args = parser.parse_args()

    import sherpa_onnx

    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(args.bundle) if args.bundle else build_bundle(Path(tmp))
        onnx_path = bundle.require_artifact("onnx")
        backend = OnnxBackend(bundle, threads=args.threads)
        extractor = FeatureExtractor(bundle.features, bundle.sample_rate)
        sherpa = sherpa_onnx.SpeakerEmbeddingExtractor(
            sherpa_onnx.SpeakerEmbeddingExtractorConfig(model=str(onnx_path), num_threads=args.threads)
        )
        rows = []
        for seconds in WINDOWS_S:
            waves = speech(args.librispeech, seconds, max(BATCHES))

            def sherpa_each(batch: int) -> None:
                for w in waves[:batch]:  # sherpa-onnx has no batch call: one stream per window
                    stream = sherpa.create_stream()
                    stream.accept_waveform(SAMPLE_RATE, w)
                    stream.input_finished()
                    sherpa.compute(stream)

            def fbank_each(batch: int) -> None:
                for w in waves[:batch]:
                    extractor.compute(w)

            for batch in BATCHES:
                feats = np.stack([extractor.compute(w) for w in waves[:batch]])

                def ours(batch: int = batch) -> None:
                    backend.embed(np.stack([extractor.compute(w) for w in waves[:batch]]))

                ms = interleaved(
                    {
                        "ours": ours,
                        "sherpa": lambda batch=batch: sherpa_each(batch),
                        "fbank": lambda batch=batch: fbank_each(batch),
                        "model": lambda feats=feats: backend.embed(feats),
                    },
                    min_reps=5,
                    min_seconds=args.min_seconds,
                )
                best = {k: v[0] / batch for k, v in ms.items()}
                med = {k: v[1] / batch for k, v in ms.items()}
                rows.append((seconds, feats.shape[1], batch, best, med))
                print(
                    f"{seconds:4.1f} s  {feats.shape[1]:3d} frames  batch {batch}:  best: fbank {best['fbank']:6.2f}  "
                    f"model {best['model']:7.2f}  ours {best['ours']:7.2f}  sherpa-onnx {best['sherpa']:7.2f}  "
                    f"median: ours {med['ours']:7.2f}  sherpa-onnx {med['sherpa']:7.2f} ms/window",
                    flush=True,
                )
        backend.close()

    import onnxruntime

    header = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}; "
        f"onnxruntime {onnxruntime.__version__}, sherpa-onnx {sherpa_onnx.__version__}; {args.threads} threads each; "
        f"contenders alternating in blocks of 4 calls (first of each block not counted), >= {args.min_seconds:g} s per cell. "
        "ms per window; best of the cell unless marked median; load average at the start "
        f"{load_at_start:.1f}.\n"
    )
    table = [
        "| window | frames | batch | fbank | model | **ours** | **sherpa-onnx** | ours / sherpa | ours (median) | sherpa-onnx (median) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seconds, frames, batch, best, med in rows:
        table.append(
            f"| {seconds:.1f} s | {frames} | {batch} | {best['fbank']:.2f} | {best['model']:.2f} | {best['ours']:.2f} | "
            f"{best['sherpa']:.2f} | {best['ours'] / best['sherpa']:.2f} | {med['ours']:.2f} | {med['sherpa']:.2f} |"
        )
    command = f"PYTHONPATH=daemon python tools/bench_wespeaker.py --threads {args.threads}"
    block = "\n".join([BEGIN, "", f"`{command}`", "", header, *table, "", END])
    print("\n" + "\n".join(table))
    if args.write_docs:
        text = args.write_docs.read_text() if args.write_docs.exists() else f"{BEGIN}\n{END}\n"
        if BEGIN not in text or END not in text:
            text += f"\n{BEGIN}\n{END}\n"
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        args.write_docs.write_text(head + block + tail)
        print(f"wrote table to {args.write_docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
