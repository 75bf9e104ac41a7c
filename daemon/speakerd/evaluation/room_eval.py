"""The room conditions of ``speakerd eval``: enrollment variants and the figures of unnamed voices.

A voice may be enrolled from its clean clips, from the same clips put through the meeting's room
(at the speaker's own place, over the same noise bed), or from the clean clips with multi-condition
versions (``rooms.room_versions``). Never-enrolled voices are judged by what the daemon does with
them: how much of their speech it names as someone enrolled, how much it gives a provisional
speaker, and how many provisional speakers, how pure, it makes of them.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ..audio import SAMPLE_RATE
from ..rooms import NOISE_COLORS as ROOM_NOISES
from .conversation import ConversationSettings, _load, meeting_room, room_mix
from .der import Labelled, speech_share_labelled

ENROLLMENTS = ("clean", "room", "multi")
"""Enrollment from the clean clips, through the meeting's room, or clean with room versions."""
PROVISIONAL_PREFIX = "(daemon) "
"""Marks the daemon's provisional speaker ids (``unknown-3``) apart from the reference's unknown voices."""


def enroll_in_room(
    cs: ConversationSettings, speakers: Sequence[str], enroll: Mapping[str, Sequence[Path]], babble: Sequence[Path],
    work: Path,
) -> dict[str, list[Path]]:
    """The enrollment clips as the meeting's microphone hears them, written to ``work``.

    Each enrolled speaker's clips come from where that speaker sits in the meeting, in the same room
    and over the same kind of noise bed at the same SNR (its own draw of noise and babble).
    """
    from .. import rooms

    room, places, _ = meeting_room(cs, speakers)
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {}
    for i, (speaker, clips) in enumerate(sorted(enroll.items())):
        for j, clip in enumerate(clips):
            dry = _load(Path(clip))
            wet = rooms.convolve(dry, room.response(places[speaker]))
            rng = np.random.default_rng([cs.seed, 7, i, j])
            mixed, _ = room_mix(wet, rooms.active_mask(dry), cs, room, rng, babble)
            path = work / f"{speaker}-{j}.wav"
            sf.write(str(path), np.clip(mixed, -1.0, 1.0), SAMPLE_RATE, subtype="FLOAT")
            out.setdefault(speaker, []).append(path)
    return out


def overlap_seconds(reference: Iterable[Labelled], hypothesis: Iterable[Labelled]) -> dict[tuple[str, str], float]:
    """Seconds each (reference label, hypothesis label) pair share."""
    hyp = list(hypothesis)
    out: dict[tuple[str, str], float] = {}
    for a, b, r in reference:
        for c, d, h in hyp:
            o = min(b, d) - max(a, c)
            if o > 0:
                out[(r, h)] = out.get((r, h), 0.0) + o
    return out


def provisional_figures(reference: Sequence[Labelled], hypothesis: Sequence[Labelled], unnamed: Collection[str]) -> dict[str, float]:
    """Seconds behind coverage and purity of the provisional speakers, and their count.

    ``covered_s`` of the ``speech_s`` of never-enrolled voices (``unnamed``) went to a provisional
    speaker; of the ``assigned_s`` any reference speech a provisional speaker got, ``pure_s`` is its
    main voice's (summed over provisional speakers). ``speakers``: provisional speakers that got any
    of it; ``voices``: never-enrolled voices that spoke.
    """
    shared = overlap_seconds(reference, hypothesis)
    provisional = {h for _, h in shared if h.startswith(PROVISIONAL_PREFIX)}
    per_speaker = {h: [s for (r, hh), s in shared.items() if hh == h] for h in provisional}
    labels = {lab for *_, lab in hypothesis if lab.startswith(PROVISIONAL_PREFIX)}
    covered, speech_s = speech_share_labelled(reference, hypothesis, unnamed, labels)
    return {
        "speech_s": speech_s,
        "covered_s": covered,
        "assigned_s": float(sum(sum(v) for v in per_speaker.values())),
        "pure_s": float(sum(max(v) for v in per_speaker.values())),
        "speakers": float(len(provisional)),
        "voices": float(len({lab for *_, lab in reference if lab in unnamed})),
    }


def pool_provisional(figures: Sequence[Mapping[str, float]]) -> dict[str, float | None]:
    """Meetings pooled: coverage and purity by time, provisional speakers and voices per meeting."""
    total = {k: sum(f[k] for f in figures) for k in ("speech_s", "covered_s", "assigned_s", "pure_s", "speakers", "voices")}
    n = len(figures)
    return {
        "coverage": total["covered_s"] / total["speech_s"] if total["speech_s"] else None,
        "purity": total["pure_s"] / total["assigned_s"] if total["assigned_s"] else None,
        "speakers_per_meeting": total["speakers"] / n if n else None,
        "voices_per_meeting": total["voices"] / n if n else None,
    }


def room_line(cfg: dict[str, Any], vad: dict[str, Any]) -> list[str]:
    """The room conditions in one sentence (nothing when the meetings had no room)."""
    if cfg.get("room_rt60_s") is None:
        return []
    snr = "no noise bed" if cfg["room_snr_db"] is None else (
        f"{cfg['room_noise']} noise and {cfg['babble']} babble voices at {cfg['room_snr_db']} dB SNR")
    overlap, interjections = (f"{100 * cfg[k]:.0f} %" for k in ("overlap", "interjections"))
    return ["", f"Room: one simulated room per meeting (pyroomacoustics), RT60 {cfg['room_rt60_s']} s, talkers 0.8-2.5 m from "
                f"one table microphone, {snr}; overlapping hand-overs {overlap}, turns with an interjection "
                f"{interjections}; enrollment {', '.join(cfg['enrollment'])} (multi: {cfg['room_versions']} room "
                f"versions per clip); VAD {vad.get('backend', 'webrtc')}."]


# -- command line ---------------------------------------------------------------------------------------


def _snr(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an SNR in dB or 'none', got {text!r}") from None


def _enrollments(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    wrong = [x for x in values if x not in ENROLLMENTS]
    if wrong or not values:
        raise argparse.ArgumentTypeError(f"enrollments are {', '.join(ENROLLMENTS)} (comma-separated), got {text!r}")
    return values


def add_room_arguments(parser: argparse.ArgumentParser) -> None:
    room = parser.add_argument_group("rooms", "one simulated room per meeting (needs pyroomacoustics: pip install 'speakerd[eval]')")
    room.add_argument("--room", type=float, nargs="?", const=0.45, default=None, metavar="RT60",
                      help="everyone in one simulated room, 0.8-2.5 m from one table microphone; RT60 in s (default 0.45 when given)")
    room.add_argument("--snr", type=_snr, default=18.0, metavar="DB", help="SNR of the room's noise bed (coloured noise and babble), dB (default 18; 'none': no bed)")
    room.add_argument("--room-noise", choices=ROOM_NOISES, default="pink", help="colour of the noise bed (default pink)")
    room.add_argument("--babble", type=int, default=4, metavar="N", help="never-enrolled voices, none in the meeting, in the babble (default 4; 0: none)")
    room.add_argument("--overlap", type=float, default=0.0, metavar="SHARE", help="share of hand-overs overlapping by 0.2-1 s (default 0)")
    room.add_argument("--interjections", type=float, default=0.0, metavar="SHARE", help="share of turns with a 0.3-1 s interjection over them (default 0)")
    room.add_argument("--enrollment", type=_enrollments, default=("clean",), metavar="E1,E2",
                      help="enrollments to compare, each in its own rows: clean (the clean clips), room (the clips through the "
                           "meeting's room, needs --room), multi (clean plus room versions) (default clean)")
    room.add_argument("--room-versions", type=int, default=2, metavar="N", help="room versions per clip of the multi enrollment (default 2)")
    room.add_argument("--nobody", type=int, default=0, metavar="N", help="also conversations of N voices nobody enrolled: provisional speakers and purity (default 0: off)")
