"""The ResNet34 split for a shared trunk: the convolutional trunk alone (frame-level layer-4 output)
as ONNX, and the ``seg_1`` linear layer as a second small ONNX (statistics pooling, cheap reductions,
runs in numpy; the linear layer does not, because numpy's threaded BLAS took 10-20 ms for one
5120 x 256 product on a loaded 2-core machine against 0.06 ms single-threaded).

The trunk is convolutional in time, so the daemon runs it once per stretch of speech and makes each
window's embedding from its slice of the output (``speakerd.embedding.trunk``), instead of running
the whole network for every overlapping window and probe.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

TRUNK_FILE = "wespeaker_resnet34.trunk.onnx"
HEAD_FILE = "wespeaker_resnet34.head.onnx"
TRUNK_OUTPUT = "frames"
EXPORT_FRAMES = 200
MIN_TRUNK_COSINE = 0.99999
"""Trunk + head against the whole network on the same window; below this the split is wrong."""


def export_trunk(model: Any, out_dir: Path, opset: int = 17) -> tuple[Path, Path]:
    """Write the trunk ONNX ((B, T, F) -> (B, C*F/8, ceil(T/8))) and the head arrays; return both paths."""
    import torch
    from torch import nn

    class Trunk(nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, feats: torch.Tensor) -> torch.Tensor:
            return self.inner.frame_level(feats).flatten(start_dim=1, end_dim=2)

    trunk_path, head_path = out_dir / TRUNK_FILE, out_dir / HEAD_FILE
    tmp = trunk_path.with_name(trunk_path.name + ".tmp")
    dummy = torch.randn(1, EXPORT_FRAMES, int(getattr(model, "feat_dim", 80)))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            Trunk(model).eval(), (dummy,), str(tmp), dynamo=False, opset_version=opset,
            input_names=["feats"], output_names=[TRUNK_OUTPUT],
            dynamic_axes={"feats": {0: "B", 1: "T"}, TRUNK_OUTPUT: {0: "B", 2: "T8"}}, do_constant_folding=True,
        )  # fmt: skip
    tmp.replace(trunk_path)
    tmp = head_path.with_name(head_path.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model.seg_1, (torch.randn(2, model.seg_1.in_features),), str(tmp), dynamo=False, opset_version=opset,
            input_names=["stats"], output_names=["embs"], dynamic_axes={"stats": {0: "B"}, "embs": {0: "B"}},
        )  # fmt: skip
    tmp.replace(head_path)
    return trunk_path, head_path


def verify_trunk(model: Any, trunk_path: Path, head_path: Path, frames: int = 148) -> float:
    """Worst cosine of trunk + head against the whole PyTorch network on random windows."""
    import torch

    from ...embedding.trunk import Head
    from ...embedding.onnx_backend import make_session

    session = make_session(trunk_path, 1)
    head = Head.load(head_path, float(model.pooling_eps))
    feats = np.random.default_rng(0).standard_normal((2, frames, int(getattr(model, "feat_dim", 80)))).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(feats)).numpy()
    (out,) = session.run([TRUNK_OUTPUT], {"feats": feats})
    got = head.embed([o for o in out])
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return float(cos.min())
