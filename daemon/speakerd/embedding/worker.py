"""The embedding worker: one thread, one bounded queue, batches when a backlog forms.

Speech boundaries travel through the same queue as windows, so whatever consumes the worker's
output sees windows and boundaries in stream order without any extra bookkeeping.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import check
from ..windows import Window

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingSettings:
    model: str = "ge2e-resemblyzer"
    """A bundle name under models/ or a bundle directory."""
    backend: str = "auto"
    """auto (CoreML on macOS when the bundle has a package, else ONNX Runtime), onnx or coreml."""
    threads: int = 0
    """ONNX Runtime intra-op threads; 0 chooses (up to 2, see onnx_backend.AUTO_THREADS_MAX)."""
    batch_max: int = 32
    """Most windows taken from a backlog at once; they are embedded in one call per window length.
    A 180 s file ran in 2.7 s of CPU at 32 against 3.3-3.9 s at 8 (windows and probes of four
    lengths share each batch, and a batch of 8 windows is where the LSTM's cost per window stops
    falling)."""
    queue_windows: int = 64
    """Bound of the worker's queue; live audio drops the oldest windows past it."""
    coreml_compute_units: str = "ALL"
    precision: str = "auto"
    """ONNX Runtime only. auto: the bundle's INT8 file when it has one whose embeddings agreed with
    FP32 (worst cosine >= 0.99 on real speech, recorded when it was built) and whose manifest lets
    auto take it, else FP32; fp32; int8. GE2E's INT8 file halves the live CPU but moves decisions,
    so only int8 takes it (models/ge2e_int8.py)."""

    trunk: str = "shared"
    """shared: a bundle with a ResNet trunk (WeSpeaker ResNet34) runs it once per stretch of speech and
    pools each window's slice (embedding/trunk.py); GE2E (FP32 ONNX Runtime) advances the windows
    of a region through its LSTM together (embedding/lockstep.py, exact); per_window: the whole
    network per window."""

    def __post_init__(self) -> None:
        check(self.trunk in ("shared", "per_window"), "embedding.trunk", self.trunk, "must be shared or per_window")
        check(self.backend in ("auto", "onnx", "coreml"), "embedding.backend", self.backend, "must be auto, onnx or coreml")
        check(self.precision in ("auto", "fp32", "int8"), "embedding.precision", self.precision, "must be auto, fp32 or int8")
        check(0 <= self.threads <= 64, "embedding.threads", self.threads, "must be within 0 to 64")
        check(1 <= self.batch_max <= 256, "embedding.batch_max", self.batch_max, "must be within 1 to 256")
        check(self.queue_windows >= self.batch_max, "embedding.queue_windows", self.queue_windows, "must be at least batch_max")
        check(
            self.coreml_compute_units in ("ALL", "CPU_AND_NE", "CPU_ONLY", "CPU_AND_GPU"),
            "embedding.coreml_compute_units",
            self.coreml_compute_units,
            "must be ALL, CPU_AND_NE, CPU_ONLY or CPU_AND_GPU",
        )


@dataclass(frozen=True)
class EmbeddedWindow:
    window: Window
    embedding: np.ndarray


_STOP = object()


class EmbeddingWorker:
    """``submit(item)`` windows and markers; ``on_output`` receives them embedded, in order, on the worker thread.

    With ``drop_oldest`` (live audio) a full queue drops its oldest window and counts it, so capture
    never waits on inference; without it (files) ``submit`` waits, so nothing is lost.
    """

    def __init__(
        self,
        embed: Callable[[np.ndarray], np.ndarray],
        on_output: Callable[[Sequence[Any]], None],
        *,
        batch_max: int = 32,
        queue_windows: int = 64,
        drop_oldest: bool = True,
        embed_windows: Callable[[Sequence[Window]], np.ndarray] | None = None,
    ) -> None:
        self._embed = embed
        self._embed_windows = embed_windows
        """A backend that embeds windows by their place in the stream (the shared ResNet trunk)
        takes the whole run in one call, in order."""
        self._on_output = on_output
        self._batch_max = batch_max
        self._capacity = queue_windows
        self._drop_oldest = drop_oldest
        self._items: deque[Any] = deque()
        self._windows_queued = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.counters = {"embedded": 0, "batches": 0, "dropped_windows": 0, "embed_errors": 0}
        self._logged_errors: set[str] = set()

    # -- producer side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="speakerd-embed", daemon=False)
        self._thread.start()

    def submit(self, item: Any) -> None:
        with self._cond:
            if isinstance(item, Window):
                while self._windows_queued >= self._capacity:
                    if self._drop_oldest:
                        self._drop_one()
                    else:
                        self._cond.wait()
                self._windows_queued += 1
            self._items.append(item)
            self._cond.notify_all()

    def queue_depth(self) -> int:
        with self._cond:
            return self._windows_queued

    def close(self, timeout: float = 10.0) -> bool:
        """Embed what is queued (bounded by ``timeout``), then stop. True if everything drained."""
        if self._thread is None:
            return True
        with self._cond:
            self._items.append(_STOP)
            self._cond.notify_all()
        self._thread.join(timeout)
        drained = not self._thread.is_alive()
        if not drained:
            logger.warning("embedding worker did not drain within %.1f s; dropping the rest", timeout)
            with self._cond:
                self._items.clear()
                self._items.append(_STOP)
                self._cond.notify_all()
            self._thread.join(5.0)
        self._thread = None
        return drained

    def _drop_one(self) -> None:
        for i, queued in enumerate(self._items):
            if isinstance(queued, Window):
                del self._items[i]
                self._windows_queued -= 1
                self.counters["dropped_windows"] += 1
                return

    # -- worker thread ---------------------------------------------------------------------------

    def _take(self) -> list[Any]:
        """The next marker alone, or a run of up to ``batch_max`` windows of any lengths.

        Regular windows and probes alternate in the stream, so a run of one length was mostly a
        single window; :meth:`_embed_run` groups the run by length instead, one call per length.
        """
        with self._cond:
            while not self._items:
                self._cond.wait()
            head = self._items[0]
            if not isinstance(head, Window):
                return [self._items.popleft()]
            run: list[Window] = []
            while (
                self._items
                and isinstance(self._items[0], Window)
                and len(run) < self._batch_max
            ):
                run.append(self._items.popleft())
            self._windows_queued -= len(run)
            self._cond.notify_all()
            return run

    def _run(self) -> None:
        while True:
            items = self._take()
            if items[0] is _STOP:
                return
            if isinstance(items[0], Window):
                outputs: Sequence[Any] = self._embed_run(items)
            else:
                outputs = items
            if outputs:
                try:
                    self._on_output(outputs)
                except Exception:  # noqa: BLE001 - a consumer bug must not kill the worker thread
                    logger.exception("window consumer failed")

    def _embed_run(self, windows: list[Window]) -> list[EmbeddedWindow]:
        """One backend call per window length in the run; the outputs keep the run's order.

        A window whose length group fails is lost (counted); the other groups still go out.
        """
        if self._embed_windows is not None:
            embs = self._embed_group(windows, self._embed_windows)
            return [] if embs is None else [EmbeddedWindow(w, e) for w, e in zip(windows, embs, strict=True)]
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(windows):
            groups.setdefault(w.num_frames, []).append(i)
        embs: list[np.ndarray | None] = [None] * len(windows)
        for members in groups.values():
            batch = self._embed_group([windows[i] for i in members])
            if batch is not None:
                for i, e in zip(members, batch, strict=True):
                    embs[i] = e
        return [EmbeddedWindow(w, e) for w, e in zip(windows, embs, strict=True) if e is not None]

    def _embed_group(self, windows: list[Window], by_window: Callable[[Sequence[Window]], np.ndarray] | None = None) -> np.ndarray | None:
        try:
            embs = np.asarray(by_window(windows) if by_window is not None else self._embed(np.stack([w.feats for w in windows])))
            if embs.ndim != 2 or len(embs) != len(windows):
                raise ValueError(f"embed returned shape {embs.shape} for {len(windows)} window(s)")
        except Exception as exc:  # noqa: BLE001 - a backend failure costs these windows, not the daemon
            self.counters["embed_errors"] += len(windows)
            kind = type(exc).__name__
            if kind not in self._logged_errors:
                self._logged_errors.add(kind)
                logger.error("embedding failed on %d window(s): %s (further %s errors are counted, not logged)", len(windows), exc, kind)
            return None
        self.counters["embedded"] += len(windows)
        self.counters["batches"] += 1
        return embs
