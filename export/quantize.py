"""INT8 as one explicitly quantised ONNX (QuantizeLinear/DequantizeLinear pairs) that ONNX Runtime's CPU and
CUDA providers and TensorRT 10 and 11 all take.

The float graph of export/onnx.py is quantised by ONNX Runtime's maintained static quantiser
(`quantize_static`, QDQ format): activation scales are calibrated once on clips of a dataset's TRAIN videos and
stored in a calibration table, so a rebuild needs no data. The recipe, and why:

* Only linear layers (MatMul/Gemm with a constant weight) are quantised. The selective scan (every node
  export/onnx.py tags SCAN_TAG, Scan bodies included), norms, convolutions and gating stay float32.
* Activations: signed int8, symmetric (zero point 0), one scale per tensor: the only activation form TensorRT
  takes, and ONNX Runtime fuses it into QLinearMatMul.
* Weights: signed int8, symmetric, one scale per output channel, in the 7-bit range [-64, 64]
  (`reduce_range`). x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply uint8 activations by int8
  weights with VPMADDUBSW, which adds each pair of products into a saturating int16: two products of 255 x 127
  reach 64,770, twice the int16 range, and the result is silently wrong (reported on a 2-core AVX2 machine:
  the previous, dynamic int8 export of the tests' model failed its tolerance there, max |dEF| 1.26, and passed
  on VNNI machines). With |w| <= 64 a pair is at
  most 2 x 255 x 64 = 32,640 < 32,767, so every kernel on every x86 CPU computes the same exact integer
  product (tests/test_int8.py emulates the saturating kernel to show both sides).
* Kept in float32, chosen by measurement (float_nodes): Mamba's out_proj and the layers that write the
  model's output.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from evim3.export.calibration import CALIBRATION_SEED, CALIBRATION_SPLIT, CALIBRATION_VIDEOS, Calibration
from evim3.export.onnx import SCAN_TAG, all_graphs
from evim3.runtime.atomic import write_atomic
from evim3.runtime.errors import ModelFileError
from evim3.runtime.fused_scan import SCAN_OUTPUT, scan_boundaries
from evim3.runtime.meta import INPUT_NAME, PreprocessSpec
from evim3.runtime.parity_check import dataset_videos, video_clip

QUANTIZED_OPS = ("MatMul", "Gemm")
WEIGHT_LEVELS = 64  # |int8 weight| <= this (reduce_range): VPMADDUBSW's int16 pair sums cannot saturate
INT16_MAX = 32767
TABLE_VERSION = 1


def calibration_videos(folder: str | os.PathLike, count: int = CALIBRATION_VIDEOS,
                       seed: int = CALIBRATION_SEED) -> list[str]:
    """A seeded sample of up to `count` CALIBRATION_SPLIT videos of an EchoNet-layout folder (or of the video
    files of a plain folder), in the folder's order."""
    videos = dataset_videos(folder, count=10**9, split=CALIBRATION_SPLIT)
    if len(videos) <= count:
        return videos
    keep = set(random.Random(seed).sample(range(len(videos)), count))
    return [v for i, v in enumerate(videos) if i in keep]


def calibration_batches(videos: list[str], spec: PreprocessSpec, batch: int) -> Iterator[np.ndarray]:
    """Each video's first clip, read and preprocessed exactly as `evim3 infer` does, in float32 batches of
    `batch` (a fixed-batch graph takes no other size; a last partial batch is left out)."""
    for start in range(0, len(videos) // batch * batch, batch):
        clips = [video_clip(path, spec) for path in videos[start:start + batch]]
        yield np.ascontiguousarray(np.stack(clips), dtype=np.float32)


def quantize_qdq(proto: onnx.ModelProto, spec: PreprocessSpec, calibration: Calibration,
                 batch: int = 1) -> onnx.ModelProto:
    """The Q/DQ INT8 form of an exported float32 graph (see the module docstring), calibrated as `calibration`
    says. The table records which graph it belongs to; a table of another model is refused."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fingerprint = graph_fingerprint(proto)
    prepared = prepared_for_quantiser(proto)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibration.method]
    table = _read_table(calibration, fingerprint)
    from_data = not table and calibration.clips is None
    videos = calibration_videos(calibration.data, calibration.videos) if from_data else []
    if from_data and len(videos) < batch:
        raise ModelFileError(calibration.data, f"{len(videos)} {CALIBRATION_SPLIT} videos: too few to calibrate "
                                               f"a batch-{batch} graph")

    class Clips(CalibrationDataReader):
        def __init__(self) -> None:
            given = np.asarray(calibration.clips, dtype=np.float32) if calibration.clips is not None else None
            self.batches = (calibration_batches(videos, spec, batch) if given is None else
                            iter(given[i:i + batch] for i in range(0, len(given) // batch * batch, batch)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            clips = next(self.batches, None)
            return None if clips is None else {INPUT_NAME: clips}

    with tempfile.TemporaryDirectory(prefix="evim3-int8-") as folder:
        source, out = os.path.join(folder, "fp32.onnx"), os.path.join(folder, "int8.onnx")
        ort_table = os.path.join(folder, "ranges.json")
        onnx.save_model(prepared, source)  # a path: the quantiser's own ModelProto route loses the weights
        if table:
            write_atomic(ort_table, json.dumps(table["ranges"]))
        disabled = logging.root.manager.disable
        logging.disable(logging.WARNING)  # its advice to pre-process the graph goes to the root logger
        try:
            quantize_static(
                source, out, None if table else Clips(), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=float_nodes(proto), calibrate_method=method, calibration_cache_path=ort_table,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
                               "QuantizeBias": False})  # float bias: TensorRT has no INT32 DequantizeLinear
        finally:
            logging.disable(disabled)
        if not table:
            with open(ort_table) as f:
                ranges = json.load(f)
            write_atomic(calibration.table, json.dumps({
                "evim3_calibration_table": TABLE_VERSION, "graph": fingerprint, "method": calibration.method,
                "split": CALIBRATION_SPLIT, "seed": CALIBRATION_SEED,
                "videos": [os.path.basename(v) for v in videos], "ranges": ranges}, indent=1))
        quantized = onnx.load(out)
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(proto.metadata_props)
    return quantized


def _read_table(calibration: Calibration, fingerprint: str) -> dict | None:
    """The stored table when it exists (and belongs to this graph); None when calibration must run."""
    if not os.path.isfile(calibration.table):
        return None
    try:
        with open(calibration.table) as f:
            table = json.load(f)
        ok = table.get("evim3_calibration_table") == TABLE_VERSION and isinstance(table.get("ranges"), dict)
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise ModelFileError(calibration.table, "not an evim3 calibration table (delete it to recalibrate)")
    if table["graph"] != fingerprint:
        if calibration.data is not None or calibration.clips is not None:
            return None  # data given: recalibrate and overwrite the stale table
        raise ModelFileError(calibration.table, "this calibration table was made for another model: give "
                                                "--calib-data DATA to recalibrate")
    if table["method"] != calibration.method:
        raise ModelFileError(calibration.table, f"this table holds {table['method']} ranges, not "
                                                f"{calibration.method}: delete it or choose {table['method']}")
    return table


def graph_fingerprint(proto: onnx.ModelProto) -> str:
    """sha256 of the top graph's nodes and weights: equal for two exports of the same checkpoint."""
    digest = hashlib.sha256()
    for node in proto.graph.node:
        digest.update(f"{node.op_type}|{','.join(node.input)}|{','.join(node.output)}\n".encode())
    for init in proto.graph.initializer:
        digest.update(init.name.encode())
        digest.update(onnx.numpy_helper.to_array(init).tobytes())
    return digest.hexdigest()


def float_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept float32: the scan region, Mamba's out_proj and the output layers. Measured on the
    tests' fitted model (max / mean |dEF| over 24 clips against PyTorch, every other linear layer int8): all
    linear layers 1.47 / 0.31; without the head's output layer 0.39 / 0.14; without it and out_proj 0.25 / 0.07.
    The output layer maps a few features straight to EF, so one activation scale's rounding is an EF error;
    out_proj reads the gated scan output, whose outliers one scale cannot hold."""
    scan = [n.name for n in proto.graph.node if n.name.startswith(SCAN_TAG)]
    return scan + out_projections(proto) + output_layers(proto)


def _linear_layers(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    weights = {i.name for i in proto.graph.initializer}
    return [n for n in proto.graph.node if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and n.input[1] in weights]


def output_layers(proto: onnx.ModelProto) -> list[str]:
    """Names of the linear layers nearest the graph's outputs: walking back from each output, the first
    MatMul/Gemm with a constant weight on every path (the EF / class / LV head's last layer)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    linear = {n.name for n in _linear_layers(proto)}
    found, seen, stack = [], set(), [o.name for o in proto.graph.output]
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.name in linear:
            found.append(node.name)
        else:
            stack.extend(node.input)
    return sorted(found)


def out_projections(proto: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes of Mamba's out_proj: the first MatMul after each recorded scan output (through
    the layout ops between them)."""
    scans = scan_boundaries({p.key: p.value for p in proto.metadata_props}) or []
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = []
    for scan in scans:
        name = scan[SCAN_OUTPUT]
        while len(readers.get(name, [])) == 1 and readers[name][0].op_type in ("Transpose", "Reshape"):
            name = readers[name][0].output[0]
        matmuls = [n for n in readers.get(name, []) if n.op_type == "MatMul"]
        if len(matmuls) != 1:
            raise RuntimeError(f"no single out_proj MatMul after scan output {scan[SCAN_OUTPUT]!r}")
        found.append(matmuls[0].name)
    return found


def prepared_for_quantiser(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy the quantiser can read. ONNX Runtime's quantiser infers shapes itself, twice (1.30 on), and the
    second pass rejects the first's value_info inside the Scan bodies ("Inferred shape and existing shape
    differ"): without the exporter's value_info both passes start clean. The exporter also writes e.g. Scan's
    scan_output_directions=[] for a loop without scan outputs, which means the same as leaving it out and
    which the quantiser, rebuilding nodes, cannot type."""
    proto = copy.deepcopy(proto)
    for graph in all_graphs(proto.graph):
        del graph.value_info[:]
        for node in graph.node:
            kept = [a for a in node.attribute if not (a.type == onnx.AttributeProto.INTS and not a.ints)]
            if len(kept) < len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(kept)
    return proto


@dataclass(frozen=True)
class QuantizedLayer:
    """One linear layer of a Q/DQ graph, as the integer kernels see it."""

    node: str
    weight: np.ndarray  # (K, N) int8, whatever the layout in the file (Gemm's transB)
    weight_scale: np.ndarray  # (N,) or ()
    activation_scale: float


def quantized_layers(proto: onnx.ModelProto) -> list[QuantizedLayer]:
    """Every MatMul/Gemm whose two inputs are DequantizeLinear outputs, with its int8 weight and scales."""
    inits = {i.name: i for i in proto.graph.initializer}
    producers = {out: node for node in proto.graph.node for out in node.output}

    def value(name: str) -> np.ndarray:
        return onnx.numpy_helper.to_array(inits[name])

    layers = []
    for node in proto.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        act, weight = (producers.get(name) for name in node.input[:2])
        if not (act and weight and act.op_type == weight.op_type == "DequantizeLinear"):
            continue
        if weight.input[0] not in inits:
            continue
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        w = value(weight.input[0])
        layers.append(QuantizedLayer(node.name, w.T if transposed else w, value(weight.input[1]),
                                     float(value(act.input[1]))))
    return layers
