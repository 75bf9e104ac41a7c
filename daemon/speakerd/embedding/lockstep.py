"""GE2E windows and probes of one speech region advanced through the LSTM together, exactly.

Per window, GE2E runs its LSTM from a zero state over every frame of the window: a 1.5 s window
every 0.5 s and a 0.8 s probe every 0.25 s put about six frames through the network per frame
heard, mostly one window at a time, and a batch-of-one LSTM step costs nearly what a step of four
does (ONNX Runtime, one thread: 76-84 us per row-step alone, 32 us in a batch of 4-6). The windows
of a region start on the windower's grids (``windows.grid_windows``), so each can be started
as soon as its first frame exists: every window in flight is a *row*, and all rows advance
together, time-major, over the frames that arrived since the last call. A window's embedding is
its row's output at its last frame, which is what the whole-window pass computes from the same
zero state and the same frames: exact, not an approximation (in FP32: INT8 rows, below, agree
without being exact).

Except for gain. A window quieter than -30 dBFS is scaled up as a whole (``features.gain_db``),
known only once the window is complete; rows run on unscaled frames, so a window that was
scaled (``Window.gain_db`` > 0) is embedded on its own, as before. In a quiet room where most
windows are scaled, rows would be wasted work: new rows open only while at least
:data:`MIN_UNSCALED` of recent windows were unscaled. Windows off the grids (a region's tail
window), windows whose row could not run (frames missing after a dropped window) and a backlog
(:data:`BACKLOG`, where batches of whole windows cost less) also take the whole-window path.
``embedding.trunk = "per_window"`` turns rows off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bundle import ModelBundle
from ..windows import Window
from .backend import STREAM_ARTIFACT, BackendError, Grid
from .onnx_backend import OnnxBackend, make_session

logger = logging.getLogger(__name__)

MIN_UNSCALED = 0.5
"""Share of recent windows that must be unscaled for new rows to open. Rows cost about half of
embedding every window alone (120 s of test-other: 5.39 -> 3.11 s of CPU; docs/BENCHMARKS.md,
session 10), so they pay while fewer than half of the windows are scaled and embedded again whole."""
BACKLOG = 8
"""A run of this many windows is a backlog (a file, or a live queue catching up): whole windows
batched by length cost less per window there (ONNX Runtime on two threads, 3.2 ms per 1.5 s window
at batch 8 against about 7 in rows), and rows restart after it. Live audio sends one or two."""
UNSCALED_WEIGHT = 0.1
"""Weight of each window in the running share of unscaled windows (about the last ten)."""

Step = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""``(x (T, B, bins), h, c (layers, B, H), pick (K,))`` -> ``(h, c, embeddings (K, D))``."""


@dataclass
class _Row:
    """One window start in flight: its LSTM state after frame ``done``."""

    first: int
    """Frame of its first input, from the region start."""
    stops: tuple[int, ...]
    """Frames after which an embedding is kept (``first`` + each length starting there), ascending."""
    h: np.ndarray
    c: np.ndarray
    done: int = 0

    @property
    def last(self) -> int:
        return self.stops[-1]


@dataclass
class _Region:
    """The unscaled frames of the region in progress, and its rows."""

    start: int
    """Sample of the region start."""
    origin: int = 0
    """Frame (from the region start) of ``frames[0]``."""
    frames: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    opened: int = 0
    """Samples from the region start up to which grid starts were considered for rows."""
    rows: list[_Row] = field(default_factory=list)
    kept: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    """(first frame, stop frame) -> the embedding of the window that spans them."""

    @property
    def end(self) -> int:
        return self.origin + len(self.frames)

    def add(self, first: int, raw: np.ndarray) -> None:
        """A window's unscaled frames: the new ones extend the buffer; after a gap (a window the
        windower rejected, or the worker dropped) the buffer starts again and stranded rows go."""
        if not len(self.frames) or first > self.end:
            self.origin, self.frames = first, raw
            self.rows = [r for r in self.rows if r.done == first]  # the others cannot cross the gap
            return
        new = raw[self.end - first :]
        if len(new):
            self.frames = np.concatenate([self.frames, new])

    def trim(self, opened_frame: int) -> None:
        keep = min([r.done for r in self.rows] + [opened_frame, self.end])
        if keep > self.origin:
            self.frames, self.origin = self.frames[keep - self.origin :], keep


class LockstepBackend:
    """``embed_windows(windows)`` with rows advanced together; ``embed(feats)`` the whole-window
    path (enrollment, tests, and windows no row serves)."""

    def __init__(self, exact: Any, step: Step, grid: Grid, *, frame_shift: int, num_frames: Callable[[int], int],
                 layers: int, hidden: int) -> None:
        self.exact = exact
        self._step: Step | None = step
        self._grid = grid
        self._shift = frame_shift
        self._num_frames = num_frames
        self._layers, self._hidden = layers, hidden
        self._region: _Region | None = None
        self._unscaled = 1.0
        self.name = f"{exact.name}, lockstep"
        self.counters = {"rows": 0, "steps": 0, "row_steps": 0, "passes": 0, "lockstep_windows": 0, "exact_windows": 0}
        """``row_steps / steps``: how many rows a step advanced on average (the batch the LSTM saw)."""

    def embed(self, feats: np.ndarray) -> np.ndarray:
        return self.exact.embed(feats)

    def reset(self) -> None:
        """Forget the region in progress (a new stream)."""
        self._region, self._unscaled = None, 1.0

    def close(self) -> None:
        self.exact.close()
        self._step = None

    def embed_windows(self, windows: Sequence[Window]) -> np.ndarray:
        """Embeddings of ``windows`` (stream order), L2-normalised, (len, D)."""
        if self._step is None:
            raise BackendError("lockstep backend is closed")
        out: list[np.ndarray | None] = [None] * len(windows)
        if len(windows) >= BACKLOG:
            self._region = None
            return self._whole(windows, out)
        run: list[int] = []
        for i, w in enumerate(windows):
            if self._region is None or w.region_start != self._region.start:
                self._advance(windows, run, out)
                run = []
                self._region = _Region(start=w.region_start)
            run.append(i)
            self._unscaled += UNSCALED_WEIGHT * (float(w.gain_db == 0.0) - self._unscaled)
        self._advance(windows, run, out)
        return self._whole(windows, out)

    def _whole(self, windows: Sequence[Window], out: list[np.ndarray | None]) -> np.ndarray:
        """The windows no row served, embedded whole in one batch per length; then all of them."""
        alone = [i for i, e in enumerate(out) if e is None]
        for n in sorted({windows[i].num_frames for i in alone}):
            members = [i for i in alone if windows[i].num_frames == n]
            for i, e in zip(members, self.exact.embed(np.stack([windows[i].feats for i in members])), strict=True):
                out[i] = e
        self.counters["exact_windows"] += len(alone)
        self.counters["lockstep_windows"] += len(windows) - len(alone)
        return np.stack([e for e in out if e is not None])

    # -- rows --------------------------------------------------------------------------------------

    def _advance(self, windows: Sequence[Window], run: list[int], out: list[np.ndarray | None]) -> None:
        """Feed the run's frames (one region) to the rows, open rows for the grid starts they reach,
        run every row to the newest frame, and take each unscaled window's embedding from its row."""
        region = self._region
        if region is None or not run:
            return
        spans = [(i, (windows[i].start - windows[i].region_start) // self._shift) for i in run]
        for i, first in spans:
            region.add(first, _unscaled(windows[i]))
        self._open(region)
        self._run_rows(region)
        for i, first in spans:
            kept = region.kept.pop((first, first + windows[i].num_frames), None)
            if kept is not None and windows[i].gain_db == 0.0:
                out[i] = kept
        newest = max(first + windows[i].num_frames for i, first in spans)
        region.kept = {k: e for k, e in region.kept.items() if k[1] >= newest}  # windows never made
        region.rows = [r for r in region.rows if r.done < r.last]
        region.trim(region.opened // self._shift)

    def _open(self, region: _Region) -> None:
        """Rows for the grid starts whose first frame has arrived (while rows pay)."""
        reach = (region.end - 1) * self._shift + 1  # a start at or before this sample has its first frame
        if reach <= region.opened:
            return
        starts = self._grid(region.opened, reach)
        region.opened = reach
        if self._unscaled < MIN_UNSCALED:
            return
        for start, lengths in sorted(starts.items()):
            first = start // self._shift
            if first < region.origin:
                continue
            stops = tuple(sorted({first + self._num_frames(n) for n in lengths}))
            zeros = np.zeros((self._layers, self._hidden), dtype=np.float32)
            region.rows.append(_Row(first=first, stops=stops, h=zeros, c=zeros.copy(), done=first))
            self.counters["rows"] += 1

    def _run_rows(self, region: _Region) -> None:
        """Advance every row to the newest frame (or its last stop), in passes of rows that stand
        at the same frame; a row that starts later joins the others once they reach it."""
        assert self._step is not None
        while True:
            live = [r for r in region.rows if r.done < min(region.end, r.last)]
            if not live:
                return
            lo = min(r.done for r in live)
            group = [r for r in live if r.done == lo]
            hi = min([r.done for r in live if r.done > lo] + [region.end] + [r.last for r in group])
            x = region.frames[lo - region.origin : hi - region.origin]
            batch = np.ascontiguousarray(np.broadcast_to(x[:, None, :], (len(x), len(group), x.shape[1])), dtype=np.float32)
            h = np.stack([r.h for r in group], axis=1)
            c = np.stack([r.c for r in group], axis=1)
            picks = [((stop - 1 - lo) * len(group) + b, r, stop) for b, r in enumerate(group) for stop in r.stops if lo < stop <= hi]
            h, c, embs = self._step(batch, h, c, np.array([p for p, _, _ in picks], dtype=np.int64))
            for b, r in enumerate(group):
                r.h, r.c, r.done = h[:, b], c[:, b], hi
            for (_, r, stop), e in zip(picks, embs, strict=True):
                region.kept[(r.first, stop)] = e
            self.counters["passes"] += 1
            self.counters["steps"] += hi - lo
            self.counters["row_steps"] += (hi - lo) * len(group)


def _unscaled(w: Window) -> np.ndarray:
    """The window's frames before its gain (mel power scales by g^2: ``features.finish_gained``)."""
    if w.gain_db == 0.0:
        return w.feats
    return (w.feats / np.float32(10.0 ** (w.gain_db / 10.0))).astype(np.float32)


class OnnxLockstepBackend(LockstepBackend):
    """The lockstep rows on ONNX Runtime: a streaming graph on one thread (its batches are the few
    windows in flight), and the whole-window file of the same precision for the whole-window path:
    ``model.onnx`` with ``model.stream.onnx`` (exact), or the INT8 pair. INT8 rows are not exact:
    ONNX Runtime quantises each step's activations over the rows in that step, so an INT8 embedding
    depends slightly on its row-mates, as it does on its batch-mates in the whole-window path."""

    def __init__(self, bundle: ModelBundle, grid: Grid, *, threads: int = 0, artifact: str = "onnx",
                 stream: str = STREAM_ARTIFACT) -> None:
        exact = OnnxBackend(bundle, threads=threads, artifact=artifact)
        session = make_session(bundle.require_artifact(stream), 1)
        shape = session.get_inputs()[1].shape
        layers, hidden = int(shape[0]), int(shape[2])

        def step(x: np.ndarray, h: np.ndarray, c: np.ndarray, pick: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            h_out, c_out, embs = session.run(None, {"x": x, "h": h, "c": c, "pick": pick})
            return np.asarray(h_out), np.asarray(c_out), np.asarray(embs)

        rate = bundle.sample_rate
        super().__init__(exact, step, grid, frame_shift=int(rate * bundle.features.frame_shift_ms / 1000),
                         num_frames=lambda n: bundle.features.num_frames(n, rate), layers=layers, hidden=hidden)
        logger.info("GE2E windows in lockstep (%s)", bundle.artifacts.get(stream, stream))
