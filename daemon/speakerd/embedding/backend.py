"""The one interface every embedding backend implements, and the choice between them."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..bundle import FeatureRecipe, ModelBundle

if TYPE_CHECKING:
    from ..windows import WindowSettings

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


class WindowLengths(Protocol):
    """The part of ``speakerd.windows.WindowSettings`` that decides window lengths."""

    @property
    def length_s(self) -> float: ...

    @property
    def first_length_s(self) -> float: ...

    def probe_lengths(self) -> tuple[float, ...]: ...


def window_frame_counts(windows: WindowLengths, recipe: FeatureRecipe, sample_rate: int = 16000) -> tuple[int, ...]:
    """Frame counts of the windows ``SpeechWindower`` makes with these settings, sorted, distinct.

    A region's first window is ``first_length_s`` long, the others (and the tail window) either
    ``length_s`` or ``first_length_s``, and probes ``WindowSettings.probe_lengths()``; so 53, 78, 98,
    103 and 148 frames for the defaults (probes 0.55 / 0.8 / 1.05 s, windows 1.0 / 1.5 s) under a 25 / 10 ms
    recipe with snip_edges. Fixed-shape backends (CoreML) must serve exactly these.
    """
    lengths = (windows.first_length_s, windows.length_s, *windows.probe_lengths())
    counts = {recipe.num_frames(int(round(s * sample_rate)), sample_rate) for s in lengths}
    return tuple(sorted(counts))


def l2_normalise(embs: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embs, axis=1, keepdims=True)
    return (embs / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def create_backend(
    bundle: ModelBundle,
    kind: str = "auto",
    *,
    threads: int = 0,
    coreml_compute_units: str = "ALL",
    window_frames: Sequence[int] | None = None,
    precision: str = "fp32",
    trunk: str = "per_window",
    grid: Grid | None = None,
) -> EmbeddingBackend:
    """``auto`` takes CoreML on macOS when the bundle has a package, else ONNX Runtime.

    ``window_frames``: the frame counts the caller will embed (:func:`window_frame_counts`). CoreML
    packages have fixed shapes, so the backend is created only if it serves every one of them; ``None``
    requires the bundle's own ``window_frames``. ONNX takes any length and ignores it.
    A CoreML failure under ``auto`` (including unserved lengths) falls back to ONNX and logs why;
    asked for by name, it is an error. ``precision`` picks the ONNX file (:func:`onnx_artifact`);
    ``trunk`` "shared" runs a bundle's ResNet trunk once per stretch of speech (embedding/trunk.py)
    when the bundle has one: on CoreML with the bundle's chunk packages, else on ONNX Runtime; for
    a bundle with a streaming LSTM graph (GE2E) and the windower's ``grid``, "shared" advances the
    windows of a region together on ONNX Runtime (embedding/lockstep.py; exact in FP32), in the
    precision of the whole-window file.
    """
    if kind not in BACKENDS:
        raise BackendError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    want_coreml = kind == "coreml" or (
        kind == "auto" and sys.platform == "darwin" and bundle.artifact("coreml") is not None
    )
    if want_coreml:
        try:
            from .coreml_backend import CoreMLBackend, shared_coreml_backend

            if trunk == "shared" and bundle.artifact("coreml_trunk") is not None:
                return shared_coreml_backend(bundle, compute_units=coreml_compute_units, window_frames=window_frames)
            return CoreMLBackend(bundle, compute_units=coreml_compute_units, window_frames=window_frames)
        except Exception as exc:  # noqa: BLE001 - any CoreML failure means: use the fallback
            if kind == "coreml":
                raise BackendError(f"CoreML backend unavailable: {exc}") from exc
            logger.warning("CoreML unavailable (%s); falling back to ONNX Runtime", exc)
    from .onnx_backend import OnnxBackend

    artifact = onnx_artifact(bundle, precision)
    if trunk == "shared" and bundle.artifact("onnx_trunk") is not None:
        from .trunk import SharedTrunkBackend

        return SharedTrunkBackend(bundle, threads=threads, precision_artifact=artifact)
    stream = STREAM_OF.get(artifact)
    if trunk == "shared" and grid is not None and stream is not None and bundle.artifact(stream) is not None:
        from .lockstep import OnnxLockstepBackend

        return OnnxLockstepBackend(bundle, grid, threads=threads, artifact=artifact, stream=stream)
    return OnnxBackend(bundle, threads=threads, artifact=artifact)


INT8_ARTIFACT = "onnx_int8"
MIN_INT8_AGREEMENT = 0.99
"""Worst cosine to FP32 on real speech for ``precision = "auto"`` to take a bundle's INT8 file."""


def onnx_artifact(bundle: ModelBundle, precision: str) -> str:
    """The bundle's ONNX artifact for ``precision``: ``int8`` requires the INT8 file; ``auto`` takes
    it only when its recorded agreement with FP32 holds (models/wespeaker/quantize.py,
    models/ge2e_int8.py and models/ecapa_int8.py record it) and the record does not say ``"auto": false`` (a bundle whose
    INT8 embeddings agree but move its decisions, as GE2E's do)."""
    if precision == "fp32":
        return "onnx"
    has_int8 = bundle.artifact(INT8_ARTIFACT) is not None
    if precision == "int8":
        if not has_int8:
            raise BackendError(
                f"model {bundle.name!r} has no INT8 file; build one (`speakerd models build {bundle.name}` for a "
                f"built-in model, with the LibriSpeech clips beside it, or `speakerd models convert wespeaker "
                f"--checkpoint PATH --int8 LIBRISPEECH_DIR`) or set embedding.precision = \"fp32\""
            )
        return INT8_ARTIFACT
    record = bundle.source.get("int8") if isinstance(bundle.source, dict) else None
    worst = float(record.get("min_cosine", 0.0)) if isinstance(record, dict) else 0.0
    if has_int8 and isinstance(record, dict) and record.get("auto") is False:
        logger.info("model %s: INT8 file not taken by precision auto (%s); embedding.precision = \"int8\" uses it",
                    bundle.name, record.get("why", "its manifest says so"))
        return "onnx"
    if has_int8 and worst >= MIN_INT8_AGREEMENT:
        return INT8_ARTIFACT
    if has_int8:
        logger.warning("model %s: INT8 file agreed with FP32 only to cosine %.4f (< %.2f); using FP32", bundle.name, worst, MIN_INT8_AGREEMENT)
    return "onnx"


STREAM_ARTIFACT = "onnx_stream"
"""A GE2E bundle's streaming LSTM graph (models/ge2e_stream.py), for embedding/lockstep.py."""
STREAM_INT8_ARTIFACT = "onnx_stream_int8"
"""The same graph quantised as the INT8 file is (models/ge2e_stream.py)."""
STREAM_OF = {"onnx": STREAM_ARTIFACT, INT8_ARTIFACT: STREAM_INT8_ARTIFACT}
"""The streaming graph that runs rows of the same precision as each whole-window file."""
Grid = Callable[[int, int], dict[int, tuple[int, ...]]]
"""``(begin, end)`` samples from a region start -> the windower's grid windows starting there
(``windows.grid_windows``)."""


class EmbeddingChoice(Protocol):
    """The embedding settings a backend is made from (``EmbeddingSettings``)."""

    backend: str
    threads: int
    coreml_compute_units: str
    precision: str
    trunk: str


def windows_for(bundle: ModelBundle, windows: WindowSettings) -> WindowSettings:
    """``windows`` with ``probe_align = "auto"`` decided for this model: probes begin on regular
    window starts where the bundle has a streaming graph (its rows then serve them), and are
    ``probe_length_s`` long where every window is embedded whole (longer probes only cost there)."""
    if windows.probe_align != "auto":
        return windows
    return dataclasses.replace(windows, probe_align="on" if STREAM_ARTIFACT in bundle.artifacts else "off")


def backend_for(bundle: ModelBundle, embedding: EmbeddingChoice, windows: WindowLengths) -> EmbeddingBackend:
    """The backend the settings ask for, checked against the windows the daemon will feed it."""
    from ..windows import WindowSettings, grid_windows

    grid = None
    if isinstance(windows, WindowSettings):  # the windower's own settings: its probes and grids are known
        windows = windows_for(bundle, windows)
        grid = functools.partial(grid_windows, windows)
    return create_backend(
        bundle,
        embedding.backend,
        threads=embedding.threads,
        coreml_compute_units=embedding.coreml_compute_units,
        window_frames=window_frame_counts(windows, bundle.features, bundle.sample_rate),
        precision=embedding.precision,
        trunk=embedding.trunk,
        grid=grid,
    )
