"""Kernels, each next to its plain reference with the same signature (mamba-ssm style); the registry and
dispatcher in evim3.ops.selective_scan."""

from evim3.ops.selective_scan import (
    SCANS,
    Scan,
    forced_scan,
    fused_available,
    register_scan,
    scan_choice,
    scan_name,
    scan_unavailable,
    selective_scan,
    use_scan,
)
from evim3.ops.selective_scan_chunked import default_chunk, selective_scan_chunked
from evim3.ops.selective_scan_exportable import selective_scan_exportable
from evim3.ops.selective_scan_ref import selective_scan_ref

__all__ = [
    "SCANS",
    "Scan",
    "default_chunk",
    "forced_scan",
    "fused_available",
    "register_scan",
    "scan_choice",
    "scan_name",
    "scan_unavailable",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_exportable",
    "selective_scan_ref",
    "use_scan",
]
