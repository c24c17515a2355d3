"""What an x86 CPU without VNNI computes for an INT8 graph, emulated in numpy: ONNX Runtime picks its integer
kernels by CPUID and nothing forces another path, so a VNNI machine cannot run the AVX2 kernels itself.

MLAS's uint8 x int8 kernel for AVX2 (and AVX-512 without VNNI) multiplies with VPMADDUBSW, which adds each
neighbouring pair of products along K into an int16 with saturation; the pairs are then summed in int32
(VPMADDWD, accumulators), and the zero points are corrected afterwards. `avx2_u8s8_products` computes a layer
exactly so; `avx2_evaluator` evaluates a whole graph with it through ONNX's reference evaluator: every
MatMulInteger (the dynamic form) and every MatMul/Gemm between two DequantizeLinear (the Q/DQ form, its int8
activations shifted by 128 into the uint8 kernel, the usual conversion) is computed that way, the rest in
numpy. `saturated_pairs()` and `emulated_products()` count since the evaluator was made. For tests
(tests/test_int8.py) and `python -m benchmarks int8`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

INT16_MAX = 32767
DOMAIN = "evim3.avx2"
_counter = {"saturated": 0, "layers": 0}


def avx2_u8s8_products(a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, int]:
    """a (M, K) uint8 values x w (K, N) int8 as MLAS's AVX2 kernel computes it: VPMADDUBSW multiplies
    neighbouring pairs along K and adds each pair into an int16 with saturation; VPMADDWD and the
    accumulators then sum the pairs in int32. Returns the int32 product and how many pairs saturated."""
    a, w = a.astype(np.int64), w.astype(np.int64)
    if a.shape[1] % 2:  # the kernel pads K with zeros
        a, w = np.pad(a, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * w[None, 0::2] + a[:, 1::2, None] * w[None, 1::2]  # (M, K/2, N)
    saturated = np.clip(pairs, -INT16_MAX - 1, INT16_MAX)
    return saturated.sum(axis=1), int((saturated != pairs).sum())


def _count(saturated: int) -> None:
    _counter["saturated"] += saturated
    _counter["layers"] += 1


def saturated_pairs() -> int:
    """Pairs that saturated since the last avx2_evaluator was made."""
    return _counter["saturated"]


def emulated_products() -> int:
    """Integer layer products computed the AVX2 way since the last avx2_evaluator was made."""
    return _counter["layers"]


class Avx2MatMul(OpRun):
    """MatMul / Gemm (DequantizeLinear(x_q), DequantizeLinear(w_q)[, bias]) as an x86 CPU without VNNI runs it:
    the int8 activation is fed to the uint8 x int8 kernel shifted by 128 (its zero point moves to 128, the
    usual conversion), the product is avx2_u8s8_products, the shift comes off exactly, then the scales."""

    op_domain = DOMAIN

    def _run(self, x_q, x_scale, w_q, w_scale, bias=None, transB=0):
        w_q = w_q.T if transB else w_q
        w_scale = np.broadcast_to(w_scale, (w_q.shape[1],))
        a = (x_q.reshape(-1, x_q.shape[-1]).astype(np.int64) + 128).astype(np.uint8)
        product, saturated = avx2_u8s8_products(a, w_q)
        _count(saturated)
        exact = product - 128 * w_q.astype(np.int64).sum(axis=0)
        out = exact * (np.float64(x_scale) * w_scale.astype(np.float64)) + (0 if bias is None else bias)
        return (out.reshape(*x_q.shape[:-1], w_q.shape[1]).astype(np.float32),)


class QuantizeLinear(OpRun):
    """Opset 13's QuantizeLinear to int8 (the reference evaluator implements only 19 on)."""

    op_domain = ""

    def _run(self, x, scale, zero_point=None, axis=1, **unused):  # later opsets' attributes, at their defaults
        q = np.rint(x / scale) + (0 if zero_point is None else zero_point.astype(np.int32))
        return (np.clip(q, -128, 127).astype(np.int8),)


class DequantizeLinear(OpRun):
    """Opset 13's DequantizeLinear, per tensor or per channel of `axis`."""

    op_domain = ""

    def _run(self, x, scale, zero_point=None, axis=1, **unused):  # later opsets' attributes, at their defaults
        shape = [1] * x.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        zp = 0 if zero_point is None else zero_point.astype(np.float32).reshape(shape)
        return (((x.astype(np.float32) - zp) * scale.reshape(shape)).astype(np.float32),)


def _qdq_layers_replaced(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every quantised MatMul replaced by Avx2MatMul on its integer inputs."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    for i, node in enumerate(list(graph.node)):
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        x_dq, w_dq = (producers.get(name) for name in node.input[:2])
        if not (x_dq and w_dq and x_dq.op_type == w_dq.op_type == "DequantizeLinear"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = {"alpha": 1.0, "beta": 1.0, "transA": 0}
        if not all(attrs.get(k, v) == v for k, v in plain.items()) or len(node.input) > 3:
            raise ValueError(f"{node.name}: not a plain linear layer ({attrs})")
        graph.node.remove(node)
        graph.node.insert(i, onnx.helper.make_node(
            "Avx2MatMul", [x_dq.input[0], x_dq.input[1], w_dq.input[0], w_dq.input[1], *node.input[2:]],
            list(node.output), domain=DOMAIN, name=node.name, transB=attrs.get("transB", 0)))
    proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return proto


class MatMulInteger(OpRun):
    """The dynamic form's MatMulInteger(a uint8, w int8, a_zero_point[, w_zero_point 0]) on the AVX2 kernel:
    the raw uint8 values go through avx2_u8s8_products, the activation zero point is taken off exactly."""

    op_domain = ""

    def _run(self, a, w, a_zero_point=None, w_zero_point=None):
        if w_zero_point is not None and np.any(w_zero_point):
            raise ValueError("MatMulInteger with a nonzero weight zero point is not emulated")
        product, saturated = avx2_u8s8_products(a.reshape(-1, a.shape[-1]), w)
        _count(saturated)
        zero = 0 if a_zero_point is None else int(a_zero_point)
        exact = product - zero * w.astype(np.int64).sum(axis=0)
        return (exact.reshape(*a.shape[:-1], w.shape[1]).astype(np.int32),)


def avx2_evaluator(proto: onnx.ModelProto) -> ReferenceEvaluator:
    """A reference evaluator of `proto` whose integer products are the AVX2 kernel's (module docstring)."""
    _counter.update(saturated=0, layers=0)
    return ReferenceEvaluator(_qdq_layers_replaced(proto),
                              new_ops=[Avx2MatMul, MatMulInteger, QuantizeLinear, DequantizeLinear])
