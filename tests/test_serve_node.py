"""`evim3 serve` end to end with real parts: the node as a subprocess (`evim3 serve ...`), Orthanc as the PACS
(a plain process, temporary config, free loopback ports), DCMTK's storescu/echoscu as the cart, dsrdump as
the SR validator. One Orthanc and one main node per module; nodes of their own for restarts, the full spool
and TLS. Models: a shrunk evim3-tiny exported to ONNX (a real Mamba graph, random init) as the EF model and
the threshold segmenter of test_seg_infer (real beats, real contours).

Where CI is set, a missing Orthanc or DCMTK fails these tests (test_serve_parts.need_tool, tests/ci.py).
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_serve_parts import (
    CT_IMAGE,
    US_IMAGE,
    Orthanc,
    beating_frames,
    dsrdump_problems,
    free_port,
    need_tool,
    sr_ef,
    threshold_seg_model,
    us_dataset,
    write_cine,
)

pytest.importorskip("pynetdicom")
from pynetdicom import AE, _config
from pynetdicom.sop_class import UltrasoundMultiFrameImageStorage, Verification

NODE_AET = "EVIM3"
# The node runs where torch is not installed: importing it fails in the node's interpreter.
NODE_MAIN = "import sys; sys.modules['torch'] = None; from evim3.cli.main import main; main()"
STORESCU_FLAGS = {"native": [], "jpeg": ["-xy"], "rle": ["-xr"], "palette": []}


# --- the node as a process ---

class Node:
    def __init__(self, root: Path, models: list[str], forward: list[str], *extra: str, env: dict | None = None,
                 port: int | None = None):
        self.root = root
        self.port, self.http_port = port or free_port(), free_port()
        self.spool = root / "spool"
        self.args = [sys.executable, "-c", NODE_MAIN, "serve", *models,
                     "--aet", NODE_AET, "--port", str(self.port), "--host", "127.0.0.1", "--spool", str(self.spool),
                     "--http-port", str(self.http_port), "--threads", "1", *extra]
        for f in forward:
            self.args += ["--forward", f]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self) -> Node:
        with open(self.root / "node.log", "ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited {self.process.returncode}: {self.log()[-3000:]}")
            try:
                self.get("/health")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"node did not answer /health: {self.log()[-3000:]}")

    def log(self) -> str:
        return (self.root / "node.log").read_text(errors="replace")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def terminate(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def audit(self) -> list[dict]:
        return [json.loads(line) for line in (self.spool / "audit.jsonl").read_text().splitlines() if line]

    def job(self, sop_uid: str) -> dict | None:
        from evim3.runtime.serve.spool import uid_hash

        jobs = [j for j in self.get("/queue?limit=500")["jobs"] if j["job"] == uid_hash(sop_uid)]
        return jobs[0] if jobs else None

    def deliveries(self, sop_uid: str) -> list[dict]:
        from evim3.runtime.serve.spool import uid_hash

        return [d for d in self.get("/queue?limit=500")["deliveries"] if d["job"] == uid_hash(sop_uid)]


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def storescu(node: Node, path: Path, flags: list[str] = (), aet: str = "CART") -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("storescu"), *flags, "-aet", aet, "-aec", NODE_AET, "127.0.0.1",
                           str(node.port), str(path)], capture_output=True, text=True, timeout=60, check=False)


def echoscu(node: Node, aet: str = "CART") -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("echoscu"), "-aet", aet, "-aec", NODE_AET, "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=30, check=False)


def srs_for(orthanc: Orthanc, sop_uid: str) -> list[pydicom.Dataset]:
    """The SRs in Orthanc that reference the source instance `sop_uid`."""
    found = []
    for sr in orthanc.srs():
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        if any(r.ReferencedSOPInstanceUID == sop_uid for r in evidence.ReferencedSOPSequence):
            found.append(sr)
    return found


def sr_items(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every content item of an SR, depth first."""
    items = []
    for item in sr.ContentSequence:
        items.append(item)
        if "ContentSequence" in item:
            items += sr_items(item)
    return items


def infer_ef(path: Path, model: str) -> float:
    from evim3.cli.main import app
    from typer.testing import CliRunner

    out = path.with_suffix(".infer.json")
    result = CliRunner().invoke(app, ["infer", str(path), "--model", model, "--json", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())["sources"][0]["ef"]


# --- fixtures ---

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A shrunk evim3-tiny (random init) exported as `evim3 export` does; the threshold segmenter."""
    torch = pytest.importorskip("torch")
    from evim3.export.onnx import export_checkpoint
    from evim3.runtime.meta import ModelMeta, PreprocessSpec

    from evim3.checkpoint import build_model, save_checkpoint
    from evim3.config import get_preset

    root = tmp_path_factory.mktemp("serve-models")
    cfg = get_preset("evim3-tiny").replace(frames=8, img_size=32, dim=16, depth=1, d_state=4, final_dim=32)
    meta = ModelMeta("evim3-tiny", cfg.to_dict(), PreprocessSpec(size=32, fps=25.0, frames=8, mean=100.0, std=50.0),
                     ef_mean=55.0)
    torch.manual_seed(0)
    save_checkpoint(root / "ef.safetensors", build_model(meta).state_dict(), meta)
    return {"ef": export_checkpoint(root / "ef.safetensors", root / "ef.onnx").path,
            "seg": threshold_seg_model(root / "seg.onnx")}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("orthanc")
    node_port = free_port()
    server = Orthanc(root, modalities={"evim3": [NODE_AET, "127.0.0.1", node_port]}).start()
    server.node_port = node_port
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc, models: dict):
    """EF + seg models, secondary capture, two destinations: Orthanc, and Orthanc under an AE title it does
    not answer to (it rejects the association: the dead letter)."""
    root = tmp_path_factory.mktemp("node")
    process = Node(root, [models["ef"], models["seg"]],
                   [f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", f"NOTORTHANC@127.0.0.1:{orthanc.dicom_port}"],
                   "--allow-aet", "CART,CART2", "--secondary-capture", "--retry-base", "0.2", "--retry-cap", "0.5",
                   port=orthanc.node_port).start()
    yield process
    process.kill()


@pytest.fixture(scope="module")
def cines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cines")
    pixels = beating_frames(frames=48)  # 1.6 s: a few beats for the segmenter
    return {encoding: write_cine(root / f"{encoding}.dcm", encoding, pixels)
            for encoding in ("native", "jpeg", "rle", "jpegls", "deflated", "palette", "delimiter")}


# --- the main node ---

@pytest.mark.parametrize("encoding", ["jpeg", "rle"])
def test_cine_from_storescu_is_answered_by_an_sr_with_infers_ef(node: Node, orthanc: Orthanc, cines: dict,
                                                               models: dict, encoding: str, tmp_path: Path) -> None:
    cine = cines[encoding]
    sop_uid = pydicom.dcmread(cine, stop_before_pixels=True).SOPInstanceUID
    sent = storescu(node, cine, STORESCU_FLAGS[encoding])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (sr,) = wait_for(lambda: srs_for(orthanc, sop_uid), what="the SR in Orthanc")
    efs = sr_ef(sr)
    # The video's EF: the very number `evim3 infer --json` reports (FloatingPointValue; the decimal string
    # NumericValue holds it to 16 characters)
    assert efs[0] == infer_ef(cine, models["ef"])
    value = next(i for i in sr_items(sr) if i.get("ValueType") == "NUM").MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(efs[0], rel=1e-12)
    assert len(efs) >= 2, "the seg model's beats each have an EF group"
    assert sr.VerificationFlag == "UNVERIFIED" and sr.StudyInstanceUID == pydicom.dcmread(cine).StudyInstanceUID
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    assert dsrdump_problems(path) == ""
    text = subprocess.run([need_tool("dsrdump"), str(path)], capture_output=True, text=True, check=True).stdout
    assert "SCOORD" in text and "(POLYLINE" in text  # the LV contour at ED and ES
    # the secondary capture, in the same study
    wait_for(lambda: orthanc.instances("OT"), what="the secondary capture")
    # the same cine again: acknowledged, one job, one SR
    again = storescu(node, cine, STORESCU_FLAGS[encoding])
    assert again.returncode == 0
    wait_for(lambda: node.job(sop_uid)["copies"] == 2, what="the second copy counted")
    time.sleep(1.0)
    assert len(srs_for(orthanc, sop_uid)) == 1
    wait_for(lambda: {d["destination"].split("@")[0]: d["state"] for d in node.deliveries(sop_uid)} == {
        "ORTHANC": "sent", "NOTORTHANC": "dead"}, what="sent to Orthanc, dead letter for the other")
    job = node.job(sop_uid)["job"]
    wait_for(lambda: [e for e in node.audit() if e["event"] == "sent" and e["job"] == job], what="sent, logged")
    assert len([e for e in node.audit() if e["event"] == "sent" and e["job"] == job]) == 1


def test_rejecting_destination_is_a_dead_letter_and_the_node_keeps_serving(node: Node, cines: dict) -> None:
    cine = cines["native"]
    sop_uid = pydicom.dcmread(cine, stop_before_pixels=True).SOPInstanceUID
    assert storescu(node, cine).returncode == 0
    dead = wait_for(lambda: [d for d in node.deliveries(sop_uid) if d["state"] == "dead"], what="a dead letter")
    # dead at the permanent rejection, not after --max-tries (8); a connection Orthanc drops before it answers
    # (seen under load) is a transient failure and one retry
    assert dead[0]["attempts"] <= 2 and "rejected (permanent" in dead[0]["last_error"]
    health = node.get("/health")
    assert health["status"] == "ok" and health["deliveries"]["dead"] >= 1 and health["last_error"]
    assert echoscu(node).returncode == 0


def test_unknown_calling_ae_is_rejected(node: Node, cines: dict) -> None:
    result = echoscu(node, aet="INTRUDER")
    assert result.returncode != 0 and "rejected" in (result.stdout + result.stderr).lower()
    assert storescu(node, cines["native"], aet="INTRUDER").returncode != 0
    assert echoscu(node, aet="CART2").returncode == 0


def test_ct_is_refused_at_negotiation(node: Node, tmp_path: Path) -> None:
    ct = us_dataset(beating_frames(frames=2), sop_class=CT_IMAGE)
    ct.Modality = "CT"
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    result = storescu(node, tmp_path / "ct.dcm")
    assert result.returncode != 0
    assert "no presentation context" in (result.stdout + result.stderr).lower()
    assert node.job(ct.SOPInstanceUID) is None


def test_single_frame_ultrasound_is_skipped_with_its_reason(node: Node, tmp_path: Path) -> None:
    still = us_dataset(beating_frames(frames=1)[0], sop_class=US_IMAGE)
    still.save_as(tmp_path / "still.dcm", enforce_file_format=True)
    assert storescu(node, tmp_path / "still.dcm").returncode == 0
    job = wait_for(lambda: (j := node.job(still.SOPInstanceUID)) and j["state"] != "received" and j["state"] != "running"
                   and j, what="triage")
    assert job["state"] == "skipped" and job["reason"] == "single frame: a still image, not a cine"
    wait_for(lambda: any(e["event"] == "skipped" and e.get("reason") == job["reason"] for e in node.audit()),
             what="the skip in the audit log")


def send_raw(node: Node, path: Path) -> int:
    """C-STORE a file's bytes as they are (pynetdicom's chunked send: no decoding on our side); the status."""
    ae = AE(ae_title="CART")
    ae.add_requested_context(UltrasoundMultiFrameImageStorage, pydicom.dcmread(path, stop_before_pixels=True,
                                                                               force=True).file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    return int(status.Status)


def test_garbage_and_truncated_datasets_get_a_failure_status(node: Node, cines: dict, tmp_path: Path) -> None:
    data = cines["native"].read_bytes()
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")  # preamble, DICM, group length element
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(data[:meta_end] + np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    for path in (garbage, truncated):
        status = send_raw(node, path)
        assert status != 0 and status & 0xF000 in (0xA000, 0xC000), hex(status)
    assert echoscu(node).returncode == 0  # still serving
    uid = pydicom.dcmread(cines["native"], stop_before_pixels=True).SOPInstanceUID
    assert node.job(uid) is None or node.job(uid)["copies"] == 1  # the cut copy was not taken as the cine


def test_palette_and_stray_delimiter_cines_are_analysed(node: Node, orthanc: Orthanc, cines: dict,
                                                        models: dict) -> None:
    palette = cines["palette"]
    assert storescu(node, palette).returncode == 0
    # DCMTK refuses to read a stray top-level sequence delimiter (that is why the node must): sent as it is
    assert send_raw(node, cines["delimiter"]) == 0
    for cine in (palette, cines["delimiter"]):
        uid = pydicom.dcmread(cine, stop_before_pixels=True).SOPInstanceUID
        (sr,) = wait_for(lambda u=uid: srs_for(orthanc, u), what=f"the SR of {cine.name}")
        assert sr_ef(sr)[0] == infer_ef(cine, models["ef"])


def test_jpeg_ls_and_deflated_cines_are_received_and_answered(node: Node, orthanc: Orthanc, cines: dict) -> None:
    """The other transfer syntaxes carts send, from pynetdicom as the cart (a dataset in its own syntax)."""
    for encoding in ("jpegls", "deflated"):
        ds = pydicom.dcmread(cines[encoding])
        ae = AE(ae_title="CART")
        ae.add_requested_context(UltrasoundMultiFrameImageStorage, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert assoc.is_established
        try:
            assert assoc.accepted_contexts[0].transfer_syntax[0] == ds.file_meta.TransferSyntaxUID
            assert assoc.send_c_store(ds).Status == 0
        finally:
            assoc.release()
        wait_for(lambda u=ds.SOPInstanceUID: srs_for(orthanc, u), what=f"the SR of the {encoding} cine")


def test_status_audit_log_and_spool_hold_no_patient_data(node: Node, cines: dict) -> None:
    health = node.get("/health")
    assert {"status", "uptime_s", "models", "jobs", "deliveries", "last_error"} <= set(health)
    assert health["models"][0]["sha256"] and health["jobs"]["done"] >= 1
    queue = node.get("/queue")
    assert {"jobs", "deliveries"} <= set(queue) and len(node.get("/queue?limit=1")["jobs"]) == 1
    with pytest.raises(urllib.error.HTTPError, match="400"):
        node.get("/queue?limit=0")
    audit_text = (node.spool / "audit.jsonl").read_text()
    source = pydicom.dcmread(cines["native"], stop_before_pixels=True)
    for secret in ("Test^Echo", "EVIM3-1", "19700101", source.StudyInstanceUID, source.SOPInstanceUID):
        assert secret not in audit_text and secret not in json.dumps(queue)
    assert all(json.loads(line)["time"] for line in audit_text.splitlines())
    files = [p for p in node.spool.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o077 == 0 for p in files), [oct(p.stat().st_mode) for p in files]


def test_check_validates_and_echoes_every_destination(orthanc: Orthanc, models: dict, tmp_path: Path) -> None:
    def check(*forward: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-c", NODE_MAIN, "serve", models["ef"], "--spool",
                str(tmp_path / "spool"), "--check", *[a for f in forward for a in ("--forward", f)]]
        return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)

    good = check(f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    assert good.returncode == 0, good.stderr
    bad = check(f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", f"ORTHANC@127.0.0.1:{free_port()}", "nonsense")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 2, bad.stderr
    assert "no answer" in lines[1] and "AET@HOST:PORT" in lines[0]


# --- restarts ---

def test_sigkill_after_acknowledgement_and_a_pacs_that_is_down(tmp_path: Path, models: dict, cines: dict) -> None:
    """The PACS is down: the node retries with backoff. SIGKILL while one job waits for its delivery and
    another was just acknowledged; restart with the PACS up: both SRs arrive, once each. Then the PACS goes
    down and comes back while the node runs: retried, then delivered. SIGTERM right after a cine is
    acknowledged: exit 0; after a restart its SR arrives. Four cines, four SRs, each sent once."""
    pacs = Orthanc(tmp_path / "pacs")  # configured, not started
    node = Node(tmp_path / "k", [models["ef"]], [f"ORTHANC@127.0.0.1:{pacs.dicom_port}"], "--retry-base", "0.2",
                "--retry-cap", "0.4", "--max-tries", "1000")
    (tmp_path / "k").mkdir()
    first, second, third, fourth = (write_cine(tmp_path / f"c{i}.dcm") for i in range(4))
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (first, second, third, fourth)]
    try:
        node.start()
        assert storescu(node, first).returncode == 0
        wait_for(lambda: any(d["attempts"] >= 2 and d["state"] == "pending" for d in node.deliveries(uids[0])),
                 what="retries while the PACS is down")
        assert storescu(node, second).returncode == 0
        node.kill()  # acknowledged: the second job may be received, running or done, never lost
        pacs.start()
        node.start()
        for uid in uids[:2]:
            wait_for(lambda u=uid: srs_for(pacs, u), what="the SR after the restart")
            wait_for(lambda u=uid: [d for d in node.deliveries(u) if d["state"] == "sent"], what="sent")
        wait_for(lambda: len([e for e in node.audit() if e["event"] == "sent"]) >= 2, what="both deliveries logged")
        sent = [e for e in node.audit() if e["event"] == "sent"]
        assert sorted(e["job"] for e in sent) == sorted(node.job(u)["job"] for u in uids[:2])  # once each
        assert len(pacs.srs()) == 2
        pacs.stop()
        assert storescu(node, third).returncode == 0
        wait_for(lambda: any(d["attempts"] >= 2 for d in node.deliveries(uids[2])), what="retries")
        pacs.start()
        wait_for(lambda: srs_for(pacs, uids[2]), what="delivery once the PACS is back")
        # SIGTERM right after an acknowledgement: exit 0, the job finished or parked, answered after restart
        assert storescu(node, fourth).returncode == 0
        assert node.terminate() == 0
        assert node.audit()[-1]["event"] == "stop"
        node.start()
        wait_for(lambda: srs_for(pacs, uids[3]), what="the SR of the job the stop finished or parked")
        # Orthanc holds the SR a moment before the node has recorded its acknowledgement
        wait_for(lambda: [d for d in node.deliveries(uids[3]) if d["state"] == "sent"], what="sent")
        wait_for(lambda: len([e for e in node.audit() if e["event"] == "sent"]) >= 4, what="four deliveries logged")
        assert len(pacs.srs()) == 4 and len([e for e in node.audit() if e["event"] == "sent"]) == 4
        assert node.terminate() == 0
    finally:
        node.kill()
        pacs.stop()


def test_full_spool_answers_failure_and_loses_nothing(tmp_path: Path, orthanc: Orthanc, models: dict) -> None:
    """The spool's disk fills up (emulated: EVIM3_SERVE_SPOOL_LIMIT): the cine that does not fit gets a failure
    status, the one acknowledged before it is analysed and answered."""
    fits, too_much = write_cine(tmp_path / "fits.dcm"), write_cine(tmp_path / "too_much.dcm")
    limit = int(fits.stat().st_size * 1.5)
    node = Node(tmp_path, [models["ef"]], [f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"],
                env={"EVIM3_SERVE_SPOOL_LIMIT": str(limit)})
    try:
        node.start()
        assert storescu(node, fits).returncode == 0
        assert storescu(node, too_much).returncode != 0
        assert send_raw(node, too_much) == 0xA700  # out of resources: a failure status, never success
        uid = pydicom.dcmread(fits, stop_before_pixels=True).SOPInstanceUID
        wait_for(lambda: srs_for(orthanc, uid), what="the SR of the acknowledged cine")
        assert node.job(pydicom.dcmread(too_much, stop_before_pixels=True).SOPInstanceUID) is None
        assert any(e["event"] == "refused" and "no space" in e["reason"] for e in node.audit())
    finally:
        node.kill()


# --- mutual TLS ---

def make_certificates(root: Path) -> dict[str, Path]:
    """A CA, and a server and a client certificate it signs (openssl)."""
    openssl = need_tool("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=root, capture_output=True, check=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=evim3 test CA")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-copy_extensions", "copy")
    return {n: root / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_mutual_tls_when_certificates_are_given(tmp_path: Path, orthanc: Orthanc, models: dict) -> None:
    certs = make_certificates(tmp_path)
    node = Node(tmp_path, [models["ef"]], [f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"],
                "--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]),
                "--tls-ca", str(certs["ca.pem"]))

    def echo(with_client_cert: bool) -> bool:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs["ca.pem"]))
        if with_client_cert:
            ctx.load_cert_chain(str(certs["client.pem"]), str(certs["client.key"]))
        ae = AE(ae_title="CART")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET, tls_args=(ctx, "localhost"))
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and status.Status == 0

    try:
        node.start()
        assert echo(with_client_cert=True)
        assert not echo(with_client_cert=False)
        assert echoscu(node).returncode != 0  # plain DICOM is not spoken on a TLS port
    finally:
        node.kill()
