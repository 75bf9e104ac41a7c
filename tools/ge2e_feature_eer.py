#!/usr/bin/env python3
"""GE2E bundle: how close are kaldi-native-fbank features to Resemblyzer's librosa mel, and how fast.

Window-level EER on LibriSpeech (test-other: 5 speakers x 10 utterances, train-clean-100: 126 speakers x
1 utterance) for several feature recipes pushed through the same ONNX model:

  knf          the bundle's recipe, computed per window as the pipeline does (snip_edges=True)
  knf-nosnip   the same with snip_edges=False (Kaldi's centred framing with reflected edges)
  reference    Resemblyzer's wav_to_mel_spectrogram on the volume-normalised window
               (librosa if importable, else the numpy re-implementation in speakerd.models.ge2e)

Trials: every pair of windows from different utterances; target = same speaker. Also prints the
agreement between knf and reference (cosine of embeddings of the same windows, relative feature error).

  PYTHONPATH=daemon python tools/ge2e_feature_eer.py                 # EER table
  PYTHONPATH=daemon python tools/ge2e_feature_eer.py --speed         # ms per window table
  PYTHONPATH=daemon python tools/ge2e_feature_eer.py --onnx other.onnx   # EER of another export
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))

from speakerd.bundle import load_bundle, models_root  # noqa: E402
from speakerd.embedding.onnx_backend import OnnxBackend  # noqa: E402
from speakerd.features import FeatureExtractor  # noqa: E402
from speakerd.models.ge2e import PARTIAL_FRAMES, normalize_volume, reference_mel  # noqa: E402

SR = 16000
GRID_SHIFT = 40
"""Samples between a knf snip_edges frame centre and the nearest librosa centre=True one (2.5 ms)."""
DEFAULT_DATA = Path(os.environ.get("SPEAKERD_LIBRISPEECH", REPO.parent / "shared" / "data" / "librispeech"))


def clips(root: Path) -> list[tuple[str, str, np.ndarray]]:
    """(speaker, utterance id, samples) for test-other and train-clean-100."""
    out = []
    for path in sorted((root / "test-other").glob("*/*.flac")) + sorted((root / "train-clean-100").glob("*.flac")):
        wave, sr = sf.read(str(path), dtype="float32")
        assert sr == SR, f"{path}: {sr} Hz"
        out.append((path.stem.split("-")[0], path.stem, wave))
    return out


def cut(clip_list, seconds: float, hop: float, max_per_utt: int):
    n, step = int(round(seconds * SR)), int(round(hop * SR))
    speakers, utts, windows = [], [], []
    for spk, utt, wave in clip_list:
        for k, start in enumerate(range(0, len(wave) - n + 1, step)):
            if k >= max_per_utt:
                break
            speakers.append(spk)
            utts.append(utt)
            windows.append(wave[start : start + n])
    return np.array(speakers), np.array(utts), windows


def eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """Equal error rate, interpolated where false accepts and false rejects cross."""
    order = np.argsort(scores)
    labels = labels[order]
    n_tar, n_non = labels.sum(), (~labels).sum()
    frr = np.concatenate([[0.0], np.cumsum(labels) / n_tar])  # targets at or below the threshold
    far = np.concatenate([[1.0], 1.0 - np.cumsum(~labels) / n_non])
    i = int(np.argmax(frr >= far))
    if i == 0:
        return 0.0
    d0, d1 = far[i - 1] - frr[i - 1], far[i] - frr[i]
    t = d0 / (d0 - d1) if d0 != d1 else 0.0
    return float(frr[i - 1] + t * (frr[i] - frr[i - 1]))


def trials(speakers: np.ndarray, utts: np.ndarray):
    i, j = np.triu_indices(len(speakers), k=1)
    keep = utts[i] != utts[j]
    i, j = i[keep], j[keep]
    return i, j, speakers[i] == speakers[j]


def embed_all(backend: OnnxBackend, feats: list[np.ndarray], batch: int = 16) -> np.ndarray:
    out = []
    for k in range(0, len(feats), batch):
        chunk = feats[k : k + batch]
        lengths = {len(f) for f in chunk}
        assert len(lengths) == 1, lengths
        out.append(backend.embed(np.stack(chunk)))
    return np.concatenate(out)


def reference_fn(kind: str):
    if kind in ("auto", "librosa"):
        try:
            import librosa

            def lib(w: np.ndarray) -> np.ndarray:
                mel = librosa.feature.melspectrogram(y=w, sr=SR, n_fft=400, hop_length=160, n_mels=40)
                return mel.astype(np.float32).T

            return f"librosa {librosa.__version__}", lib
        except ImportError:
            if kind == "librosa":
                raise
    return "numpy re-implementation", reference_mel


def run_eer(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.model)
    if args.onnx:
        bundle = replace(bundle, artifacts={**bundle.artifacts, "onnx": str(Path(args.onnx).resolve())})
    backend = OnnxBackend(bundle, threads=args.threads)
    ref_name, ref_mel = reference_fn(args.reference)
    print(f"model {bundle.require_artifact('onnx')}  reference: {ref_name}")
    data = clips(args.data)
    recipe = bundle.features
    extract = FeatureExtractor(recipe, SR)
    extract_nosnip = FeatureExtractor(replace(recipe, snip_edges=False), SR)
    extract_raw = FeatureExtractor(replace(recipe, gain_normalize_dbfs=None), SR)

    if ref_name.startswith("librosa"):
        w = data[0][2]
        err = np.linalg.norm(ref_mel(w) - reference_mel(w)) / np.linalg.norm(ref_mel(w))
        print(f"numpy reference vs librosa on {data[0][1]}: relative error {err:.2e}")

    rows = []
    for seconds in args.windows:
        speakers, utts, windows = cut(data, seconds, args.hop or seconds, args.max_per_utt)
        n_partial = PARTIAL_FRAMES if abs(seconds - 1.6) < 1e-6 else None  # Resemblyzer keeps mel[0:160]
        feats = {
            "knf": [extract.compute(w) for w in windows],
            "knf-nosnip": [extract_nosnip.compute(w) for w in windows],
            "reference": [ref_mel(normalize_volume(w))[:n_partial] for w in windows],
        }
        i, j, target = trials(speakers, utts)
        embs = {name: embed_all(backend, f) for name, f in feats.items()}
        for name, e in embs.items():
            scores = np.sum(e[i] * e[j], axis=1)
            rows.append(
                (f"{seconds:.1f}s", name, len(feats[name][0]), len(windows), int(target.sum()), int((~target).sum()),
                 100 * eer(scores, target), scores[target].mean(), scores[~target].mean())
            )  # fmt: skip
        agree = np.sum(embs["knf"] * embs["reference"], axis=1)
        agree_ns = np.sum(embs["knf-nosnip"] * embs["reference"], axis=1)
        # feature error with the nearest frame centres (knf frame t <-> librosa frame t+1, 2.5 ms apart)
        rel = [np.linalg.norm(k - r[1 : 1 + len(k)]) / np.linalg.norm(r[1 : 1 + len(k)]) for k, r in zip(feats["knf"], feats["reference"])]
        # the same frames exactly: knf (no gain step) on the normalised window with librosa's 200 zero
        # samples each side; and how much a 2.5 ms shift of the frame grid alone moves the embedding
        exact, same_grid, shifted = [], [], []
        for w, r in zip(windows[: args.grid_check], feats["reference"][: args.grid_check]):
            raw = extract_raw.compute(np.pad(normalize_volume(w), 200))[: len(r)]
            exact.append(np.linalg.norm(raw - r) / np.linalg.norm(r))
            same_grid.append(raw)
            shifted.append(ref_mel(normalize_volume(w[GRID_SHIFT:]))[: len(r) - 1])
        if same_grid:
            ref_e = embs["reference"][: len(same_grid)]
            cos_exact = np.sum(embed_all(backend, same_grid) * ref_e, axis=1)
            cos_shift = np.sum(embed_all(backend, shifted) * ref_e, axis=1)
            print(
                f"{seconds:.1f}s on {len(same_grid)} windows: knf on librosa's own frame grid vs reference: "
                f"feature rel. error max {np.max(exact):.1e}, embedding cosine min {cos_exact.min():.6f}; "
                f"reference vs itself with the grid moved {GRID_SHIFT} samples: embedding cosine mean "
                f"{cos_shift.mean():.4f} min {cos_shift.min():.4f}"
            )
        print(
            f"{seconds:.1f}s agreement knf vs reference: embedding cosine mean {agree.mean():.4f} "
            f"min {agree.min():.4f} p5 {np.percentile(agree, 5):.4f} | knf-nosnip mean {agree_ns.mean():.4f} "
            f"min {agree_ns.min():.4f} | feature rel. error (nearest frames, 2.5 ms apart) mean {np.mean(rel):.3f}"
        )
    print()
    print("| window | features | frames | windows | target | non-target | EER % | mean tgt cos | mean non cos |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| {} | {} | {} | {} | {} | {} | {:.2f} | {:.3f} | {:.3f} |".format(*r))


def run_speed(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.model)
    if args.onnx:
        bundle = replace(bundle, artifacts={**bundle.artifacts, "onnx": str(Path(args.onnx).resolve())})
    print(f"model {bundle.require_artifact('onnx')}, T={args.frames} frames, best of {args.repeats} runs")
    print("| threads | batch 1 | batch 4 | batch 8 | batch 16 |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for threads in (1, 2):
        backend = OnnxBackend(bundle, threads=threads)
        cells = []
        for batch in (1, 4, 8, 16):
            x = (rng.random((batch, args.frames, 40), dtype=np.float32) * 0.05) ** 2
            backend.embed(x)
            reps = max(3, 64 // batch)
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for _ in range(reps):
                    backend.embed(x)
                best = min(best, (time.perf_counter() - t0) / reps / batch * 1000)
            cells.append(f"{best:.2f} ms")
        print(f"| {threads} | " + " | ".join(cells) + " |")
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, default=models_root() / "ge2e-resemblyzer")
    parser.add_argument("--onnx", help="use this ONNX file instead of the bundle's")
    parser.add_argument("--int8", action="store_true", help="use an int8 copy (speakerd.models.ge2e_int8.quantize_int8)")
    parser.add_argument("--windows", type=float, nargs="+", default=[1.5, 1.6], help="window lengths, seconds")
    parser.add_argument("--hop", type=float, default=0.0, help="hop between windows in a clip (default: window length)")
    parser.add_argument("--max-per-utt", type=int, default=6)
    parser.add_argument("--grid-check", type=int, default=200, help="windows for the frame-grid checks")
    parser.add_argument("--reference", choices=("auto", "librosa", "numpy"), default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed", action="store_true", help="time ONNX Runtime instead of measuring EER")
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.int8:
        from speakerd.models.ge2e_int8 import quantize_int8

        src = Path(args.onnx) if args.onnx else load_bundle(args.model).require_artifact("onnx")
        args.onnx = str(quantize_int8(src, Path(tempfile.mkdtemp()) / "model.int8.onnx"))
    run_speed(args) if args.speed else run_eer(args)


if __name__ == "__main__":
    main()
