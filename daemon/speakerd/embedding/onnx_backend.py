"""ONNX Runtime backend: the fallback everywhere and the only backend off macOS."""

from __future__ import annotations

import logging
import os

import numpy as np

from ..bundle import ModelBundle
from .backend import BackendError, l2_normalise

logger = logging.getLogger(__name__)

AUTO_THREADS_MAX = 2
"""Intra-op threads when the setting is 0: batches of 8 LSTM windows ran 2.2 ms/window on 2 threads
against 4.1 on one (idle 2-core machine); more threads than that only add synchronisation."""


class OnnxBackend:
    """One InferenceSession, created once with explicit thread settings."""

    def __init__(self, bundle: ModelBundle, *, threads: int = 0) -> None:
        import onnxruntime as ort

        path = bundle.require_artifact("onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads if threads > 0 else min(AUTO_THREADS_MAX, os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        # A background service must not burn a core between windows: spinning threads cost twice
        # the CPU per window at batch 1 and slowed the other stages on a busy 2-core machine.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise BackendError(f"cannot load {path}: {exc}") from exc
        self._input = bundle.io.get("input", "feats")
        self._output = bundle.io.get("output", "embs")
        self.name = "onnx"
        self.threads = opts.intra_op_num_threads
        logger.info("ONNX Runtime session for %s (%d threads)", path.name, self.threads)

    def embed(self, feats: np.ndarray) -> np.ndarray:
        if feats.ndim != 3:
            raise BackendError(f"expected (batch, frames, bins), got shape {feats.shape}")
        (out,) = self._session.run([self._output], {self._input: np.ascontiguousarray(feats, dtype=np.float32)})
        return l2_normalise(np.asarray(out).reshape(len(feats), -1))

    def close(self) -> None:
        self._session = None
