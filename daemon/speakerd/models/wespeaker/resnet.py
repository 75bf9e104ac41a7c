"""WeSpeaker's ResNet34 speaker-embedding network, re-written so its state_dict loads key for key.

Layout follows wenet-e2e/wespeaker ``wespeaker/models/resnet.py`` (ResNet34, TSTP pooling, one
embedding layer ``seg_1``), so official and pyannote checkpoints load with ``strict=True``. Two
deliberate differences, both invisible to the weights:

- ``forward`` returns the embedding ``(B, embed_dim)`` only; the official model returns the tuple
  ``(tensor(0.0), embedding)`` when ``two_emb_layer`` is False. A tensor is what ONNX / CoreML
  export and the backends need.
- the pooling epsilon is a constructor argument: WeSpeaker adds 1e-7 under the square root,
  pyannote's port of the same weights adds nothing.

Only ``torch`` is imported, and the forward pass is free of data-dependent Python control flow, so
``torch.jit.trace`` gives one graph for any batch and length (the CoreML conversion relies on it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WESPEAKER_POOLING_EPS = 1e-7
"""What wespeaker/models/pooling_layers.py TSTP adds to the variance before the square root."""
PYANNOTE_POOLING_EPS = 0.0
"""pyannote's StatsPool: unbiased std with no epsilon."""

RESNET34_BLOCKS = (3, 4, 6, 3)
RESNET34_NUM_TENSORS = 218
RESNET34_NUM_PARAMETERS = 6_634_336
"""Figures of the official ResNet34(feat_dim=80, embed_dim=256) state_dict (buffers excluded)."""


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus a shortcut, then ReLU (expansion 1)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # An empty Sequential is the identity and owns no tensors, as in the reference; the 1x1
        # projection exists only where stride or width change (keys shortcut.0 / shortcut.1).
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class StatsPooling(nn.Module):
    """TSTP: per-(channel, frequency) mean and std over time, concatenated.

    The variance is ``torch.var`` (two-pass, unbiased), never E[x^2] - E[x]^2, which cancels
    catastrophically in FP16 on the Neural Engine. Input (B, C, F, T) -> (B, 2*C*F), flattened
    channel-major like the reference.
    """

    def __init__(self, eps: float = WESPEAKER_POOLING_EPS) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1)
        var = torch.var(x, dim=-1, unbiased=True)
        std = torch.sqrt(var + self.eps) if self.eps > 0.0 else torch.sqrt(var)
        return torch.cat((mean.flatten(start_dim=1), std.flatten(start_dim=1)), dim=1)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class ResNetSpeaker(nn.Module):
    """WeSpeaker ResNet (BasicBlock) with TSTP pooling and a single embedding layer ``seg_1``.

    Input: log-mel fbank (B, T, feat_dim) after per-window CMN. Output: raw (not normalised)
    embedding (B, embed_dim).
    """

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = RESNET34_BLOCKS,
        *,
        feat_dim: int = 80,
        embed_dim: int = 256,
        m_channels: int = 32,
        pooling_eps: float = WESPEAKER_POOLING_EPS,
    ) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.embed_dim = embed_dim
        self.m_channels = m_channels
        self._in_planes = m_channels
        self.conv1 = nn.Conv2d(1, m_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self.layer1 = self._make_layer(m_channels, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(m_channels * 2, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(m_channels * 4, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(m_channels * 8, num_blocks[3], stride=2)
        self.pool = StatsPooling(pooling_eps)
        # Same rule as the reference (int(feat_dim / 8) frequency rows survive three stride-2 stages).
        stats_dim = int(feat_dim / 8) * m_channels * 8 * BasicBlock.expansion
        self.seg_1 = nn.Linear(stats_dim * 2, embed_dim)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self._in_planes, planes, s))
            self._in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    @property
    def pooling_eps(self) -> float:
        return self.pool.eps

    def frame_level(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> layer4 output (B, 8*m_channels, ceil(F/8), ceil(T/8))."""
        x = feats.permute(0, 2, 1).unsqueeze(1)  # frequency is the height, time the width
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        return self.layer4(out)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.seg_1(self.pool(self.frame_level(feats)))


def resnet34(*, feat_dim: int = 80, embed_dim: int = 256, pooling_eps: float = WESPEAKER_POOLING_EPS) -> ResNetSpeaker:
    """The ResNet34 of WeSpeaker's VoxCeleb recipes (m_channels 32, blocks 3/4/6/3)."""
    return ResNetSpeaker(RESNET34_BLOCKS, feat_dim=feat_dim, embed_dim=embed_dim, pooling_eps=pooling_eps)
