"""The GEMM floor of `python -m benchmarks step`: the step's matmul and convolution FLOPs, with convolution
backwards counted by a groups-aware formula (torch's own ignores groups), and the operator families its
breakdown uses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_step import _grouped_conv_backward_flops, _inplace_addmm_flops, family_of


def conv_flops(x: torch.Tensor, weight: torch.Tensor, groups: int, *, input_grad: bool) -> int:
    """FLOPs of conv1d forward + backward under the counter with the benchmark's backward formula."""
    x = x.clone().requires_grad_(input_grad)
    weight = weight.clone().requires_grad_(True)
    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.convolution_backward: _grouped_conv_backward_flops})
    with counter:
        F.conv1d(x, weight, groups=groups).sum().backward()
    return int(counter.get_total_flops())


@pytest.mark.parametrize("groups", [1, 4, 16])
@pytest.mark.parametrize("input_grad", [True, False])
def test_conv_backward_counts_each_gradient_once_per_forward(groups: int, input_grad: bool) -> None:
    """Forward: 2 N L_out C_out (C_in / groups) k multiply-adds x2; backward: the same per gradient computed
    (weight always, input when it requires grad). A depthwise conv (groups = channels) is 16x cheaper than a
    dense one of the same width, which torch's formula misses."""
    batch, channels, length, k = 3, 16, 20, 4
    x = torch.randn(batch, channels, length)
    weight = torch.randn(channels, channels // groups, k)
    forward = 2 * batch * (length - k + 1) * channels * (channels // groups) * k
    expected = forward * (1 + 1 + int(input_grad))
    assert conv_flops(x, weight, groups, input_grad=input_grad) == expected


def test_depthwise_conv_is_not_counted_as_dense() -> None:
    x, k = torch.randn(2, 64, 50), 4
    depthwise = conv_flops(x, torch.randn(64, 1, k), 64, input_grad=True)
    dense = conv_flops(x, torch.randn(64, 64, k), 1, input_grad=True)
    assert dense == 64 * depthwise
    assert math.isclose(depthwise, 3 * 2 * 2 * 47 * 64 * k)


@pytest.mark.parametrize("name, family", [
    ("CpuScanFnBackward", "scan bwd"), ("CpuScanFn", "scan fwd"), ("mamba_inner::scan_backward", "scan bwd"),
    ("mamba_inner::scan", "scan fwd"), ("mamba_inner::causal_conv1d_backward", "conv"), ("CpuConvFn", "conv"),
    ("CpuMambaInnerFnBackward", "other"), ("aten::mm", "gemm"), ("aten::addmm", "gemm"),
    ("aten::convolution_backward", "conv"), ("aten::mkldnn_convolution", "conv"), ("aten::index_select", "layout"),
    ("aten::flip", "layout"), ("aten::copy_", "layout"), ("aten::native_layer_norm", "other"),
    ("aten::silu_backward", "other"),
    # the extension's own operators, as the profiler names them
    ("evim3_selective_scan_cpu_0123456789::forward", "scan fwd"), ("evim3_selective_scan_cpu_0123456789::backward", "scan bwd"),
    ("evim3_selective_scan_cpu_0123456789::causal_conv1d_forward", "conv"),
    ("evim3_selective_scan_cpu_0123456789::causal_conv1d_backward", "conv"),
])
def test_operator_families(name: str, family: str) -> None:
    assert family_of(name) == family


def test_inplace_addmm_is_counted_as_addmm() -> None:
    """The fused Mamba block's x.addmm_(a, b) counts as torch counts x.addmm(a, b): 2 m k n."""
    from torch.utils.flop_counter import FlopCounterMode

    x, a, b = torch.randn(50, 7), torch.randn(50, 3), torch.randn(3, 7)
    counts = []
    for mapping in ({}, {torch.ops.aten.addmm_: _inplace_addmm_flops}):
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with counter:
            torch.addmm(x, a, b)
            x.clone().addmm_(a, b)
        counts.append(counter.get_total_flops())
    assert counts == [2 * 50 * 3 * 7, 2 * 2 * 50 * 3 * 7]  # torch alone misses the in-place one
