"""``speakerd eval --vad-compare``: how much speech each voice activity detector misses, and how much
noise and distant babble it lets through, on the same meetings.

Two levels: the speech regions the daemon works on (the segmenter, with its hysteresis, closing
silence and padding) and the detector's own frames. Babble is judged on its own too: a stretch of the
meeting room's noise bed (coloured noise and distant voices) with nobody in the meeting speaking.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..audio import SAMPLE_RATE, AudioChunk
from ..vad import SpeechEnd, SpeechStart, VadSegmenter, VadSettings, frame_classifier
from .der import Labelled

GRID_S = 0.01
CHUNK = SAMPLE_RATE // 10
BED_S = 30.0
"""Seconds of the noise bed alone, per meeting."""


@dataclass(frozen=True)
class VadVariant:
    name: str
    settings: VadSettings


def default_variants(base: VadSettings) -> list[VadVariant]:
    """webrtcvad at the default and the strictest aggressiveness, Silero at its usual threshold."""
    return [
        VadVariant("webrtc (aggressiveness 2)", dataclasses.replace(base, backend="webrtc", aggressiveness=2)),
        VadVariant("webrtc (aggressiveness 3)", dataclasses.replace(base, backend="webrtc", aggressiveness=3)),
        VadVariant("silero (threshold 0.5)", dataclasses.replace(base, backend="silero", threshold=0.5)),
    ]


def regions(audio: np.ndarray, settings: VadSettings) -> list[tuple[float, float]]:
    """Speech regions (seconds) of the segmenter the daemon runs, fed in 100 ms chunks."""
    seg = VadSegmenter(settings)
    events: list[Any] = []
    for i in range(0, len(audio), CHUNK):
        events += seg.process(AudioChunk(samples=audio[i : i + CHUNK], start=i, capture_time=0.0))
    events += seg.flush()
    out: list[tuple[float, float]] = []
    start = 0
    for e in events:
        if isinstance(e, SpeechStart):
            start = e.sample
        elif isinstance(e, SpeechEnd):
            out.append((start / SAMPLE_RATE, e.sample / SAMPLE_RATE))
    return out


def voiced_frames(audio: np.ndarray, settings: VadSettings) -> list[tuple[float, float]]:
    """The detector's own speech frames (seconds), before any hysteresis of the segmenter."""
    classifier = frame_classifier(settings)
    n = len(audio) // classifier.frame
    flags = classifier.classify(np.asarray(audio[: n * classifier.frame], dtype=np.float32))
    step = classifier.frame / SAMPLE_RATE
    return [(i * step, (i + 1) * step) for i in np.flatnonzero(flags)]


def _raster(spans: Sequence[tuple[float, float]], n: int) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    for a, b in spans:
        out[max(0, int(round(a / GRID_S))) : min(n, int(round(b / GRID_S)))] = True
    return out


def speech_figures(reference: Sequence[Labelled], detected: Sequence[tuple[float, float]], duration: float) -> dict[str, float]:
    """Seconds of reference speech, of it missed, of non-speech, and of non-speech called speech."""
    n = int(np.ceil(duration / GRID_S))
    ref = _raster([(a, b) for a, b, _ in reference], n)
    hyp = _raster(detected, n)
    return {
        "speech_s": float(ref.sum() * GRID_S),
        "missed_s": float((ref & ~hyp).sum() * GRID_S),
        "nonspeech_s": float((~ref).sum() * GRID_S),
        "admitted_s": float((~ref & hyp).sum() * GRID_S),
    }


def noise_bed_alone(meeting: Any) -> np.ndarray | None:
    """``BED_S`` of the meeting room's noise bed at the level it has under the meeting's speech."""
    from .. import rooms
    from .conversation import _load, meeting_room

    cs = meeting.settings
    if cs is None or cs.room is None or cs.room.snr_db is None:
        return None
    room, _, rng = meeting_room(cs, sorted(meeting.conversation_speakers()))
    bed = rooms.noise_bed(int(BED_S * SAMPLE_RATE), cs.room, room, rng, [_load(p) for p in meeting.babble])
    return (bed * np.float32(rooms.SPEECH_LEVEL / 10 ** (cs.room.snr_db[0] / 20))).astype(np.float32)


def compare(meetings: Sequence[Any], reference: Any, variants: Sequence[VadVariant]) -> dict[str, Any]:
    """Per variant: missed speech and admitted non-speech (regions and frames) over all meetings, and
    the share of the noise bed alone called speech. ``reference(meeting)`` gives its speech intervals."""
    beds = [noise_bed_alone(m) for m in meetings]
    out: dict[str, Any] = {}
    for v in variants:
        totals: dict[str, dict[str, float]] = {"regions": {}, "frames": {}}
        bed_s = bed_admitted = 0.0
        for m, bed in zip(meetings, beds, strict=True):
            audio = m.conversation.audio
            ref = reference(m)
            for level, spans in (("regions", regions(audio, v.settings)), ("frames", voiced_frames(audio, v.settings))):
                for k, x in speech_figures(ref, spans, m.conversation.duration).items():
                    totals[level][k] = totals[level].get(k, 0.0) + x
            if bed is not None:
                admitted = sum(b - a for a, b in regions(bed, v.settings))
                bed_s += BED_S
                bed_admitted += admitted
        out[v.name] = {
            **{f"{level}_missed": t["missed_s"] / t["speech_s"] if t["speech_s"] else None for level, t in totals.items()},
            **{f"{level}_admitted": t["admitted_s"] / t["nonspeech_s"] if t["nonspeech_s"] else None for level, t in totals.items()},
            "babble_admitted": bed_admitted / bed_s if bed_s else None,
            "speech_s": totals["regions"].get("speech_s", 0.0),
            "nonspeech_s": totals["regions"].get("nonspeech_s", 0.0),
            "babble_s": bed_s,
        }
    return out


def markdown(figures: dict[str, Any], header: str) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f} %"

    lines = ["# speakerd eval --vad-compare", "", header, "",
             "| VAD | missed speech (regions) | non-speech admitted (regions) | noise bed alone admitted (regions) | "
             "missed speech (frames) | non-speech admitted (frames) |",
             "|---|---|---|---|---|---|"]
    for name, f in figures.items():
        lines.append(f"| {name} | {pct(f['regions_missed'])} | {pct(f['regions_admitted'])} | {pct(f['babble_admitted'])} | "
                     f"{pct(f['frames_missed'])} | {pct(f['frames_admitted'])} |")
    first = next(iter(figures.values()))
    lines += ["", f"Reference speech {first['speech_s']:.0f} s, non-speech {first['nonspeech_s']:.0f} s (pauses, lead-in and "
              f"lead-out, reverberant tails), noise bed alone {first['babble_s']:.0f} s. Regions: what the daemon works on "
              "(start_frames, end_silence_ms and padding_ms as configured); frames: the detector's own decisions.", ""]
    return "\n".join(lines)


def main_vad_compare(es: Any, settings: Any, out: Path, keep_audio: bool) -> int:
    """``speakerd eval --vad-compare``: the meetings ``es`` describes, each VAD over them, vad.md and vad.json."""
    from .evaluate import build_meetings, reference_intervals
    from .room_eval import room_line

    with tempfile.TemporaryDirectory(prefix="speakerd-eval-") as tmp:
        work = out / "audio" if keep_audio else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        _, meetings = build_meetings(es, work)
    figures = compare(meetings, reference_intervals, default_variants(settings.vad))
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(es).items()}
    header = (f"{len(meetings)} meetings ({', '.join(sorted({m.condition for m in meetings}))}), {es.turns} turns, seed {es.seed}."
              + " ".join(room_line(cfg, {"backend": "each"})))
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(figures, header)
    (out / "vad.md").write_text(text)
    (out / "vad.json").write_text(json.dumps({"config": cfg, "vad": figures}, indent=2) + "\n")
    print(text)
    return 0
