"""CoreML backend (macOS): the bundle's ``.mlpackage`` files on the Neural Engine through coremltools.

Each package is compiled to ``.mlmodelc`` once and kept in a cache keyed by the package's content
hash: compiling (the ANE compiler especially) can take long, and a launchd restart must not pay it
again. CoreML is loaded directly, not through ONNX Runtime's CoreML provider, which has failed
inside non-GUI launchd processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..bundle import ModelBundle
from ..errors import ConfigError
from .backend import BackendError, l2_normalise
from .trunk import SharedTrunk

logger = logging.getLogger(__name__)

COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_ONLY", "CPU_AND_GPU")
"""coremltools.ComputeUnit names accepted for ``coreml_compute_units``."""
CACHE_SUBDIR = "coreml"


def parse_compute_units(value: str) -> str:
    """Validate a compute-units setting; a bad value is a ConfigError naming it."""
    name = str(value).strip().upper()
    if name not in COMPUTE_UNITS:
        raise ConfigError("coreml_compute_units", value, f"choose one of {', '.join(COMPUTE_UNITS)}")
    return name


def default_cache_dir() -> Path:
    """~/Library/Caches/speakerd/coreml on macOS, $XDG_CACHE_HOME/speakerd/coreml elsewhere."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "speakerd" / CACHE_SUBDIR
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "speakerd" / CACHE_SUBDIR


def package_digest(package: Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 over every file of the package (relative path, size, bytes), in a fixed order.

    Keyed by content, not mtime or path: a rebuilt package with other weights compiles afresh, a
    copied or touched one does not.
    """
    digest = hashlib.sha256()
    files = sorted(p for p in package.rglob("*") if p.is_file())
    if not files:
        raise BackendError(f"{package} is empty or not a package directory")
    for path in files:
        rel = path.relative_to(package).as_posix()
        digest.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as fh:
            while block := fh.read(chunk_bytes):
                digest.update(block)
    return digest.hexdigest()


def compiled_model_path(package: Path, cache_dir: Path, ct: Any) -> Path:
    """The cached ``.mlmodelc`` for ``package``, compiling it first if the cache has none.

    Compiles into a private staging folder and renames it into place, so a crash mid-compile or two
    processes starting at once never leave (or load) a half-written model.
    """
    key = package_digest(package)[:32]
    target = cache_dir / f"{package.stem}-{key}.mlmodelc"
    if target.is_dir():
        logger.info("CoreML: using cached compiled model %s", target)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".compile-", dir=cache_dir))
    try:
        started = time.monotonic()
        logger.info("CoreML: compiling %s (once; cached in %s)", package.name, cache_dir)
        compiled = Path(ct.models.utils.compile_model(str(package), str(staging / target.name)))
        try:
            os.rename(compiled, target)
        except OSError:
            if not target.is_dir():
                raise
            logger.info("CoreML: another process compiled %s first", target.name)
        logger.info("CoreML: compiled in %.1f s", time.monotonic() - started)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _import_coremltools() -> ModuleType:
    if sys.platform != "darwin":
        raise BackendError(f"CoreML needs macOS (this is {sys.platform}); use the ONNX backend")
    try:
        import coremltools
    except ImportError as exc:
        raise BackendError("coremltools is not installed: pip install 'speakerd[coreml]'") from exc
    return coremltools


def load_compiled(package: Path, cache_dir: Path, ct: Any, compute_units: str) -> Any:
    """``package`` compiled (cached, :func:`compiled_model_path`) and loaded with ``compute_units``."""
    compiled = compiled_model_path(package, cache_dir, ct)
    try:
        return ct.models.CompiledMLModel(str(compiled), compute_units=getattr(ct.ComputeUnit, compute_units))
    except Exception as exc:  # noqa: BLE001 - CoreML raises several unrelated types
        raise BackendError(f"cannot load {compiled}: {exc}") from exc


class CoreMLBackend:
    """The bundle's CoreML packages, each compiled once and loaded once with the configured compute
    units; every window length warmed up; each batch routed to the package serving its length.

    Both layouts of :mod:`speakerd.coreml.layout` load: one package enumerating several lengths
    (ResNet34) or a directory of one fixed-shape package per length (GE2E). ``window_frames`` are
    the lengths the daemon will send (see :func:`speakerd.embedding.backend.window_frame_counts`);
    every one must be served, else BackendError at creation, so ``auto`` can fall back to ONNX
    instead of failing per window. ``None`` requires the bundle's own ``window_frames``.
    ``coremltools_module`` lets tests inject a stand-in for the parts that need macOS.
    """

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        compute_units: str = "ALL",
        cache_dir: Path | None = None,
        coremltools_module: Any = None,
        window_frames: Sequence[int] | None = None,
    ) -> None:
        self.compute_units = parse_compute_units(compute_units)
        ct = coremltools_module if coremltools_module is not None else _import_coremltools()
        artifact = bundle.require_artifact("coreml")
        self._input = bundle.io.get("input", "feats")
        self._output = bundle.io.get("output", "embs")
        self.feat_dim = bundle.features.num_mel_bins
        self.embedding_dim = bundle.embedding_dim
        self.name = "coreml"

        from ..coreml.check import CheckError
        from ..coreml.layout import read_package_set
        from ..coreml.mil_exec import MilError

        try:
            served = read_package_set(
                artifact,
                input_name=self._input,
                output_name=self._output,
                feat_dim=self.feat_dim,
                embedding_dim=self.embedding_dim,
            )
        except (CheckError, MilError) as exc:
            raise BackendError(f"CoreML model of bundle {bundle.name!r} is unusable: {exc}") from exc
        needed = tuple(int(f) for f in (bundle.window_frames if window_frames is None else window_frames))
        missing = sorted(set(needed) - set(served.window_frames))
        if missing:
            raise BackendError(
                f"windows of {missing} frames are not served by the CoreML model of bundle {bundle.name!r} "
                f"({artifact.name} serves {list(served.window_frames)} frames); rebuild it for these "
                f"windows (`speakerd models build {bundle.name}`) or use the ONNX backend"
            )
        # load only the packages the daemon will use; with nothing asked for, all of them
        wanted = [p for p, frames in served.packages.items() if not needed or set(frames) & set(needed)]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._models: dict[int, Any] = {}
        self.ct = ct
        for package in wanted:
            model = load_compiled(package, self.cache_dir, ct, self.compute_units)
            for frames in served.packages[package]:
                self._models[frames] = model
        self.window_frames: tuple[int, ...] = tuple(sorted(self._models))
        self.packages = {f: served.package_for(f) for f in self.window_frames}
        self._warm_up()
        logger.info(
            "CoreML model %s (%s layout, %d package(s), compute units %s, windows %s frames)",
            artifact.name, served.layout, len(wanted), self.compute_units, list(self.window_frames),
        )  # fmt: skip

    def _warm_up(self) -> None:
        """One prediction per window length, so the first real window does not pay the device
        set-up (each shape and each package is specialised separately)."""
        for frames in self.window_frames:
            started = time.monotonic()
            self._predict(np.zeros((1, frames, self.feat_dim), dtype=np.float32))
            logger.info("CoreML warm-up, %d frames: %.1f ms", frames, 1000 * (time.monotonic() - started))

    def _predict(self, feats: np.ndarray) -> np.ndarray:
        model = self._models[feats.shape[1]]
        batch = [{self._input: np.ascontiguousarray(feats[i : i + 1], dtype=np.float32)} for i in range(len(feats))]
        results = model.predict(batch)
        if len(results) != len(batch):
            raise BackendError(f"CoreML returned {len(results)} results for {len(batch)} windows")
        return np.stack([np.asarray(r[self._output], dtype=np.float32).reshape(-1) for r in results])

    def embed(self, feats: np.ndarray) -> np.ndarray:
        """(B, T, F) -> L2-normalised (B, D); T must be one of the served window lengths."""
        if feats.ndim != 3:
            raise BackendError(f"expected (batch, frames, bins), got shape {feats.shape}")
        if not self._models:
            raise BackendError("CoreML backend is closed")
        _, frames, bins = feats.shape
        if frames not in self._models:
            raise BackendError(
                f"window of {frames} frames: the CoreML model serves only {list(self.window_frames)} frames"
            )
        if bins != self.feat_dim:
            raise BackendError(f"window has {bins} bins, the model takes {self.feat_dim}")
        if len(feats) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return l2_normalise(self._predict(feats))

    def close(self) -> None:
        self._models = {}


def shared_coreml_backend(
    bundle: ModelBundle,
    *,
    compute_units: str = "ALL",
    cache_dir: Path | None = None,
    coremltools_module: Any = None,
    window_frames: Sequence[int] | None = None,
) -> SharedTrunk:
    """``embedding.trunk = "shared"`` on CoreML: :class:`speakerd.embedding.trunk.SharedTrunk` with
    the bundle's chunk package as the trunk (each pass padded to an enumerated length and masked,
    :func:`speakerd.embedding.trunk.pad_chunk`), its head package as ``seg_1``, and
    :class:`CoreMLBackend` as the exact per-window path. Every package is read (I/O only) before
    anything is compiled; a chunk package whose longest length is shorter than a pass is refused.
    """
    from ..coreml.check import CheckError, check_io
    from ..coreml.layout import HEAD_ARTIFACT, HEAD_IO, TRUNK_ARTIFACT, TRUNK_IO
    from ..coreml.mil_exec import MilError
    from .trunk import MAX_PASS_FRAMES, Head, output_frames, pad_chunk

    trunk_package = bundle.require_artifact(TRUNK_ARTIFACT)
    head_package = bundle.require_artifact(HEAD_ARTIFACT)
    bins = bundle.features.num_mel_bins
    try:
        trunk_io = check_io(trunk_package, input_name=TRUNK_IO[0], output_name=TRUNK_IO[1], feat_dim=bins + 1)
        head_io = check_io(
            head_package, input_name=HEAD_IO[0], output_name=HEAD_IO[1], vector_input=True, embedding_dim=bundle.embedding_dim
        )  # fmt: skip
    except (CheckError, MilError, OSError) as exc:
        raise BackendError(f"CoreML trunk of bundle {bundle.name!r} is unreadable: {exc}") from exc
    problems = trunk_io.problems + head_io.problems
    chunk_frames = tuple(sorted(trunk_io.window_frames))
    if chunk_frames and chunk_frames[-1] < MAX_PASS_FRAMES:
        problems.append(f"{trunk_package.name} serves passes up to {chunk_frames[-1]} frames, a pass takes up to {MAX_PASS_FRAMES}")
    if problems:
        raise BackendError(f"CoreML trunk of bundle {bundle.name!r} is unusable: {'; '.join(problems)}")
    stats_dim = head_io.input_shapes[0][1]

    exact = CoreMLBackend(
        bundle, compute_units=compute_units, cache_dir=cache_dir, coremltools_module=coremltools_module, window_frames=window_frames
    )  # fmt: skip
    trunk_model = load_compiled(trunk_package, exact.cache_dir, exact.ct, exact.compute_units)
    head_model = load_compiled(head_package, exact.cache_dir, exact.ct, exact.compute_units)

    def trunk(feats: np.ndarray) -> np.ndarray:
        (result,) = trunk_model.predict([{TRUNK_IO[0]: pad_chunk(feats, chunk_frames)}])
        return np.asarray(result[TRUNK_IO[1]], dtype=np.float32)[0][:, : output_frames(len(feats))]

    def linear(stats: np.ndarray) -> np.ndarray:
        results = head_model.predict([{HEAD_IO[0]: np.ascontiguousarray(stats[i : i + 1], dtype=np.float32)} for i in range(len(stats))])
        if len(results) != len(stats):
            raise BackendError(f"CoreML returned {len(results)} results for {len(stats)} windows")
        return np.stack([np.asarray(r[HEAD_IO[1]], dtype=np.float32).reshape(-1) for r in results])

    for frames in chunk_frames:  # each enumerated shape is specialised on first use
        started = time.monotonic()
        trunk(np.zeros((frames, bins), dtype=np.float32))
        logger.info("CoreML trunk warm-up, %d frames: %.1f ms", frames, 1000 * (time.monotonic() - started))
    linear(np.zeros((1, stats_dim), dtype=np.float32))
    head = Head(linear, stats_dim, float(bundle.source.get("pooling_eps", 1e-7)))
    return SharedTrunk(exact, trunk, head, bundle=bundle, label=f"CoreML {trunk_package.name}, passes of {list(chunk_frames)} frames")
