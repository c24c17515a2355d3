"""The TensorRT 10.x and 11.x parser rules (export/trt_rules.py), checked without TensorRT: every exported variant of a
tiny model breaks none of them, and graphs planted with one violation each are refused with a message that
names the node and the rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from evim3.export.onnx import export_onnx
from evim3.export.trt_rules import check_graph, require_tensorrt_ready
from evim3.runtime.errors import ModelFileError
from evim3.runtime.meta import PRECISION_PROP, ModelMeta, PreprocessSpec

from evim3.config import get_preset
from evim3.models.evim3 import EViM3

CFG = get_preset("evim3-tiny").replace(frames=8, img_size=32, dim=16, depth=1, d_state=4, final_dim=32)
META = ModelMeta("evim3-tiny", CFG.to_dict(), PreprocessSpec(size=32, frames=8), ef_mean=55.0)
h = onnx.helper
T = onnx.TensorProto


def tiny_model() -> EViM3:
    torch.manual_seed(0)
    return EViM3(CFG, ef_mean=55.0).eval()


# fp32 and fp16, fixed and dynamic batch, opset 17 and 18: every form `evim3 export` writes for TensorRT
VARIANTS = [{"fp16": fp16, "dynamic_batch": dynamic, "opset": opset}
            for fp16, dynamic, opset in ((False, False, 17), (True, True, 17), (False, True, 18), (True, False, 18))]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_exported_variant_breaks_no_rule(tmp_path: Path, options: dict) -> None:
    """export_onnx runs the check itself (it would raise); the file is checked again here, and its Scan loops
    were looked at (a checker that saw no Scan would pass anything)."""
    path = tmp_path / "m.onnx"
    export_onnx(tiny_model(), META, path, **options)
    proto = onnx.load(str(path))
    assert check_graph(proto) == []
    assert sum(n.op_type == "Scan" for n in proto.graph.node) == 3 * 6 * CFG.depth


def model(nodes: list, inputs: list, outputs: list, opset: int = 17, initializers: tuple = ()) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])


def io(name: str, shape: list, elem: int = T.FLOAT) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, elem, shape)


def rules(proto: onnx.ModelProto) -> list[str]:
    return [str(v) for v in check_graph(proto)]


def test_a_clean_graph_passes() -> None:
    proto = model([h.make_node("Relu", ["x"], ["y"], name="relu")], [io("x", [2, 3])], [io("y", [2, 3])])
    assert rules(proto) == []


def test_float64_tensor_is_caught() -> None:
    proto = model([h.make_node("Cast", ["x"], ["x64"], to=T.DOUBLE, name="to_double"),
                   h.make_node("Mul", ["x64", "x64"], ["sq"], name="square"),
                   h.make_node("Cast", ["sq"], ["y"], to=T.FLOAT, name="back")],
                  [io("x", [2, 3])], [io("y", [2, 3])])
    found = rules(proto)
    assert any("tensor 'x64' is FP64" in r for r in found), found
    assert any(r.startswith("Mul node 'square'") and "FP64" in r for r in found), found


def scan_body() -> onnx.GraphProto:
    """state s (2,), scanned x_t (2,) -> s + x_t, and s + x_t as the scan output."""
    return h.make_graph([h.make_node("Add", ["s", "x_t"], ["s_next"]), h.make_node("Identity", ["s_next"], ["y_t"])],
                        "body", [io("s", [2]), io("x_t", [2])], [io("s_next", [2]), io("y_t", [2])])


def test_scan_with_sequence_lens_is_caught() -> None:
    """Scan-8 (the only form with sequence_lens); opset 8 is also below TensorRT's range."""
    node = h.make_node("Scan", ["lens", "s0", "x"], ["s_end", "ys"], name="scan8", body=scan_body(),
                       num_scan_inputs=1)
    proto = model([node], [io("lens", [1], T.INT32), io("s0", [1, 2]), io("x", [1, 5, 2])],
                  [io("s_end", [1, 2]), io("ys", [1, 5, 2])], opset=8)
    found = rules(proto)
    assert any("Scan node 'scan8'" in r and "sequence_lens" in r for r in found), found
    assert any("opset 8 is outside" in r for r in found), found


def test_scan_with_dynamic_trip_count_is_caught() -> None:
    node = h.make_node("Scan", ["s0", "x"], ["s_end", "ys"], name="scan", body=scan_body(), num_scan_inputs=1)
    proto = model([node], [io("s0", [2]), io("x", ["steps", 2])], [io("s_end", [2]), io("ys", ["steps", 2])])
    found = rules(proto)
    assert any("trip count" in r and "'x'" in r for r in found), found


def test_scan_state_that_changes_shape_is_caught() -> None:
    body = h.make_graph([h.make_node("Concat", ["s", "x_t"], ["s_next"], axis=0),
                         h.make_node("Identity", ["x_t"], ["y_t"])],
                        "body", [io("s", [2]), io("x_t", [2])], [io("s_next", [4]), io("y_t", [2])])
    node = h.make_node("Scan", ["s0", "x"], ["s_end", "ys"], name="growing", body=body, num_scan_inputs=1)
    proto = model([node], [io("s0", [2]), io("x", [5, 2])], [io("s_end", [None]), io("ys", [5, 2])])
    assert any("changes shape" in r for r in rules(proto))


def test_loop_with_dynamic_trip_count_and_scan_outputs_is_caught() -> None:
    body = h.make_graph([h.make_node("Identity", ["cond"], ["cond_out"]), h.make_node("Add", ["s", "s"], ["s_next"]),
                         h.make_node("Identity", ["s"], ["y"])], "body",
                        [io("i", [], T.INT64), io("cond", [], T.BOOL), io("s", [2])],
                        [io("cond_out", [], T.BOOL), io("s_next", [2]), io("y", [2])])
    node = h.make_node("Loop", ["m", "c", "s0"], ["s_end", "ys"], name="loop", body=body)
    proto = model([node], [io("m", [], T.INT64), io("c", [], T.BOOL), io("s0", [2])],
                  [io("s_end", [2]), io("ys", [None, 2])])
    assert any("Loop node 'loop'" in r and "constant trip count" in r for r in rules(proto))


def test_unsupported_op_and_custom_domain_are_caught() -> None:
    proto = model([h.make_node("Unique", ["x"], ["y"], name="uniq"),
                   h.make_node("FusedThing", ["y"], ["z"], name="fused", domain="com.example")],
                  [io("x", [6])], [io("z", [None])])
    proto.opset_import.append(h.make_opsetid("com.example", 1))
    found = rules(proto)
    assert "Unique node 'uniq': Unique is not supported by TensorRT 10.3's ONNX parser" in found, found
    assert any("custom domain 'com.example'" in r for r in found), found


def test_runtime_axes_and_unsupported_types_are_caught() -> None:
    """ReduceSum with axes computed at run time; a Sigmoid on int32 data; an extra LayerNormalization output."""
    nodes = [h.make_node("Shape", ["x"], ["shape"]), h.make_node("Slice", ["shape", "zero", "one"], ["axes"]),
             h.make_node("Sub", ["axes", "one"], ["axes0"], name="axes_at_runtime"),
             h.make_node("ReduceSum", ["x", "axes0"], ["r"], name="reduce"),
             h.make_node("Cast", ["x"], ["xi"], to=T.INT32), h.make_node("Sigmoid", ["xi"], ["si"], name="int_sigmoid"),
             h.make_node("LayerNormalization", ["x", "w"], ["ln", "mean"], name="ln")]
    init = [onnx.numpy_helper.from_array(np.array(v, "int64"), n) for n, v in (("zero", [0]), ("one", [1]))]
    init.append(onnx.numpy_helper.from_array(np.ones(3, "float32"), "w"))
    proto = model(nodes, [io("x", [2, 3])], [io("r", None), io("si", [2, 3], T.INT32), io("ln", [2, 3])],
                  initializers=init)
    found = rules(proto)
    assert any(r.startswith("ReduceSum node 'reduce'") and "build-time constant" in r for r in found), found
    assert any(r.startswith("Sigmoid node 'int_sigmoid'") and "INT32" in r for r in found), found
    assert any(r.startswith("LayerNormalization node 'ln'") and "first output" in r for r in found), found


def test_violation_is_one_line_naming_the_file() -> None:
    proto = model([h.make_node("Unique", ["x"], ["y"], name="uniq"), h.make_node("Det", ["x"], ["d"], name="det")],
                  [io("x", [3, 3])], [io("y", [None]), io("d", [])])
    with pytest.raises(ModelFileError) as e:
        require_tensorrt_ready(proto, "m.onnx")
    message = str(e.value)
    assert "\n" not in message and message.startswith("m.onnx: graph breaks a TensorRT 10.x parser rule: Unique")
    assert message.endswith("(and 1 more)")


def test_export_refuses_a_model_that_breaks_a_rule(tmp_path: Path) -> None:
    """A model computing part of its head in float64: export_onnx raises and writes nothing."""
    net = tiny_model()
    net.head.register_forward_hook(lambda module, args, out: (out.double() * 1.5).float())
    path = tmp_path / "f64.onnx"
    with pytest.raises(ModelFileError, match="FP64"):
        export_onnx(net, META, path)
    assert not path.exists() and not list(tmp_path.iterdir())


def qdq_linear(*, zero_point: int | None = 0, zp_type: int = T.INT8, scale: float = 0.05,
               weight_scales: list[float] | None = None, axis: int = 1, act_scale_per_channel: bool = False) -> onnx.ModelProto:
    """x (1, 4) -> Q -> DQ -> MatMul with DQ(int8 weight (4, 3)): the pattern `evim3 export --int8` writes."""
    weight_scales = weight_scales or [0.01, 0.02, 0.03]
    inits = [h.make_tensor("w_q", T.INT8, [4, 3], [1, -2, 3, 4, 5, -6, 7, 8, 9, 10, -11, 12]),
             h.make_tensor("w_scale", T.FLOAT, [len(weight_scales)], weight_scales),
             h.make_tensor("w_zp", T.INT8, [len(weight_scales)], [0] * len(weight_scales)),
             h.make_tensor("x_scale", T.FLOAT, [4] if act_scale_per_channel else [],
                           [scale] * (4 if act_scale_per_channel else 1))]
    q_inputs = ["x", "x_scale"]
    if zero_point is not None:
        inits.append(h.make_tensor("x_zp", zp_type, [], [zero_point]))
        q_inputs.append("x_zp")
    nodes = [h.make_node("QuantizeLinear", q_inputs, ["x_q"], name="q", axis=1),
             h.make_node("DequantizeLinear", ["x_q", *q_inputs[1:]], ["x_dq"], name="dq", axis=1),
             h.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq_w", axis=axis),
             h.make_node("Cast", ["x_dq"], ["x_f"], to=T.FLOAT, name="cast"),
             h.make_node("MatMul", ["x_f", "w"], ["y"], name="mm")]
    return model(nodes, [io("x", [1, 4])], [io("y", [1, 3])], opset=19, initializers=inits)


def test_qdq_linear_layer_passes_both_generations() -> None:
    proto = qdq_linear()
    assert check_graph(proto, "10") == [] and check_graph(proto, "11") == []


@pytest.mark.parametrize("graph, found", [
    (lambda: qdq_linear(zero_point=None), "never UINT8"),  # ONNX's default quantized type
    (lambda: qdq_linear(zero_point=0, zp_type=T.UINT8), "never UINT8"),
    (lambda: qdq_linear(zero_point=3), "constant zero"),
    (lambda: qdq_linear(scale=-0.05), "finite and positive"),
    (lambda: qdq_linear(scale=float("inf")), "finite and positive"),
    (lambda: qdq_linear(weight_scales=[0.01, 0.0, 0.03]), "finite and positive"),
    (lambda: qdq_linear(weight_scales=[0.01, 0.02, 0.03], axis=0), "does not match axis 0"),
    (lambda: qdq_linear(act_scale_per_channel=True), "constant weights only"),
])
def test_qdq_rules_refuse_what_tensorrt_cannot_take(graph, found: str) -> None:
    for generation in ("10", "11"):
        messages = [str(v) for v in check_graph(graph(), generation)]
        assert any(found in m for m in messages), (generation, messages)


def test_tensorrt_11_takes_int8_only_as_qdq() -> None:
    """A file that says int8 but holds no Q/DQ (e.g. an implicitly calibrated build's fp32 graph) passes 10.x
    and fails 11.x: TensorRT 11 has no implicit calibration."""
    plain = model([h.make_node("Relu", ["x"], ["y"], name="relu")], [io("x", [2])], [io("y", [2])])
    plain.metadata_props.add(key=PRECISION_PROP, value="int8")
    assert check_graph(plain, "10") == []
    assert any("no implicit INT8" in str(v) for v in check_graph(plain, "11"))
    with pytest.raises(ModelFileError, match="TensorRT 11.x parser rule"):
        require_tensorrt_ready(plain, "m.onnx")
