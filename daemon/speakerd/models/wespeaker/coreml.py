"""CoreML hook for the WeSpeaker bundle build: a thin call into the generic converter.

The wespeaker convert code calls :func:`convert_coreml` if this module is importable; the heavy
lifting, the static check and the FP16 reference run live in ``speakerd.coreml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ...coreml.convert import convert_resnet_coreml


def convert_coreml(model: nn.Module, out_dir: Path, window_frames: Sequence[int], feat_dim: int = 80) -> Path:
    """Save ``out_dir/model.mlpackage`` (FP16 ML Program, one enumerated shape per window length)."""
    return convert_resnet_coreml(model, out_dir, window_frames, feat_dim=feat_dim)
