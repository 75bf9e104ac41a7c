"""Batching across window lengths is exact: the worker's batched embeddings equal one-at-a-time ones.

Real speech through the daemon's VAD and windower (regular windows, probes, cut probes, first
windows), the default model on ONNX Runtime, the real worker with a backlog.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from speakerd.audio import AudioChunk
from speakerd.bundle import load_bundle
from speakerd.embedding.onnx_backend import SMALL_BATCH, OnnxBackend
from speakerd.embedding.worker import EmbeddedWindow, EmbeddingWorker
from speakerd.settings import Settings
from speakerd.vad import VadSegmenter
from speakerd.windows import SpeechWindower, Window



def real_windows(librispeech: Path, recipe: Any) -> list[Any]:
    settings = Settings()
    audio = np.concatenate([sf.read(str(p), dtype="float32")[0] for p in sorted((librispeech / "test-other").rglob("*.flac"))[:3]])
    seg, windower = VadSegmenter(settings.vad), SpeechWindower(settings.windows, recipe)
    items: list[Any] = []
    block = 1600
    for i in range(0, len(audio), block):
        for event in seg.process(AudioChunk(audio[i : i + block], i, float(i) / 16000)):
            items.extend(windower.process(event))
    for event in seg.flush():
        items.extend(windower.process(event))
    return items


def test_batched_across_lengths_equals_one_at_a_time(librispeech: Path, default_model: Path) -> None:
    bundle = load_bundle(default_model)
    items = real_windows(librispeech, bundle.features)
    windows = [w for w in items if isinstance(w, Window)]
    lengths = {w.num_frames for w in windows}
    assert {53, 78, 148} <= lengths and sum(w.probe for w in windows) > len(windows) / 2
    backend = OnnxBackend(bundle)
    try:
        alone = {id(w): backend.embed(w.feats[None])[0] for w in windows}
        out: list[Any] = []
        calls: list[int] = []
        gate = threading.Event()

        def embed(feats: np.ndarray) -> np.ndarray:
            gate.wait(10.0)  # the first call holds the worker so that a backlog forms
            calls.append(len(feats))
            return backend.embed(feats)

        def collect(batch: Sequence[Any]) -> None:
            out.extend(batch)

        worker = EmbeddingWorker(embed, collect, batch_max=32, queue_windows=len(items), drop_oldest=False)
        worker.start()
        for item in items:
            worker.submit(item)
        gate.set()
        assert worker.close(30.0)
    finally:
        backend.close()
    embedded = [o for o in out if isinstance(o, EmbeddedWindow)]
    assert [o.window for o in embedded] == windows  # every window, in stream order
    assert max(calls) > SMALL_BATCH  # the multi-thread session served real batches
    cos = np.array([float(np.dot(o.embedding, alone[id(o.window)])) for o in embedded])
    assert cos.min() >= 0.9999, cos.min()
