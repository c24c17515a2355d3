"""`evim3 info`: what each preset is -- parameters, token counts, the Enclosure Global Token geometry, the scan
chunk and the forward FLOPs. Imports torch inside the command only."""

from __future__ import annotations

from typing import Any

import typer
from evim3.cli.common import cli_errors
from rich.console import Console
from rich.table import Table

from evim3.config import PRESETS, get_preset


def preset_summary(name: str) -> dict[str, Any]:
    """The numbers `evim3 info` prints for one preset. Builds the model (with the EF head) once to count
    its parameters: exact by construction, and about a second for the largest preset."""
    from evim3.models.evim3 import EViM3, count_parameters, model_flops
    from evim3.ops import default_chunk

    cfg = get_preset(name)
    chunk = cfg.scan_chunk or default_chunk(cfg.num_tokens)
    return {
        "preset": name,
        "parameters": count_parameters(EViM3(cfg)),
        "clip": f"{cfg.in_channels}x{cfg.frames}x{cfg.img_size}x{cfg.img_size}",
        "patch": f"{cfg.time_patch}x{cfg.patch}x{cfg.patch}",
        "dim": cfg.dim,
        "blocks": cfg.depth,
        "grid": cfg.grid,
        "padded_grid": cfg.padded_grid,
        "real_tokens": cfg.num_real_tokens,
        "tokens": cfg.num_tokens,
        "global_planes": cfg.global_planes,
        "scan_chunk": chunk,
        "scan_chunks": -(-cfg.num_tokens // chunk),
        "gflops": model_flops(cfg) / 1e9,
    }


SCAN_LABELS = {
    "mamba": "mamba-ssm's fused CUDA kernel",
    "triton": "evim3's Triton kernels",
    "cpu": "evim3's fused C++ kernel",
    "chunked": "the chunked scan (PyTorch ops)",
}


def scan_lines() -> list[str]:
    """Which selective scan runs CUDA and CPU tensors on this machine (EVIM3_SCAN forces one)."""
    from evim3.ops import scan_choice

    lines = []
    for device, label in (("cuda", "CUDA"), ("cpu", "CPU")):
        try:
            name, why = scan_choice(device)
        except ValueError as e:  # EVIM3_SCAN names no scan, or one that cannot run there
            lines.append(f"scan on {label} tensors: none -- {e}")
            continue
        lines.append(f"scan on {label} tensors: {SCAN_LABELS[name]}" + (f" ({'; '.join(why)})" if why else ""))
    return lines


def summary_table(rows: list[dict[str, Any]]) -> Table:
    """One column per preset, one row per quantity: fits an 80-column terminal for all four presets."""

    def dims(shape) -> str:
        return "x".join(map(str, shape))

    lines = {
        "parameters": lambda r: f"{r['parameters']:,}",
        "clip (CxTxHxW)": lambda r: r["clip"],
        "patch": lambda r: r["patch"],
        "D / blocks": lambda r: f"{r['dim']} / {r['blocks']}",
        "grid (L x H x W)": lambda r: dims(r["grid"]),
        "with EGT": lambda r: dims(r["padded_grid"]),
        "real tokens": lambda r: f"{r['real_tokens']:,}",
        "tokens with EGT": lambda r: f"{r['tokens']:,}",
        "global planes L": lambda r: ",".join(map(str, r["global_planes"][0])),
        "global planes H": lambda r: ",".join(map(str, r["global_planes"][1])),
        "global planes W": lambda r: ",".join(map(str, r["global_planes"][2])),
        "scan chunk T x K": lambda r: f"{r['scan_chunk']} x {r['scan_chunks']}",
        "forward GFLOPs": lambda r: f"{r['gflops']:.1f}",
    }
    table = Table(title="E-ViM3 presets (one clip, EF head)")
    table.add_column("")
    for r in rows:
        table.add_column(r["preset"], justify="right")
    for label, value in lines.items():
        table.add_row(label, *(value(r) for r in rows))
    return table


@cli_errors
def info(
    preset: str | None = typer.Option(None, "--preset", help=f"One of {', '.join(PRESETS)}; all when omitted."),
) -> None:
    """Parameters, token counts, global planes, scan chunk and forward GFLOPs of the model presets."""
    names = [preset] if preset else list(PRESETS)  # an unknown name fails in get_preset, one line
    console = Console()
    console.print(summary_table([preset_summary(name) for name in names]))
    for line in scan_lines():
        console.print(line, highlight=False, markup=False, soft_wrap=True)
