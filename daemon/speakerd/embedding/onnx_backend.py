"""ONNX Runtime backend: the fallback everywhere and the only backend off macOS."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import ModelBundle
from .backend import BackendError, l2_normalise

logger = logging.getLogger(__name__)

AUTO_THREADS_MAX = 2
"""Intra-op threads when the setting is 0: batches of 8 LSTM windows ran 1.3 ms/window on 2 threads
against 2.5 on one (idle 2-core machine); more threads than that only add synchronisation."""
SMALL_BATCH = 2
"""Batches up to this size run on a one-thread session. A single GE2E window of 1.5 s cost 9.2 ms of
CPU (6.8 ms wall) on 2 threads and 5.4 ms (5.4 ms wall) on one: live audio sends windows one by one,
and a second thread only added wake-ups."""


def make_session(path: Path, threads: int) -> Any:
    """An InferenceSession with explicit thread settings and no spinning."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # A background service must not burn a core between windows: spinning threads cost twice
    # the CPU per window at batch 1 and slowed the other stages on a busy 2-core machine.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise BackendError(f"cannot load {path}: {exc}") from exc


class OnnxBackend:
    """Sessions created once: one with ``threads`` for batches, one single-threaded for small ones.

    ``artifact``: which ONNX file of the bundle (``onnx``, or ``onnx_int8`` for the quantised one).
    """

    def __init__(self, bundle: ModelBundle, *, threads: int = 0, artifact: str = "onnx") -> None:
        path = bundle.require_artifact(artifact)
        self.threads = threads if threads > 0 else min(AUTO_THREADS_MAX, os.cpu_count() or 1)
        self._session = make_session(path, self.threads)
        self._small = self._session if self.threads == 1 else make_session(path, 1)
        self._input = bundle.io.get("input", "feats")
        self._output = bundle.io.get("output", "embs")
        self.name = "onnx" if artifact == "onnx" else f"onnx ({artifact})"
        logger.info("ONNX Runtime session for %s (%d threads; batches of %d or fewer on one)", path.name, self.threads, SMALL_BATCH)

    def embed(self, feats: np.ndarray) -> np.ndarray:
        if feats.ndim != 3:
            raise BackendError(f"expected (batch, frames, bins), got shape {feats.shape}")
        if self._session is None:
            raise BackendError("ONNX backend is closed")
        session = self._small if len(feats) <= SMALL_BATCH else self._session
        (out,) = session.run([self._output], {self._input: np.ascontiguousarray(feats, dtype=np.float32)})
        return l2_normalise(np.asarray(out).reshape(len(feats), -1))

    def close(self) -> None:
        self._session = None
        self._small = None
