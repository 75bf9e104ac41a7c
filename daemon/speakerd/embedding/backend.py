"""The one interface every embedding backend implements, and the choice between them."""

from __future__ import annotations

import logging
import sys
from typing import Protocol

import numpy as np

from ..bundle import ModelBundle

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "coreml")


class BackendError(Exception):
    """A backend cannot be created or failed on an input."""


class EmbeddingBackend(Protocol):
    """Features (batch, frames, bins) float32 -> L2-normalised embeddings (batch, dim) float32.

    Every window in one call has the same number of frames; the worker groups them so.
    """

    name: str

    def embed(self, feats: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def l2_normalise(embs: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embs, axis=1, keepdims=True)
    return (embs / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def create_backend(
    bundle: ModelBundle,
    kind: str = "auto",
    *,
    threads: int = 0,
    coreml_compute_units: str = "ALL",
) -> EmbeddingBackend:
    """``auto`` takes CoreML on macOS when the bundle has a package, else ONNX Runtime.

    A CoreML failure under ``auto`` falls back to ONNX and says why; asked for by name, it is an error.
    """
    if kind not in BACKENDS:
        raise BackendError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    want_coreml = kind == "coreml" or (
        kind == "auto" and sys.platform == "darwin" and bundle.artifact("coreml") is not None
    )
    if want_coreml:
        try:
            from .coreml_backend import CoreMLBackend

            return CoreMLBackend(bundle, compute_units=coreml_compute_units)
        except Exception as exc:  # noqa: BLE001 - any CoreML failure means: use the fallback
            if kind == "coreml":
                raise BackendError(f"CoreML backend unavailable: {exc}") from exc
            logger.warning("CoreML unavailable (%s); falling back to ONNX Runtime", exc)
    from .onnx_backend import OnnxBackend

    return OnnxBackend(bundle, threads=threads)
