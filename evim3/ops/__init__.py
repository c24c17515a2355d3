"""Kernels, each next to its plain reference with the same signature (mamba-ssm style)."""

from evim3.ops.selective_scan import (
    default_chunk,
    exportable_scan,
    forced_scan,
    fused_available,
    scan_choice,
    scan_name,
    scan_unavailable,
    selective_scan,
    selective_scan_chunked,
    selective_scan_exportable,
    selective_scan_ref,
)

__all__ = [
    "default_chunk",
    "exportable_scan",
    "forced_scan",
    "fused_available",
    "scan_choice",
    "scan_name",
    "scan_unavailable",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_exportable",
    "selective_scan_ref",
]
