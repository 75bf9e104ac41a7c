"""One ResNet34 trunk pass per second of audio: windows and probes pool slices of a shared output.

The per-window path runs the whole network for every overlapping 1.5 s window (hop 0.5 s) and every
0.8 s probe (four a second): about 6 s of audio through the trunk per second heard. The trunk is
convolutional in time, so here it runs once over each stretch of speech as it grows: each batch
of windows makes one pass from the last output frame kept (with :data:`CONTEXT` frames of left
context) to the newest frame, its output frames are kept, and each window's embedding is TSTP
statistics pooling over its slice of the layer-4 output plus the final linear layer. Live audio
(one window every 0.25 s) makes a pass of about 0.9 s per 0.25 s; a file's backlog about one pass
over the audio. An output frame is computed with the right context its pass had, so embeddings
depend slightly on batching (docs/wespeaker.md measures both).

What changes against the per-window path: frames near a window's edges see real audio instead of
zero padding, and features are normalised by the segment's running mean up to the chunk's (or
tail's) end instead of each window's own mean (per-window CMN). docs/wespeaker.md has the
agreement figures; ``embedding.trunk = "per_window"`` is the exact path.

The segment's features are rebuilt from the windows themselves: overlapping windows differ only by
their own CMN constants, which the overlap gives, and a running mean removes any common constant.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import ModelBundle
from ..windows import Window
from .backend import BackendError, l2_normalise
from .onnx_backend import OnnxBackend, make_session

logger = logging.getLogger(__name__)

STRIDE = 8
"""Input frames per layer-4 output frame (three stride-2 stages)."""
CONTEXT = 64
"""Left context per pass, a multiple of STRIDE. The trunk's receptive field is about 225 frames;
64 gives a pass's first output frames most of their left half."""
MAX_PASS = 320
"""Most new frames per pass; a longer stretch (a file's backlog) runs in pieces. Per frame, passes of
256-512 frames ran fastest; 1024 cost 1.5x more per frame (activations outgrow the caches)."""
RIGHT = 16
"""Output frames with less right context than this stay provisional and are computed again by the
next pass, so kept frames do not depend much on how windows were batched."""
KEEP = 400
"""Frames of a segment kept behind the latest window's end (longer than any window)."""
MIN_OVERLAP = 8
"""Frames a window must share with its segment to be aligned to it; less starts a new segment."""
MAX_PASS_FRAMES = CONTEXT + MAX_PASS + RIGHT
"""Most input frames one pass sends through the trunk (left context, new frames, provisional ones)."""
CHUNK_FRAMES = (112, 160, 256, MAX_PASS_FRAMES)
"""Input lengths of a fixed-shape trunk (CoreML: one enumerated shape each, never a range). A pass
is padded up to the next one and the padding masked (:func:`pad_chunk`). Live passes are 92-109
frames (10th-90th percentile; -> 112), a fresh segment's first 1.0 / 1.5 s window 98 / 148 frames
(-> 112 / 160), a backlog's passes up to 400. Padding costs 12 % more trunk frames live and 16 % in a
backlog (three test-other clips); 104 instead of 112 cost 23 % live. Each is a multiple of STRIDE so
the output grid stays the pass's."""
TRUNK_ARTIFACT = "onnx_trunk"
HEAD_ARTIFACT = "head"

TrunkRun = Callable[[np.ndarray], np.ndarray]
"""Features of one pass (n, bins), already normalised -> layer-4 output (C*F, ceil(n / STRIDE))."""
Linear = Callable[[np.ndarray], np.ndarray]
"""Pooled statistics (batch, 2*C*F) -> raw embeddings (batch, D): the ``seg_1`` layer."""


def pad_chunk(feats: np.ndarray, chunk_frames: Sequence[int]) -> np.ndarray:
    """A pass's features (n, bins) as the fixed-shape trunk's input (1, L, bins + 1): L is the
    shortest served length >= n, the frames are zero-padded on the right, and the last column is
    1 on real frames and 0 on padding. The trunk multiplies every activation that feeds a
    convolution by that mask (subsampled with each stride), so its valid output frames equal an
    unpadded pass's exactly: padding looks like the convolutions' own zero padding."""
    n, bins = feats.shape
    fitting = [int(f) for f in chunk_frames if int(f) >= n]
    if not fitting:
        raise BackendError(f"a trunk pass of {n} frames exceeds the longest chunk ({max(chunk_frames)} frames)")
    buf = np.zeros((1, min(fitting), bins + 1), dtype=np.float32)
    buf[0, :n, :bins] = feats
    buf[0, :n, bins] = 1.0
    return buf


def output_frames(frames: int) -> int:
    """Layer-4 output frames of an unpadded pass of ``frames`` input frames."""
    return math.ceil(frames / STRIDE)


def tstp_stats(slices: Sequence[np.ndarray], stats_dim: int, eps: float) -> np.ndarray:
    """TSTP pooling in FP32 numpy: per row mean and unbiased std over time, channel-major (len, stats_dim)."""
    stats = np.empty((len(slices), stats_dim), dtype=np.float32)
    half = stats_dim // 2
    for i, s in enumerate(slices):
        stats[i, :half] = s.mean(axis=1)
        stats[i, half:] = np.sqrt(s.var(axis=1, ddof=1) + eps)
    return stats


class Head:
    """TSTP pooling (numpy, FP32: a slice has any length, and pooling is a few thousand flops) and
    the ``seg_1`` linear layer (a one-thread ONNX session, or a CoreML package)."""

    def __init__(self, linear: Linear, stats_dim: int, eps: float) -> None:
        self._linear = linear
        self.eps = eps
        self.stats_dim = int(stats_dim)

    @classmethod
    def load(cls, path: Path, eps: float) -> Head:
        session = make_session(path, 1)

        def linear(stats: np.ndarray) -> np.ndarray:
            (out,) = session.run(None, {"stats": stats})
            return np.asarray(out)

        return cls(linear, int(session.get_inputs()[0].shape[1]), eps)

    def embed(self, slices: Sequence[np.ndarray]) -> np.ndarray:
        """Layer-4 slices, each (C*F, n) -> raw embeddings (len, D)."""
        return self._linear(tstp_stats(slices, self.stats_dim, self.eps))


@dataclass
class _Segment:
    """A stretch of speech whose windows overlap: features up to a constant, and the trunk output."""

    start: int
    """First frame of the segment, counted from its region's start."""
    origin: int
    """Frame (from the region start) of ``raw[0]``."""
    raw: np.ndarray
    csum: np.ndarray
    """csum[i]: sum of every segment frame before frame ``origin + i`` (trimmed ones included)."""
    out_origin: int = 0
    """Frame of the first kept output frame's input."""
    out: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    done: int = 0
    """Frame up to which chunks have run (from the region start)."""

    @property
    def end(self) -> int:
        return self.origin + len(self.raw)

    def mean_until(self, frame: int) -> np.ndarray:
        return (self.csum[frame - self.origin] / (frame - self.start)).astype(np.float32)

    def extend(self, first: int, feats: np.ndarray) -> None:
        """Align a window starting at ``first`` to the segment by its overlap, keep its new frames."""
        overlap = min(self.end, first + len(feats)) - first
        offset = (self.raw[first - self.origin : first - self.origin + overlap] - feats[:overlap]).mean(axis=0)
        new = feats[self.end - first :] + offset
        if len(new):
            self.raw = np.concatenate([self.raw, new])
            self.csum = np.concatenate([self.csum, self.csum[-1] + np.cumsum(new, axis=0, dtype=np.float64)])

    def trim(self, keep_from: int) -> None:
        """Drop features and outputs no future pass or window reaches."""
        raw_from = min(keep_from, self.done - CONTEXT) - self.origin
        raw_from -= (self.origin + raw_from - self.start) % STRIDE  # passes start on the output grid
        if raw_from > 0:
            self.raw, self.csum, self.origin = self.raw[raw_from:], self.csum[raw_from:], self.origin + raw_from
        out_from = (keep_from - self.out_origin) // STRIDE
        if out_from > 0 and self.out.size:
            self.out = self.out[:, out_from:]
            self.out_origin += out_from * STRIDE


class SharedTrunk:
    """``embed_windows(windows)`` through the shared trunk; ``embed(feats)`` the exact per-window path
    (enrollment, tests, and windows that fit no segment).

    The segment bookkeeping (which frames a pass runs, what is kept, each window's slice) is this
    class's alone; backends supply the three computations: ``exact`` (the whole network per
    window), ``trunk`` (one pass, :data:`TrunkRun`) and ``head`` (pooling + ``seg_1``). ONNX Runtime:
    :class:`SharedTrunkBackend`; CoreML: ``speakerd.embedding.coreml_backend.shared_coreml_backend``.
    """

    def __init__(self, exact: Any, trunk: TrunkRun, head: Head, *, bundle: ModelBundle, label: str) -> None:
        self.exact = exact
        self._trunk: TrunkRun | None = trunk
        self._head = head
        self._embedding_dim = bundle.embedding_dim
        self._frame_shift = int(bundle.sample_rate * bundle.features.frame_shift_ms / 1000)
        self._segment: _Segment | None = None
        self._region = -1
        self.name = f"{exact.name}, shared trunk"
        self.counters = {"trunk_frames": 0, "trunk_passes": 0, "exact_windows": 0}
        logger.info("shared ResNet trunk (%s), %d frames of left context", label, CONTEXT)

    def embed(self, feats: np.ndarray) -> np.ndarray:
        return self.exact.embed(feats)

    def reset(self) -> None:
        """Forget the current segment: the next window starts a new one (a new stream)."""
        self._segment, self._region = None, -1

    def close(self) -> None:
        self.exact.close()
        self._trunk = None

    def embed_windows(self, windows: Sequence[Window]) -> np.ndarray:
        """Embeddings of ``windows`` (stream order), L2-normalised, (len, D)."""
        if self._trunk is None:
            raise BackendError("shared-trunk backend is closed")
        slices: list[np.ndarray | None] = [None] * len(windows)
        pending: list[tuple[int, int, int]] = []  # (index, first frame, end frame) in the current segment
        for i, w in enumerate(windows):
            first = (w.start - w.region_start) // self._frame_shift
            before = self._segment
            seg = self._segment_for(w.region_start, first, w.feats)
            if seg is not before and before is not None and pending:
                self._pool(before, pending, slices)
                pending = []
            if seg is not None:
                pending.append((i, first, first + w.num_frames))
        if self._segment is not None and pending:
            self._pool(self._segment, pending, slices)
        out = np.zeros((len(windows), self._embedding_dim), dtype=np.float32)
        pooled = [i for i, x in enumerate(slices) if x is not None]
        if pooled:
            out[pooled] = self._head.embed([slices[i] for i in pooled])
        for i in (i for i, x in enumerate(slices) if x is None):  # rare: starts before its segment's kept features
            out[i] = self.exact.embed(windows[i].feats[None])[0]
            self.counters["exact_windows"] += 1
        return l2_normalise(out)

    # -- segments --------------------------------------------------------------------------------

    def _segment_for(self, region: int, first: int, feats: np.ndarray) -> _Segment | None:
        seg = self._segment if region == self._region else None
        if seg is not None and first < seg.origin:
            return None
        if seg is None or first > seg.end - MIN_OVERLAP:
            raw = feats.astype(np.float32, copy=True)
            csum = np.concatenate([np.zeros((1, raw.shape[1])), np.cumsum(raw, axis=0, dtype=np.float64)])
            seg = _Segment(start=first, origin=first, raw=raw, csum=csum, out_origin=first, done=first,
                           out=np.zeros((self._head.stats_dim // 2, 0), dtype=np.float32))  # fmt: skip
            self._segment, self._region = seg, region
            return seg
        seg.extend(first, feats)
        return seg

    def _pool(self, seg: _Segment, pending: list[tuple[int, int, int]], slices: list[np.ndarray | None]) -> None:
        """One trunk pass from the segment's last frozen output to its newest frame, then each
        pending window's slice of the output."""
        end = seg.end
        while end - seg.done > MAX_PASS + RIGHT:
            piece = self._pass(seg, seg.done, seg.done + MAX_PASS)
            kept = (MAX_PASS - RIGHT) // STRIDE
            seg.out = np.concatenate([seg.out, piece[:, :kept]], axis=1)
            seg.done += kept * STRIDE
        fresh = self._pass(seg, seg.done, end)
        frozen = max(0, end - RIGHT - seg.done) // STRIDE  # the newest frames are redone next time
        seg.out = np.concatenate([seg.out, fresh[:, :frozen]], axis=1)
        seg.done += frozen * STRIDE
        output = np.concatenate([seg.out, fresh[:, frozen:]], axis=1)
        for i, first, stop in pending:
            a = (first - seg.out_origin) // STRIDE
            slices[i] = output[:, a : math.ceil((stop - seg.out_origin) / STRIDE)]
        seg.trim(max(stop for _, _, stop in pending) - KEEP)

    def _pass(self, seg: _Segment, begin: int, end: int) -> np.ndarray:
        """Trunk output for input frames [begin, end), run from ``CONTEXT`` frames before ``begin``,
        normalised by the segment's running mean up to ``end``."""
        lead = max(seg.start, begin - CONTEXT, seg.origin)
        if self._trunk is None:
            raise BackendError("shared-trunk backend is closed")
        x = seg.raw[lead - seg.origin : end - seg.origin] - seg.mean_until(end)
        y = self._trunk(np.ascontiguousarray(x, dtype=np.float32))
        self.counters["trunk_frames"] += end - lead
        self.counters["trunk_passes"] += 1
        skip = (begin - lead) // STRIDE
        return y[:, skip : skip + output_frames(end - begin)]


class SharedTrunkBackend(SharedTrunk):
    """The shared trunk on ONNX Runtime: the trunk ONNX (or its INT8 twin) and the head ONNX."""

    def __init__(self, bundle: ModelBundle, *, threads: int = 0, precision_artifact: str = "onnx") -> None:
        exact = OnnxBackend(bundle, threads=threads, artifact=precision_artifact)
        trunk_kind = TRUNK_ARTIFACT + ("_int8" if precision_artifact.endswith("int8") and bundle.artifact(TRUNK_ARTIFACT + "_int8") else "")
        session = make_session(bundle.require_artifact(trunk_kind), exact.threads)

        def trunk(feats: np.ndarray) -> np.ndarray:
            (y,) = session.run(None, {"feats": feats[None]})
            return np.asarray(y)[0]

        head = Head.load(bundle.require_artifact(HEAD_ARTIFACT), float(bundle.source.get("pooling_eps", 1e-7)))
        super().__init__(exact, trunk, head, bundle=bundle, label=trunk_kind)
