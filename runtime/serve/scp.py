"""The Storage and Verification SCP (pynetdicom).

Accepted: Ultrasound Multi-frame Image Storage and Ultrasound Image Storage (and their retired versions) in
the transfer syntaxes of
``TRANSFER_SYNTAXES`` (every JPEG one listed explicitly), and Verification (C-ECHO). Every other SOP
class is refused at association negotiation.

A C-STORE answers success (0x0000) only once the dataset, as received, is durably in the spool
(``Spool.write``: temp file, fsync, rename, folder fsync) and its job committed to the queue. Otherwise:
0xA700 (out of resources: the spool cannot write, or the dataset is over the size limit) or 0xC210 (cannot
understand: the dataset does not parse, lacks its UIDs or its pixel data is cut short). The same instance
received again is acknowledged (it is already safe) and counted, not queued twice.
"""

from __future__ import annotations

from collections.abc import Callable

import pydicom
from evim3.runtime.serve.audit import AuditLog, scrub
from evim3.runtime.serve.jobqueue import JobQueue
from evim3.runtime.serve.spool import Spool, uid_hash
from evim3.runtime.serve.triage import RETIRED_ULTRASOUND_SOP_CLASSES, drop_stray_delimiters
from pydicom.encaps import generate_frames
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt, register_uid, sop_class
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import UltrasoundImageStorage, UltrasoundMultiFrameImageStorage, Verification

# The current classes and their retired predecessors, which older carts still send (pynetdicom serves a
# retired class only once it is registered with the storage service)
for _uid, _keyword in zip(RETIRED_ULTRASOUND_SOP_CLASSES, ("UltrasoundMultiFrameImageStorageRetired",
                                                           "UltrasoundImageStorageRetired")):
    if not hasattr(sop_class, _keyword):
        register_uid(_uid, _keyword, StorageServiceClass)
STORAGE_SOP_CLASSES = (UltrasoundMultiFrameImageStorage, UltrasoundImageStorage, *RETIRED_ULTRASOUND_SOP_CLASSES)
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, RLELossless,
]
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210


class DatasetError(Exception):
    pass


class StorageSCP:
    def __init__(self, ae_title: str, spool: Spool, queue: JobQueue, audit: AuditLog, max_dataset_bytes: int,
                 allow_aet: list[str], max_associations: int, on_queued: Callable[[], None]):
        self.spool, self.queue, self.audit = spool, queue, audit
        self.max_dataset_bytes = max_dataset_bytes
        self.on_queued = on_queued
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_associations = max_associations
        self.ae.require_calling_aet = list(allow_aet)
        for storage_class in STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(storage_class, TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.server = None

    def start(self, host: str, port: int, ssl_context=None) -> None:
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_REJECTED, self._rejected), (evt.EVT_ACCEPTED, self._accepted)]
        self.server = self.ae.start_server((host, port), block=False, evt_handlers=handlers,
                                           ssl_context=ssl_context)

    def stop(self) -> None:
        """Stop accepting associations; running ones are ended."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _accepted(self, event) -> None:
        self.audit.event("association", calling_aet=event.assoc.requestor.ae_title,
                         contexts=len(event.assoc.accepted_contexts), refused=len(event.assoc.rejected_contexts))

    def _rejected(self, event) -> None:
        self.audit.event("association rejected", calling_aet=event.assoc.requestor.ae_title)

    def handle_store(self, event) -> int:
        calling = event.assoc.requestor.ae_title
        size = event.request.DataSet.getbuffer().nbytes
        if size > self.max_dataset_bytes:
            self.audit.event("refused", calling_aet=calling, reason=f"dataset of {size} bytes is over the limit "
                                                                    f"of {self.max_dataset_bytes}")
            return OUT_OF_RESOURCES
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop_uid = check_dataset(ds, event.request.AffectedSOPInstanceUID, event.request.AffectedSOPClassUID)
        except Exception as e:  # noqa: BLE001 -- whatever pydicom makes of bad bytes: not understood
            self.audit.event("refused", calling_aet=calling,
                             reason=f"dataset cannot be read: {type(e).__name__}: {scrub(e)}")
            return CANNOT_UNDERSTAND
        job = uid_hash(sop_uid)
        if self.queue.has_job(sop_uid):
            self.queue.add_job(sop_uid, job, "", calling)  # counts the copy
            self.audit.event("duplicate", job=job, calling_aet=calling)
            return SUCCESS
        path = self.spool.received_path(sop_uid)
        try:
            self.spool.write(path, event.encoded_dataset(include_meta=True))
            self.queue.add_job(sop_uid, job, str(path), calling)
        except Exception as e:  # noqa: BLE001 -- a full disk, a locked queue...: never acknowledge
            self.audit.event("refused", job=job, calling_aet=calling, reason=f"spool cannot store it: {scrub(e)}")
            return OUT_OF_RESOURCES
        self.audit.event("received", job=job, calling_aet=calling, bytes=size, state="received")
        self.on_queued()
        return SUCCESS


def check_dataset(ds: pydicom.Dataset, request_sop_uid: str, request_sop_class: str) -> str:
    """Parse every element; the SOP UIDs must match the request's and the pixel data hold every frame.
    Returns the SOP Instance UID; raises DatasetError (or pydicom's error) when the dataset is unusable.
    Stray top-level delimiters (a vendor fault pydicom reads past) are dropped from this in-memory copy;
    the spool keeps the bytes as received."""
    drop_stray_delimiters(ds)
    for _ in ds.iterall():  # converts every raw element: bad bytes raise here
        pass
    sop_uid, sop_class = str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))
    if not sop_uid or sop_uid != str(request_sop_uid) or sop_class != str(request_sop_class):
        raise DatasetError("SOP Instance/Class UID missing or unlike the C-STORE request's")
    if "PixelData" not in ds:
        raise DatasetError("no pixel data")
    frames = int(ds.get("NumberOfFrames") or 1)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        found = sum(1 for _ in generate_frames(ds.PixelData, number_of_frames=frames))
        if found < frames:
            raise DatasetError(f"pixel data holds {found} of {frames} frames")
    else:
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
                    * int(ds.BitsAllocated) // 8 * frames)
        if len(ds.PixelData) < expected:
            raise DatasetError(f"pixel data is cut short: {len(ds.PixelData)} of {expected} bytes")
    return sop_uid
