"""CoreML hook for the WeSpeaker bundle build: thin calls into the generic converter.

The wespeaker convert code calls :func:`convert_coreml` (and :func:`convert_coreml_trunk`, for
``embedding.trunk = "shared"``) if this module is importable; the heavy lifting, the static check
and the FP16 reference run live in ``speakerd.coreml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ...coreml.convert import convert_resnet_coreml
from ...coreml.trunk import convert_trunk_coreml


def convert_coreml(model: nn.Module, out_dir: Path, window_frames: Sequence[int], feat_dim: int = 80) -> Path:
    """Save ``out_dir/model.mlpackage`` (FP16 ML Program, one enumerated shape per window length)."""
    return convert_resnet_coreml(model, out_dir, window_frames, feat_dim=feat_dim)


def convert_coreml_trunk(model: nn.Module, out_dir: Path) -> tuple[Path, Path]:
    """Save ``out_dir/trunk.mlpackage`` (the shared trunk's chunk model, one enumerated shape per
    pass length) and ``out_dir/head.mlpackage`` (its ``seg_1`` head)."""
    return convert_trunk_coreml(model, out_dir)
