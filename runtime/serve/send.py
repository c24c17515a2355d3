"""C-STORE of a job's objects (the SR, the secondary capture) to one destination, and what a failure means.

Outcomes: sent (every object acknowledged with success or a warning); retry (the destination is down, busy
or answered a transient failure: the delivery is tried again after an exponential backoff,
``retry_in``, until ``max_tries``); dead (a permanent rejection of the association, a refused presentation
context or a failure status the destination will answer again: dead at once, no retry).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

import pydicom
from pynetdicom import AE

# C-STORE statuses: 0x0000 success; 0xB000/0xB007/0xB006 warnings (stored); 0xA7xx out of resources
# (transient: the disk may free up); 0xA9xx, 0xCxxx, 0x0122 (SOP class not supported) etc.: permanent.
WARNING_STATUSES = {0xB000, 0xB006, 0xB007}
TRANSIENT_STATUS_PREFIX = 0xA700
ASSOCIATE_REJECTED_PERMANENT = 0x01

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class Destination:
    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Destination:
        """AET@HOST:PORT; ValueError with a one-line reason."""
        aet, at, address = text.partition("@")
        host, colon, port = address.rpartition(":")
        if not at or not colon or not aet or not host:
            raise ValueError(f"--forward {text!r}: expected AET@HOST:PORT")
        check_aet(aet, "--forward")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--forward {text!r}: port must be 1-65535")
        return cls(aet, host.strip("[]"), int(port))


def check_aet(aet: str, what: str) -> str:
    if not 0 < len(aet) <= 16 or not aet.isascii() or "\\" in aet or aet != aet.strip() or not aet.isprintable():
        raise ValueError(f"{what}: AE title {aet!r} must be 1-16 printable ASCII characters, no backslash, "
                         "no leading or trailing space")
    return aet


@dataclass
class SendResult:
    ok: bool
    permanent: bool = False
    error: str | None = None


def retry_in(attempts: int, base_s: float, cap_s: float) -> float:
    """Seconds before the next try after `attempts` failed tries: base * 2^(attempts - 1), at most cap."""
    return min(cap_s, base_s * 2 ** max(0, attempts - 1))


def send(paths: list[str], destination: Destination, calling_aet: str, timeout_s: float = 30.0,
         tls: ssl.SSLContext | None = None) -> SendResult:
    """C-STORE every file of `paths` (DICOM Part 10) to `destination` over one association."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10.0)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    tls_args = (tls, destination.host) if tls is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.aet, tls_args=tls_args)
    if assoc.is_rejected:
        result = getattr(assoc.acceptor.primitive, "result", None)
        permanent = result == ASSOCIATE_REJECTED_PERMANENT
        return SendResult(False, permanent, f"association rejected ({'permanent' if permanent else 'transient'}, "
                                            f"reason {getattr(assoc.acceptor.primitive, 'diagnostic', '?')})")
    if not assoc.is_established:
        return SendResult(False, False, "no association (destination down or not answering)")
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except ValueError as e:  # no accepted presentation context for this SOP class
                return SendResult(False, True, f"refused: {e}")
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == -1:
                return SendResult(False, False, "connection lost or no response to C-STORE")
            if code != 0 and code not in WARNING_STATUSES:
                transient = code & 0xFF00 == TRANSIENT_STATUS_PREFIX
                return SendResult(False, not transient, f"C-STORE status 0x{code:04X}")
        return SendResult(True)
    finally:
        if assoc.is_established:
            assoc.release()
