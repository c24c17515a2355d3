"""PyTorch -> ONNX for E-ViM3: one graph from a preprocessed clip to EF (or class logits, or LV logits).

How the graph is made, and why:

* The model is traced inside ``evim3.ops.use_scan(model, "exportable")``: every selective scan becomes the two-level
  blocked scan whose three loops are ``torch.ops.higher_order.scan``, and torch's dynamo exporter writes
  each as one ONNX ``Scan`` with a three-to-seven-node body. The node count per scan is therefore fixed
  (56, bodies included, whatever the sequence length), where unrolling the chunked scan's Python loops
  costs ~1,650 nodes per Mamba unit at evim3-tiny and grows with sqrt(L); the Scan form also exports
  faster and runs faster in ONNX Runtime (measured: benchmarks/bench_export.py --forms).
* Direction permutations are Gathers of constant index tables (the model's buffers).
* torch's exporter writes opset 18; opset 17 (the default, for older TensorRT/ONNX Runtime) is reached by
  rewriting the few ops whose form changed in 18 (``downgrade_to_opset17``).
* Each selective scan's inputs and output are marked while tracing (``evim3::scan_boundary``, a node of a
  private domain the optimizer cannot fold through), then the markers are removed and the names of the tensors
  they marked are written to the metadata (``evim3.scans``): the edge runtime puts its fused scan op in each
  scan's place from them (runtime/fused_scan.py). The file itself is the standard graph.
* Every node of a selective scan (between its markers) is renamed with the prefix ``SCAN_TAG``: TensorRT
  (export/tensorrt.py) keeps those layers in float32 when it builds an fp16 engine from the fp32 graph.
* ``fp16=True`` exports the model with float16 weights and compute, but float32 for the scan (and its
  exp), its parameters (A_log, D, dt bias) and the residual stream -- mamba's own mixed precision. Input
  and output stay float32.
* ``int8=Calibration(...)`` quantises the linear layers of that graph explicitly (QuantizeLinear /
  DequantizeLinear pairs, activation ranges calibrated on TRAIN clips: export/quantize.py): one file for
  ONNX Runtime on CPU and CUDA and for TensorRT 10 and 11. The scan, the norms and everything else stay float32.
* Every graph written is checked against the rules of TensorRT's ONNX parser, 10.x and 11.x
  (export/trt_rules.py): one that breaks a rule is not written.
* The file carries its ModelMeta JSON in ``metadata_props[META_KEY]`` plus a few flat keys for humans
  (Netron shows them); it passes ``onnx.checker`` with ``full_check``; it is written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx
import onnxscript
import torch
from evim3.export.defaults import MIN_OPSET
from evim3.export.trt_rules import require_tensorrt_ready
from evim3.runtime.atomic import atomic_path
from evim3.runtime.errors import ModelFileError
from evim3.runtime.fused_scan import SCAN_INPUTS, SCAN_OUTPUT, SCANS_KEY, names_read
from evim3.runtime.meta import INPUT_NAME, META_KEY, OUTPUT_NAME, PRECISION_PROP, ModelMeta
from evim3.runtime.tasks import task_spec
from torch import Tensor, nn

from evim3 import __version__
from evim3.checkpoint import load_model
from evim3.config import ModelConfig
from evim3.models.evim3 import EViM3
from evim3.modules.mamba import Mamba
from evim3.ops import use_scan  # also registers torch.ops.evim3.scan_boundary

if TYPE_CHECKING:
    from evim3.export.calibration import Calibration

EXPORTER_OPSET = 18  # what torch's dynamo exporter writes natively
SCAN_TAG = "evim3_scan/"  # node-name prefix of the selective scan's nodes (kept float32 by TensorRT)
BATCH_DIM = "batch"
# The marker of a scan's inputs and output (evim3::scan_boundary) while the graph is built; never in a file.
BOUNDARY_DOMAIN, BOUNDARY_OP = "evim3.export", "ScanBoundary"


@dataclass(frozen=True)
class GraphStats:
    nodes: int  # every node, those inside Scan bodies included
    scans: int  # selective scans (three ONNX Scan nodes each)
    scan_nodes: int  # nodes belonging to the selective scans, bodies included
    op_counts: dict[str, int]

    @property
    def nodes_per_scan(self) -> float:
        return self.scan_nodes / self.scans if self.scans else 0.0


@dataclass(frozen=True)
class OnnxExport:
    path: str
    opset: int
    precision: str  # one of PRECISIONS
    batch: int | None  # None: dynamic batch
    seconds: float
    stats: GraphStats


def export_checkpoint(checkpoint: str | os.PathLike, path: str | os.PathLike, *, preset: str | None = None,
                      **options) -> OnnxExport:
    """Load an evim3 checkpoint (its preset must be `preset` when given) and export it; see export_onnx."""
    model, meta = load_model(checkpoint, preset=preset)
    return export_onnx(model, meta, path, **options)


def export_onnx(model: EViM3, meta: ModelMeta, path: str | os.PathLike, *, opset: int = MIN_OPSET,
                batch: int = 1, dynamic_batch: bool = False, fp16: bool = False,
                int8: Calibration | None = None) -> OnnxExport:
    """Write `model` as an ONNX file taking `clip` (batch, 1, frames, size, size) float32 to `output`.

    batch: the fixed batch size of the graph; dynamic_batch: a symbolic batch dimension instead; fp16:
    float16 compute; int8: 8-bit linear layers as Q/DQ pairs, activation ranges from this calibration
    (export/quantize.py). One of fp16 and int8 at most.
    """
    if fp16 and int8 is not None:
        raise ValueError("choose fp16 or int8, not both")
    if opset < MIN_OPSET or opset > onnx.defs.onnx_opset_version():
        raise ValueError(f"opset {opset} is not supported: choose {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    _check_meta_fits(model.cfg, meta)
    t0 = time.perf_counter()
    module: nn.Module = Float16Compute(model) if fp16 else model
    proto = trace_to_onnx(module.eval(), model.cfg, batch=batch, dynamic_batch=dynamic_batch,
                          opset=max(opset, EXPORTER_OPSET))
    meta = dataclasses.replace(meta, precision="fp16" if fp16 else "fp32")
    finish_graph(proto, meta, opset=opset, dynamic_batch=dynamic_batch)
    onnx.checker.check_model(proto, full_check=True)
    require_tensorrt_ready(proto, path)  # fail here, not at engine build time on the device
    if int8 is not None:  # derived from the checked float graph, and checked again as TensorRT will read it
        from evim3.export.quantize import quantize_qdq  # needs onnxruntime, which a training box may lack

        meta = dataclasses.replace(meta, precision="int8")
        proto = quantize_qdq(proto, meta.preprocess, int8, batch=batch)
        set_metadata(proto, meta)
        onnx.checker.check_model(proto, full_check=True)
        require_tensorrt_ready(proto, path)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)
    return OnnxExport(os.fspath(path), opset, meta.precision, None if dynamic_batch else batch,
                      time.perf_counter() - t0, graph_stats(proto))


def _check_meta_fits(cfg: ModelConfig, meta: ModelMeta) -> None:
    spec = meta.preprocess
    if (spec.frames, spec.size) != (cfg.frames, cfg.img_size):
        raise ValueError(f"metadata preprocessing makes clips of {spec.frames}x{spec.size}^2 but the model "
                         f"takes {cfg.frames}x{cfg.img_size}^2")


class Float16Compute(nn.Module):
    """A float16 copy of an EViM3 whose selective scans, scan parameters (A_log, D, dt bias) and residual
    stream stay float32. Takes and returns float32.

    The model already computes the residual stream (ResidualMamba) and the scan (evim3.ops) in float32
    whatever its weights' dtype; the only missing pieces are casts into the modules that read that
    float32 stream with float16 weights (LayerNorm, the patch Conv3d), added here as pre-hooks.
    """

    FLOAT32_PARAMETERS = ("A_log", "D", "dt_proj.bias")

    def __init__(self, model: EViM3):
        super().__init__()
        self.model = copy.deepcopy(model)
        keep = {f"{name}.{p}" for name, m in self.model.named_modules() if isinstance(m, Mamba)
                for p in self.FLOAT32_PARAMETERS}
        for name, param in self.model.named_parameters():
            if name not in keep:
                param.data = param.data.half()
        for m in self.model.modules():
            if isinstance(m, (nn.LayerNorm, nn.Conv3d)):
                m.register_forward_pre_hook(_cast_inputs_to_weight_dtype)

    def forward(self, clip: Tensor) -> Tensor:
        return self.model(clip).float()


def _cast_inputs_to_weight_dtype(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(a.to(module.weight.dtype) for a in args)


def trace_to_onnx(module: nn.Module, cfg: ModelConfig, *, batch: int, dynamic_batch: bool,
                  opset: int) -> onnx.ModelProto:
    """torch.export (strict: dynamo) with every Mamba unit running the exportable scan, then torch's ONNX
    translation and optimizer."""
    # A dynamic dimension must not be traced at size 1 (torch specialises 0/1), hence 2 for the example.
    example = torch.randn(2 if dynamic_batch else batch, cfg.in_channels, cfg.frames, cfg.img_size,
                          cfg.img_size)
    dynamic_shapes = {"clip": {0: torch.export.Dim(BATCH_DIM, min=1)}} if dynamic_batch else None
    with _quiet_exporter(), torch.no_grad(), use_scan(module, "exportable"):
        program = torch.export.export(module, (example,), strict=True, dynamic_shapes=dynamic_shapes)
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                         output_names=[OUTPUT_NAME], optimize=True, verbose=False,
                                         custom_translation_table=_SCAN_BOUNDARY_TRANSLATION)
    return onnx_program.model_proto


def _scan_boundary_onnx(x, role: str):
    """evim3::scan_boundary as a node of a private domain: opaque to the exporter's optimizer, so the values it
    marks survive constant folding as they are used; remove_scan_boundaries takes it out again."""
    if not onnx.defs.has(BOUNDARY_OP, BOUNDARY_DOMAIN):
        param = onnx.defs.OpSchema.FormalParameter
        onnx.defs.register_schema(onnx.defs.OpSchema(
            BOUNDARY_OP, BOUNDARY_DOMAIN, 1, inputs=[param("x", "T")], outputs=[param("y", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(double)"], "")],
            attributes=[onnx.defs.OpSchema.Attribute("role", onnx.defs.OpSchema.AttrType.STRING, "")]))
    return onnxscript.values.Op(onnxscript.values.Opset(BOUNDARY_DOMAIN, 1), BOUNDARY_OP)(x, role=role)


_SCAN_BOUNDARY_TRANSLATION = {torch.ops.evim3.scan_boundary.default: _scan_boundary_onnx}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs progress and harmless notes (no torchvision, ambiguous empty attributes) that
    would bury the CLI's own output; real errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def finish_graph(proto: onnx.ModelProto, meta: ModelMeta, *, opset: int, dynamic_batch: bool) -> None:
    """Everything after tracing: record and remove the scan boundaries, tag the scan, drop source locations,
    name the batch dimension, reach the asked opset, set the IR version and write the metadata."""
    scans, region = remove_scan_boundaries(proto.graph)
    kept_opsets = [entry for entry in proto.opset_import if entry.domain != BOUNDARY_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept_opsets)
    proto.metadata_props.add(key=SCANS_KEY, value=json.dumps(scans))  # set_metadata keeps it
    tag_scan_nodes(proto.graph, region)
    _strip_node_metadata(proto.graph)
    if dynamic_batch:
        _name_batch_dimension(proto.graph)
    if opset < EXPORTER_OPSET:  # traced at max(opset, 18)
        downgrade_to_opset17(proto)
    proto.ir_version = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    proto.producer_name, proto.producer_version = "evim3", __version__
    proto.doc_string = (f"E-ViM3 {meta.preset} ({meta.task}): {INPUT_NAME} (N, 1, {meta.preprocess.frames}, "
                        f"{meta.preprocess.size}, {meta.preprocess.size}) normalised -> {OUTPUT_NAME}")
    set_metadata(proto, meta)


def remove_scan_boundaries(graph: onnx.GraphProto) -> tuple[list[dict[str, str]], set[str]]:
    """Take every scan_boundary node out of the graph (its readers read what it marked) and return, per
    selective scan, {role: name of the marked tensor} for the runtime's fused op (runtime/fused_scan.py),
    and the names of the nodes inside the scans.

    A scan's input markers are those reached walking back from its output marker without crossing another
    marker: everything between belongs to that scan.
    """
    markers = {node.output[0]: node for node in graph.node if node.domain == BOUNDARY_DOMAIN}
    if not markers:
        return [], set()
    producers = {out: node for node in graph.node for out in node.output}
    scans, region = [], set()
    for node in markers.values():
        if _role(node) != SCAN_OUTPUT:
            continue
        scan, seen, stack = {SCAN_OUTPUT: node.input[0]}, set(), [node.input[0]]
        while stack:
            name = stack.pop()
            if name in seen or name not in producers:
                continue
            seen.add(name)
            producer = producers[name]
            if producer.domain == BOUNDARY_DOMAIN and producer is not node:
                scan[_role(producer)] = producer.input[0]
            else:
                region.add(producer.name)
                stack.extend(names_read(producer))
        if set(scan) != {*SCAN_INPUTS, SCAN_OUTPUT}:
            raise RuntimeError(f"scan boundary markers of one scan are incomplete: found {sorted(scan)}")
        scans.append(scan)
    renamed = {out: marker.input[0] for out, marker in markers.items()}
    if renamed.keys() & {o.name for o in graph.output}:
        raise RuntimeError("a scan boundary marker is a graph output")
    kept = [n for n in graph.node if n.domain != BOUNDARY_DOMAIN]
    del graph.node[:]
    graph.node.extend(kept)
    for g in all_graphs(graph):
        for n in g.node:
            for i, name in enumerate(n.input):
                n.input[i] = renamed.get(name, name)
        value_info = [v for v in g.value_info if v.name not in renamed]
        del g.value_info[:]
        g.value_info.extend(value_info)
    return scans, region - {node.name for node in markers.values()}


def _role(node: onnx.NodeProto) -> str:
    return next(onnx.helper.get_attribute_value(a).decode() for a in node.attribute if a.name == "role")


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)


def tag_scan_nodes(graph: onnx.GraphProto, region: set[str]) -> None:
    """Prefix SCAN_TAG to the name of every node of `region` (between a scan's markers) and of every ONNX
    Scan, with its whole body."""
    for node in graph.node:
        if node.op_type == "Scan" or node.name in region:
            _tag(node)


def _tag(node: onnx.NodeProto) -> None:
    if not node.name.startswith(SCAN_TAG):
        node.name = SCAN_TAG + node.name
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            for inner in attr.g.node:
                _tag(inner)


def _strip_node_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node stack traces and module paths: they name files of the machine that
    exported, weigh more than the graph, and would need a newer IR version."""
    for g in all_graphs(graph):
        for node in g.node:
            del node.metadata_props[:]
        for value in (*g.input, *g.output, *g.value_info):
            del value.metadata_props[:]


def _name_batch_dimension(graph: onnx.GraphProto) -> None:
    """The exporter names the symbolic batch after its internal symbol (e.g. 's53'); call it 'batch'."""
    symbol = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for g in all_graphs(graph):
        for value in (*g.input, *g.output, *g.value_info):
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param == symbol:
                    dim.dim_param = BATCH_DIM


def downgrade_to_opset17(proto: onnx.ModelProto) -> None:
    """Rewrite an opset-18 graph as opset 17 (onnx's version converter has no adapter for Split 18 -> 17).

    Of the ops whose form changed in opset 18, the exporter emits Split with ``num_outputs`` (opset 17:
    equal parts, one per output, when the axis divides evenly) and Pad without ``axes`` (same in 17).
    Anything else is refused with a pointer to --opset 18 rather than guessed.
    """
    shapes = _static_shapes(proto)
    for graph in all_graphs(proto.graph):
        for node in graph.node:
            if node.domain not in ("", "ai.onnx") or onnx.defs.get_schema(node.op_type, 18).since_version < 18:
                continue
            if node.op_type == "Pad" and len(node.input) < 4:
                continue
            if node.op_type == "Split":
                _split_to_opset13(node, shapes.get(node.input[0]))
                continue
            raise ValueError(f"cannot write opset 17: the graph uses {node.op_type} in its opset-18 form; "
                             "export with --opset 18")
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = MIN_OPSET


def _split_to_opset13(node: onnx.NodeProto, shape: list[int | None] | None) -> None:
    """Split-18 differs from Split-13 only by ``num_outputs``; with a `split` input they are the same."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if "num_outputs" not in attrs:
        return
    parts, axis = attrs["num_outputs"], attrs.get("axis", 0)
    length = shape[axis] if shape is not None else None
    if parts != len(node.output) or length is None or length % parts:
        raise ValueError(f"cannot write opset 17: Split {node.name!r} is not an even split of a known "
                         "length; export with --opset 18")
    kept = [a for a in node.attribute if a.name != "num_outputs"]
    del node.attribute[:]
    node.attribute.extend(kept)


def _static_shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes of every value onnx's shape inference knows (symbolic dims as None)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {}
    for graph in all_graphs(inferred.graph):
        for value in (*graph.input, *graph.output, *graph.value_info):
            dims = value.type.tensor_type.shape.dim
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def set_metadata(proto: onnx.ModelProto, meta: ModelMeta) -> None:
    """The ModelMeta JSON under META_KEY, and flat copies of what a person looks for first."""
    spec = meta.preprocess
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    flat = {
        META_KEY: meta.to_json(),
        f"{META_KEY}.preset": meta.preset,
        f"{META_KEY}.task": meta.task,
        f"{META_KEY}.input": f"{INPUT_NAME} ({batch.dim_param or batch.dim_value}, 1, {spec.frames}, "
                             f"{spec.size}, {spec.size}) float32, (pixel - {spec.mean:g}) / {spec.std:g}",
        f"{META_KEY}.video": f"resampled to {spec.fps:g} fps, every {spec.period}th frame",
        f"{META_KEY}.output": task_spec(meta.task).output_description(meta),
        PRECISION_PROP: meta.precision,
        f"{META_KEY}.version": meta.version or __version__,
    }
    scans = next((p.value for p in proto.metadata_props if p.key == SCANS_KEY), None)  # the graph's, kept
    if scans is not None:
        flat[SCANS_KEY] = scans
    del proto.metadata_props[:]
    for key, value in flat.items():
        proto.metadata_props.add(key=key, value=value)


def read_onnx_meta(path: str | os.PathLike) -> tuple[ModelMeta, dict[str, str]]:
    """(ModelMeta, every metadata_props entry) of an evim3 ONNX file, without loading its weights."""
    path = os.fspath(path)
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 -- protobuf raises DecodeError, OSError, RuntimeError...
        raise ModelFileError(path, f"not a readable ONNX file ({type(e).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise ModelFileError(path, "ONNX model carries no evim3 metadata (export it with `evim3 export`)")
    try:
        return ModelMeta.from_onnx_props(props), props
    except (ValueError, TypeError, KeyError) as e:
        raise ModelFileError(path, f"evim3 metadata is invalid ({e})") from None


def graph_stats(proto: onnx.ModelProto) -> GraphStats:
    ops: Counter[str] = Counter()
    scan_nodes = 0
    for graph in all_graphs(proto.graph):
        for node in graph.node:
            ops[node.op_type] += 1
            scan_nodes += node.name.startswith(SCAN_TAG)
    return GraphStats(nodes=sum(ops.values()), scans=ops["Scan"] // 3, scan_nodes=scan_nodes,
                      op_counts=dict(ops.most_common()))

