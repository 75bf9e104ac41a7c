"""ECAPA-TDNN (Desplanques et al. 2020) as SpeechBrain's ``spkrec-ecapa-voxceleb`` lays it out.

Written here, not imported, because SpeechBrain cannot be imported without torchaudio, and torchaudio
would pull a second torch. Parameter names match SpeechBrain's checkpoint one to one (its ``Conv1d``
and ``BatchNorm1d`` wrap torch's as ``.conv`` and ``.norm``), so its ``embedding_model.ckpt`` loads
strictly. Only inference is written: full-length inputs (no padding masks), no dropout. Build-time
only (torch); the daemon runs the ONNX export.
"""

from __future__ import annotations

import torch
from torch import nn


class _Conv1d(nn.Module):
    """SpeechBrain's Conv1d with ``padding="same"``: reflect padding, then an unpadded conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__()
        self.pad = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = nn.functional.pad(x, (self.pad, self.pad), mode="reflect")
        return self.conv(x)


class _BatchNorm1d(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class TdnnBlock(nn.Module):
    """Conv, ReLU, batch norm (in that order, as SpeechBrain's TDNNBlock)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.conv = _Conv1d(in_channels, out_channels, kernel_size, dilation)
        self.activation = nn.ReLU()
        self.norm = _BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.activation(self.conv(x)))


class Res2NetBlock(nn.Module):
    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList(TdnnBlock(width, width, kernel_size, dilation) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(x, self.scale, dim=1)
        out = [parts[0]]
        previous = None
        for i, block in enumerate(self.blocks, start=1):
            previous = block(parts[i] if previous is None else parts[i] + previous)
            out.append(previous)
        return torch.cat(out, dim=1)


class SeBlock(nn.Module):
    """Squeeze-excitation over the whole input's time mean."""

    def __init__(self, channels: int, se_channels: int) -> None:
        super().__init__()
        self.conv1 = _Conv1d(channels, se_channels, 1)
        self.relu = nn.ReLU()
        self.conv2 = _Conv1d(se_channels, channels, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=2, keepdim=True)
        return self.sigmoid(self.conv2(self.relu(self.conv1(s)))) * x


class SeRes2NetBlock(nn.Module):
    def __init__(self, channels: int, scale: int, se_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.tdnn1 = TdnnBlock(channels, channels, 1, 1)
        self.res2net_block = Res2NetBlock(channels, scale, kernel_size, dilation)
        self.tdnn2 = TdnnBlock(channels, channels, 1, 1)
        self.se_block = SeBlock(channels, se_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


def _stats(x: torch.Tensor, weights: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and standard deviation over time (``weights`` sum to 1 over dim 2)."""
    mean = (weights * x).sum(dim=2)
    std = torch.sqrt((weights * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2).clamp(min=eps))
    return mean, std


class AttentiveStatsPool(nn.Module):
    """Channel- and context-dependent attentive statistics pooling (global context on)."""

    def __init__(self, channels: int, attention_channels: int) -> None:
        super().__init__()
        self.tdnn = TdnnBlock(channels * 3, attention_channels, 1, 1)
        self.tanh = nn.Tanh()
        self.conv = _Conv1d(attention_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        uniform = torch.ones_like(x[:, :1, :]) / frames
        mean, std = _stats(x, uniform)
        context = torch.cat([x, mean.unsqueeze(2).expand_as(x), std.unsqueeze(2).expand_as(x)], dim=1)
        attention = torch.softmax(self.conv(self.tanh(self.tdnn(context))), dim=2)
        mean, std = _stats(x, attention)
        return torch.cat([mean, std], dim=1).unsqueeze(2)


class EcapaTdnn(nn.Module):
    """(batch, frames, mels) log-mel features -> (batch, embedding_dim) raw embeddings."""

    def __init__(
        self,
        input_size: int = 80,
        channels: tuple[int, ...] = (1024, 1024, 1024, 1024, 3072),
        kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1),
        dilations: tuple[int, ...] = (1, 2, 3, 4, 1),
        attention_channels: int = 128,
        res2net_scale: int = 8,
        se_channels: int = 128,
        lin_neurons: int = 192,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TdnnBlock(input_size, channels[0], kernel_sizes[0], dilations[0])])
        for i in range(1, len(channels) - 1):
            if channels[i] != channels[i - 1]:
                raise ValueError("SE-Res2Net blocks without a shortcut need equal channel counts")
            self.blocks.append(SeRes2NetBlock(channels[i], res2net_scale, se_channels, kernel_sizes[i], dilations[i]))
        self.mfa = TdnnBlock(sum(channels[1:-1]), channels[-1], kernel_sizes[-1], dilations[-1])
        self.asp = AttentiveStatsPool(channels[-1], attention_channels)
        self.asp_bn = _BatchNorm1d(channels[-1] * 2)
        self.fc = _Conv1d(channels[-1] * 2, lin_neurons, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.transpose(1, 2)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        x = self.mfa(torch.cat(outputs[1:], dim=1))
        return self.fc(self.asp_bn(self.asp(x))).squeeze(2)
