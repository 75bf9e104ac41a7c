"""Room responses shipped in a model bundle, so multi-condition enrollment needs no room simulator.

``speakerd models build`` simulates them once with pyroomacoustics (``rooms.MULTI_CONDITION_ROOMS``:
offices to meeting rooms, a table microphone 0.8-2.5 m from the talker); enrollment convolves each
recording with a few of them and lays a noise bed under it (``rooms.room_versions``: numpy and scipy
only). ``speakerd enroll`` therefore puts every voice through rooms by default, on a Mac with nothing
extra installed, and a voice enrolled from a clean file is recognised across a room.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .bundle import ModelBundle

logger = logging.getLogger(__name__)

ARTIFACT = "rooms"
"""The bundle's artifact kind (``artifacts.rooms`` in the manifest)."""
FILE = "rooms.npz"
COUNT = 32
"""Responses built: as many as ``rooms.MAX_VERSIONS``, so every version of a recording has its own room."""
SEED = 20261207
"""Seed of the simulated rooms: the same responses on every build."""
TAIL_DB = 60.0
"""A response is cut where what remains of its energy lies this far below the whole (RT60's own decay)."""
SOURCE = ("simulated with pyroomacoustics (image-source shoeboxes, RT60 0.25-0.75 s measured on the response, "
          "a table microphone 0.8-2.5 m from a seated talker) by `speakerd models build`")


@dataclass(frozen=True)
class RoomResponses:
    """Impulse responses from a talker to a table microphone, each in its own room."""

    responses: tuple[np.ndarray, ...]
    rt60_s: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.responses or len(self.responses) != len(self.rt60_s):
            raise ValueError("room responses need one RT60 per response, and at least one response")

    def __len__(self) -> int:
        return len(self.responses)

    def save(self, path: Path) -> None:
        lengths = np.array([len(r) for r in self.responses], dtype=np.int64)
        np.savez(path, samples=np.concatenate(self.responses).astype(np.float32), lengths=lengths,
                 rt60_s=np.array(self.rt60_s, dtype=np.float32))


def trimmed(response: np.ndarray, tail_db: float = TAIL_DB) -> np.ndarray:
    """``response`` without the part of its tail that holds less than ``tail_db`` below its energy."""
    energy = np.cumsum(np.asarray(response, dtype=np.float64)[::-1] ** 2)[::-1]
    if energy[0] <= 0:
        return np.asarray(response, dtype=np.float32)
    keep = int(np.searchsorted(-energy, -energy[0] * 10 ** (-tail_db / 10))) + 1
    return np.asarray(response[:keep], dtype=np.float32)


def build_responses(count: int = COUNT, seed: int = SEED) -> RoomResponses:
    """``count`` responses, each from its own simulated room and talker's place (needs pyroomacoustics)."""
    from . import rooms

    rng = np.random.default_rng(seed)
    settings = rooms.MULTI_CONDITION_ROOMS
    responses: list[np.ndarray] = []
    rt60: list[float] = []
    for _ in range(count):
        room = rooms.build_room(settings, rng)
        responses.append(trimmed(room.response(room.place(rng, settings.distance_m))))
        rt60.append(room.rt60_s)
    return RoomResponses(tuple(responses), tuple(rt60))


def load_responses(path: Path) -> RoomResponses:
    """Responses saved by ``RoomResponses.save``; ValueError if the file does not hold them."""
    with np.load(path) as data:
        samples = np.asarray(data["samples"], dtype=np.float32)
        lengths = np.asarray(data["lengths"], dtype=np.int64)
        rt60 = tuple(float(x) for x in data["rt60_s"])
    if lengths.ndim != 1 or np.any(lengths < 1) or int(lengths.sum()) != len(samples) or not np.all(np.isfinite(samples)):
        raise ValueError(f"{path} does not hold room responses")
    return RoomResponses(tuple(np.split(samples, np.cumsum(lengths)[:-1])), rt60)


def bundle_responses(bundle: ModelBundle) -> RoomResponses | None:
    """The bundle's room responses, or None when it has none built (or they do not load: the log says so)."""
    path = bundle.artifact(ARTIFACT)
    if path is None:
        return None
    try:
        return load_responses(path)
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("%s: room responses not usable (%s); rebuild the model with `speakerd models build %s`", path, exc, bundle.name)
        return None
