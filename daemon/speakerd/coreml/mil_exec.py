"""A small numpy executor for the MIL programs speakerd saves, read back from the ``.mlpackage`` on disk.

CoreML cannot predict on Linux, so the saved package is proven right by running its own program:
the operations, constants and weights are parsed from ``Data/com.apple.CoreML/model.mlmodel`` and
``weights/weight.bin`` (nothing comes from the converter's in-memory program), executed with numpy,
and every op result is rounded to the dtype the program declares for it. An op declared fp16 is
therefore stored in fp16 as the device stores it; inside one op numpy computes in fp32, i.e. this
models FP16 storage with FP32 accumulation (what the Neural Engine is reported to do for conv and
matmul; reductions may differ on hardware, see docs/coreml.md).

Only the operations the ResNet and GE2E programs contain are implemented; any other op raises
:class:`UnsupportedOpError` naming it, so a converter change that introduces a new op is caught.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MODEL_FILE = "model.mlmodel"
DATA_DIR = Path("Data") / "com.apple.CoreML"
MODEL_PATH_TOKEN = "@model_path"
"""Blob file names in the program are relative to the folder holding model.mlmodel."""

BLOB_SENTINEL = 0xDEADBEEF
BLOB_STORAGE_VERSION = 2
BLOB_HEADER = struct.Struct("<II")  # storage_header: count, version (then 7 reserved uint64)
BLOB_METADATA = struct.Struct("<IIQQ")  # blob_metadata: sentinel, mil_dtype, sizeInBytes, offset
BLOB_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float16),
    2: np.dtype(np.float32),
    3: np.dtype(np.uint8),
    4: np.dtype(np.int8),
}
"""MILBlob::Blob::BlobDataType (coremltools mlmodel/src/MILBlob/Blob/StorageFormat.hpp)."""

# MILSpec.DataType enum values (coremltools/proto MIL.proto) -> numpy
PROTO_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.bool_),
    10: np.dtype(np.float16),
    11: np.dtype(np.float32),
    12: np.dtype(np.float64),
    21: np.dtype(np.int8),
    22: np.dtype(np.int16),
    23: np.dtype(np.int32),
    24: np.dtype(np.int64),
    31: np.dtype(np.uint8),
    32: np.dtype(np.uint16),
    33: np.dtype(np.uint32),
    34: np.dtype(np.uint64),
}
PROTO_STRING = 2
CAST_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": np.bool_}


class MilError(Exception):
    """The package cannot be read or its program cannot be executed."""


class UnsupportedOpError(MilError):
    """The program holds an operation this executor does not implement."""

    def __init__(self, op_type: str, op_name: str = "") -> None:
        where = f" (op {op_name!r})" if op_name else ""
        super().__init__(f"MIL op {op_type!r}{where} is not supported by the reference executor")
        self.op_type = op_type


@dataclass(frozen=True)
class ValueSpec:
    """Declared type of a program value; ``None`` in ``shape`` is a dimension unknown until run time."""

    name: str
    dtype: np.dtype | None  # None for strings
    shape: tuple[int | None, ...]


@dataclass
class MilOp:
    type: str
    name: str
    inputs: dict[str, list[Any]]
    """Input name -> bindings; a binding is a value name (str) or an inline constant (ConstValue)."""
    outputs: list[ValueSpec]
    value: Any = None
    """For ``const``: the decoded value."""


@dataclass(frozen=True)
class ConstValue:
    value: Any


@dataclass
class MilProgram:
    """The main function of a saved ML Program, with constants already decoded."""

    package: Path
    opset: str
    inputs: list[ValueSpec]
    outputs: list[str]
    ops: list[MilOp]
    output_specs: dict[str, ValueSpec] = field(default_factory=dict)

    def op_types(self) -> list[str]:
        return [op.type for op in self.ops]


def package_model_path(package: Path) -> Path:
    """The root model file, as the package's ``Manifest.json`` names it."""
    manifest = package / "Manifest.json"
    try:
        info = json.loads(manifest.read_text())
        root = info["itemInfoEntries"][info["rootModelIdentifier"]]
        return package / "Data" / root["path"]
    except FileNotFoundError:
        raise MilError(f"{package} is not an .mlpackage (no Manifest.json)") from None
    except (KeyError, json.JSONDecodeError) as exc:
        raise MilError(f"{manifest} is unreadable: {exc}") from None


def read_spec(package: Path) -> Any:
    """The ``Model`` protobuf of a saved package, parsed from disk with coremltools' proto classes only."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(package_model_path(package).read_bytes())
    return spec


class BlobReader:
    """Reads tensors from a MIL blob storage file (``weight.bin``), format version 2.

    Layout: a 64-byte storage header (count, version), then per blob a 64-byte ``blob_metadata``
    (sentinel 0xDEADBEEF, dtype, size in bytes, data offset) and its data, each 64-byte aligned. A
    ``BlobFileValue`` offset in the program points at the metadata, not at the data.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data = np.memmap(path, dtype=np.uint8, mode="r")
        if len(self._data) < BLOB_HEADER.size:
            raise MilError(f"{path}: too short for a blob storage header")
        count, version = BLOB_HEADER.unpack_from(self._data, 0)
        if version != BLOB_STORAGE_VERSION:
            raise MilError(f"{path}: blob storage version {version}, expected {BLOB_STORAGE_VERSION}")
        self.count = count

    def read(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if offset + BLOB_METADATA.size > len(self._data):
            raise MilError(f"{self.path}: blob metadata offset {offset} past the end")
        sentinel, blob_dtype, size, data_offset = BLOB_METADATA.unpack_from(self._data, offset)
        if sentinel != BLOB_SENTINEL:
            raise MilError(f"{self.path}: bad blob sentinel {sentinel:#x} at offset {offset}")
        stored = BLOB_DTYPES.get(blob_dtype)
        if stored is None or stored != dtype:
            raise MilError(f"{self.path}: blob at {offset} has dtype code {blob_dtype}, program expects {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size != expected or data_offset + size > len(self._data):
            raise MilError(f"{self.path}: blob at {offset} holds {size} bytes, program expects {expected}")
        raw = np.frombuffer(self._data, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=data_offset)
        return raw.reshape(shape).copy()


def _value_type(vtype: Any) -> tuple[np.dtype | None, tuple[int | None, ...]]:
    if vtype.WhichOneof("type") != "tensorType":
        raise MilError(f"unsupported MIL value type {vtype.WhichOneof('type')!r}")
    tt = vtype.tensorType
    dims: list[int | None] = []
    for d in tt.dimensions:
        dims.append(int(d.constant.size) if d.WhichOneof("dimension") == "constant" else None)
    if tt.dataType == PROTO_STRING:
        return None, tuple(dims)
    dtype = PROTO_DTYPES.get(tt.dataType)
    if dtype is None:
        raise MilError(f"unsupported MIL data type code {tt.dataType}")
    return dtype, tuple(dims)


def _decode_value(value: Any, blobs: Callable[[str], BlobReader]) -> Any:
    """A MIL ``Value`` (immediate or blob file) as a numpy array, or a str for string scalars."""
    dtype, shape = _value_type(value.type)
    kind = value.WhichOneof("value")
    if kind == "blobFileValue":
        if dtype is None or any(d is None for d in shape):
            raise MilError("blob constant with a string type or an unknown dimension")
        return blobs(value.blobFileValue.fileName).read(int(value.blobFileValue.offset), dtype, shape)  # type: ignore[arg-type]
    if kind != "immediateValue" or value.immediateValue.WhichOneof("value") != "tensor":
        raise MilError(f"unsupported MIL constant kind {kind!r}")
    tensor = value.immediateValue.tensor
    field_name = tensor.WhichOneof("value")
    if dtype is None:
        strings = list(tensor.strings.values)
        return strings[0] if not shape else np.array(strings).reshape(shape)
    if field_name == "bytes":
        arr = np.frombuffer(tensor.bytes.values, dtype=dtype).copy()
    elif field_name is None:
        arr = np.zeros(0, dtype=dtype)
    else:
        arr = np.asarray(list(getattr(tensor, field_name).values)).astype(dtype)
    return arr.reshape(tuple(int(d) for d in shape))  # type: ignore[arg-type]


def load_program(package: Path, function: str = "main") -> MilProgram:
    """Parse ``function`` of a saved ``.mlpackage`` and decode every constant (weights included)."""
    package = Path(package)
    spec = read_spec(package)
    if spec.WhichOneof("Type") != "mlProgram":
        raise MilError(f"{package} holds a {spec.WhichOneof('Type')!r} model, not an ML Program")
    functions = spec.mlProgram.functions
    if function not in functions:
        raise MilError(f"{package}: no function {function!r} (has {', '.join(functions)})")
    fn = functions[function]
    block = fn.block_specializations[fn.opset]
    model_dir = package_model_path(package).parent
    readers: dict[str, BlobReader] = {}

    def blobs(file_name: str) -> BlobReader:
        if file_name not in readers:
            rel = file_name.replace(MODEL_PATH_TOKEN, "").lstrip("/")
            readers[file_name] = BlobReader(model_dir / rel)
        return readers[file_name]

    inputs = [ValueSpec(nv.name, *_value_type(nv.type)) for nv in fn.inputs]
    ops: list[MilOp] = []
    for proto_op in block.operations:
        if len(proto_op.blocks):
            raise UnsupportedOpError(proto_op.type, "nested blocks")
        name_attr = proto_op.attributes.get("name")
        name = _decode_value(name_attr, blobs) if name_attr is not None else ""
        outputs = [ValueSpec(o.name, *_value_type(o.type)) for o in proto_op.outputs]
        op_inputs: dict[str, list[Any]] = {}
        for key, arg in proto_op.inputs.items():
            op_inputs[key] = [
                b.name if b.WhichOneof("binding") == "name" else ConstValue(_decode_value(b.value, blobs))
                for b in arg.arguments
            ]
        op = MilOp(type=proto_op.type, name=str(name), inputs=op_inputs, outputs=outputs)
        if proto_op.type == "const":
            op.value = _decode_value(proto_op.attributes["val"], blobs)
        ops.append(op)
    output_specs = {spec_out.name: spec_out for op in ops for spec_out in op.outputs if spec_out.name in block.outputs}
    return MilProgram(
        package=package,
        opset=fn.opset,
        inputs=inputs,
        outputs=list(block.outputs),
        ops=ops,
        output_specs=output_specs,
    )


# --- operations -----------------------------------------------------------------------------------


def _f32(x: np.ndarray) -> np.ndarray:
    """Upcast fp16 for the arithmetic of one op (its result is rounded back by the executor)."""
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _ints(x: Any) -> list[int]:
    return [int(v) for v in np.atleast_1d(np.asarray(x))]


def _conv_pads(
    pad_type: str, pad: Sequence[int], size: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dil: Sequence[int]
) -> list[tuple[int, int]]:
    if pad_type == "valid":
        return [(0, 0)] * len(size)
    if pad_type == "custom":
        return [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(len(size))]
    if pad_type in ("same", "same_lower"):
        pads = []
        for n, k, s, d in zip(size, kernel, strides, dil):
            out = -(-n // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
            small = total // 2
            pads.append((small, total - small) if pad_type == "same" else (total - small, small))
        return pads
    raise MilError(f"conv pad_type {pad_type!r} is not supported")


def _conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, *, strides: Sequence[int], pad_type: str,
          pad: Sequence[int], dilations: Sequence[int], groups: int) -> np.ndarray:  # fmt: skip
    """2-D convolution (N, C, H, W) by im2col and one matmul."""
    if x.ndim != 4 or groups != 1:
        raise UnsupportedOpError("conv", f"rank {x.ndim}, groups {groups}: only 2-D, groups=1 is implemented")
    n, c, h, w = x.shape
    out_c, in_c, kh, kw = weight.shape
    (pt, pb), (pl, pr) = _conv_pads(pad_type, pad, (h, w), (kh, kw), strides, dilations)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    sh, sw = strides
    dh, dw = dilations
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
    out = np.einsum("ok,nkp->nop", weight.reshape(out_c, -1), cols.reshape(n, c * kh * kw, oh * ow), optimize=True)
    out = out.reshape(n, out_c, oh, ow)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


def _reduce(fn: Callable[..., np.ndarray]) -> Callable[[OpArgs], list[np.ndarray]]:
    def run(a: OpArgs) -> list[np.ndarray]:
        x = a.x("x")
        axes = a.opt("axes")
        axis = tuple(_ints(axes)) if axes is not None else None
        keep = bool(a.opt("keep_dims", False))
        data = _f32(x) if x.dtype.kind == "f" else x
        return [np.asarray(fn(data, axis=axis, keepdims=keep))]

    return run


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[OpArgs], list[np.ndarray]]:
    return lambda a: [np.asarray(fn(_f32(np.asarray(a.x("x"))), _f32(np.asarray(a.x("y")))))]


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[OpArgs], list[np.ndarray]]:
    return lambda a: [np.asarray(fn(_f32(np.asarray(a.x("x")))))]


def _slice_by_index(a: OpArgs) -> list[np.ndarray]:
    x = np.asarray(a.x("x"))
    rank = x.ndim
    begin = _ints(a.x("begin"))
    end = _ints(a.x("end"))
    stride = _ints(a.opt("stride", [1] * rank))
    begin_mask = [bool(v) for v in np.atleast_1d(a.opt("begin_mask", [False] * rank))]
    end_mask = [bool(v) for v in np.atleast_1d(a.opt("end_mask", [False] * rank))]
    squeeze_mask = [bool(v) for v in np.atleast_1d(a.opt("squeeze_mask", [False] * rank))]
    slices = []
    for i in range(rank):
        if squeeze_mask[i]:
            slices.append(begin[i] if begin[i] >= 0 else begin[i] + x.shape[i])
            continue
        slices.append(slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i]))
    return [np.asarray(x[tuple(slices)])]


def _split(a: OpArgs) -> list[np.ndarray]:
    x = a.x("x")
    axis = int(a.x("axis"))
    sizes = a.opt("split_sizes")
    if sizes is not None:
        bounds = np.cumsum(_ints(sizes))[:-1]
        return list(np.split(x, bounds, axis=axis))
    return list(np.split(x, int(a.x("num_splits")), axis=axis))


def _reshape(a: OpArgs) -> list[np.ndarray]:
    x = a.x("x")
    shape = _ints(a.x("shape"))
    if len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _squeeze(a: OpArgs) -> list[np.ndarray]:
    x = a.x("x")
    axes = a.opt("axes")
    if axes is None:
        return [np.squeeze(x)]
    keep = tuple(ax % x.ndim for ax in _ints(axes) if x.shape[ax] == 1)
    return [np.squeeze(x, axis=keep)]


def _cast(a: OpArgs) -> list[np.ndarray]:
    dtype = CAST_DTYPES.get(str(a.x("dtype")))
    if dtype is None:
        raise MilError(f"cast to {a.x('dtype')!r} is not supported")
    return [np.asarray(a.x("x")).astype(dtype)]


def _conv_op(a: OpArgs) -> list[np.ndarray]:
    x = _f32(a.x("x"))
    rank = x.ndim - 2
    return [
        _conv(
            x,
            _f32(a.x("weight")),
            None if a.opt("bias") is None else _f32(a.opt("bias")),
            strides=_ints(a.opt("strides", [1] * rank)),
            pad_type=str(a.opt("pad_type", "valid")),
            pad=_ints(a.opt("pad", [0] * 2 * rank)),
            dilations=_ints(a.opt("dilations", [1] * rank)),
            groups=int(a.opt("groups", 1)),
        )
    ]


def _linear(a: OpArgs) -> list[np.ndarray]:
    out = _f32(a.x("x")) @ _f32(a.x("weight")).T
    bias = a.opt("bias")
    return [out + _f32(bias) if bias is not None else out]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # no overflow warning for large |x|


OPS: dict[str, Callable[[OpArgs], list[np.ndarray]]] = {
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "relu": _unary(lambda x: np.maximum(x, 0)),
    "sigmoid": _unary(_sigmoid),
    "tanh": _unary(np.tanh),
    "sqrt": _unary(np.sqrt),
    "square": _unary(np.square),
    "reduce_mean": _reduce(np.mean),
    "reduce_prod": _reduce(np.prod),
    "cast": _cast,
    "conv": _conv_op,
    "linear": _linear,
    "transpose": lambda a: [np.transpose(a.x("x"), _ints(a.x("perm")))],
    "expand_dims": lambda a: [np.expand_dims(a.x("x"), tuple(_ints(a.x("axes"))))],
    "squeeze": _squeeze,
    "reshape": _reshape,
    "concat": lambda a: [np.concatenate([np.atleast_1d(v) for v in a.many("values")], axis=int(a.x("axis")))],
    "stack": lambda a: [np.stack(a.many("values"), axis=int(a.x("axis")))],
    "split": _split,
    "slice_by_index": _slice_by_index,
    "shape": lambda a: [np.asarray(np.shape(a.x("x")), dtype=np.int32)],
}
"""The executor's op set: what the ResNet (conv/BN-folded/ReLU/var-pool/linear) and unrolled-LSTM
GE2E programs contain, and nothing else."""


class OpArgs:
    """Resolved inputs of one op."""

    def __init__(self, op: MilOp, env: Mapping[str, Any]) -> None:
        self.op = op
        self._env = env

    def _resolve(self, binding: Any) -> Any:
        if isinstance(binding, ConstValue):
            return binding.value
        try:
            return self._env[binding]
        except KeyError:
            raise MilError(f"op {self.op.name!r} ({self.op.type}) reads {binding!r} before it is defined") from None

    def x(self, key: str) -> Any:
        bindings = self.op.inputs.get(key)
        if not bindings:
            raise MilError(f"op {self.op.name!r} ({self.op.type}) has no input {key!r}")
        return self._resolve(bindings[0])

    def opt(self, key: str, default: Any = None) -> Any:
        return self.x(key) if self.op.inputs.get(key) else default

    def many(self, key: str) -> list[Any]:
        return [self._resolve(b) for b in self.op.inputs.get(key, [])]


@dataclass
class RunStats:
    """What one run saw: the largest finite fp16 magnitude (FP16 overflows at 65504) and any op
    whose output was not finite."""

    peak_fp16: float = 0.0
    peak_op: str = ""
    nonfinite_ops: list[str] = field(default_factory=list)


class MilExecutor:
    """Runs a :class:`MilProgram` on numpy inputs; construct once, ``run`` many times."""

    def __init__(self, program: MilProgram) -> None:
        self.program = program
        unknown = sorted({op.type for op in program.ops if op.type != "const" and op.type not in OPS})
        if unknown:
            raise UnsupportedOpError(unknown[0], f"also: {', '.join(unknown[1:])}" if len(unknown) > 1 else "")
        self._consts = {op.outputs[0].name: op.value for op in program.ops if op.type == "const"}
        self.stats = RunStats()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, Any] = dict(self._consts)
        for spec in self.program.inputs:
            if spec.name not in feeds:
                raise MilError(f"missing input {spec.name!r}")
            value = np.asarray(feeds[spec.name])
            if len(value.shape) != len(spec.shape) or any(
                d is not None and d != v for d, v in zip(spec.shape, value.shape)
            ):
                raise MilError(f"input {spec.name!r} has shape {value.shape}, program declares {spec.shape}")
            env[spec.name] = value.astype(spec.dtype) if spec.dtype is not None else value
        stats = RunStats()
        for op in self.program.ops:
            if op.type == "const":
                continue
            results = OPS[op.type](OpArgs(op, env))
            if len(results) != len(op.outputs):
                raise MilError(f"op {op.name!r} ({op.type}) gave {len(results)} outputs, declares {len(op.outputs)}")
            for spec, result in zip(op.outputs, results):
                value = np.asarray(result)
                if spec.dtype is not None:
                    value = value.astype(spec.dtype)  # the rounding the device's storage does
                if len(spec.shape) != value.ndim or any(d is not None and d != v for d, v in zip(spec.shape, value.shape)):
                    raise MilError(f"op {op.name!r} ({op.type}) gave shape {value.shape}, declares {spec.shape}")
                if value.dtype == np.float16:
                    finite = np.isfinite(value)
                    if not finite.all():
                        stats.nonfinite_ops.append(f"{op.type}:{op.name}")
                    peak = float(np.abs(value[finite]).max(initial=0.0))
                    if peak > stats.peak_fp16:
                        stats.peak_fp16, stats.peak_op = peak, f"{op.type}:{op.name}"
                env[spec.name] = value
        self.stats = stats
        return {name: env[name] for name in self.program.outputs}


def run_package(package: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Load and run once (tests and one-off checks; keep a :class:`MilExecutor` for repeated runs)."""
    return MilExecutor(load_program(package)).run(feeds)
