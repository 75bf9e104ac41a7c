"""GE2E's LSTM as a streaming step: the bundle's own weights, with the recurrent state in and out.

``embedding/lockstep.py`` advances every window and probe of a speech region through the LSTM
together, frame by frame as audio arrives, instead of running each from scratch when it is
complete. That needs the network with its state exposed, which ``model.onnx`` hides (it starts
every sequence from zeros and returns only the embedding). This graph is the same three LSTM
nodes with the same initializers, rewired; no weight is re-exported, so nothing can drift:

    inputs   x (T, B, 40)       mel power frames, time-major, one column per window in flight
             h, c (3, B, 256)   each layer's state before the first frame (zeros for a new window)
             pick (K,)          flat indices t * B + b of the steps whose embedding is wanted
    outputs  h_out, c_out       the state after the last frame
             embs (K, 256)      Linear + ReLU + L2 norm of the last layer's output at those steps

Built from ``model.onnx`` by ``speakerd models build`` and ``scripts/setup`` (needs the ``onnx``
package of the build extra, not torch). A bundle without it embeds each window on its own.

Beside it, when the bundle has an INT8 file, ``model.stream.int8.onnx``: the same graph quantised
the way ``model.int8.onnx`` is (models/ge2e_int8.py: layers 2-3 and the linear layer int8), so
``embedding.precision`` picks rows of the same precision as the whole-window path.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..bundle import ModelBundle, load_bundle, write_manifest
from ..embedding.backend import INT8_ARTIFACT, STREAM_ARTIFACT, STREAM_INT8_ARTIFACT

logger = logging.getLogger(__name__)

STREAM_FILE = "model.stream.onnx"
STREAM_INT8_FILE = "model.stream.int8.onnx"
LAYERS = 3


class StreamGraphError(Exception):
    """``model.onnx`` is not the LSTM graph this module knows how to rewire."""


def build_stream(src: Path, dst: Path) -> Path:
    """Write the streaming graph of the GE2E ONNX file ``src`` to ``dst``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    lstms = [n for n in graph.node if n.op_type == "LSTM"]
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    if len(lstms) != LAYERS or len(gemms) != 1 or not all(a in inits for a in gemms[0].input[1:3]):
        raise StreamGraphError(f"{src}: expected {LAYERS} LSTM nodes and one Gemm with stored weights")
    hidden = int({a.name: helper.get_attribute_value(a) for a in lstms[0].attribute}["hidden_size"])
    nodes = [
        helper.make_node("Split", ["h", "split3"], [f"h{i}" for i in range(LAYERS)], axis=0),
        helper.make_node("Split", ["c", "split3"], [f"c{i}" for i in range(LAYERS)], axis=0),
    ]
    used: list[str] = []
    x = "x"
    for i, node in enumerate(lstms):
        ins = list(node.input) + [""] * (7 - len(node.input))
        used += [a for a in ins[1:4] if a]
        ins[0], ins[4], ins[5], ins[6] = x, "", f"h{i}", f"c{i}"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        # named, so quantisation can keep layer 1 in float (models/ge2e_int8.py)
        nodes.append(helper.make_node("LSTM", ins, [f"y{i}", f"h_out{i}", f"c_out{i}"], name=node.name or f"lstm{i}", **attrs))
        nodes.append(helper.make_node("Squeeze", [f"y{i}", "axis1"], [f"s{i}"]))  # (T, 1, B, H) -> (T, B, H)
        x = f"s{i}"
    weight, bias = gemms[0].input[1:3]
    transposed = {a.name: helper.get_attribute_value(a) for a in gemms[0].attribute}.get("transB", 0)
    used += [weight, bias]
    nodes += [
        helper.make_node("Concat", [f"h_out{i}" for i in range(LAYERS)], ["h_out"], axis=0),
        helper.make_node("Concat", [f"c_out{i}" for i in range(LAYERS)], ["c_out"], axis=0),
        helper.make_node("Reshape", [x, "flat"], ["steps"]),
        helper.make_node("Gather", ["steps", "pick"], ["picked"], axis=0),
        helper.make_node("Gemm", ["picked", weight, bias], ["linear"], transB=transposed),
        helper.make_node("Relu", ["linear"], ["relu"]),
        helper.make_node("ReduceL2", ["relu"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Clip", ["norm", "eps"], ["safe"]),
        helper.make_node("Div", ["relu", "safe"], ["embs"]),
    ]
    consts = [
        numpy_helper.from_array(np.array([1, 1, 1], np.int64), "split3"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([-1, hidden], np.int64), "flat"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
    ]
    state = [LAYERS, "B", hidden]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", 40]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, state),
        helper.make_tensor_value_info("c", TensorProto.FLOAT, state),
        helper.make_tensor_value_info("pick", TensorProto.INT64, ["K"]),
    ]
    outputs = [
        helper.make_tensor_value_info("h_out", TensorProto.FLOAT, state),
        helper.make_tensor_value_info("c_out", TensorProto.FLOAT, state),
        helper.make_tensor_value_info("embs", TensorProto.FLOAT, ["K", hidden]),
    ]
    out = helper.make_graph(nodes, "ge2e_stream", inputs, outputs, [inits[u] for u in dict.fromkeys(used)] + consts)
    stream = helper.make_model(out, opset_imports=model.opset_import)
    stream.ir_version = model.ir_version
    onnx.checker.check_model(stream)
    tmp = dst.with_name(f".{dst.name}.tmp")
    onnx.save(stream, str(tmp))
    tmp.replace(dst)
    return dst


def needs_stream(bundle: ModelBundle) -> bool:
    """A built GE2E bundle (its manifest names a streaming graph) without that graph, or without the
    INT8 one beside a built INT8 file: built before they existed."""
    if bundle.artifact("onnx") is None or STREAM_ARTIFACT not in bundle.artifacts:
        return False
    missing = [a for a in (STREAM_ARTIFACT, STREAM_INT8_ARTIFACT) if a in bundle.artifacts and bundle.artifact(a) is None]
    return bool(missing) or (bundle.artifact(INT8_ARTIFACT) is not None and STREAM_INT8_ARTIFACT not in bundle.artifacts)


def add_stream(bundle_dir: Path) -> ModelBundle:
    """Build the streaming graph beside ``model.onnx`` (and its INT8 version beside ``model.int8.onnx``)
    and name them in the manifest."""
    from .ge2e_int8 import quantize_int8

    bundle = load_bundle(bundle_dir)
    built = {STREAM_ARTIFACT: STREAM_FILE}
    build_stream(bundle.require_artifact("onnx"), bundle.path / STREAM_FILE)
    if bundle.artifact(INT8_ARTIFACT) is not None:
        quantize_int8(bundle.path / STREAM_FILE, bundle.path / STREAM_INT8_FILE)
        built[STREAM_INT8_ARTIFACT] = STREAM_INT8_FILE
    if any(bundle.artifacts.get(k) != v for k, v in built.items()):
        write_manifest(dataclasses.replace(bundle, artifacts={**bundle.artifacts, **built}))
    logger.info("%s: streaming LSTM graph %s", bundle.name, ", ".join(built.values()))
    return load_bundle(bundle_dir)
