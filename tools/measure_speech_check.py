#!/usr/bin/env python3
"""Which files enrollment's speech check refuses: every LibriSpeech clip (none should be) and the
non-speech sounds of ``speakerd.evaluation.nonspeech`` at two levels and three seeds (all should be).

Prints the evidence per sound and the range of each figure over the speech clips, through the
same path as ``speakerd enroll`` (file source, VAD, windows, embeddings, ``speechcheck``).

  PYTHONPATH=daemon python tools/measure_speech_check.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from speakerd.audio import SAMPLE_RATE
from speakerd.bundle import resolve_bundle
from speakerd.embedding import backend_for
from speakerd.enroll import embed_windows, file_speech
from speakerd.evaluation.nonspeech import SOUNDS, nonspeech
from speakerd.settings import load_settings
from speakerd.speechcheck import SpeechCheckSettings, SpeechEvidence, speech_evidence

LIBRISPEECH = Path(os.environ.get("SPEAKERD_LIBRISPEECH", Path(__file__).resolve().parents[2] / "shared" / "data" / "librispeech"))
SECONDS = 20.0
LEVELS_DB = (-15.0, 0.0, 6.0)
"""Relative to nonspeech's -20 dBFS."""
SEEDS = (1, 2, 3)


def main() -> None:
    settings = load_settings(None, {})
    bundle = resolve_bundle(settings.embedding.model)
    backend = backend_for(bundle, settings.embedding, settings.windows)
    check = SpeechCheckSettings()

    def evidence(path: Path) -> tuple[SpeechEvidence | None, float]:
        windows, speech_s, audio = file_speech(path, settings, bundle.features)
        if not windows:
            return None, speech_s
        return speech_evidence(audio, embed_windows(windows, backend.embed), check), speech_s

    with tempfile.TemporaryDirectory() as scratch:
        print("sound                       level  seed  speech_s  similarity  voiced  held   verdict")
        caught = total = 0
        for name in SOUNDS:
            for level in LEVELS_DB:
                for seed in SEEDS:
                    path = Path(scratch) / "sound.wav"
                    sf.write(path, nonspeech(name, SECONDS, seed) * 10 ** (level / 20), SAMPLE_RATE)
                    ev, speech_s = evidence(path)
                    total += 1
                    if ev is None:
                        caught += 1
                        print(f"{name:26s} {level:5.0f} {seed:5d} {speech_s:8.1f}  (no speech windows: refused as too little speech)")
                        continue
                    why = ev.refusal(check)
                    caught += why is not None
                    sim = f"{ev.window_similarity:.3f}" if ev.window_similarity is not None else "  -  "
                    print(f"{name:26s} {level:5.0f} {seed:5d} {speech_s:8.1f}  {sim:>10}  {ev.voiced:6.2f} {ev.held_pitch:5.2f}   "
                          f"{'refused' if why else 'PASSED'}")
        print(f"non-speech refused: {caught} of {total}")
        clips = sorted((LIBRISPEECH / "test-other").rglob("*.flac")) + sorted((LIBRISPEECH / "train-clean-100").glob("*.flac"))
        rows, refused = [], []
        for clip in clips:
            ev, _ = evidence(clip)
            if ev is None:
                continue
            rows.append((ev.window_similarity if ev.window_similarity is not None else np.nan, ev.voiced, ev.held_pitch))
            if ev.refusal(check):
                refused.append(f"{clip.name}: {ev.refusal(check)}")
    backend.close()
    a = np.asarray(rows)
    for j, what in enumerate(("window similarity", "voiced", "held pitch")):
        print(f"speech {what:18s} min {np.nanmin(a[:, j]):.3f}  median {np.nanmedian(a[:, j]):.3f}  max {np.nanmax(a[:, j]):.3f}")
    print(f"speech clips refused: {len(refused)} of {len(rows)}")
    for line in refused:
        print("  " + line)


if __name__ == "__main__":
    main()
