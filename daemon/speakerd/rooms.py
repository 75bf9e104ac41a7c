"""Simulated rooms: one table microphone, talkers at their own places, a noise bed under everything.

One module for everything that puts speech through a room, so ``speakerd eval``'s room conditions
and multi-condition enrollment hear the same kind of room. Rooms are pyroomacoustics image-source
shoeboxes (``inverse_sabine`` gives the wall absorption and reflection order for a target RT60);
pyroomacoustics is imported only when a room is built, so the daemon never needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from .audio import SAMPLE_RATE
from .errors import SpeakerdError, check

logger = logging.getLogger(__name__)

ROOM_SIZE_M = ((4.0, 8.0), (3.5, 6.5), (2.6, 3.2))
"""Ranges of width, depth and height: offices to meeting rooms."""
MIC_HEIGHT_M = 0.75
"""A microphone lying on a table."""
MOUTH_HEIGHT_M = (1.1, 1.3)
"""Seated talkers."""
WALL_CLEARANCE_M = 0.4
NOISE_COLORS = ("pink", "brown")
BABBLE_DISTANCE_M = (2.5, 5.0)
"""Babble comes from people further away than anyone in the meeting, where the room has the space
(the microphone that far from every wall); else from ``BABBLE_NEAR_M``."""
BABBLE_NEAR_M = (1.5, 2.5)
SPEECH_LEVEL = 0.05
"""Active speech level of a simulated recording (-26 dBFS): clear of clipping with 0 dB SNR noise."""
ACTIVE_FLOOR_DB = 30.0
"""Frames this far below a signal's loud frames are not part of its active level."""
FRAME_S = 0.02
PLACE_TRIES = 200
MIN_WIDTH_IN_REACHES = 1.5
"""Rooms at least this many farthest talker distances (plus clearance) wide: such a place fits at some angle."""
PROBE_M = 1.2
"""Where the response that calibrates a room's RT60 is measured: this far from the microphone, at
``PROBE_HEIGHT_M``, a seated talker's mouth."""
PROBE_HEIGHT_M = 1.2
CALIBRATION_STEPS = 3
CALIBRATION_TOLERANCE = 0.05
MAX_ABSORPTION = 0.99
MAX_VERSIONS = 32


class RoomError(SpeakerdError):
    exit_code = 2


def pyroomacoustics() -> ModuleType:
    """The pyroomacoustics module, or an error that says how to get it."""
    try:
        import pyroomacoustics as pra
    except ImportError:
        raise RoomError(
            "simulated rooms need pyroomacoustics, which the daemon itself never uses: "
            "pip install 'speakerd[rooms]' (or pip install pyroomacoustics)"
        ) from None
    return pra


@dataclass(frozen=True)
class RoomSettings:
    """``rt60_s`` and ``snr_db``: ranges drawn from per room (equal ends for a fixed value); ``snr_db``
    None adds no noise bed. ``distance_m``: talker to microphone. ``noise_color``: the stationary part
    of the noise bed (fans, ventilation); ``babble_share``: the part of the bed's power that is distant
    voices, when any are given. ``max_order``: cap on reflections (None: what the RT60 needs; a cap
    shortens the tail, for fast tests only)."""

    rt60_s: tuple[float, float] = (0.45, 0.45)
    distance_m: tuple[float, float] = (0.8, 2.5)
    snr_db: tuple[float, float] | None = (18.0, 18.0)
    noise_color: str = "pink"
    babble_share: float = 0.5
    max_order: int | None = None

    def __post_init__(self) -> None:
        lo, hi = self.rt60_s
        check(0.1 <= lo <= hi <= 1.5, "room.rt60_s", self.rt60_s, "must be a range within 0.1 to 1.5 s")
        lo, hi = self.distance_m
        check(0.3 <= lo <= hi <= 3.0, "room.distance_m", self.distance_m, "must be a range within 0.3 to 3 m")
        if self.snr_db is not None:
            lo, hi = self.snr_db
            check(-5.0 <= lo <= hi <= 60.0, "room.snr_db", self.snr_db, "must be a range within -5 to 60 dB")
        check(self.noise_color in NOISE_COLORS, "room.noise_color", self.noise_color, f"must be one of {', '.join(NOISE_COLORS)}")
        check(0.0 <= self.babble_share <= 1.0, "room.babble_share", self.babble_share, "must be within 0 to 1")
        check(self.max_order is None or self.max_order >= 1, "room.max_order", self.max_order, "must be at least 1")


@dataclass(frozen=True)
class Room:
    """A shoebox with absorbing walls and a microphone on the table."""

    size: tuple[float, float, float]
    rt60_s: float
    absorption: float
    max_order: int
    mic: tuple[float, float, float]

    def response(self, position: Sequence[float]) -> np.ndarray:
        """The impulse response from a talker at ``position`` to the microphone."""
        pra = pyroomacoustics()
        room = pra.ShoeBox(list(self.size), fs=SAMPLE_RATE, materials=pra.Material(self.absorption),
                           max_order=self.max_order, air_absorption=False)
        room.add_source(list(position))
        room.add_microphone(list(self.mic))
        room.compute_rir()
        return np.asarray(room.rir[0][0], dtype=np.float32)

    def place(self, rng: np.random.Generator, distance_m: tuple[float, float]) -> tuple[float, float, float]:
        """A seated talker at a distance drawn from ``distance_m``, inside the walls."""
        for _ in range(PLACE_TRIES):
            d = rng.uniform(*distance_m)
            z = rng.uniform(*MOUTH_HEIGHT_M)
            horizontal = np.sqrt(max(d**2 - (z - self.mic[2]) ** 2, 0.0))
            angle = rng.uniform(0, 2 * np.pi)
            x, y = self.mic[0] + horizontal * np.cos(angle), self.mic[1] + horizontal * np.sin(angle)
            if WALL_CLEARANCE_M <= x <= self.size[0] - WALL_CLEARANCE_M and WALL_CLEARANCE_M <= y <= self.size[1] - WALL_CLEARANCE_M:
                return float(x), float(y), float(z)
        raise RoomError(f"no place {distance_m} m from the microphone fits in a {self.size} m room")


def build_room(settings: RoomSettings, rng: np.random.Generator) -> Room:
    """A room of random size with walls absorbing enough for an RT60 drawn from the settings."""
    pra = pyroomacoustics()
    rt60 = float(rng.uniform(*settings.rt60_s))
    for _ in range(PLACE_TRIES):
        size = tuple(float(rng.uniform(*r)) for r in ROOM_SIZE_M)
        if min(size[0], size[1]) < MIN_WIDTH_IN_REACHES * (settings.distance_m[1] + WALL_CLEARANCE_M):
            continue
        try:
            absorption, order = pra.inverse_sabine(rt60, list(size))
        except ValueError:  # too reverberant a target for so small a room
            continue
        mic = (size[0] / 2 + rng.uniform(-0.5, 0.5), size[1] / 2 + rng.uniform(-0.5, 0.5), MIC_HEIGHT_M)
        if settings.max_order is not None:
            order = min(order, settings.max_order)
        room = Room(size, rt60, float(absorption), int(order), mic)  # type: ignore[arg-type]
        return room if settings.max_order is not None else _calibrated(room)
    raise RoomError(f"no room size fits RT60 {rt60:.2f} s with talkers {settings.distance_m} m away")


def _calibrated(room: Room) -> Room:
    """The room with its wall absorption corrected until the RT60 measured on a response is the target.

    Sabine's formula, which ``inverse_sabine`` inverts, assumes a diffuse field; image-source
    shoeboxes reverberate up to 20 % longer than it says. RT60 goes about as 1 / absorption.
    """
    pra = pyroomacoustics()
    x = room.mic[0] + PROBE_M if room.mic[0] + PROBE_M < room.size[0] - WALL_CLEARANCE_M else room.mic[0] - PROBE_M
    probe = (x, room.mic[1], PROBE_HEIGHT_M)
    for _ in range(CALIBRATION_STEPS):
        measured = float(pra.experimental.measure_rt60(room.response(probe), fs=SAMPLE_RATE, decay_db=30))
        if abs(measured / room.rt60_s - 1) <= CALIBRATION_TOLERANCE:
            break
        absorption = min(room.absorption * measured / room.rt60_s, MAX_ABSORPTION)
        room = Room(room.size, room.rt60_s, absorption, room.max_order, room.mic)
    return room


def convolve(audio: np.ndarray, response: np.ndarray) -> np.ndarray:
    """``audio`` as the microphone hears it: same length, the reverberant tail past its end cut."""
    from scipy.signal import fftconvolve

    return fftconvolve(np.asarray(audio, dtype=np.float64), response)[: len(audio)].astype(np.float32)


# -- noise ------------------------------------------------------------------------------------------------


def colored_noise(color: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise with a 1/f (pink) or 1/f^2 (brown) power spectrum, above 20 Hz."""
    spectrum = np.fft.rfft(rng.normal(0.0, 1.0, n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    exponent = {"pink": 0.5, "brown": 1.0, "white": 0.0}[color]
    spectrum *= np.where(freqs >= 20.0, np.maximum(freqs, 20.0) ** -exponent, 0.0)
    out = np.fft.irfft(spectrum, n)
    return (out / max(rms(out), 1e-12)).astype(np.float32)


def babble(voices: Sequence[np.ndarray], n: int, room: Room, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS distant chatter: each voice looped to ``n`` samples, through the room from afar, summed."""
    total = np.zeros(n, dtype=np.float64)
    for voice in voices:
        if not len(voice):
            continue
        reps = int(np.ceil(n / len(voice))) + 1
        looped = np.tile(voice, reps)
        start = int(rng.integers(0, len(voice)))
        track = looped[start : start + n]
        where = room.place(rng, BABBLE_DISTANCE_M) if _fits(room, BABBLE_DISTANCE_M) else room.place(rng, BABBLE_NEAR_M)
        track = convolve(track / max(rms(track), 1e-12), room.response(where))
        total += track / max(rms(track), 1e-12)
    return (total / max(rms(total), 1e-12)).astype(np.float32)


def _fits(room: Room, distance: tuple[float, float]) -> bool:
    reach = min(room.mic[0], room.mic[1], room.size[0] - room.mic[0], room.size[1] - room.mic[1]) - WALL_CLEARANCE_M
    return reach >= distance[0]


def noise_bed(n: int, settings: RoomSettings, room: Room, rng: np.random.Generator,
              voices: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Unit-RMS room noise: coloured noise, plus babble of ``voices`` with ``babble_share`` of the power."""
    bed = colored_noise(settings.noise_color, n, rng).astype(np.float64)
    if voices and settings.babble_share > 0:
        share = settings.babble_share
        bed = np.sqrt(1 - share) * bed + np.sqrt(share) * babble(voices, n, room, rng)
    return (bed / max(rms(bed), 1e-12)).astype(np.float32)


# -- levels -----------------------------------------------------------------------------------------------


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def active_mask(x: np.ndarray) -> np.ndarray:
    """Per sample, whether its 20 ms frame is within ``ACTIVE_FLOOR_DB`` of the signal's loud frames."""
    hop = int(FRAME_S * SAMPLE_RATE)
    n = max(len(x) // hop, 1)
    frames = np.resize(np.asarray(x, dtype=np.float64), n * hop).reshape(n, hop)
    db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-20)
    active = db >= np.percentile(db, 95) - ACTIVE_FLOOR_DB
    mask = np.repeat(active, hop)
    return np.concatenate([mask, np.full(len(x) - len(mask), active[-1])])[: len(x)]


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float, speech_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(speech scaled to ``SPEECH_LEVEL`` plus noise ``snr_db`` below it, the noise as mixed).

    Speech power is taken where ``speech_mask`` is True (default: its active frames), as speech levels
    are measured; noise power over all of it, since noise is everywhere.
    """
    mask = active_mask(speech) if speech_mask is None else speech_mask
    level = rms(speech[mask]) if mask.any() else rms(speech)
    gain = SPEECH_LEVEL / max(level, 1e-12)
    scaled_noise = noise * np.float32(SPEECH_LEVEL / 10 ** (snr_db / 20) / max(rms(noise), 1e-12))
    return (speech * np.float32(gain) + scaled_noise).astype(np.float32), scaled_noise.astype(np.float32)


def measured_snr_db(speech: np.ndarray, noise: np.ndarray, speech_mask: np.ndarray) -> float:
    return float(20 * np.log10(rms(speech[speech_mask]) / max(rms(noise), 1e-12)))


# -- multi-condition versions of one recording ----------------------------------------------------------


MULTI_CONDITION_ROOMS = RoomSettings(rt60_s=(0.25, 0.75), distance_m=(0.8, 2.5), snr_db=(10.0, 30.0))
"""Rooms of multi-condition enrollment: offices to meeting rooms, a table microphone, 10-30 dB of
pink or brown noise; wider than any one room so the voiceprint fits whichever room it meets."""


@dataclass(frozen=True)
class MultiConditionSettings:
    """Multi-condition enrollment: each enrollment recording is also embedded through ``versions``
    simulated rooms (``MULTI_CONDITION_ROOMS``), so a voice enrolled from a clean file is recognised
    through a table microphone. 0 is off. The rooms come from the model bundle's room responses
    (``room_responses``), or are simulated when it has none (needs pyroomacoustics). ``seed`` makes a
    recording's versions the same on every enrollment. 2 by default: in eval's room (RT60 0.45 s,
    18 dB) voices enrolled from clean clips were named in 73-79 % of their speech against 46-59 %
    without, with clean speech unchanged (seeds 0-2; docs/BENCHMARKS.md, session 8)."""

    versions: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.versions, int) and 0 <= self.versions <= MAX_VERSIONS, "enroll_rooms.versions", self.versions,
              f"must be an integer within 0 to {MAX_VERSIONS}")

    @property
    def room(self) -> RoomSettings:
        return MULTI_CONDITION_ROOMS


def room_versions(audio: np.ndarray, settings: MultiConditionSettings, seed: int = 0,
                  responses: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """``settings.versions`` copies of ``audio``, each through its own room, place and noise.

    ``responses``: room responses to draw the rooms from (a bundle's, ``room_responses``), each
    version its own; None simulates new rooms (needs pyroomacoustics)."""
    rng = np.random.default_rng([settings.seed, seed])
    room_settings = settings.room
    if responses is not None:
        check(settings.versions <= len(responses), "enroll_rooms.versions", settings.versions,
              f"must be at most the {len(responses)} room responses the model bundle has")
        drawn = [responses[int(i)] for i in rng.choice(len(responses), settings.versions, replace=False)]
    else:
        drawn = []
        for _ in range(settings.versions):
            room = build_room(room_settings, rng)
            drawn.append(room.response(room.place(rng, room_settings.distance_m)))
    out: list[np.ndarray] = []
    for response in drawn:
        wet = convolve(audio, response)
        noise = colored_noise(NOISE_COLORS[int(rng.integers(len(NOISE_COLORS)))], len(wet), rng)
        mixed, _ = mix_at_snr(wet, noise, float(rng.uniform(*room_settings.snr_db)), active_mask(audio))
        out.append(np.clip(mixed, -1.0, 1.0))
    return out
