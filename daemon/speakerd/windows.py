"""VAD-gated sliding windows over each speech region, as slices of one feature stream.

Windows live inside a speech region, so they never straddle a silence longer than the VAD's
end-of-speech hangover. The first window of a region is shorter (``first_length_s``) so a new
voice after a pause is named sooner; after that windows are ``length_s`` long every ``hop_s``.
Window ends sit on a grid of ``hop_s`` from the region start, which keeps every window start on the
feature frame grid: features are sliced from the region's stream, not recomputed per window.

Between the regular windows, *probes* (``probe_length_s`` long, on a finer ``probe_hop_s`` grid)
let the tracker announce a hand-over sooner: a 1.5 s window ending 0.75 s after a change is half
the old voice, a 0.8 s probe ending there is almost all the new one. Probes only ever raise a
tentative change; regular windows confirm it, make turns and feed clustering and enrollment. With
``probe_align`` a probe begins on a regular window's start (so every other one is 1.05 s), which
lets a model that runs windows as LSTM rows serve it from a window's row (``grid_probes``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE, to_samples
from .bundle import FeatureRecipe
from .errors import check
from .features import FeatureStream, SpeechBrainFbank, finish_gained, gain_db
from .vad import SpeechAudio, SpeechEnd, SpeechStart, VadEvent


PROBE_ALIGN = ("auto", "on", "off")


@dataclass(frozen=True)
class WindowSettings:
    length_s: float = 1.5
    """Length of a full window."""
    hop_s: float = 0.5
    """Step between window ends."""
    first_length_s: float = 1.0
    """Length of a region's first window, and the shortest region that is embedded at all."""
    min_speech: float = 0.5
    """Fraction of a window's samples the VAD must call voiced for it to be embedded."""
    probe_hop_s: float = 0.25
    """Grid of probe window ends, from ``probe_start_s`` into a region; a probe is made where no
    regular window ends. 0 turns probes off."""
    probe_length_s: float = 0.8
    """Length of a probe window: short enough to be mostly the new voice soon after a hand-over."""
    probe_start_s: float = 0.55
    """End of a region's first probe, so a voice after a pause is guessed this soon; probes that
    would start before the region are cut to begin with it. 0.55 puts every other probe's start
    (``end - probe_length_s``) on a regular window's start, where the lockstep backend advances
    both in one LSTM row: a quarter fewer row-steps than 0.6 (docs/BENCHMARKS.md, session 11)."""
    probe_align: str = "auto"
    """"on": a probe whose start (``end - probe_length_s``) falls between regular window starts
    begins at the regular start before it instead (1.05 s rather than 0.8 s, for every other probe
    with the defaults), so GE2E's lockstep backend advances every probe in a regular window's LSTM
    row: 0.4 points of a core less live, decisions unchanged within noise in the room and on clean
    speech (docs/BENCHMARKS.md, session 15). "off": every probe is ``probe_length_s``. "auto" (what
    an unresolved setting does: on) is resolved per model by ``embedding.backend.windows_for``: on
    for a bundle with a streaming graph, off for models that embed every window whole (ECAPA-TDNN:
    longer probes cost it 7 % more CPU and save nothing)."""

    def __post_init__(self) -> None:
        check(0.5 <= self.length_s <= 10.0, "windows.length_s", self.length_s, "must be within 0.5 to 10 s")
        check(0.1 <= self.hop_s <= self.length_s, "windows.hop_s", self.hop_s, "must be within 0.1 s and length_s")
        check(
            0.5 <= self.first_length_s <= self.length_s,
            "windows.first_length_s",
            self.first_length_s,
            "must be within 0.5 s and length_s",
        )
        check(0.0 <= self.min_speech <= 1.0, "windows.min_speech", self.min_speech, "must be a fraction in [0, 1]")
        check(
            self.probe_hop_s == 0 or 0.1 <= self.probe_hop_s <= self.length_s,
            "windows.probe_hop_s",
            self.probe_hop_s,
            "must be 0 (off) or within 0.1 s and length_s",
        )
        check(
            0.5 <= self.probe_length_s <= self.length_s,
            "windows.probe_length_s",
            self.probe_length_s,
            "must be within 0.5 s and length_s",
        )
        check(
            0.5 <= self.probe_start_s <= 10.0,
            "windows.probe_start_s",
            self.probe_start_s,
            "must be within 0.5 and 10 s",
        )
        check(self.probe_align in PROBE_ALIGN, "windows.probe_align", self.probe_align,
              f"must be one of {', '.join(PROBE_ALIGN)}")

    @property
    def aligns_probes(self) -> bool:
        return self.probe_align != "off"

    def probe_lengths(self) -> tuple[float, ...]:
        """Every length a grid probe can have, ascending: cut ones near the region start,
        ``probe_length_s``, and (aligned) the longer ones that begin on a regular start."""
        if not self.probe_hop_s:
            return ()
        hop, probe_hop = to_samples(self.hop_s), to_samples(self.probe_hop_s)
        # starts repeat with the period of both grids: a window and a probe past one period covers every length
        horizon = to_samples(self.probe_start_s) + to_samples(self.length_s) + to_samples(self.probe_length_s) + math.lcm(hop, probe_hop)
        lengths = {stop - start for start, stop in itertools.takewhile(lambda span: span[1] < horizon, grid_probes(self))}
        return tuple(round(n / SAMPLE_RATE, 6) for n in sorted(lengths))


@dataclass(frozen=True)
class Window:
    """Features of one window, placed on the sample clock."""

    start: int
    end: int
    feats: np.ndarray
    speech_fraction: float
    wall_time: float
    """Capture time of the window's last sample: when the window could first be decided."""
    region_start: int
    first_in_region: bool
    probe: bool = False
    """A probe between regular windows: evidence for an early tentative change only."""
    lag: int = 0
    """Samples past ``end`` before the window could be made: a region's tail windows wait for the
    VAD to decide that the region ended."""
    gain_db: float = 0.0
    """The level normalisation ``feats`` carry (``features.gain_db``; 0: none): the lockstep
    backend embeds a window without it from the frames it shares with its neighbours."""

    @property
    def decided(self) -> tuple[int, float]:
        """Audio position and capture time at which the window could first be decided."""
        return self.end + self.lag, self.wall_time + self.lag / SAMPLE_RATE

    @property
    def num_frames(self) -> int:
        return int(self.feats.shape[0])

    @property
    def center(self) -> int:
        return (self.start + self.end) // 2


WindowerOutput = Window | SpeechStart | SpeechEnd


def grid_windows(settings: WindowSettings, begin: int, end: int) -> dict[int, tuple[int, ...]]:
    """The windows ``SpeechWindower`` places on its grids with a start in [``begin``, ``end``)
    (samples from the region start), as start -> the lengths starting there, ascending: the first
    window, the regular ones, and the probes (cut ones near the start too). A region gets those
    its length reaches and its VAD voices; its tail window and tail probe are off the grids."""
    first, full, hop = to_samples(settings.first_length_s), to_samples(settings.length_s), to_samples(settings.hop_s)
    found: dict[int, set[int]] = {}

    def add(start: int, length: int) -> None:
        if begin <= start < end:
            found.setdefault(start, set()).add(length)

    add(0, first)
    second = _second_start(settings)
    k = max(0, -(-(begin - second) // hop))
    while (start := second + k * hop) < end:
        add(start, full)
        k += 1
    if settings.probe_hop_s:
        for start, stop in grid_probes(settings, begin):
            if start >= end:
                break
            add(start, stop - start)
    return {start: tuple(sorted(lengths)) for start, lengths in sorted(found.items())}


def grid_probes(settings: WindowSettings, begin: int = 0) -> Iterator[tuple[int, int]]:
    """(start, stop) of the grid probes (samples from the region start) in order, endlessly, from
    the first that can start at ``begin`` or later: one ends every ``probe_hop_s`` from
    ``probe_start_s`` where no regular window ends. Needs ``probe_hop_s`` > 0."""
    first, full, hop = to_samples(settings.first_length_s), to_samples(settings.length_s), to_samples(settings.hop_s)
    second_end = _second_start(settings) + full
    probe, probe_hop, probe_end = to_samples(settings.probe_length_s), to_samples(settings.probe_hop_s), to_samples(settings.probe_start_s)
    # a probe starts at or before ``stop - probe`` (aligned: the regular start before it), never after
    k = 0 if begin <= 0 else max(0, -(-(begin + probe - probe_end) // probe_hop))
    while True:
        stop = probe_end + k * probe_hop
        if not (stop == first or (stop >= second_end and (stop - second_end) % hop == 0)):
            yield probe_start(settings, stop), stop
        k += 1


def probe_start(settings: WindowSettings, stop: int) -> int:
    """Start of the grid probe ending at ``stop`` (samples from the region start): ``probe_length_s``
    before it, cut to the region, or (``probe_align``) the latest regular window start at or
    before that (``grid_windows``' starts: 0, then every ``hop_s`` from the second window's)."""
    start = max(0, stop - to_samples(settings.probe_length_s))
    if not settings.aligns_probes:
        return start
    second, hop = _second_start(settings), to_samples(settings.hop_s)
    return 0 if start < second else second + (start - second) // hop * hop


def _second_start(settings: WindowSettings) -> int:
    """Start of a region's second regular window, from which they start every ``hop_s``: the
    second ends ``hop_s`` after the first or ``length_s`` into the region (``SpeechWindower._following_end``)."""
    full = to_samples(settings.length_s)
    return max(to_samples(settings.first_length_s) + to_samples(settings.hop_s), full) - full


NEVER = 1 << 62
"""A sample position no stream reaches: the next probe end when probes are off."""


class SpeechWindower:
    """``process(vad_event)`` -> windows, with the speech boundaries passed through in order."""

    def __init__(self, settings: WindowSettings, recipe: FeatureRecipe, sample_rate: int = SAMPLE_RATE) -> None:
        self.settings = settings
        self.recipe = recipe
        self._stream = FeatureStream(recipe, sample_rate)
        self._per_window = SpeechBrainFbank(recipe, sample_rate) if recipe.per_window else None
        shift = self._stream.frame_shift
        for key, seconds in (
            ("windows.hop_s", settings.hop_s),
            ("windows.first_length_s", settings.first_length_s),
            ("windows.probe_hop_s", settings.probe_hop_s),
            ("windows.probe_length_s", settings.probe_length_s),
            ("windows.probe_start_s", settings.probe_start_s),
        ):
            check(to_samples(seconds) % shift == 0, key, seconds, f"must be a multiple of the {recipe.frame_shift_ms} ms frame shift")
        self._hop = to_samples(settings.hop_s)
        self._full = to_samples(settings.length_s)
        self._first = to_samples(settings.first_length_s)
        self._probe_hop = to_samples(settings.probe_hop_s)
        self._probe = to_samples(settings.probe_length_s)
        self._probe_start = to_samples(settings.probe_start_s)
        self.reset()

    def reset(self) -> None:
        self._stream.reset()
        self._in_region = False
        self._region_start = 0
        self._audio = np.zeros(0, dtype=np.float32)
        self._voiced = np.zeros(0, dtype=bool)
        self._audio_start = 0  # sample index of self._audio[0]
        self._anchor = (0, 0.0)  # (sample, wall time) of the latest audio, to place windows in wall time
        self._next_end = 0
        self._next_probe = 0
        self._last_end = 0
        self.windows_emitted = 0
        self.windows_rejected = 0
        self.probes_emitted = 0

    def process(self, event: VadEvent) -> list[WindowerOutput]:
        if isinstance(event, SpeechStart):
            self._open(event.sample)
            return [event]
        if isinstance(event, SpeechAudio):
            return self._accept(event)
        out: list[WindowerOutput] = []
        if self._in_region:
            out.extend(self._close(event))
        out.append(event)
        return out

    # -- region handling -------------------------------------------------------------------------

    def _open(self, sample: int) -> None:
        self._stream.reset()
        self._in_region = True
        self._region_start = sample
        self._audio = np.zeros(0, dtype=np.float32)
        self._voiced = np.zeros(0, dtype=bool)
        self._audio_start = sample
        self._next_end = sample + self._first
        self._next_probe = sample + self._probe_start if self._probe_hop else NEVER
        self._last_end = sample

    def _accept(self, event: SpeechAudio) -> list[WindowerOutput]:
        chunk = event.chunk
        if not self._in_region:  # audio without a start: treat its first sample as one
            self._open(chunk.start)
        self._audio = np.concatenate([self._audio, chunk.samples.astype(np.float32, copy=False)])
        self._voiced = np.concatenate([self._voiced, event.voiced.astype(bool, copy=False)])
        self._anchor = (chunk.end, chunk.wall_time_of(chunk.end))
        if self._per_window is None:
            self._stream.process(chunk.samples)
        out: list[WindowerOutput] = []
        while True:
            end = min(self._next_end, self._next_probe)
            probe = end < self._next_end
            length = end - self._region_start - probe_start(self.settings, end - self._region_start) if probe else self._length_ending(end)
            if end > self._audio_start + len(self._audio) or not self._frames_cover(end - length, end):
                return out
            window = self._make(end - length, end, probe=probe)
            if window is not None:
                out.append(window)
            if self._next_probe == end:
                self._next_probe += self._probe_hop
            if not probe:
                self._next_end = self._following_end(end)
                self._trim(self._next_end - self._full - self._hop)

    def _close(self, end: SpeechEnd) -> list[WindowerOutput]:
        """Flush the tail: one last window aligned to the region end if the grid left speech uncovered,
        and a probe ending there, where a new voice's first words before a pause are."""
        self._stream.finish()
        self._in_region = False
        region_end = min(end.sample, self._audio_start + len(self._audio))
        decided = end.sample + end.lag
        duration = region_end - self._region_start
        out: list[Window | None] = []
        if duration >= self._first and region_end - self._last_end >= self._hop // 2:
            length = self._full if duration >= self._full else self._first
            start = self._snapped_start(region_end, length)
            out.append(self._make(start, start + length, decided=decided))
        probed = self._next_probe - self._probe_hop  # the last probe's end
        if self._probe_hop and duration >= self._probe and region_end - probed >= self._probe_hop // 2:
            start = self._snapped_start(region_end, self._probe)
            out.append(self._make(start, start + self._probe, decided=decided, probe=True))
        return [w for w in out if w is not None]

    def _snapped_start(self, region_end: int, length: int) -> int:
        """Start of a window of ``length`` ending at ``region_end``, on the region's frame grid."""
        shift = self._stream.frame_shift
        start = self._region_start + ((region_end - length - self._region_start) // shift) * shift
        return max(start, self._region_start)

    # -- helpers ---------------------------------------------------------------------------------

    def _following_end(self, end: int) -> int:
        """After the short first window, full windows: the first ends ``length_s`` into the region."""
        following = end + self._hop
        return max(following, self._region_start + self._full)

    def _frames_for(self, start: int, end: int) -> tuple[int, int]:
        first = (start - self._region_start) // self._stream.frame_shift
        count = self.recipe.num_frames(end - start, SAMPLE_RATE)
        return first, first + count

    def _length_ending(self, end: int) -> int:
        return self._first if end - self._region_start == self._first else self._full

    def _frames_cover(self, start: int, end: int) -> bool:
        if self._per_window is not None:  # computed from the window's samples, which the caller checked
            return True
        _, stop = self._frames_for(start, end)
        return stop <= self._stream.num_frames

    def _make(self, start: int, end: int, *, probe: bool = False, decided: int | None = None) -> Window | None:
        """The window [start, end) if enough of it is voiced; ``decided``: when it can be made, if later
        than its end."""
        a, b = start - self._audio_start, end - self._audio_start
        samples = self._audio[a:b]
        fraction = float(self._voiced[a:b].mean()) if b > a else 0.0
        if not probe:
            self._last_end = end  # the tail window covers what the regular grid left, not the probes
        if fraction < self.settings.min_speech:
            self.windows_rejected += not probe
            return None
        gain = gain_db(self.recipe, samples)
        if self._per_window is not None:
            feats = finish_gained(self.recipe, self._per_window.compute(samples), gain)
        else:
            first, stop = self._frames_for(start, end)
            stop = min(stop, self._stream.num_frames)
            feats = finish_gained(self.recipe, self._stream.frames(first, stop), gain)
        anchor_sample, anchor_wall = self._anchor
        if probe:
            self.probes_emitted += 1
        else:
            self.windows_emitted += 1
        return Window(
            start=start,
            end=end,
            feats=feats,
            speech_fraction=fraction,
            wall_time=anchor_wall - (anchor_sample - end) / SAMPLE_RATE,
            region_start=self._region_start,
            first_in_region=start == self._region_start and end - start == self._first and not probe,
            probe=probe,
            lag=max(0, decided - end) if decided is not None else 0,
            gain_db=gain,
        )

    def _trim(self, keep_from: int) -> None:
        """Drop audio and frames that no future window of this region can reach."""
        keep_from = max(keep_from, self._region_start)
        drop = keep_from - self._audio_start
        if drop > 0:
            self._audio = self._audio[drop:]
            self._voiced = self._voiced[drop:]
            self._audio_start = keep_from
            first, _ = self._frames_for(keep_from, keep_from)
            self._stream.discard_before(first)
