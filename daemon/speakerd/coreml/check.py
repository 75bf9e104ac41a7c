"""Static check of a saved ``.mlpackage``: I/O contract, fixed shapes, FP16 compute, ANE-eligible ops.

Everything is read back from disk (the ``Model`` protobuf and the weights file), never from the
converter's in-memory program, so the check covers what the daemon will actually load. Passing it
means *eligible* for the Neural Engine; actual placement per shape can only be read on a Mac
(``MLComputePlan``), see docs/coreml.md.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .mil_exec import ConstValue, MilOp, MilProgram, load_program, read_spec

logger = logging.getLogger(__name__)

ARRAY_FLOAT32 = 65568
"""ArrayFeatureType.ArrayDataType.FLOAT32 in the CoreML Model proto."""

ANE_OPS: Mapping[str, str] = {
    # convolution / dense: the ANE's core; Apple's ANE transformer guide maps even linear layers to conv
    "conv": "Apple 'Deploying Transformers on the ANE' (2022); dilation must be 1 (hollance/neural-engine)",
    "linear": "Apple ANE transformer guide (dense layers); FluidAudio WeSpeaker-style model 93% on ANE",
    # elementwise and activations
    "add": "field-guide measurements (skyfallsin/apple-neural-engine-field-guide): add runs on ANE",
    "sub": "elementwise family of add/mul; ANE transformer guide (layer norm centring)",
    "mul": "field-guide measurements: same-shape and channel-broadcast mul on ANE",
    "real_div": "elementwise; only by a scalar here (unbiased variance factor)",
    "relu": "hollance/neural-engine: standard activations run on ANE",
    "sigmoid": "field-guide measurements: sigmoid on ANE",
    "tanh": "hollance/neural-engine: standard activations run on ANE",
    "sqrt": "ANE transformer guide layer norm (rsqrt/sqrt of a variance)",
    "square": "ANE transformer guide layer norm (squared deviations)",
    # reductions
    "reduce_mean": "ANE transformer guide layer norm (mean over channels)",
    # layout
    "concat": "ANE transformer guide (head concat); hollance: ND variants only are the problem",
    "split": "ANE transformer guide (per-head split)",
    "slice_by_index": "field-guide: slices of runtime tensors on ANE",
    "reshape": "field-guide measurements: reshape on ANE",
    "transpose": "ANE transformer guide (layout changes)",
    "expand_dims": "rank change without data movement",
    "squeeze": "rank change without data movement",
    "stack": "expand_dims + concat",
}
"""MIL ops taken as Neural-Engine eligible, with the public evidence for each (docs/coreml.md)."""

SHAPE_OPS = frozenset({"shape", "slice_by_index", "concat", "reduce_prod", "cast", "sub", "real_div", "mul", "add"})
"""Ops allowed on values derived only from tensor *shapes* (no tensor data): with enumerated shapes
coremltools leaves e.g. the n/(n-1) factor of the unbiased variance as a scalar computed from
``shape``. One scalar, no activation passes through it."""

KNOWN_OFF_ANE = {
    "lstm": "RNN layers do not run on the ANE (hollance/neural-engine); unroll the LSTM",
    "gru": "RNN layers do not run on the ANE (hollance/neural-engine)",
    "gather": "gather does not run on the ANE (hollance/neural-engine)",
    "tile": "tile corrupts ANE state (skyfallsin field guide)",
}


class CheckError(Exception):
    """A package fails the static check; the message lists every problem."""


@dataclass
class CheckReport:
    path: Path
    is_ml_program: bool = False
    input_name: str = ""
    input_dtype: str = ""
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    flexibility: str = ""
    """"fixed", "enumerated" or "range" (the last fails)."""
    output_name: str = ""
    output_dtype: str = ""
    output_shape: tuple[int, ...] = ()
    opset: str = ""
    op_counts: Counter[str] = field(default_factory=Counter)
    """Tensor ops of the main function (consts excluded)."""
    shape_op_counts: Counter[str] = field(default_factory=Counter)
    """Ops on values computed from input shapes alone (see SHAPE_OPS)."""
    io_casts: int = 0
    """FP32 input -> FP16 and FP16 -> FP32 output casts (two in a well-formed package)."""
    unknown_ops: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def window_frames(self) -> tuple[int, ...]:
        return tuple(shape[1] for shape in self.input_shapes if len(shape) == 3)

    def raise_for_problems(self) -> None:
        if self.problems:
            raise CheckError(f"{self.path} fails the CoreML check: " + "; ".join(self.problems))

    def summary(self) -> str:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.op_counts.items()))
        state = "OK" if self.ok else "FAILED: " + "; ".join(self.problems)
        return (
            f"{self.path.name}: {self.input_name} {self.input_dtype} {self.flexibility} {self.input_shapes} -> "
            f"{self.output_name} {self.output_dtype} {self.output_shape}; opset {self.opset}; ops: {ops}; {state}"
        )


def _array_dtype(code: int) -> str:
    return {65568: "FLOAT32", 65552: "FLOAT16", 65600: "DOUBLE", 131104: "INT32"}.get(code, f"code {code}")


def _check_io(spec: object, report: CheckReport, input_name: str, output_name: str) -> None:
    desc = spec.description  # type: ignore[attr-defined]
    if len(desc.input) != 1:
        report.problems.append(f"expected exactly one input, found {[i.name for i in desc.input]}")
    if len(desc.output) != 1:
        report.problems.append(f"expected exactly one output, found {[o.name for o in desc.output]}")
    if not desc.input or not desc.output:
        return
    inp, out = desc.input[0], desc.output[0]
    report.input_name, report.output_name = inp.name, out.name
    if inp.name != input_name:
        report.problems.append(f"input is named {inp.name!r}, expected {input_name!r}")
    if out.name != output_name:
        report.problems.append(f"output is named {out.name!r}, expected {output_name!r}")
    for role, feature in (("input", inp), ("output", out)):
        if feature.type.WhichOneof("Type") != "multiArrayType":
            report.problems.append(f"{role} {feature.name!r} is a {feature.type.WhichOneof('Type')}, not a multi-array")
            return
    arr = inp.type.multiArrayType
    report.input_dtype = _array_dtype(arr.dataType)
    report.output_dtype = _array_dtype(out.type.multiArrayType.dataType)
    report.output_shape = tuple(int(d) for d in out.type.multiArrayType.shape)
    for role, dtype in (("input", report.input_dtype), ("output", report.output_dtype)):
        if dtype != "FLOAT32":
            report.problems.append(f"{role} dtype is {dtype}, expected FLOAT32 (explicit FP32 I/O)")
    flex = arr.WhichOneof("ShapeFlexibility")
    if flex == "shapeRange":
        report.flexibility = "range"
        ranges = [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges]
        report.problems.append(f"input uses a flexible shape range (RangeDim) {ranges}: keeps the model off the ANE")
        report.input_shapes = [tuple(int(d) for d in arr.shape)]
    elif flex == "enumeratedShapes":
        report.flexibility = "enumerated"
        report.input_shapes = [tuple(int(d) for d in s.shape) for s in arr.enumeratedShapes.shapes]
    else:
        report.flexibility = "fixed"
        report.input_shapes = [tuple(int(d) for d in arr.shape)]


def _const_value(op: MilOp, key: str, consts: Mapping[str, object]) -> object | None:
    bindings = op.inputs.get(key)
    if not bindings:
        return None
    b = bindings[0]
    return b.value if isinstance(b, ConstValue) else consts.get(b)


def _check_ops(program: MilProgram, report: CheckReport, allowlist: Mapping[str, str]) -> None:
    consts = {op.outputs[0].name: op.value for op in program.ops if op.type == "const"}
    shape_derived: set[str] = set()
    unknown: set[str] = set()
    input_names = {spec.name for spec in program.inputs}
    for op in program.ops:
        if op.type == "const":
            continue
        named = [b for bindings in op.inputs.values() for b in bindings if isinstance(b, str) and b not in consts]
        if op.type == "shape" or (named and all(n in shape_derived for n in named) and op.type in SHAPE_OPS):
            shape_derived.update(spec.name for spec in op.outputs)
            report.shape_op_counts[op.type] += 1
            continue
        is_io_cast = op.type == "cast" and (
            any(b in input_names for b in named) or any(spec.name in program.outputs for spec in op.outputs)
        )
        if is_io_cast:  # FP32 I/O <-> FP16 compute at the boundary: part of CoreML's input/output binding
            report.io_casts += 1
            continue
        report.op_counts[op.type] += 1
        if op.type not in allowlist:
            unknown.add(op.type)
            reason = KNOWN_OFF_ANE.get(op.type, "not on the ANE allowlist")
            report.problems.append(f"op {op.type!r} ({op.name}): {reason}")
            continue
        if op.type == "conv":
            dil = _const_value(op, "dilations", consts)
            if dil is not None and np.any(np.asarray(dil) != 1):
                report.problems.append(f"conv {op.name} is dilated {list(np.asarray(dil))}: dilated conv is not on the ANE")
        out_dtypes = {str(spec.dtype) for spec in op.outputs}
        if out_dtypes != {"float16"}:
            report.problems.append(f"op {op.type} {op.name} computes in {sorted(out_dtypes)}, not FP16 (runs off the ANE)")
    report.unknown_ops = sorted(unknown)


def check_io(
    path: Path,
    *,
    input_name: str = "feats",
    output_name: str = "embs",
    feat_dim: int | None = None,
    window_frames: Sequence[int] | None = None,
    embedding_dim: int | None = None,
    vector_input: bool = False,
) -> CheckReport:
    """The I/O half of the check, from the model description only (cheap: no weights are read).

    The backend runs this at start to learn the enumerated window lengths. ``vector_input``: the
    input is one fixed (1, feat_dim) vector (the shared trunk's head takes pooled statistics),
    not (1, frames, bins).
    """
    path = Path(path)
    report = CheckReport(path=path)
    spec = read_spec(path)
    if spec.WhichOneof("Type") != "mlProgram":
        report.problems.append(f"model type is {spec.WhichOneof('Type')!r}, expected an ML Program")
        return report
    report.is_ml_program = True
    _check_io(spec, report, input_name, output_name)
    for shape in report.input_shapes:
        if vector_input:
            if report.flexibility != "fixed" or shape != (1, feat_dim if feat_dim is not None else shape[-1]):
                report.problems.append(f"input shape {shape} ({report.flexibility}) is not a fixed (1, {feat_dim})")
        elif len(shape) != 3 or shape[0] != 1:
            report.problems.append(f"input shape {shape} is not (1, frames, bins)")
        elif feat_dim is not None and shape[2] != feat_dim:
            report.problems.append(f"input shape {shape} has {shape[2]} bins, expected {feat_dim}")
    if window_frames is not None and sorted(set(report.window_frames)) != sorted(set(int(f) for f in window_frames)):
        report.problems.append(f"package enumerates frames {list(report.window_frames)}, expected {list(window_frames)}")
    if embedding_dim is not None and report.output_shape and report.output_shape[-1] != embedding_dim:
        report.problems.append(f"output shape {report.output_shape}, expected embedding size {embedding_dim}")
    return report


def check_mlpackage(
    path: Path,
    *,
    input_name: str = "feats",
    output_name: str = "embs",
    feat_dim: int | None = None,
    window_frames: Sequence[int] | None = None,
    embedding_dim: int | None = None,
    allowlist: Mapping[str, str] = ANE_OPS,
    vector_input: bool = False,
) -> CheckReport:
    """Check the saved package at ``path``; ``report.problems`` lists every failure (empty when OK)."""
    report = check_io(
        path,
        input_name=input_name,
        output_name=output_name,
        feat_dim=feat_dim,
        window_frames=window_frames,
        embedding_dim=embedding_dim,
        vector_input=vector_input,
    )
    if not report.is_ml_program:
        return report
    program = load_program(report.path)
    report.opset = program.opset
    for spec_in in program.inputs:
        if any(d is None for d in spec_in.shape) and report.flexibility != "enumerated":
            report.problems.append(f"program input {spec_in.name} has unknown dimensions {spec_in.shape} without enumerated shapes")
    _check_ops(program, report, allowlist)
    if report.ok:
        logger.info("CoreML check passed: %s", report.summary())
    else:
        logger.warning("CoreML check failed: %s", report.summary())
    return report
