"""The ResNet34 shared trunk for CoreML: a fixed-shape chunk model and a small head model.

``embedding.trunk = "shared"`` runs the trunk once per stretch of speech (speakerd.embedding.trunk);
its passes have any length up to :data:`~speakerd.embedding.trunk.MAX_PASS_FRAMES`. CoreML on the
Neural Engine wants fixed shapes (never a RangeDim), so the chunk model enumerates a few input
lengths (:data:`~speakerd.embedding.trunk.CHUNK_FRAMES`) and each pass is zero-padded on the right
up to the next one. Padding alone would change the last output frames: after the first
convolution a padded frame is no longer zero (BN shift), and the next convolutions would read it
where an unpadded pass reads their zero padding. So the input carries a validity mask as one
extra feature column, and every activation that feeds a convolution is multiplied by the mask at
its time resolution (subsampled by each stride-2 stage as ``mask[..., ::2]``, which is exact
because a stride-2, pad-1, kernel-3 convolution maps n valid frames to ceil(n/2)). Valid output
frames then equal an unpadded pass's: 33 ``mul`` by a broadcast mask, ANE-eligible elementwise ops.

The head is the ``seg_1`` linear layer on pooled statistics, fixed (1, 2*C*F): pooling stays in
FP32 numpy beside it (a window's slice has any length, and pooling is a few thousand flops).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..embedding.trunk import CHUNK_FRAMES, STRIDE, pad_chunk
from .convert import ConversionError, convert_to_mlpackage
from .layout import HEAD_IO, HEAD_PACKAGE, TRUNK_IO, TRUNK_PACKAGE

logger = logging.getLogger(__name__)

MIN_MASKED_COSINE = 0.99999
"""The masked, padded chunk module must match the plain trunk on an unpadded pass this closely in
FP32, frame for frame, before it is converted."""


class MaskedChunkTrunk(nn.Module):
    """``ResNetSpeaker.frame_level`` over a padded chunk: (1, L, bins + 1) -> (1, C*F, L/8).

    The last input column is the validity mask (1 on real frames); see the module docstring.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.bins = int(getattr(model, "feat_dim", 80))

    def forward(self, chunk: torch.Tensor) -> torch.Tensor:
        feats = chunk[:, :, : self.bins]
        mask = chunk[:, :, self.bins :].permute(0, 2, 1).unsqueeze(1)  # (1, 1, 1, L): broadcast over C, F
        m = self.model
        x = feats.permute(0, 2, 1).unsqueeze(1) * mask
        out = F.relu(m.bn1(m.conv1(x))) * mask
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            for block in layer:
                if block.conv1.stride[1] == 2:
                    mask = mask[:, :, :, ::2]
                inner = F.relu(block.bn1(block.conv1(out))) * mask
                out = F.relu(block.bn2(block.conv2(inner)) + block.shortcut(out)) * mask
        return out.flatten(start_dim=1, end_dim=2)


class StatsHead(nn.Module):
    """Pooled statistics (1, 2*C*F) -> raw embedding (1, D): the model's ``seg_1``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.seg_1 = linear

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        return self.seg_1(stats)


def masked_agreement(model: nn.Module, chunk_frames: Sequence[int], seed: int = 0) -> float:
    """Worst cosine, per output frame, between the masked chunk module on padded passes and the
    plain trunk on the same passes unpadded (one pass length per chunk length, some odd)."""
    bins = int(getattr(model, "feat_dim", 80))
    masked = MaskedChunkTrunk(model).eval()
    rng = np.random.default_rng(seed)
    worst = 1.0
    for length in chunk_frames:
        n = max(1, int(length) - 13)  # an odd pass, padded by 13 frames
        feats = rng.standard_normal((n, bins)).astype(np.float32)
        with torch.no_grad():
            ref = model.frame_level(torch.from_numpy(feats[None])).flatten(1, 2)[0].numpy()
            got = masked(torch.from_numpy(pad_chunk(feats, [length])))[0].numpy()[:, : math.ceil(n / STRIDE)]
        cos = np.sum(ref * got, axis=0) / np.maximum(np.linalg.norm(ref, axis=0) * np.linalg.norm(got, axis=0), 1e-12)
        worst = min(worst, float(cos.min()))
    return worst


def convert_trunk_coreml(
    model: nn.Module, out_dir: Path, chunk_frames: Sequence[int] = CHUNK_FRAMES
) -> tuple[Path, Path]:
    """Write ``out_dir/trunk.mlpackage`` (chunk model, one enumerated shape per chunk length) and
    ``out_dir/head.mlpackage`` (``seg_1``, fixed shape); both pass the static check. Returns both."""
    model = model.eval()
    bins = int(getattr(model, "feat_dim", 80))
    if any(int(f) % STRIDE for f in chunk_frames):
        raise ConversionError(f"chunk lengths must be multiples of {STRIDE}, got {list(chunk_frames)}")
    agreement = masked_agreement(model, chunk_frames)
    if not agreement >= MIN_MASKED_COSINE:
        raise ConversionError(f"the masked chunk trunk disagrees with the plain trunk: cosine {agreement:.7f}")
    logger.info("masked chunk trunk matches the plain trunk (cosine %.7f); converting for %s frames", agreement, list(chunk_frames))
    out_dir = Path(out_dir)
    trunk = convert_to_mlpackage(
        MaskedChunkTrunk(model).eval(), out_dir / TRUNK_PACKAGE, feat_dim=bins + 1, window_frames=chunk_frames,
        input_name=TRUNK_IO[0], output_name=TRUNK_IO[1],
    )  # fmt: skip
    linear: Any = model.seg_1
    head = convert_to_mlpackage(
        StatsHead(linear).eval(), out_dir / HEAD_PACKAGE, feat_dim=int(linear.in_features), window_frames=(),
        input_name=HEAD_IO[0], output_name=HEAD_IO[1], vector_input=True,
    )  # fmt: skip
    return trunk, head
