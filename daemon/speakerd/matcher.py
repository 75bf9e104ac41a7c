"""Who is this? Matching window embeddings against enrolled speakers.

``SpeakerIndex`` is shaped like sherpa-onnx's SpeakerEmbeddingManager (add, remove, rank,
best_matches, verify), over a faiss inner-product index of L2-normalised embeddings, so
scores are cosine similarities in [-1, 1]. A window is scored against each *speaker*, not each
embedding: the ``top_k`` nearest embeddings are fetched in one faiss call for the whole batch and
grouped by speaker (``max`` or ``top3``), or the window is compared with each speaker's normalised
mean embedding (``centroid``, exact over all speakers; faiss is not needed for that).

Embeddings of a speaker's recordings heard through simulated rooms (multi-condition enrollment,
``store.ROOM_VERSION``) are a voiceprint of their own: ``rank`` scores the recordings as they are,
``rank_rooms`` the room versions, and the decision layer takes the better of the two
(``decisions.policy.with_rooms``). Averaged into one voiceprint they cost clean speech: the mean
moved towards "heard in a room" and clean windows scored under the threshold.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import faiss
import numpy as np

from .decisions.evidence import Candidate
from .errors import check

if TYPE_CHECKING:
    from .store import SpeakerStore

logger = logging.getLogger(__name__)

SCORE_MODES = ("max", "top3", "centroid")
TOP_N = 3
"""How many of a speaker's best neighbour similarities the ``top3`` score averages."""
MAX_TOP_K = 4096
LOCAL_ID_BASE = 1 << 62
"""Embeddings added in memory without a store row id get ids from here up, clear of SQLite's ids."""
FROM_STORE_ATTEMPTS = 3


@dataclass(frozen=True)
class MatchSettings:
    """How the index searches. Whether a score names a speaker is the decision layer's
    (``decisions.policy.verdict``, with the model's ``DecisionValues``)."""

    top_k: int = 32
    """Nearest embeddings fetched from faiss per window, before grouping by speaker."""
    score: str = "centroid"
    """Per-speaker score: 'centroid' (cosine to the speaker's normalised mean embedding; scores every
    speaker, so the margin is over the true runner-up), 'max' (best neighbour) or 'top3' (mean of its
    best up to 3 neighbours); the last two see only speakers among the ``top_k`` neighbours, so with
    few speakers of many embeddings the runner-up can be missing and the margin then equals the score."""
    faiss_threads: int = 1
    """OpenMP threads for a faiss search, set on the searching thread only. 1 because batches are
    tiny (0.1-0.2 ms) and the other pipeline stages share the cores: measured on 2 busy cores, 2
    threads gave a p95 of 25-32 ms against 4-8 ms for 1."""

    def __post_init__(self) -> None:
        check(
            isinstance(self.top_k, int) and 1 <= self.top_k <= MAX_TOP_K,
            "matching.top_k",
            self.top_k,
            f"must be an integer in [1, {MAX_TOP_K}]",
        )
        check(
            isinstance(self.faiss_threads, int) and self.faiss_threads >= 1,
            "matching.faiss_threads",
            self.faiss_threads,
            "must be a positive integer",
        )
        check(self.score in SCORE_MODES, "matching.score", self.score, f"must be one of {', '.join(SCORE_MODES)}")


def _normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.maximum(norms, np.finfo(np.float32).tiny), dtype=np.float32)


class _Centroids:
    """Each speaker's normalised mean embedding, searchable in one faiss call; rebuilt when stale.
    Not numpy: a (8, d) @ (d, n) matmul lets OpenBLAS start its own threads, which on busy cores
    measured 20 ms median against 0.2 ms for faiss with one thread."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.ids: list[str] = []
        self.matrix = np.zeros((0, dim), dtype=np.float32)
        self._index = faiss.IndexFlatIP(dim)
        self.stale = False

    def refresh(self, vectors: dict[str, np.ndarray]) -> None:
        if self.stale:
            self.ids = list(vectors)
            means = [vectors[s].mean(axis=0) for s in self.ids]
            self.matrix = _normalise(np.array(means, dtype=np.float32).reshape(-1, self.dim))
            self._index = faiss.IndexFlatIP(self.dim)
            self._index.add(self.matrix)
            self.stale = False

    def search(self, queries: np.ndarray) -> list[list[tuple[str, float]]]:
        """Per query: (speaker id, cosine) for every speaker, best first."""
        if not self.ids:
            return [[] for _ in range(len(queries))]
        sims, rows = self._index.search(queries, len(self.ids))
        return [
            [(self.ids[j], s) for s, j in zip(row_sims, row_ids, strict=True)]
            for row_sims, row_ids in zip(sims.astype(np.float64).tolist(), rows.tolist(), strict=True)
        ]

    def score(self, speaker_id: str, query: np.ndarray) -> float:
        return float(self.matrix[self.ids.index(speaker_id)] @ query)


class SpeakerIndex:
    """Enrolled speakers' embeddings in memory, searchable in batches. Thread-safe (one lock)."""

    def __init__(self, dim: int, settings: MatchSettings | None = None) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self.settings = settings if settings is not None else MatchSettings()
        self._lock = threading.RLock()
        self._index: faiss.IndexIDMap2 = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._owner: dict[int, str] = {}  # embedding id -> speaker id
        self._names: dict[str, str] = {}  # speaker id -> name
        self._vectors: dict[str, np.ndarray] = {}  # speaker id -> (m, dim) normalised
        self._emb_ids: dict[str, np.ndarray] = {}  # speaker id -> its embedding ids
        self._next_local_id = LOCAL_ID_BASE
        self._centroids = _Centroids(self.dim)
        self._rooms: dict[str, np.ndarray] = {}  # speaker id -> room versions' embeddings, normalised
        self._room_centroids = _Centroids(self.dim)

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def from_store(cls, store: SpeakerStore, settings: MatchSettings | None = None) -> SpeakerIndex:
        """Adopt the store's persisted faiss index and its id -> speaker mapping (no re-embedding,
        no re-reading of vectors from SQLite)."""
        from .store import StoreError

        for _ in range(FROM_STORE_ATTEMPTS):
            index = store.load_index()
            row_ids, owners = store.embedding_owners()
            in_rooms = store.room_version_ids()
            names = {s.id: s.name for s in store.speakers()}
            index_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
            if np.array_equal(np.sort(index_ids), row_ids) and set(owners) <= set(names):
                break
            logger.info("speaker store changed while loading the index; retrying")
        else:
            raise StoreError(f"the speaker store in {store.directory} kept changing while it was loaded")

        built = cls(store.dim, settings)
        flat = faiss.downcast_index(index.index)
        # IndexFlat stores vectors in insertion order, the same order as id_map.
        vectors = faiss.vector_to_array(flat.codes).view(np.float32).reshape(-1, store.dim)
        owner_of = dict(zip(row_ids.tolist(), owners, strict=True))
        room = set(in_rooms.tolist())
        rows_of: dict[str, list[int]] = {}
        room_rows_of: dict[str, list[int]] = {}
        for row, emb_id in enumerate(index_ids.tolist()):
            (room_rows_of if emb_id in room else rows_of).setdefault(owner_of[emb_id], []).append(row)
        for speaker_id, rows in rows_of.items():  # a speaker left with no embeddings cannot match
            built._names[speaker_id] = names[speaker_id]
            built._vectors[speaker_id] = np.ascontiguousarray(vectors[rows])
            built._emb_ids[speaker_id] = index_ids[rows]
        for speaker_id, rows in room_rows_of.items():
            if speaker_id in built._names:  # room versions alone are no voiceprint
                built._rooms[speaker_id] = np.ascontiguousarray(vectors[rows])
        if room:  # the neighbour search (max, top3) sees the recordings as they are, as rank does
            index.remove_ids(np.fromiter(room, dtype=np.int64))
        built._index = index
        built._owner = {i: o for i, o in owner_of.items() if i not in room}
        built._centroids.stale = built._room_centroids.stale = True
        logger.info("speaker index: %d speakers, %d embeddings (%d more through simulated rooms)", len(built._names),
                    index.ntotal, len(room))
        return built

    def _prepare(self, embeddings: np.ndarray, what: str) -> np.ndarray:
        matrix = np.asarray(embeddings, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (n, {self.dim}), got {np.shape(embeddings)}")
        if not np.all(np.isfinite(matrix)):
            raise ValueError(f"{what} contain NaN or infinite values")
        return _normalise(matrix)

    def add(self, speaker_id: str, name: str, embeddings: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Add embeddings for a speaker (new or existing). Pass the store's row ids as ``ids`` when
        mirroring an enrollment, so this index and the store's stay comparable."""
        matrix = self._prepare(embeddings, "embeddings")
        if len(matrix) == 0:
            raise ValueError("no embeddings to add")
        with self._lock:
            for other, other_name in self._names.items():
                if other_name == name and other != speaker_id:
                    raise ValueError(f"name {name!r} already belongs to speaker {other}")
            if ids is None:
                new_ids = np.arange(self._next_local_id, self._next_local_id + len(matrix), dtype=np.int64)
                self._next_local_id += len(matrix)
            else:
                new_ids = np.asarray(ids, dtype=np.int64).reshape(-1)
                if len(new_ids) != len(matrix):
                    raise ValueError(f"{len(new_ids)} ids for {len(matrix)} embeddings")
                if len(set(new_ids.tolist())) != len(new_ids) or any(i in self._owner for i in new_ids.tolist()):
                    raise ValueError("embedding ids must be new and distinct")
            self._index.add_with_ids(matrix, new_ids)
            self._names[speaker_id] = name
            self._vectors[speaker_id] = np.concatenate([self._vectors.get(speaker_id, matrix[:0]), matrix])
            self._emb_ids[speaker_id] = np.concatenate([self._emb_ids.get(speaker_id, new_ids[:0]), new_ids])
            self._owner.update((i, speaker_id) for i in new_ids.tolist())
            self._centroids.stale = True

    def remove(self, speaker_id: str) -> bool:
        """Forget a speaker; False if it was not there."""
        with self._lock:
            if speaker_id not in self._names:
                return False
            ids = self._emb_ids.pop(speaker_id)
            self._index.remove_ids(ids)
            for i in ids.tolist():
                del self._owner[i]
            del self._names[speaker_id], self._vectors[speaker_id]
            self._rooms.pop(speaker_id, None)
            self._centroids.stale = self._room_centroids.stale = True
            return True

    def rename(self, speaker_id: str, name: str) -> None:
        with self._lock:
            if speaker_id not in self._names:
                raise KeyError(speaker_id)
            for other, other_name in self._names.items():
                if other_name == name and other != speaker_id:
                    raise ValueError(f"name {name!r} already belongs to speaker {other}")
            self._names[speaker_id] = name

    @property
    def speakers(self) -> dict[str, str]:
        """Speaker id -> name (a copy)."""
        with self._lock:
            return dict(self._names)

    @property
    def num_embeddings(self) -> int:
        return int(self._index.ntotal)

    def name_of(self, speaker_id: str) -> str | None:
        return self._names.get(speaker_id)

    def __len__(self) -> int:
        return len(self._names)

    # -- scoring ----------------------------------------------------------------------------------

    def _aggregate(self, sims: list[float]) -> float:
        """A speaker's score from its similarities, sorted best first (plain floats: this is per window)."""
        if self.settings.score == "max":
            return sims[0]
        best = sims[:TOP_N]
        return sum(best) / len(best)

    def _candidates(self, queries: np.ndarray) -> list[list[tuple[str, float]]]:
        """Per query: (speaker id, score) for every candidate speaker, best first."""
        if not self._names:
            return [[] for _ in range(len(queries))]
        faiss.omp_set_num_threads(self.settings.faiss_threads)  # an OpenMP ICV of this thread only
        if self.settings.score == "centroid":
            self._centroids.refresh(self._vectors)
            return self._centroids.search(queries)
        k = min(self.settings.top_k, int(self._index.ntotal))
        sims, ids = self._index.search(queries, k)  # one call for the whole batch
        out = []
        for row_sims, row_ids in zip(sims.astype(np.float64).tolist(), ids.tolist(), strict=True):
            grouped: dict[str, list[float]] = {}
            for sim, emb_id in zip(row_sims, row_ids, strict=True):
                if emb_id != -1:  # faiss pads with -1 when fewer than k exist
                    grouped.setdefault(self._owner[emb_id], []).append(sim)
            scored = [(spk, self._aggregate(s)) for spk, s in grouped.items()]
            scored.sort(key=lambda item: -item[1])
            out.append(scored)
        return out

    def rank(self, embeddings: np.ndarray) -> list[list[Candidate]]:
        """Per row of ``embeddings`` (n, dim): every candidate speaker as (id, name, score), best
        first; one faiss search for the batch. Empty lists when nobody is enrolled."""
        queries = self._prepare(embeddings, "embeddings")
        with self._lock:
            if len(queries) == 0:
                return []
            names = self._names
            return [[(spk, names[spk], score) for spk, score in c] for c in self._candidates(queries)]

    def rank_rooms(self, embeddings: np.ndarray) -> list[list[Candidate]]:
        """As ``rank``, against each speaker's room versions' mean (multi-condition enrollment), for
        the speakers that have them (empty lists when none has)."""
        queries = self._prepare(embeddings, "embeddings")
        with self._lock:
            if not self._rooms:
                return [[] for _ in range(len(queries))]
            faiss.omp_set_num_threads(self.settings.faiss_threads)
            self._room_centroids.refresh(self._rooms)
            names = self._names
            return [[(spk, names[spk], score) for spk, score in c] for c in self._room_centroids.search(queries)]

    def embeddings_of(self, speaker_id: str) -> np.ndarray | None:
        """A copy of an enrolled speaker's normalised embeddings (m, dim), or None."""
        with self._lock:
            vectors = self._vectors.get(speaker_id)
            return None if vectors is None else vectors.copy()

    def best_matches(self, embedding: np.ndarray, n: int) -> list[tuple[str, str, float]]:
        """Up to ``n`` (speaker id, name, score), best first, among the candidate speakers."""
        queries = self._prepare(self._one(embedding), "embedding")
        with self._lock:
            return [(spk, self._names[spk], score) for spk, score in self._candidates(queries)[0][:n]]

    def verify(self, speaker_id: str, embedding: np.ndarray, threshold: float) -> bool:
        """Is ``embedding`` this speaker at ``threshold``? Scored exactly over all of the speaker's embeddings."""
        query = self._prepare(self._one(embedding), "embedding")[0]
        with self._lock:
            return speaker_id in self._names and self.score_of(speaker_id, query) >= threshold

    def score_of(self, speaker_id: str, embedding: np.ndarray) -> float:
        """This speaker's score for ``embedding`` over all its embeddings (not limited to top_k).

        Equals the ``rank`` score when ``top_k`` covers the speaker's embeddings; with fewer of
        them among the top_k, ``top3`` in ``rank`` averages only those. KeyError if unknown."""
        query = self._prepare(self._one(embedding), "embedding")[0]
        with self._lock:
            if speaker_id not in self._names:
                raise KeyError(speaker_id)
            if self.settings.score == "centroid":
                self._centroids.refresh(self._vectors)
                return self._centroids.score(speaker_id, query)
            sims = np.sort(self._vectors[speaker_id] @ query)[::-1]
            return float(self._aggregate(sims.astype(np.float64).tolist()))

    def _one(self, embedding: np.ndarray) -> np.ndarray:
        vector = np.asarray(embedding, dtype=np.float32)
        if vector.shape != (self.dim,):
            raise ValueError(f"embedding must have shape ({self.dim},), got {vector.shape}")
        return vector.reshape(1, self.dim)
