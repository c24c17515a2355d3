"""Every Triton scan kernel, the current ones and issue 27's variants, compiled for sm_90 (H100/H200) on this
machine, without a GPU: Triton's compiler and its bundled ptxas (-v) say how many registers each kernel takes and
whether any spill to local memory. A spill is a GPU-only slowdown no interpreter test can see, so there must be
none. One subprocess (the session runs Triton's interpreter) compiles the ten kernels in ~7 s on one core; skipped
(with the reason) only where Triton cannot target sm_90.
"""

from __future__ import annotations

import pytest
from ci import require

pytest.importorskip("triton")

from evim3.ops import triton_static

require(triton_static.target_unavailable())

# Above this a kernel holds fewer than two 256-thread blocks per SM (65,536 registers): a ceiling, not a target.
MAX_REGISTERS = 255


@pytest.fixture(scope="module")
def reports() -> dict[str, triton_static.StaticReport]:
    return {r.kernel: r for r in triton_static.report_in_subprocess(90)}


def test_every_kernel_compiles_for_sm90_without_spills(reports: dict[str, triton_static.StaticReport]) -> None:
    for r in reports.values():
        print(r)
    expected = {s.name for s in triton_static.kernel_specs()}
    assert {name.split("[")[0] for name in reports} == expected
    assert len(reports) == len(triton_static.kernel_specs())  # the variants' STAGES 1 and 2 both there
    for r in reports.values():
        assert r.spill_stores == 0 and r.spill_loads == 0, r
        assert 0 < r.registers <= MAX_REGISTERS, r


def test_ptxas_report_parsing() -> None:
    """The parser reads ptxas -v's lines (and refuses what it cannot read rather than report zero spills)."""
    log = ("ptxas info    : Function properties for k\n    8 bytes stack frame, 24 bytes spill stores, "
           "16 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers")
    r = triton_static._parse("k", 8, log)
    assert (r.registers, r.spill_stores, r.spill_loads, r.stack_bytes) == (255, 24, 16, 8)
    with pytest.raises(RuntimeError):
        triton_static._parse("k", 8, "nothing")
