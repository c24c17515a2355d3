"""What the ONNX parsers of TensorRT 10.x (from 10.3) and 11.x accept, checked on an ONNX graph without TensorRT.

No machine that exports has TensorRT, so the exported graph must be right by construction: every node of
every graph (Scan/Loop/If bodies included) is checked against the parser's operator table and its documented
restrictions, and the graph against its data types, opset range and size limits. `evim3 export` runs this
on every graph it writes for TensorRT (fp32 and fp16, fixed or dynamic batch, any opset): a graph that breaks
a rule fails the export with one line, not the engine build on the user's Jetson.

Source: onnx/onnx-tensorrt docs/operators.md and onnxOpImporters.cpp (Scan, Loop importers) at branch
10.1-GA, commit 96e7811 ("ONNX-TensorRT 10.1 GA release"), the newest 10.x revision available to this
project (no 10.3 branch was); that table states opset 9..20 and the types per operator. A parser release
normally adds support rather than removing it, so these rules should hold for 10.3 too; that is not verified
against 10.3's own table, and no TensorRT has parsed an evim3 graph yet.

Rules encoded (each violation names its node and the rule):
* opset of the default domain within 9..20; no node outside the default domain (custom ops need plugins);
* the operator is in the table as supported, and its data tensor's type is one the table lists for it;
* data types of every value and initializer: no DOUBLE (TensorRT casts it down, silently losing range),
  no STRING, UINT8 only as a graph input/output, INT8/INT4/FP8 only as quantized data around
  QuantizeLinear/DequantizeLinear;
* restrictions of the table that concern graphs a model exporter writes: `axes` (Reduce*, Slice, Squeeze,
  Pad, CumSum's axis) and Unsqueeze's axes are build-time constants; LayerNormalization uses only its first
  output; MaxPool has no Indices output; pools are 2D or 3D with unit dilations; Dropout's training_mode is
  a constant; TopK sorted with K < 3840; Constant holds no sparse or string value; Quantize/DequantizeLinear
  zero points are zero; ScatterND has no reduction; Resize uses the supported modes without antialiasing;
* loops: Scan has no `sequence_lens` (opset 8 form), its trip count (the scanned axis of its inputs) is a
  static number, and its loop-carried states keep one static shape (a symbolic batch dimension allowed);
  Loop with scan outputs has a constant trip count, and its carried values keep their shape;
* size: each initializer below 2**31 elements and the serialised model below protobuf's 2 GiB;
* explicit quantisation (Q/DQ), as TensorRT's "Explicit Quantization" chapter states it: quantized data is
  signed (INT8, not UINT8: a QuantizeLinear without a zero point or output_dtype makes UINT8), symmetric
  (zero point 0), with scales that are build-time constants, finite and positive; one scale per tensor for
  activations, and per-channel scales only on a DequantizeLinear of constant weights, along an axis of that
  weight with one scale per entry.

TensorRT 11 (GENERATIONS["11"]) removed weak typing: no precision builder flags (FP16, INT8) and no
implicit INT8 calibration; every network is strongly typed, so a graph's reduced precision must be written in
the graph itself. Rules added for it, from NVIDIA's 10.x-to-11.x migration guide (no 11.x parser table was
available to this project, and no TensorRT has parsed an evim3 graph): a file whose metadata says int8
carries Q/DQ pairs (without them 11.x can only build it in float). (A strongly typed network also wants a
QuantizeLinear's input and scale of one type; ONNX itself requires that below opset 21, and opset 21 is
outside the parser's range, so the opset rule covers it.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from evim3.runtime.errors import ModelFileError
from evim3.runtime.meta import PRECISION_PROP

TENSORRT_VERSION = "10.3"
GENERATIONS = ("10", "11")  # the TensorRT major versions every exported graph is checked for
OPSET_RANGE = (9, 20)
MAX_INITIALIZER_ELEMENTS = 2**31 - 1  # TensorRT volumes are int32-indexed
MAX_MODEL_BYTES = 2**31 - 1  # protobuf's limit for one serialised message (no external data here)
TOPK_MAX_K = 3840

_T = onnx.TensorProto
TYPE_NAMES = {_T.FLOAT: "FP32", _T.FLOAT16: "FP16", _T.BFLOAT16: "BF16", _T.INT32: "INT32", _T.INT64: "INT64",
              _T.INT8: "INT8", _T.UINT8: "UINT8", _T.BOOL: "BOOL", _T.DOUBLE: "FP64", _T.STRING: "STRING",
              _T.INT4: "INT4", _T.FLOAT8E4M3FN: "FP8"}
QUANTIZED = {"INT8", "INT4", "FP8"}
NEVER = {"FP64": "float64 is not a TensorRT type (the parser casts it down to float32, clamping)",
         "STRING": "TensorRT has no string tensors"}

# The operator table: op -> the types its data tensor may have. Groups as the table writes them.
_F = frozenset({"FP32", "FP16", "BF16"})
_FI = _F | {"INT32", "INT64"}
_FIB = _FI | {"BOOL"}
_BOOL = frozenset({"BOOL"})
SUPPORTED: dict[str, frozenset[str]] = {
    **dict.fromkeys(("Abs", "Add", "ArgMax", "ArgMin", "Div", "Equal", "Greater", "GreaterOrEqual", "Less",
                     "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Relu", "Sign", "Sub", "Sum", "IsNaN",
                     "Range", "Shrink", "DepthToSpace", "SpaceToDepth", "Scatter", "ScatterElements", "ScatterND",
                     "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                     "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Pad", "TopK"), _FI),
    **dict.fromkeys(("Concat", "Constant", "ConstantOfShape", "Expand", "EyeLike", "Flatten", "Gather",
                     "GatherElements", "GatherND", "Identity", "If", "Loop", "OneHot", "Reshape", "ReverseSequence",
                     "Shape", "Size", "Slice", "Split", "Squeeze", "Tile", "Transpose", "Trilu", "Unsqueeze",
                     "Where"), _FIB),
    **dict.fromkeys(("Cast", "CastLike"), _FIB | {"UINT8"}),
    **dict.fromkeys(("And", "Not", "Or", "Xor"), _BOOL),
    **dict.fromkeys(("Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization",
                     "Ceil", "Celu", "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout", "Einsum",
                     "Elu", "Erf", "Exp", "Floor", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool",
                     "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Hardmax", "ImageScaler",
                     "InstanceNormalization", "IsInf", "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax",
                     "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "MaxPool", "MeanVarianceNormalization",
                     "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike",
                     "RandomUniform", "RandomUniformLike", "Reciprocal", "Resize", "RNN", "Round", "ScaledTanh",
                     "Scan", "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan",
                     "Tanh", "ThresholdedRelu", "Upsample"), _F),
    **dict.fromkeys(("DeformConv", "GridSample", "Mish", "NonMaxSuppression", "NonZero", "RoiAlign"),
                    frozenset({"FP32", "FP16"})),
    "Gelu": _FI | {"INT8"},
    "Mean": _FI | {"FP8"},
    "DequantizeLinear": frozenset(QUANTIZED),
}
# Ops whose first input is not the data tensor the table's types refer to: (index of that input, or None for
# the first output).
_DATA_INPUT = {"Where": 1, "Constant": None, "ConstantOfShape": None, "Range": None, "RandomNormal": None,
               "RandomUniform": None, "EyeLike": None, "Shape": None, "Size": None, "Loop": None, "If": None}
# Inputs that must be build-time constants (initializers or Constant outputs): op -> {input index: what}.
_CONSTANT_INPUTS = {
    **{op: {1: "axes"} for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                  "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
                                  "Squeeze", "Unsqueeze")},
    "Slice": {3: "axes"}, "Pad": {3: "axes"}, "CumSum": {1: "axis"}, "Dropout": {2: "training_mode"},
    "TopK": {1: "K"},
}
# Opsets from which these ops take axes as an input rather than an attribute.
_AXES_INPUT_SINCE = {"ReduceSum": 13, "Squeeze": 13, "Unsqueeze": 13,
                     **{op: 18 for op in _CONSTANT_INPUTS if op.startswith("Reduce") and op != "ReduceSum"}}
_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_COORDINATES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


@dataclass(frozen=True)
class Violation:
    node: str  # node name ("" for graph-level rules), with the enclosing loop nodes: "scan_3 > mul_2"
    op: str  # op type, or "graph" / "initializer"
    rule: str  # what is broken, in words

    def __str__(self) -> str:
        where = f"{self.op} node {self.node!r}" if self.node else self.op
        return f"{where}: {self.rule}"


class _Scope:
    """What is known about the values visible in one graph: types, shapes, constants (outer scopes too)."""

    def __init__(self, graph: onnx.GraphProto, outer: _Scope | None = None):
        self.types: dict[str, int] = dict(outer.types) if outer else {}
        self.shapes: dict[str, list[int | str | None]] = dict(outer.shapes) if outer else {}
        self.constants: dict[str, onnx.TensorProto | None] = dict(outer.constants) if outer else {}
        for value in (*graph.input, *graph.output, *graph.value_info):
            t = value.type.tensor_type
            if t.elem_type:
                self.types[value.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                           for d in t.shape.dim]
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            self.shapes[init.name] = list(init.dims)
            self.constants[init.name] = init
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                self.constants[node.output[0]] = value


def check_graph(proto: onnx.ModelProto, generation: str = "10") -> list[Violation]:
    """Every rule the graph breaks for TensorRT `generation` ("10": 10.3 and later 10.x; "11") (empty: its
    parser takes the graph). Runs onnx shape inference to learn the types and shapes of intermediate values,
    inside loop bodies too."""
    if generation not in GENERATIONS:
        raise ValueError(f"TensorRT generation {generation!r}: choose one of {', '.join(GENERATIONS)}")
    violations = []
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    version = opsets.get("ai.onnx")
    if version is None or not OPSET_RANGE[0] <= version <= OPSET_RANGE[1]:
        violations.append(Violation("", "graph", f"opset {version} is outside TensorRT {TENSORRT_VERSION}'s "
                                                 f"{OPSET_RANGE[0]}..{OPSET_RANGE[1]}"))
    size = proto.ByteSize()
    if size > MAX_MODEL_BYTES:
        violations.append(Violation("", "graph", f"the model is {size / 2**30:.1f} GiB, over protobuf's 2 GiB"))
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # noqa: BLE001 -- a graph inference cannot read is judged on its declared types only
        inferred = proto
    violations += _check(inferred.graph, _Scope(inferred.graph), version or 0, path="", top=True)
    if generation == "11":
        precision = {p.key: p.value for p in proto.metadata_props}.get(PRECISION_PROP)
        if precision == "int8" and not any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
            violations.append(Violation("", "graph", "the file says int8 but has no QuantizeLinear/DequantizeLinear: "
                                                     "TensorRT 11 has no implicit INT8 calibration"))
    return violations


def _check(graph: onnx.GraphProto, scope: _Scope, opset: int, path: str, top: bool) -> list[Violation]:
    out: list[Violation] = []
    io = {v.name for v in (*graph.input, *graph.output)} if top else set()
    defined = {i.name for i in (*graph.input, *graph.initializer)} | {o for n in graph.node for o in n.output}
    quantized_ok = _quantized_values(graph)
    for init in graph.initializer:
        count = 1
        for d in init.dims:
            count *= d
        if count > MAX_INITIALIZER_ELEMENTS:
            out.append(Violation(path + init.name, "initializer", f"{count:,} elements, over TensorRT's 2**31 - 1"))
    for name, elem in scope.types.items():
        # each value is judged in the graph that defines it, not again in every body that sees it
        if name in io or name in quantized_ok or name not in defined:
            continue
        kind = TYPE_NAMES.get(elem, onnx.TensorProto.DataType.Name(elem))
        if kind in NEVER:
            out.append(Violation("", "graph", f"tensor {name!r} is {kind}: {NEVER[kind]}"))
        elif kind == "UINT8":
            out.append(Violation("", "graph", f"tensor {name!r} is UINT8, which TensorRT takes only as a network "
                                              "input or output"))
        elif kind in QUANTIZED:
            out.append(Violation("", "graph", f"tensor {name!r} is {kind}, which TensorRT takes only as quantized "
                                              "data of QuantizeLinear/DequantizeLinear"))
        elif kind not in TYPE_NAMES.values():
            out.append(Violation("", "graph", f"tensor {name!r} has type {kind}, which is not a TensorRT type"))
    for node in graph.node:
        where = path + (node.name or node.output[0] if node.output else node.name)
        out += [Violation(where, node.op_type, rule) for rule in _node_rules(node, scope, opset)]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out += _check(attr.g, _Scope(attr.g, scope), opset, path=where + " > ", top=False)
    return out


def _quantized_values(graph: onnx.GraphProto) -> set[str]:
    """Values that are the quantized side of a Q/DQ pair: INT8/INT4/FP8 is allowed there only."""
    names = set()
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            names.update(node.output[:1])
            names.update(node.input[2:3])
        elif node.op_type == "DequantizeLinear":
            names.update(node.input[:1])
            names.update(node.input[2:3])
    return names


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.type != onnx.AttributeProto.GRAPH}


def _node_rules(node: onnx.NodeProto, scope: _Scope, opset: int) -> Iterator[str]:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        yield f"custom domain {node.domain!r}: TensorRT's parser needs a plugin for it"
        return
    if op not in SUPPORTED:
        yield f"{op} is not supported by TensorRT {TENSORRT_VERSION}'s ONNX parser"
        return
    data_index = _DATA_INPUT.get(op, 0)
    data = node.output[0] if data_index is None else (node.input[data_index] if len(node.input) > data_index
                                                      else "")
    if data and data in scope.types:
        kind = TYPE_NAMES.get(scope.types[data], str(scope.types[data]))
        if kind not in SUPPORTED[op]:
            yield f"{op} on {kind} data ({data!r}) is not supported (supported: {', '.join(sorted(SUPPORTED[op]))})"
    for index, what in _CONSTANT_INPUTS.get(op, {}).items():
        if opset < _AXES_INPUT_SINCE.get(op, 0):
            break  # axes is an attribute at this opset: constant by construction
        if len(node.input) > index and node.input[index] and node.input[index] not in scope.constants:
            yield f"input {what} ({node.input[index]!r}) must be a build-time constant (an initializer)"
    yield from _RULES.get(op, _no_rules)(node, scope, opset)


def _no_rules(node: onnx.NodeProto, scope: _Scope, opset: int) -> Iterator[str]:
    return iter(())


def _scan(node: onnx.NodeProto, scope: _Scope, opset: int) -> Iterator[str]:
    attrs = _attrs(node)
    body = next(a.g for a in node.attribute if a.name == "body")
    offset = 1 if opset == 8 else 0
    if offset and node.input[0]:
        yield "sequence_lens is given: TensorRT supports Scan without sequence_lens only"
    inputs = list(node.input[offset:])
    n_scan = attrs["num_scan_inputs"]
    n_state = len(inputs) - n_scan
    axes = list(attrs.get("scan_input_axes", [offset] * n_scan))
    for name, axis in zip(inputs[n_state:], axes):
        shape = scope.shapes.get(name)
        length = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
        if not isinstance(length, int) or length <= 0:
            yield (f"the trip count (axis {axis} of scanned input {name!r}) is not a static number "
                   f"(shape {shape}): TensorRT sizes the Scan's outputs at build time")
    yield from _carried_shapes(node, body, inputs[:n_state], body.input[:n_state], body.output[:n_state])


def _loop(node: onnx.NodeProto, scope: _Scope, opset: int) -> Iterator[str]:
    body = next(a.g for a in node.attribute if a.name == "body")
    carried = list(node.input[2:])
    scan_outputs = len(body.output) - 1 - len(carried)
    if scan_outputs > 0 and (not node.input[0] or node.input[0] not in scope.constants):
        yield "a Loop with scan outputs needs a constant trip count M: TensorRT cannot size a dynamic scan output"
    yield from _carried_shapes(node, body, carried, body.input[2:], body.output[1:1 + len(carried)])


def _carried_shapes(node: onnx.NodeProto, body: onnx.GraphProto, outer: list[str],
                    body_in: list[onnx.ValueInfoProto], body_out: list[onnx.ValueInfoProto]) -> Iterator[str]:
    """Loop-carried values must keep one shape across iterations: the body's state input and output shapes
    must be equal and every dimension known (a number, or a named dimension such as the batch)."""
    for value_in, value_out in zip(body_in, body_out):
        shape_in, shape_out = _value_shape(value_in), _value_shape(value_out)
        if shape_in is None or any(d is None for d in shape_in):
            yield f"loop-carried {value_in.name!r} has no static shape ({shape_in})"
        elif shape_out is not None and shape_in != shape_out:
            yield f"loop-carried {value_in.name!r} changes shape in the body: {shape_in} -> {shape_out}"


def _value_shape(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _layer_norm(node: onnx.NodeProto, scope: _Scope, opset: int) -> Iterator[str]:
    if any(node.output[1:]):
        yield "only the first output (Y) is supported, not Mean / InvStdDev"


def _pool(node: onnx.NodeProto, scope: _Scope, opset: int) -> Iterator[str]:
    attrs = _attrs(node)
    if node.op_type != "LpPool" and len(attrs.get("kernel_shape", [])) not in (2, 3):
        yield "2D or 3D pooling only"
    if any(d != 1 for d in attrs.get("dilations", [])):
        yield "dilations must be all ones"
    if node.op_type == "MaxPool" and any(node.output[1:]):
        yield "the Indices output is not supported"


def _dropout(node: onnx.NodeProto, scope: _Scope, opset: int) -> Iterator[str]:
    if len(node.input) > 2 and node.input[2]:
        value = scope.constants.get(node.input[2])
        if value is not None and bool(onnx.numpy_helper.to_array(value).any()):
            yield "training_mode must be False"


def _topk(node: onnx.NodeProto, scope: _Scope, opset: int) -> Iterator[str]:
    if _attrs(node).get("sorted", 1) != 1:
        yield "sorted must be 1"
    k = scope.constants.get(node.input[1]) if len(node.input) > 1 else None
    if k is not None and int(onnx.numpy_helper.to_array(k).max()) >= TOPK_MAX_K:
        yield f"K must be below {TOPK_MAX_K}"


def _constant(node: onnx.NodeProto, scope: _Scope, opset: int) -> Iterator[str]:
    unsupported = {"sparse_value", "value_string", "value_strings"} & set(_attrs(node))
    if unsupported:
        yield f"attribute {', '.join(sorted(unsupported))} is not supported"


def _zero_point(node: onnx.NodeProto, scope: _Scope, name: str) -> Iterator[str]:
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in scope.constants:
            yield f"{name} must be a constant zero"
            return
        value = scope.constants[node.input[2]]  # None: a Constant in another form than `value`
        if value is not None and onnx.numpy_helper.to_array(value).any():
            yield f"{name} must be a constant zero"


def _scale(node: onnx.NodeProto, scope: _Scope) -> Iterator[str]:
    """Constant, finite, positive; per tensor, or per channel of a constant weight (DequantizeLinear only)."""
    name = node.input[1] if len(node.input) > 1 else ""
    if name not in scope.constants:
        yield f"scale {name!r} must be a build-time constant (an initializer)"
        return
    value = scope.constants[name]
    if value is None:
        return
    scale = onnx.numpy_helper.to_array(value).astype(np.float64)
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        yield f"scale {name!r} must be finite and positive (min {scale.min():g})"
    if scale.size == 1:
        return
    weight = scope.constants.get(node.input[0])
    if node.op_type != "DequantizeLinear" or node.input[0] not in scope.constants:
        yield "per-channel scales are for constant weights only (DequantizeLinear of an initializer)"
        return
    shape = scope.shapes.get(node.input[0]) or (list(weight.dims) if weight is not None else [])
    axis = _attrs(node).get("axis", 1)
    if scale.ndim != 1 or not -len(shape) <= axis < len(shape) or shape[axis] != scale.size:
        yield (f"per-channel scale of {scale.size} entries does not match axis {axis} of the weight "
               f"{node.input[0]!r} (shape {shape})")


def _quantized_type(node: onnx.NodeProto, scope: _Scope) -> str | None:
    """The type of a Q/DQ pair's quantized side: the zero point's, else QuantizeLinear's output_dtype, else
    ONNX's default (UINT8) for QuantizeLinear, or the data input's type for DequantizeLinear."""
    if len(node.input) > 2 and node.input[2] in scope.types:
        return TYPE_NAMES.get(scope.types[node.input[2]])
    if node.op_type == "QuantizeLinear":
        return TYPE_NAMES.get(_attrs(node).get("output_dtype") or _T.UINT8)
    return TYPE_NAMES.get(scope.types.get(node.input[0], 0))


def _q_dq(node: onnx.NodeProto, scope: _Scope, opset: int) -> Iterator[str]:
    kind = _quantized_type(node, scope)
    if kind not in (None, *QUANTIZED):
        yield f"quantized data is {kind}: TensorRT quantizes to signed INT8 (or INT4/FP8), never {kind}"
    yield from _zero_point(node, scope, "y_zero_point" if node.op_type == "QuantizeLinear" else "x_zero_point")
    yield from _scale(node, scope)


def _scatter_nd(node: onnx.NodeProto, scope: _Scope, opset: int) -> Iterator[str]:
    if _attrs(node).get("reduction", b"none") not in (b"none", "none"):
        yield "reduction is not supported"


def _resize(node: onnx.NodeProto, scope: _Scope, opset: int) -> Iterator[str]:
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in _attrs(node).items()}
    if attrs.get("mode", "nearest") not in _RESIZE_MODES:
        yield f"mode {attrs['mode']!r} is not supported (nearest, linear)"
    if attrs.get("coordinate_transformation_mode", "half_pixel") not in _RESIZE_COORDINATES:
        yield f"coordinate_transformation_mode {attrs['coordinate_transformation_mode']!r} is not supported"
    if attrs.get("nearest_mode", "round_prefer_floor") not in _RESIZE_NEAREST:
        yield f"nearest_mode {attrs['nearest_mode']!r} is not supported"
    if attrs.get("antialias", 0):
        yield "antialiasing is not supported"
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        yield "keep_aspect_ratio_policy must be stretch"


_RULES = {
    "Scan": _scan, "Loop": _loop, "LayerNormalization": _layer_norm, "MaxPool": _pool, "AveragePool": _pool,
    "LpPool": _pool, "Dropout": _dropout, "TopK": _topk, "Constant": _constant,
    "QuantizeLinear": _q_dq, "DequantizeLinear": _q_dq,
    "ScatterND": _scatter_nd, "Resize": _resize,
}


def require_tensorrt_ready(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Raise ModelFileError (one line: the first broken rule, its TensorRT generation, and how many more)
    unless the ONNX parsers of both TensorRT generations take the graph."""
    for generation in GENERATIONS:
        violations = check_graph(proto, generation)
        if violations:
            more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
            raise ModelFileError(path, f"graph breaks a TensorRT {generation}.x parser rule: {violations[0]}{more}")
