"""A background cohort: embeddings of voices nobody enrolls, shipped with the model bundle.

A window's cosine to every enrolled voiceprint sinks when the channel changes (a table microphone
in a reverberant room against voiceprints made from clean recordings), and so does its cosine to
voices it has nothing to do with. The level of a window's best cohort scores therefore measures how
far the channel has pulled its scores down, and ``policy.normalised`` takes it back out (test-side
adaptive normalisation, the T half of AS-norm: ../shared/docs/rooms.md). Built by ``speakerd
models build`` from LibriSpeech train-clean-100 voices (the manifest's ``source.cohort`` names
them); a built artifact like model.onnx.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

if TYPE_CHECKING:
    from ..bundle import ModelBundle
    from ..settings import Settings

logger = logging.getLogger(__name__)

ARTIFACT = "cohort"
"""The bundle's artifact kind (``artifacts.cohort`` in the manifest)."""
FILE = "cohort.npz"
WINDOWS_PER_VOICE = 2
"""Windows kept per cohort voice: enough for the top-N level, few enough to stay small (252 rows)."""
MIN_STD = 1e-3
"""A cohort level's spread below this is treated as this (never divide by nothing)."""


@dataclass(frozen=True)
class Cohort:
    embeddings: np.ndarray
    """(n, dim), unit rows."""
    speakers: tuple[str, ...]
    """The voice of each row (LibriSpeech speaker id), so an evaluation can leave its own voices out."""
    _index: faiss.IndexFlatIP = field(init=False, repr=False, compare=False)
    """The rows in faiss: every window is scored against them (``level``), and a numpy matmul of
    that size woke an OpenBLAS thread that cost 0.2 % of a core live (docs/BENCHMARKS.md, session 14)."""

    def __post_init__(self) -> None:
        rows = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        index = faiss.IndexFlatIP(rows.shape[1])
        index.add(rows)
        object.__setattr__(self, "_index", index)

    def without(self, speakers: Collection[str]) -> Cohort:
        """The cohort less the rows of ``speakers`` (an evaluation's meeting voices)."""
        keep = [i for i, s in enumerate(self.speakers) if s not in speakers]
        return Cohort(self.embeddings[keep], tuple(self.speakers[i] for i in keep))

    def level(self, embeddings: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and spread of each embedding's ``top_n`` best cosines to the cohort: (m,), (m,)."""
        x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        n = max(1, min(top_n, len(self.embeddings)))
        faiss.omp_set_num_threads(1)  # an OpenMP setting of this thread only
        best, _ = self._index.search(np.ascontiguousarray(x, dtype=np.float32), n)
        return best.mean(axis=1), np.maximum(best.std(axis=1), MIN_STD)

    def save(self, path: Path) -> None:
        np.savez(path, embeddings=self.embeddings.astype(np.float32), speakers=np.array(self.speakers))


def load_cohort(bundle: ModelBundle) -> Cohort | None:
    """The bundle's cohort, or None when it has none built (scores are then used as they are)."""
    path = bundle.artifact(ARTIFACT)
    if path is None:
        return None
    with np.load(path) as data:
        emb = np.asarray(data["embeddings"], dtype=np.float32)
        speakers = tuple(str(s) for s in data["speakers"])
    if emb.ndim != 2 or emb.shape[1] != bundle.embedding_dim or len(speakers) != len(emb):
        logger.warning("%s: cohort of shape %s does not fit %d-d embeddings; scoring without it", path, emb.shape, bundle.embedding_dim)
        return None
    return Cohort(emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12), speakers)


def build_cohort(audio_dir: Path, settings: Settings, features, embed: Callable[[np.ndarray], np.ndarray],  # noqa: ANN001
                 per_voice: int = WINDOWS_PER_VOICE) -> Cohort:
    """The first ``per_voice`` windows of every clip in ``audio_dir`` (LibriSpeech file names:
    ``<speaker>-<chapter>-<utterance>.flac``), embedded the way enrollment embeds a file."""
    from ..enroll import embed_windows, file_speech

    rows: list[np.ndarray] = []
    speakers: list[str] = []
    for path in sorted(Path(audio_dir).glob("*.flac")):
        windows, _, _ = file_speech(path, settings, features)
        if not windows:
            continue
        emb = embed_windows(windows[:per_voice], embed)
        rows.append(emb)
        speakers += [path.name.split("-")[0]] * len(emb)
    if not rows:
        raise FileNotFoundError(f"{audio_dir} has no .flac clip long enough to embed: a cohort needs LibriSpeech voices")
    emb = np.concatenate(rows)
    return Cohort(emb / np.linalg.norm(emb, axis=1, keepdims=True), tuple(speakers))
