"""Where a bundle's CoreML packages are, and which window lengths (frames) each one serves.

A bundle's ``artifacts.coreml`` names one of two layouts:

- **one package** (``model.mlpackage``) whose input enumerates every window length
  (``EnumeratedShapes``): the WeSpeaker ResNet34, a conv net that any length runs through;
- **a directory of fixed-shape packages**, ``frames-<T>.mlpackage`` per window length: GE2E, whose
  LSTM is unrolled for the Neural Engine and so has exactly one length per program.

Not one multifunction package: coremltools saves those only for iOS 18 / macOS 15 (ML Program
spec 9), and selecting a function at load time (``MLModelConfiguration.functionName``) needs
macOS 15 too, while the packages target macOS 13. GE2E's weights are 1.4 M parameters (2.8 MB in
FP16), so storing them once per length costs little.

Reading a layout needs only coremltools' protobuf classes (no weights are read), so the backend
does it at start-up on macOS and the build and tests do it on Linux.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .check import CheckError, check_io
from .mil_exec import read_spec

logger = logging.getLogger(__name__)

PACKAGE_SUFFIX = ".mlpackage"
PER_LENGTH_DIR = "coreml"
"""Directory name, inside a bundle, of the per-length layout (the manifest's ``artifacts.coreml``)."""
TRUNK_PACKAGE = "trunk.mlpackage"
"""The shared trunk's chunk package (manifest ``artifacts.coreml_trunk``): input ``feats``
(1, L, bins + 1), features plus a validity mask column, L enumerated over the pass lengths
(``speakerd.embedding.trunk.CHUNK_FRAMES``); output ``frames`` (1, C*F, L/8), layer 4."""
HEAD_PACKAGE = "head.mlpackage"
"""The shared trunk's head package (manifest ``artifacts.coreml_head``): pooled statistics
``stats`` (1, 2*C*F), fixed, -> ``embs`` (1, D): the ``seg_1`` layer."""
TRUNK_ARTIFACT = "coreml_trunk"
HEAD_ARTIFACT = "coreml_head"
TRUNK_IO = ("feats", "frames")
HEAD_IO = ("stats", "embs")
_PER_LENGTH_NAME = re.compile(r"^frames-(\d+)\.mlpackage$")


def per_length_name(frames: int) -> str:
    """File name of the fixed-shape package for windows of ``frames`` frames."""
    return f"frames-{int(frames)}{PACKAGE_SUFFIX}"


def is_package(path: Path) -> bool:
    return path.suffix == PACKAGE_SUFFIX or (path / "Manifest.json").is_file()


@dataclass(frozen=True)
class PackageSet:
    """The packages of one bundle artifact and the window lengths each serves."""

    artifact: Path
    packages: dict[Path, tuple[int, ...]]
    """Package -> the frame counts its input accepts (several when enumerated, else one)."""

    @property
    def layout(self) -> str:
        """"package" (one package, possibly enumerated) or "per-length" (a directory)."""
        return "package" if is_package(self.artifact) else "per-length"

    @property
    def window_frames(self) -> tuple[int, ...]:
        return tuple(sorted({f for frames in self.packages.values() for f in frames}))

    def package_for(self, frames: int) -> Path | None:
        for package, served in self.packages.items():
            if frames in served:
                return package
        return None


def list_packages(artifact: Path) -> list[Path]:
    """The packages of ``artifact``: itself if it is a package, else its ``frames-<T>.mlpackage``
    entries ordered by length. Raises CheckError if there are none."""
    artifact = Path(artifact)
    if is_package(artifact):
        return [artifact]
    if not artifact.is_dir():
        raise CheckError(f"{artifact} is neither an .mlpackage nor a directory of them")
    found = sorted(
        ((int(m.group(1)), p) for p in artifact.iterdir() if (m := _PER_LENGTH_NAME.match(p.name))),
        key=lambda item: item[0],
    )
    if not found:
        raise CheckError(f"{artifact} holds no frames-<T>{PACKAGE_SUFFIX} packages")
    return [p for _, p in found]


def read_package_set(
    artifact: Path,
    *,
    input_name: str = "feats",
    output_name: str = "embs",
    feat_dim: int | None = None,
    embedding_dim: int | None = None,
) -> PackageSet:
    """Read every package's I/O (no weights) and map it to the lengths it serves.

    Raises CheckError listing every problem: a package failing :func:`check_io`, a per-length
    package whose name disagrees with its fixed input shape, or one length served twice.
    """
    packages: dict[Path, tuple[int, ...]] = {}
    problems: list[str] = []
    owner: dict[int, Path] = {}
    for package in list_packages(artifact):
        report = check_io(
            package, input_name=input_name, output_name=output_name, feat_dim=feat_dim, embedding_dim=embedding_dim
        )
        problems.extend(f"{package.name}: {p}" for p in report.problems)
        named = _PER_LENGTH_NAME.match(package.name)
        if named and report.window_frames != (int(named.group(1)),):
            problems.append(f"{package.name} takes {list(report.window_frames)} frames, not what its name says")
        for frames in report.window_frames:
            if frames in owner:
                problems.append(f"{frames} frames served by both {owner[frames].name} and {package.name}")
            owner[frames] = package
        packages[package] = report.window_frames
    if problems:
        raise CheckError(f"{artifact}: " + "; ".join(problems))
    return PackageSet(artifact=Path(artifact), packages=packages)


def package_metadata(package: Path) -> dict[str, str]:
    """The package's user-defined metadata (what the converter stamped on it), read from disk."""
    spec = read_spec(Path(package))
    return dict(spec.description.metadata.userDefined)


def missing_frames(served: Sequence[int], needed: Sequence[int]) -> list[int]:
    return sorted(set(int(f) for f in needed) - set(int(f) for f in served))
