"""Load WeSpeaker ResNet34 weights from the two layouts they are published in, strictly.

- a WeSpeaker model directory: ``avg_model.pt`` (a plain averaged state_dict that still holds the
  training loss head ``projection.*``, dropped here) and ``config.yaml`` (model, model_args,
  dataset_args.fbank_args);
- pyannote's ``wespeaker-voxceleb-resnet34-LM`` ``pytorch_model.bin``: a Lightning-style dict whose
  ``state_dict`` keys are prefixed ``resnet.``; pyannote's pooling adds no epsilon under the square
  root, so the model is built with ``pooling_eps=0`` for it.

Anything missing, unexpected or mis-shaped is an error that names the keys: a silently
half-loaded network still produces embeddings, just wrong ones.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ...bundle import FeatureRecipe
from .. import state_dict
from ..state_dict import CheckpointError, name_keys
from .resnet import PYANNOTE_POOLING_EPS, WESPEAKER_POOLING_EPS, ResNetSpeaker, resnet34

logger = logging.getLogger(__name__)

Layout = Literal["wespeaker", "pyannote"]

WESPEAKER_WEIGHTS = "avg_model.pt"
WESPEAKER_CONFIG = "config.yaml"
LOSS_HEAD_PREFIX = "projection."
PYANNOTE_PREFIX = "resnet."
SAMPLE_RATE = 16000
PYANNOTE_EMBED_DIM = 256
"""pyannote stores no model_args; its WeSpeakerResNet34 is always 256-d."""
SUPPORTED_MODELS = ("ResNet34",)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A model with weights loaded, plus what the bundle must record about where they came from."""

    model: ResNetSpeaker
    layout: Layout
    weights_path: Path
    """The file holding the weights (``avg_model.pt`` or the ``.bin``); its hash identifies them."""
    recipe: FeatureRecipe
    sample_rate: int = SAMPLE_RATE
    notes: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """A WeSpeaker directory (or its ``avg_model.pt``) or a pyannote ``pytorch_model.bin``."""
    path = Path(path).expanduser()
    if path.is_dir():
        return load_wespeaker_dir(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.name == WESPEAKER_WEIGHTS and (path.parent / WESPEAKER_CONFIG).is_file():
        return load_wespeaker_dir(path.parent)
    return load_pyannote_bin(path)


def load_wespeaker_dir(directory: Path) -> LoadedCheckpoint:
    """``avg_model.pt`` + ``config.yaml`` as unpacked from WeSpeaker's ``voxceleb_resnet34_LM.zip``."""
    weights = directory / WESPEAKER_WEIGHTS
    config_path = directory / WESPEAKER_CONFIG
    for needed in (weights, config_path):
        if not needed.is_file():
            raise CheckpointError(
                f"{directory} is not a WeSpeaker model directory: {needed.name} is missing "
                f"(expected {WESPEAKER_WEIGHTS} and {WESPEAKER_CONFIG})"
            )
    config = _read_yaml(config_path)
    model_name = config.get("model")
    if model_name not in SUPPORTED_MODELS:
        raise CheckpointError(f"{config_path}: model {model_name!r} is not supported (only {', '.join(SUPPORTED_MODELS)})")
    model_args = dict(config.get("model_args") or {})
    pooling = model_args.pop("pooling_func", "TSTP")
    two_emb = model_args.pop("two_emb_layer", False)
    if pooling != "TSTP" or two_emb:
        raise CheckpointError(
            f"{config_path}: pooling_func={pooling!r}, two_emb_layer={two_emb!r}; only TSTP with one embedding layer is supported"
        )
    unknown_args = sorted(set(model_args) - {"feat_dim", "embed_dim"})
    if unknown_args:
        raise CheckpointError(f"{config_path}: unsupported model_args {', '.join(unknown_args)}")
    dataset_args = config.get("dataset_args") or {}
    fbank_args = dict(dataset_args.get("fbank_args") or {})
    feat_dim = int(model_args.get("feat_dim", 80))
    recipe = wespeaker_recipe(
        num_mel_bins=int(fbank_args.get("num_mel_bins", feat_dim)),
        frame_length_ms=float(fbank_args.get("frame_length", 25)),
        frame_shift_ms=float(fbank_args.get("frame_shift", 10)),
        source=str(config_path),
    )
    if recipe.num_mel_bins != feat_dim:
        raise CheckpointError(f"{config_path}: fbank num_mel_bins {recipe.num_mel_bins} != model feat_dim {feat_dim}")
    sample_rate = int(dataset_args.get("resample_rate", SAMPLE_RATE))
    if sample_rate != SAMPLE_RATE:
        raise CheckpointError(f"{config_path}: resample_rate {sample_rate}; only {SAMPLE_RATE} Hz models are supported")

    state = _torch_load(weights)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{weights}: expected a state_dict, found {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    dropped = sorted(k for k in state if k.startswith(LOSS_HEAD_PREFIX))
    state = {k: v for k, v in state.items() if not k.startswith(LOSS_HEAD_PREFIX)}
    model = resnet34(feat_dim=feat_dim, embed_dim=int(model_args.get("embed_dim", 256)), pooling_eps=WESPEAKER_POOLING_EPS)
    load_strict(model, state, source=weights)
    logger.info("loaded WeSpeaker %s from %s (dropped loss head %s)", model_name, directory, ", ".join(dropped) or "none")
    return LoadedCheckpoint(
        model=model.eval(),
        layout="wespeaker",
        weights_path=weights,
        recipe=recipe,
        sample_rate=sample_rate,
        notes={"dropped": dropped, "training_dither": fbank_args.get("dither")},
    )


def load_pyannote_bin(path: Path) -> LoadedCheckpoint:
    """pyannote/wespeaker-voxceleb-resnet34-LM ``pytorch_model.bin``: ``state_dict`` with ``resnet.`` keys."""
    ckpt = _torch_load(path)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(
            f"{path}: not a pyannote checkpoint (no 'state_dict' dict) and not a WeSpeaker directory; "
            f"pass the directory holding {WESPEAKER_WEIGHTS} and {WESPEAKER_CONFIG}, or pyannote's pytorch_model.bin"
        )
    raw = ckpt["state_dict"]
    outside = sorted(k for k in raw if not k.startswith(PYANNOTE_PREFIX))
    if outside:
        raise CheckpointError(f"{path}: unexpected keys outside '{PYANNOTE_PREFIX}*': {name_keys(outside)}")
    state = {k[len(PYANNOTE_PREFIX) :]: v for k, v in raw.items()}
    hparams = ckpt.get("hyper_parameters") or {}
    hp = dict(hparams.items()) if isinstance(hparams, Mapping) else {}
    if hp.get("fbank_centering_span") is not None:
        raise CheckpointError(f"{path}: fbank_centering_span={hp['fbank_centering_span']!r} (sliding CMN) is not supported")
    if hp.get("window_type", "hamming") != "hamming" or float(hp.get("dither", 0.0)) != 0.0:
        raise CheckpointError(f"{path}: window_type={hp.get('window_type')!r}, dither={hp.get('dither')!r}; expected hamming, 0")
    sample_rate = int(hp.get("sample_rate", SAMPLE_RATE))
    if sample_rate != SAMPLE_RATE:
        raise CheckpointError(f"{path}: sample_rate {sample_rate}; only {SAMPLE_RATE} Hz models are supported")
    feat_dim = int(hp.get("num_mel_bins", 80))
    recipe = wespeaker_recipe(
        num_mel_bins=feat_dim,
        frame_length_ms=float(hp.get("frame_length", 25.0)),
        frame_shift_ms=float(hp.get("frame_shift", 10.0)),
        source=str(path),
    )
    model = resnet34(feat_dim=feat_dim, embed_dim=PYANNOTE_EMBED_DIM, pooling_eps=PYANNOTE_POOLING_EPS)
    load_strict(model, state, source=path)
    logger.info("loaded pyannote WeSpeaker ResNet34 from %s (pooling without epsilon)", path)
    return LoadedCheckpoint(model=model.eval(), layout="pyannote", weights_path=path, recipe=recipe, sample_rate=sample_rate)


def write_wespeaker_dir(model: ResNetSpeaker, directory: Path, *, num_classes: int = 5994) -> Path:
    """Save ``model`` the way WeSpeaker publishes it (random loss head included): tests, benchmarks."""
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    state = dict(model.state_dict())
    state[LOSS_HEAD_PREFIX + "weight"] = torch.randn(num_classes, model.embed_dim)
    torch.save(state, directory / WESPEAKER_WEIGHTS)
    config = {
        "model": "ResNet34",
        "model_args": {"feat_dim": model.feat_dim, "embed_dim": model.embed_dim, "pooling_func": "TSTP", "two_emb_layer": False},
        "dataset_args": {
            "resample_rate": SAMPLE_RATE,
            "fbank_args": {"num_mel_bins": model.feat_dim, "frame_shift": 10, "frame_length": 25, "dither": 1.0},
        },
    }
    (directory / WESPEAKER_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


def write_pyannote_bin(model: ResNetSpeaker, path: Path) -> Path:
    """Save ``model`` in pyannote's ``pytorch_model.bin`` layout (plain-dict metadata only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": {PYANNOTE_PREFIX + k: v for k, v in model.state_dict().items()},
        "hyper_parameters": {
            "sample_rate": SAMPLE_RATE,
            "num_channels": 1,
            "num_mel_bins": model.feat_dim,
            "frame_length": 25,
            "frame_shift": 10,
            "dither": 0.0,
            "window_type": "hamming",
            "fbank_centering_span": None,
        },
        "pytorch-lightning_version": "2.x",
    }
    torch.save(checkpoint, path)
    return path


def load_strict(model: torch.nn.Module, state: Mapping[str, Any], *, source: Path) -> None:
    """``load_state_dict(strict=True)`` with an error that names every offending key."""
    state_dict.load_strict(model, state, what=f"{source} does not match WeSpeaker ResNet34")


def wespeaker_recipe(
    *, num_mel_bins: int = 80, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, source: str = "WeSpeaker"
) -> FeatureRecipe:
    """WeSpeaker's inference fbank (wespeaker/cli/speaker.py): training values with dither off (1.0 only in training).

    Hamming window, pre-emphasis 0.97, DC removal, 20 Hz to Nyquist, snip_edges, log power mel on
    int16-range samples, then per-window mean subtraction (CMN, no variance normalisation).
    """
    if num_mel_bins <= 0 or frame_length_ms <= 0 or frame_shift_ms <= 0:
        raise CheckpointError(f"{source}: bad fbank settings {num_mel_bins} bins, {frame_length_ms}/{frame_shift_ms} ms")
    return FeatureRecipe(
        num_mel_bins=num_mel_bins,
        frame_length_ms=frame_length_ms,
        frame_shift_ms=frame_shift_ms,
        window_type="hamming",
        preemph_coeff=0.97,
        remove_dc_offset=True,
        dither=0.0,
        low_freq=20.0,
        high_freq=0.0,
        snip_edges=True,
        round_to_power_of_two=True,
        use_log_fbank=True,
        use_power=True,
        input_scale=32768.0,
        gain_normalize_dbfs=None,
        cmn=True,
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError as exc:  # PyYAML is a build-time dependency only
        raise CheckpointError("reading WeSpeaker's config.yaml needs PyYAML: pip install pyyaml") from exc
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping at top level")
    return data


def _torch_load(path: Path) -> Any:
    """Tensors and plain containers only; foreign classes (pyannote/Lightning metadata) become stubs.

    ``weights_only=True`` refuses pyannote's file (it pickles pyannote and Lightning objects next to
    the weights), and ``weights_only=False`` would import and run whatever the pickle names. The
    fallback resolves only an allow-list of torch/builtins names; everything else is a stub.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        logger.debug("weights_only load of %s refused (%s); using the stubbing unpickler", path, exc)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/EOFError/zipfile errors alike
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {exc}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_StubbingPickle)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {exc}") from None


class _Stub(dict):  # type: ignore[type-arg]
    """Stands in for a class the checkpoint names but we refuse to import; keeps what it is given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args
        self.kwargs = kwargs
        self.items_appended: list[Any] = []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items_appended.append(item)

    def extend(self, items: Any) -> None:
        self.items_appended.extend(items)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}


class _StubbingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (_Stub,), {"__module__": f"stub:{module}"})


class _StubbingPickle:
    """The ``pickle_module`` torch.load expects: only ``Unpickler`` and ``load`` are used."""

    Unpickler = _StubbingUnpickler
    __name__ = "speakerd_stubbing_pickle"

    @staticmethod
    def load(fh: io.BufferedIOBase, **kwargs: Any) -> Any:
        return _StubbingUnpickler(fh, **kwargs).load()
