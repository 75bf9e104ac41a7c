"""Model bundles: a folder with a manifest that declares everything the pipeline needs of a model.

The pipeline is model-agnostic: sample rate, feature recipe, window shapes, embedding size and the
fingerprint that tags stored voiceprints all come from ``manifest.json``, never from code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .decisions.values import check_bundled
from .errors import SpeakerdError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class BundleError(SpeakerdError):
    """A model bundle is missing, incomplete or inconsistent: the user chose or must build another
    (exit 2, as for any setting they can fix)."""

    exit_code = 2


@dataclass(frozen=True)
class KnownModel:
    """A model speakerd knows how to get, built or not."""

    description: str
    get: str
    """The command (or commands) that build its bundle."""


DEFAULT_MODEL = "ge2e-resemblyzer"
KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(
        "GE2E d-vector encoder from Resemblyzer 0.1.4 (3-layer LSTM, 256-d, LibriSpeech + VoxCeleb)",
        f"speakerd models build {DEFAULT_MODEL}",
    ),
    "ecapa-speechbrain": KnownModel(
        "SpeechBrain ECAPA-TDNN (VoxCeleb, EER 0.8 %, 192-d): names voices through a room's microphone far "
        "better than the default, at about ten times its CPU cost; see docs/BENCHMARKS.md",
        "speakerd models build ecapa-speechbrain",
    ),
    "wespeaker-resnet34": KnownModel(
        "WeSpeaker ResNet34 (VoxCeleb, EER 0.8 %, 256-d); see docs/wespeaker.md",
        "speakerd models fetch wespeaker-resnet34 (downloads the checkpoint), "
        "or offline: speakerd models convert wespeaker --checkpoint PATH",
    ),
}
"""Every model `speakerd models list` shows, and the command that builds each."""


def how_to_get(name: str) -> str:
    known = KNOWN_MODELS.get(name)
    return known.get if known is not None else f"speakerd models build {name}"


KALDI_FBANK = "kaldi_fbank"
SPEECHBRAIN_FBANK = "speechbrain_fbank"
FEATURE_KINDS = (KALDI_FBANK, SPEECHBRAIN_FBANK)


@dataclass(frozen=True)
class FeatureRecipe:
    """Kaldi-style filterbank settings, mapped one to one onto kaldi-native-fbank options.

    ``kind`` ``speechbrain_fbank`` is SpeechBrain's ``Fbank`` instead (ECAPA was trained on it):
    computed per window from its samples (``features.SpeechBrainFbank``), using only the frame
    length and shift, ``num_mel_bins``, ``low_freq``, ``high_freq``, ``input_scale`` and ``cmn``.

    The post-processing keys (``input_scale``, ``gain_normalize_dbfs``, ``cmn``) describe what the
    model saw in training around the filterbank itself.
    """

    kind: str = KALDI_FBANK
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window_type: str = "hamming"
    preemph_coeff: float = 0.97
    remove_dc_offset: bool = True
    dither: float = 0.0
    low_freq: float = 20.0
    high_freq: float = 0.0
    snip_edges: bool = True
    round_to_power_of_two: bool = True
    mel_is_librosa: bool = False
    mel_norm: str = "slaney"
    use_log_fbank: bool = True
    use_power: bool = True
    input_scale: float = 32768.0
    """Multiply float samples by this before the filterbank (Kaldi recipes expect int16 range)."""
    gain_normalize_dbfs: float | None = None
    """Raise each window's RMS to this level first (never lowers it), as the model's training did."""
    cmn: bool = True
    """Subtract the per-window mean of each bin over time."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureRecipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"kind"})
        if unknown:
            raise BundleError(f"unknown feature recipe keys: {', '.join(unknown)}")
        if data.get("kind", KALDI_FBANK) not in FEATURE_KINDS:
            raise BundleError(f"unsupported feature kind {data['kind']!r}; known: {', '.join(FEATURE_KINDS)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def per_window(self) -> bool:
        """Features computed from each window's own samples, not sliced from the region's stream."""
        return self.kind == SPEECHBRAIN_FBANK

    def num_frames(self, num_samples: int, sample_rate: int) -> int:
        """Frames the filterbank yields for ``num_samples`` (Kaldi's rule for snip_edges)."""
        shift = int(sample_rate * self.frame_shift_ms / 1000)
        length = int(sample_rate * self.frame_length_ms / 1000)
        if self.per_window:  # frames centred on every hop, the edges zero-padded (torch.stft center=True)
            return 1 + num_samples // shift
        if self.snip_edges:
            return 0 if num_samples < length else 1 + (num_samples - length) // shift
        return (num_samples + shift // 2) // shift


@dataclass(frozen=True)
class ModelBundle:
    """A loaded manifest plus the folder it came from."""

    path: Path
    name: str
    sample_rate: int
    embedding_dim: int
    features: FeatureRecipe
    fingerprint: str
    artifacts: dict[str, str]
    io: dict[str, str] = field(default_factory=lambda: {"input": "feats", "output": "embs"})
    window_frames: tuple[int, ...] = ()
    """Window lengths (in frames) the bundle's fixed-shape artifacts were built for, if any."""
    description: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, float] = field(default_factory=dict)
    """The model's calibrated decision values (``decisions.values.DecisionValues``; may be empty
    or partial: the config gives the rest, or the daemon refuses to start)."""

    def artifact(self, kind: str) -> Path | None:
        """Path of a built artifact (``onnx``, ``coreml``), or None if the bundle has none built."""
        rel = self.artifacts.get(kind)
        if rel is None:
            return None
        path = self.path / rel
        return path if path.exists() else None

    def require_artifact(self, kind: str) -> Path:
        path = self.artifact(kind)
        if path is None:
            raise BundleError(
                f"model {self.name!r} has no built {kind} artifact in {self.path}; "
                f"run `{how_to_get(self.name)}`"
            )
        return path


def fingerprint_of(name: str, weights_sha256: str, recipe: FeatureRecipe, embedding_dim: int) -> str:
    """Identify an embedding space: same weights and same features give comparable voiceprints."""
    canonical = json.dumps(
        {"name": name, "weights": weights_sha256, "features": recipe.to_dict(), "dim": embedding_dim},
        sort_keys=True,
    )
    return f"{name}:{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def load_bundle(path: Path) -> ModelBundle:
    """Read and validate ``path/manifest.json``."""
    manifest_path = path / MANIFEST
    try:
        data = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise BundleError(f"no {MANIFEST} in {path}: not a model bundle") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{manifest_path}: must be a JSON object, not {type(data).__name__}")
    if data.get("format") != MANIFEST_FORMAT:
        raise BundleError(f"{manifest_path}: unsupported manifest format {data.get('format')!r}")
    try:
        return ModelBundle(
            path=path,
            name=str(data["name"]),
            sample_rate=int(data["sample_rate"]),
            embedding_dim=int(data["embedding_dim"]),
            features=FeatureRecipe.from_dict(data["features"]),
            fingerprint=str(data["fingerprint"]),
            artifacts=dict(data.get("artifacts", {})),
            io=dict(data.get("io", {"input": "feats", "output": "embs"})),
            window_frames=tuple(int(f) for f in data.get("window_frames", ())),
            description=str(data.get("description", "")),
            source=dict(data.get("source", {})),
            decision=check_bundled(data.get("decision", {}), str(manifest_path)),
        )
    except KeyError as exc:
        raise BundleError(f"{manifest_path}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{manifest_path}: bad value: {exc}") from None


def write_manifest(bundle: ModelBundle) -> Path:
    data = {
        "format": MANIFEST_FORMAT,
        "name": bundle.name,
        "description": bundle.description,
        "sample_rate": bundle.sample_rate,
        "embedding_dim": bundle.embedding_dim,
        "features": bundle.features.to_dict(),
        "window_frames": list(bundle.window_frames),
        "artifacts": bundle.artifacts,
        "io": bundle.io,
        "fingerprint": bundle.fingerprint,
        "source": bundle.source,
    }
    if bundle.decision:
        data["decision"] = bundle.decision
    bundle.path.mkdir(parents=True, exist_ok=True)
    target = bundle.path / MANIFEST
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(target)
    return target


def kept_decision(path: Path, fingerprint: str) -> dict[str, float]:
    """The decision values of the bundle already at ``path`` when it is the same model
    (fingerprint), so rebuilding a bundle keeps its calibration; else nothing."""
    try:
        old = load_bundle(path)
    except BundleError:
        return {}
    return dict(old.decision) if old.fingerprint == fingerprint else {}


def models_root() -> Path:
    """Where named bundles live: $SPEAKERD_MODELS, else the checkout's ``models/``, else the data dir."""
    import os

    from .paths import data_dir

    env = os.environ.get("SPEAKERD_MODELS")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "models"
    if checkout.is_dir():
        return checkout
    return data_dir() / "models"


def resolve_bundle(name_or_dir: str) -> ModelBundle:
    """A directory path, or the name of a bundle under ``models_root()``."""
    candidate = Path(name_or_dir).expanduser()
    if candidate.is_dir():
        return load_bundle(candidate)
    named = models_root() / name_or_dir
    if named.is_dir():
        return load_bundle(named)
    if name_or_dir in KNOWN_MODELS:
        raise BundleError(f"model {name_or_dir!r} is not built yet (no bundle in {models_root()}); "
                          f"build it with: {how_to_get(name_or_dir)}")
    raise BundleError(
        f"no model {name_or_dir!r}: not a directory and not a bundle in {models_root()}; known models: "
        f"{', '.join(KNOWN_MODELS)} (`speakerd models list` shows which are built and how to build the others)"
    )
