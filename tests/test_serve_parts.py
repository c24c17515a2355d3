"""`evim3 serve`, part by part (no network): test cines in every encoding the node accepts, the queue's
states and dedupe, the spool's durability rules, triage reasons, the SR (highdicom TID 1500, checked by
DCMTK's dsrdump), backoff, configuration errors. The helpers here (cines, Orthanc, models) serve
test_serve_node.py too.

DCMTK and Orthanc come from Debian packages (`.ci/run` installs them). Missing, their tests skip here and
fail where CI is set (tests/ci.py), so a CI run cannot pass without them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from ci import require
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

try:
    import highdicom  # noqa: F401
    import pynetdicom  # noqa: F401
except ImportError as e:
    require(f"the [serve] extra is not installed ({e.name}): pip install -e '.[serve]'")

from evim3.runtime.meta import ModelMeta, PreprocessSpec
from evim3.runtime.serve.analyse import Analysis, BeatResult, trace_outline
from evim3.runtime.serve.config import ServeConfig
from evim3.runtime.serve.jobqueue import JobQueue
from evim3.runtime.serve.send import Destination, retry_in
from evim3.runtime.serve.spool import LIMIT_ENV, Spool, uid_hash
from evim3.runtime.serve.sr import LVEF, build_sr, derived_uid
from evim3.runtime.serve.triage import triage

US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
RETIRED_US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
# Cines the test models read: 24 frames of 64x64 at 30 fps = 0.8 s (the models need 0.5 s)
FRAMES, SIZE, FRAME_TIME_MS = 24, 64, 1000 / 30


def need_tool(name: str) -> str:
    """The path of a Debian-packaged tool (DCMTK's, not pynetdicom's same-named console scripts); skipped when
    missing, a failure where CI is set (tests/ci.py)."""
    debian = [f"{folder}/{name}" for folder in ("/usr/bin", "/usr/sbin") if os.path.exists(f"{folder}/{name}")]
    path = debian[0] if debian else shutil.which(name)
    require(None if path else f"{name} is not installed (apt-get install orthanc dcmtk openssl; .ci/run does)")
    return path


# --- cines ---

def beating_frames(frames: int = FRAMES, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """A dark LV in noisy bright tissue, shrinking and growing over 12-frame beats."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for i in range(frames):
        s = 1 - 0.25 * (0.5 - 0.5 * np.cos(2 * np.pi * i / 12))
        lv = ((xx - size / 2) / (size * 0.16 * s)) ** 2 + ((yy - size / 2) / (size * 0.34 * s)) ** 2 < 1
        out.append(np.where(lv, 20 + rng.integers(-10, 11, lv.shape), 170 + rng.integers(-25, 26, lv.shape)))
    return np.stack(out).astype(np.uint8)


def region_item(rows: int, columns: int, delta_cm: float = 0.05) -> Dataset:
    r = Dataset()
    r.RegionSpatialFormat, r.RegionDataType, r.RegionFlags = 1, 1, 0
    r.RegionLocationMinX0, r.RegionLocationMinY0 = 0, 0
    r.RegionLocationMaxX1, r.RegionLocationMaxY1 = columns - 1, rows - 1
    r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = 3
    r.PhysicalDeltaX = r.PhysicalDeltaY = delta_cm
    return r


def us_dataset(pixels: np.ndarray, sop_class: str = US_MULTIFRAME, region: bool = True,
               study_uid: str | None = None) -> Dataset:
    """An ultrasound cine as a cart writes it: patient, study, series, frame time, region; gray native pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Echo", "EVIM3-1", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "A1", "1"
    ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", "US", 1, 1
    ds.Manufacturer = "evim3 tests"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = len(pixels)
        ds.FrameTime = f"{FRAME_TIME_MS:.4f}"
        ds.FrameIncrementPointer = 0x00181063
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if region:
        ds.SequenceOfUltrasoundRegions = [region_item(ds.Rows, ds.Columns)]
    ds.PixelData = pixels.tobytes()
    return ds


def write_cine(path: Path, encoding: str = "native", pixels: np.ndarray | None = None, **kwargs) -> Path:
    """encoding: native (explicit VR little endian), rle, jpeg (baseline, one JPEG per frame), jpegls (lossless),
    deflated (deflated explicit VR little endian), palette
    (PALETTE COLOR with 8-bit LUTs), delimiter (a stray sequence delimiter item at the top level)."""
    pixels = beating_frames() if pixels is None else pixels
    ds = us_dataset(pixels, **kwargs)
    if encoding == "rle":
        ds.compress(RLELossless, encoding_plugin="pydicom")
    elif encoding == "jpegls":
        ds.compress(JPEGLSLossless)
    elif encoding == "deflated":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    elif encoding == "jpeg":
        frames = []
        for frame in pixels:
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
            frames.append(buffer.getvalue())
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    elif encoding == "palette":
        ds.PhotometricInterpretation = "PALETTE COLOR"
        ramp = np.arange(256)
        for colour, lut in (("Red", ramp), ("Green", ramp), ("Blue", 255 - ramp // 2)):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 8])
            setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype(np.uint8).tobytes())
    ds.save_as(path, enforce_file_format=True)
    if encoding == "delimiter":  # (FFFE,E0DD) length 0 between two top-level elements, as some vendors write
        data = path.read_bytes()
        marker = (0x0008).to_bytes(2, "little") + (0x0060).to_bytes(2, "little")  # before (0008,0060) Modality
        at = data.index(marker, 132 + 8)
        path.write_bytes(data[:at] + bytes.fromhex("feffdde000000000") + data[at:])
    return path


def gray_of_palette(pixels: np.ndarray) -> np.ndarray:
    """What the LUTs of write_cine('palette') make of gray levels, as gray (BT.601 weights of the reader)."""
    rgb = np.stack([pixels, pixels, 255 - pixels // 2], axis=-1).astype(np.float32)
    return np.rint(rgb @ np.array([0.2989, 0.587, 0.114], np.float32)).astype(np.uint8)


# --- models ---

SPEC = PreprocessSpec(size=32, fps=25.0, frames=8, period=2, mean=100.0, std=50.0)


def contract_ef_model(path: Path) -> str:
    from test_runtime import make_contract_onnx

    return make_contract_onnx(path, ModelMeta(preset="contract", model={}, preprocess=SPEC))


def threshold_seg_model(path: Path) -> str:
    from test_seg_infer import make_threshold_seg_onnx

    return make_threshold_seg_onnx(path, ModelMeta(preset="threshold", model={}, preprocess=SPEC, task="seg"))


# --- Orthanc ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """Orthanc as a plain process: temporary config and storage, free loopback ports, REST for checks."""

    def __init__(self, root: Path, aet: str = "ORTHANC", modalities: dict | None = None):
        self.binary = need_tool("Orthanc")
        self.root = root
        self.aet = aet
        self.dicom_port, self.http_port = free_port(), free_port()
        storage = root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "evim3-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "DicomAet": aet, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "DicomModalities": modalities or {},
            "Plugins": [], "SaveJobs": False, "StableAge": 1, "HttpThreadsCount": 4,
        }))
        self.process: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        with open(self.root / "orthanc.log", "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen([self.binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer /system in 30 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def post(self, path: str, body: object) -> object:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", json.dumps(body).encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def delete_all(self) -> None:
        for patient in self.get("/patients"):
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{self.http_port}/patients/{patient}", method="DELETE"), timeout=10).read()

    def srs(self) -> list[pydicom.Dataset]:
        """Every SR instance Orthanc holds, read back as datasets."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}})
        return [pydicom.dcmread(io.BytesIO(self.get(f"/instances/{i}/file"))) for i in found]

    def instances(self, modality: str) -> list[str]:
        return self.post("/tools/find", {"Level": "Instance", "Query": {"Modality": modality}})


# --- unit tests ---

def sr_ef(sr: pydicom.Dataset) -> list[float]:
    """Every LVEF numeric value of an SR, in document order."""
    values = []

    def walk(items) -> None:
        for item in items:
            if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == LVEF.value:
                value = item.MeasuredValueSequence[0]  # the exact double (FD) where the decimal string rounds
                values.append(float(value.get("FloatingPointValue", value.NumericValue)))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return values


def dsrdump_problems(path: Path) -> str:
    """dsrdump's stderr and any error/warning lines: empty when the SR is clean."""
    result = subprocess.run([need_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60, check=False)
    bad = [line for line in (result.stdout + result.stderr).splitlines()
           if line.startswith(("E:", "W:", "F:")) or "error" in line.lower() or "warning" in line.lower()]
    return "\n".join(bad + ([f"exit {result.returncode}"] if result.returncode else []))


def test_queue_states_dedupe_and_restart(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "q.sqlite")
    assert queue.add_job("1.2.3", uid_hash("1.2.3"), "a.dcm", "CART")
    assert not queue.add_job("1.2.3", uid_hash("1.2.3"), "", "CART")  # the same instance again: one job
    assert queue.add_job("1.2.4", uid_hash("1.2.4"), "b.dcm", "CART")
    job = queue.claim_job()
    assert job.sop_instance_uid == "1.2.3" and job.state == "running"
    queue.close()
    queue = JobQueue(tmp_path / "q.sqlite")  # a crash: the running job is received again
    assert queue.requeue_interrupted() == 1
    assert queue.counts()["jobs"]["received"] == 2
    job = queue.claim_job()
    queue.finish_job(job.sop_instance_uid, "done", ef=55.0, outputs=["sr.dcm"], destinations=["A@h:1", "B@h:2"])
    other = queue.claim_job()
    queue.finish_job(other.sop_instance_uid, "skipped", "single frame")
    assert queue.counts()["jobs"] == {"received": 0, "running": 0, "done": 1, "skipped": 1, "failed": 0}
    due = queue.due_deliveries()
    assert [d.destination for d in due] == ["A@h:1", "B@h:2"] and due[0].outputs == ["sr.dcm"]
    queue.delivery_sent("1.2.3", "A@h:1")
    queue.delivery_failed("1.2.3", "B@h:2", "down", dead=False, retry_in_s=60)
    assert queue.due_deliveries() == []  # not due again for a minute
    queue.delivery_failed("1.2.3", "B@h:2", "rejected", dead=True, retry_in_s=0)
    assert queue.counts()["deliveries"] == {"pending": 0, "sent": 1, "dead": 1}
    assert queue.last_error()["error"] == "rejected"
    assert queue._read("PRAGMA journal_mode")[0][0] == "wal"
    assert "1.2.3" not in json.dumps(queue.recent())  # hashed UIDs only


def test_library_messages_lose_their_quoted_values_in_the_audit_log() -> None:
    from evim3.runtime.serve.audit import scrub

    assert scrub("Invalid value for VR PN: 'Doe^Jane' in \"(0010,0010)\"") == "Invalid value for VR PN: '…' in '…'"
    assert len(scrub("x" * 1000)) == 300


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [retry_in(n, 2.0, 30.0) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]


def test_spool_writes_are_private_atomic_and_fail_as_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.received_path("1.2.3")
    spool.write(path, b"x" * 100)
    assert path.read_bytes() == b"x" * 100 and path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700 and "1.2.3" not in path.name
    monkeypatch.setenv(LIMIT_ENV, "150")
    spool = Spool(tmp_path / "spool")
    with pytest.raises(OSError, match="no space"):
        spool.write(spool.received_path("1.2.4"), b"y" * 100)
    assert not spool.received_path("1.2.4").exists() and list(spool.tmp.iterdir()) == []


def test_destination_and_configuration_errors_are_one_line_each(tmp_path: Path) -> None:
    assert Destination.parse("ORTHANC@127.0.0.1:4242") == Destination("ORTHANC", "127.0.0.1", 4242)
    for bad in ("ORTHANC@127.0.0.1", "127.0.0.1:4242", "A_VERY_LONG_AE_TITLE_X@h:1", "X@h:70000"):
        with pytest.raises(ValueError):
            Destination.parse(bad)
    config = ServeConfig(models=[str(tmp_path / "none.onnx")], spool=str(tmp_path / "s"), aet="",
                         forward=["nope"], port=0, tls_cert="c.pem", scan="fast")
    problems = config.problems()
    assert len(problems) == 6, problems  # AE title, model, port, destination, TLS, scan
    assert all("\n" not in p for p in problems)


def test_triage_gives_a_reason_for_every_cine_it_skips(tmp_path: Path) -> None:
    ok = write_cine(tmp_path / "ok.dcm")
    assert triage(str(ok), 0.5).analyse
    assert triage(str(write_cine(tmp_path / "old.dcm", sop_class=RETIRED_US_MULTIFRAME)), 0.5).analyse
    still = us_dataset(beating_frames()[0], sop_class=US_IMAGE)
    still.save_as(tmp_path / "still.dcm", enforce_file_format=True)
    assert triage(str(tmp_path / "still.dcm"), 0.5).reason == "single frame: a still image, not a cine"
    short = write_cine(tmp_path / "short.dcm", pixels=beating_frames(frames=9))
    assert triage(str(short), 0.5).reason.startswith("too short: 9 frames")
    untimed = us_dataset(beating_frames())
    del untimed.FrameTime
    untimed.save_as(tmp_path / "untimed.dcm", enforce_file_format=True)
    assert "no frame time" in triage(str(tmp_path / "untimed.dcm"), 0.5).reason
    bare = write_cine(tmp_path / "bare.dcm", region=False)
    assert "no usable 2D ultrasound region" in triage(str(bare), 0.5).reason
    ct = us_dataset(beating_frames(), sop_class=CT_IMAGE)
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    assert "not an ultrasound image" in triage(str(tmp_path / "ct.dcm"), 0.5).reason


@pytest.mark.parametrize("encoding", ["native", "rle", "jpeg", "jpegls", "deflated", "palette", "delimiter"])
def test_every_encoding_reads_to_the_drawn_frames(tmp_path: Path, encoding: str) -> None:
    """What the node (and `evim3 infer`) decode: the frames drawn, up to JPEG's loss; palette through its LUT."""
    from evim3.runtime.video import read_video

    pixels = beating_frames()
    video = read_video(write_cine(tmp_path / f"{encoding}.dcm", encoding, pixels))
    expected = gray_of_palette(pixels) if encoding == "palette" else pixels
    error = np.abs(video.frames.astype(int) - expected).mean()
    assert video.frames.shape == pixels.shape and error < (3 if encoding == "jpeg" else 0.6), error
    assert video.fps == pytest.approx(30, abs=0.01) and video.meta["region"] == (0, SIZE, 0, SIZE)


def test_sr_is_tid1500_with_deterministic_uids_and_passes_dsrdump(tmp_path: Path) -> None:
    source = pydicom.dcmread(write_cine(tmp_path / "cine.dcm"), stop_before_pixels=True)
    contour = np.array([[20, 10], [40, 10], [40, 50], [20, 50], [20, 10]], float)
    analysis = Analysis(ef=57.123456, ef_method="ef model",
                        beats=[BeatResult(50.5, 0, 6, contour, contour * 0.9, 3.2, 2.1)])
    sr = build_sr(source, analysis, "ab" * 32, ["contract"], "EVIM3", "1.2.3.4")
    again = build_sr(source, analysis, "ab" * 32, ["contract"], "EVIM3", "1.2.3.4")
    other_model = build_sr(source, analysis, "cd" * 32, ["contract"], "EVIM3", "1.2.3.4")
    assert sr.SOPInstanceUID == again.SOPInstanceUID == derived_uid(source.SOPInstanceUID, "ab" * 32, "sr")
    assert sr.SeriesInstanceUID == again.SeriesInstanceUID and other_model.SOPInstanceUID != sr.SOPInstanceUID
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr_ef(sr) == [pytest.approx(57.123456), 50.5]
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert dsrdump_problems(tmp_path / "sr.dcm") == ""
    text = subprocess.run([need_tool("dsrdump"), str(tmp_path / "sr.dcm")], capture_output=True, text=True,
                          check=True).stdout
    assert "Left ventricular Ejection fraction" in text and "(%,UCUM" in text and "SCOORD" in text
    assert "Device Observer UID" in text and "Algorithm Version" in text


def test_outline_is_the_regions_boundary_in_order() -> None:
    mask = np.zeros((32, 32), bool)
    mask[8:24, 12:20] = True
    outline = trace_outline(mask)
    assert (outline[0] == outline[-1]).all() and len(outline) == 2 * (16 + 8) - 4 + 1
    assert outline[:, 0].min() == 12 and outline[:, 0].max() == 19 and outline[:, 1].min() == 8
    steps = np.abs(np.diff(outline, axis=0)).max(axis=1)
    assert (steps == 1).all()  # neighbours, in order


def test_seg_beats_come_with_source_frames_and_contours_inside_the_lv(tmp_path: Path) -> None:
    """The adapter on a real pipeline run: beats of the threshold segmenter, their ED/ES as source frames,
    contours in source pixels around the drawn LV (centred, 0.32 x 0.68 of the side at ED)."""
    from evim3.runtime.serve.analyse import Analyser

    cine = write_cine(tmp_path / "cine.dcm", pixels=beating_frames(frames=48, size=96))
    analyser = Analyser([contract_ef_model(tmp_path / "ef.onnx"), threshold_seg_model(tmp_path / "seg.onnx")])
    try:
        analysis = analyser.analyse(str(cine))
    finally:
        analyser.close()
    assert analysis.ef is not None and analysis.beats, analysis.no_beat_reason
    for beat in analysis.beats:
        assert 0 <= beat.ed_frame < 48 and 0 <= beat.es_frame < 48 and beat.ed_frame != beat.es_frame
        ed, es = beat.ed_contour, beat.es_contour
        width, height = np.ptp(ed[:, 0]), np.ptp(ed[:, 1])
        assert abs(ed[:, 0].mean() - 47.5) < 3 and abs(ed[:, 1].mean() - 47.5) < 3
        assert 0.7 * 96 * 0.68 < height < 1.1 * 96 * 0.68 and 0.6 * 96 * 0.32 < width < 1.2 * 96 * 0.32
        assert np.ptp(es[:, 1]) < height  # smaller at end-systole


def test_scp_bounds_dataset_size_and_associations_and_spools_what_it_received(tmp_path: Path) -> None:
    """The SCP in-process: an association over --max-associations is rejected, a dataset over
    --max-dataset-mb gets A700, one within them is spooled (the bytes as received) and queued."""
    from evim3.runtime.serve.audit import AuditLog
    from evim3.runtime.serve.scp import StorageSCP
    from pynetdicom import AE
    from pynetdicom.sop_class import UltrasoundMultiFrameImageStorage

    spool = Spool(tmp_path / "spool")
    queue = JobQueue(tmp_path / "spool" / "queue.sqlite")
    audit = AuditLog(tmp_path / "spool" / "audit.jsonl")
    queued = []
    scp = StorageSCP("EVIM3", spool, queue, audit, max_dataset_bytes=50_000, allow_aet=[], max_associations=1,
                     on_queued=lambda: queued.append(1))
    port = free_port()
    scp.start("127.0.0.1", port)
    try:
        ae = AE(ae_title="CART")
        ae.add_requested_context(UltrasoundMultiFrameImageStorage, ExplicitVRLittleEndian)
        first = ae.associate("127.0.0.1", port, ae_title="EVIM3")
        assert first.is_established
        second = ae.associate("127.0.0.1", port, ae_title="EVIM3")
        assert second.is_rejected  # over --max-associations
        big, small = us_dataset(beating_frames()), us_dataset(beating_frames(frames=4))
        assert first.send_c_store(big).Status == 0xA700  # 98 KB over the 50 KB limit
        assert first.send_c_store(small).Status == 0x0000
        first.release()
        ae.requested_contexts = []
        ae.add_requested_context(RETIRED_US_MULTIFRAME, ExplicitVRLittleEndian)
        for _ in range(50):  # the released association leaves the server's count a moment later
            old_cart = ae.associate("127.0.0.1", port, ae_title="EVIM3")
            if old_cart.is_established:
                break
            time.sleep(0.1)
        retired = us_dataset(beating_frames(frames=4), sop_class=RETIRED_US_MULTIFRAME)
        assert old_cart.send_c_store(retired).Status == 0x0000  # the retired class older carts send
        old_cart.release()
    finally:
        scp.stop()
        queue.close()
        audit.close()
    assert not queue_path_has(tmp_path, big.SOPInstanceUID) and queued == [1, 1]
    stored = pydicom.dcmread(spool.received_path(small.SOPInstanceUID))
    assert stored.SOPInstanceUID == small.SOPInstanceUID and stored.PixelData == small.PixelData
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def queue_path_has(tmp_path: Path, sop_uid: str) -> bool:
    queue = JobQueue(tmp_path / "spool" / "queue.sqlite")
    try:
        return queue.has_job(sop_uid)
    finally:
        queue.close()


def test_a_port_in_use_is_one_line_and_the_node_cleans_up(tmp_path: Path) -> None:
    from evim3.runtime.errors import Evim3Error
    from evim3.runtime.serve.node import Node

    model = contract_ef_model(tmp_path / "ef.onnx")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for where in ({"port": port, "http_port": 0}, {"port": free_port(), "http_port": port}):
            config = ServeConfig(models=[model], spool=str(tmp_path / "spool"), forward=["PACS@127.0.0.1:1"],
                                 host="127.0.0.1", http_host="127.0.0.1", **where)
            name = "--port" if where["http_port"] == 0 else "--http-port"
            with pytest.raises(Evim3Error, match=f"^{name} {port}: cannot listen on 127.0.0.1: "):
                Node(config).serve_forever()


def test_worker_fails_a_vanished_file_and_sender_retries_then_dead_letters(tmp_path: Path) -> None:
    """In-process (nothing started): a job whose spooled file is gone fails with its reason; a delivery to a
    port nobody listens on is retried with backoff until --max-tries, then dead."""
    from evim3.runtime.serve.node import Node

    model = contract_ef_model(tmp_path / "ef.onnx")
    config = ServeConfig(models=[model], spool=str(tmp_path / "spool"), forward=[f"PACS@127.0.0.1:{free_port()}"],
                         max_tries=2, retry_base_s=0.01, retry_cap_s=0.01, http_port=0)
    node = Node(config)
    try:
        node.queue.add_job("1.2.3", uid_hash("1.2.3"), str(tmp_path / "gone.dcm"), "CART")
        node.process(node.queue.claim_job())
        job = node.queue.job("1.2.3")
        assert job.state == "failed" and job.reason.startswith("unreadable dataset")
        cine = write_cine(tmp_path / "cine.dcm")
        uid = str(pydicom.dcmread(cine, stop_before_pixels=True).SOPInstanceUID)
        node.queue.add_job(uid, uid_hash(uid), str(cine), "CART")
        node.process(node.queue.claim_job())
        assert node.queue.job(uid).state == "done" and len(node.queue.job(uid).outputs) == 1
        (delivery,) = node.queue.due_deliveries()
        node.deliver(delivery)
        assert node.queue.counts()["deliveries"]["pending"] == 1
        time.sleep(0.05)
        (delivery,) = node.queue.due_deliveries()
        assert delivery.attempts == 1
        node.deliver(delivery)
        assert node.queue.counts()["deliveries"] == {"pending": 0, "sent": 0, "dead": 1}
        events = [e["event"] for e in json.loads("[" + ",".join(
            (tmp_path / "spool" / "audit.jsonl").read_text().splitlines()) + "]")]
        assert events[-2:] == ["retry", "dead"]
    finally:
        node.stop()


def test_secondary_capture_is_in_the_source_study_with_derived_uids(tmp_path: Path) -> None:
    from evim3.runtime.serve.capture import HEIGHT, WIDTH, build_capture

    source = pydicom.dcmread(write_cine(tmp_path / "cine.dcm"), stop_before_pixels=True)
    analysis = Analysis(ef=55.2, ef_method="ef model", clip_efs=[50.0, 60.0], clip_times=[(0.0, 0.6), (0.3, 0.9)])
    sc = build_capture(source, analysis, "ab" * 32, ["contract"])
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SOPInstanceUID == derived_uid(source.SOPInstanceUID, "ab" * 32, "sc")
    assert sc.PatientID == source.PatientID and sc.BurnedInAnnotation == "YES"
    assert sc.pixel_array.shape == (HEIGHT, WIDTH, 3) and sc.pixel_array.max() > 0
