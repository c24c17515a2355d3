"""`evim3 serve` under a stream of cines (issue 25): 50 echo cines sent back to back by DCMTK's storescu (one
association, JPEG baseline) to the node, which forwards its SRs to a real Orthanc. Per configuration (SR only,
and with --secondary-capture): cines per minute; C-STORE-to-SR-in-Orthanc latency p50/p95 (from the node's
audit log: a cine's 'received' entry, written when its C-STORE is acknowledged, to its 'sent' entry, written
when Orthanc acknowledged the SR); the node's peak resident memory over the first 10 cines and over all 50
(flat when the node holds nothing per cine).

The model is a random-init evim3-tiny exported as `evim3 export` does (the demo's fine-tuned evim3-tiny has the
same graph and compute: weights do not change the time); EVIM3_BENCH_SERVE_MODEL=path.onnx runs another model,
e.g. the demo's (`evim3 demo --out D` writes D/model.onnx). EVIM3_BENCH_SERVE_CINES (50), _FRAMES (60, at
30 fps), _SIZE (256). Needs Orthanc and DCMTK (Debian packages orthanc, dcmtk) and the [serve] extra.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the Orthanc runner and the cine writer of the serve tests

CINES = int(os.environ.get("EVIM3_BENCH_SERVE_CINES", "50"))
FRAMES = int(os.environ.get("EVIM3_BENCH_SERVE_FRAMES", "60"))
SIZE = int(os.environ.get("EVIM3_BENCH_SERVE_SIZE", "256"))
EARLY = 10  # the "first cines" of the memory comparison


def run() -> dict[str, Any]:
    from test_serve_parts import Orthanc, beating_frames, free_port, need_tool, write_cine

    from benchmarks.bench_export import LOADED, _cpu_seconds

    with tempfile.TemporaryDirectory(prefix="evim3-bench-serve-") as tmp:
        root = Path(tmp)
        model = os.environ.get("EVIM3_BENCH_SERVE_MODEL") or _export_tiny(root)
        started, (busy_before, own_before) = time.perf_counter(), _cpu_seconds()
        orthanc = Orthanc(root / "orthanc").start()
        rows = []
        try:
            for secondary_capture in (False, True):
                folder = root / ("sc" if secondary_capture else "sr")
                folder.mkdir()
                cines = [write_cine(folder / f"cine{i:03d}.dcm", "jpeg", beating_frames(FRAMES, SIZE, seed=i))
                         for i in range(CINES)]
                rows.append(_run_node(folder, model, orthanc, cines, secondary_capture, free_port,
                                      need_tool("storescu")))
        finally:
            orthanc.stop()
        # the node, Orthanc and storescu are this process' finished children: their CPU time is our own
        busy_after, own_after = _cpu_seconds()
    others = max(0.0, (busy_after - busy_before) - (own_after - own_before))
    others_share = others / ((time.perf_counter() - started) * (os.cpu_count() or 1))
    return {"rows": rows, "cines": CINES, "cine": f"{FRAMES} frames {SIZE}x{SIZE} at 30 fps, JPEG baseline",
            "model": os.environ.get("EVIM3_BENCH_SERVE_MODEL") or "evim3-tiny (random init, exported)",
            "other_processes_cpu_share": round(others_share, 3),
            "status": ("UNDER LOAD (other processes computing): not final, rerun on a quiet machine"
                       if others_share > LOADED else "quiet machine")}


def _export_tiny(root: Path) -> str:
    from benchmarks.bench_runtime import export_random

    return export_random("evim3-tiny", str(root))


def _run_node(folder: Path, model: str, orthanc, cines: list[Path], secondary_capture: bool, free_port,
              storescu: str) -> dict[str, Any]:
    port, http_port = free_port(), free_port()
    spool = folder / "spool"
    args = [sys.executable, "-c", "from evim3.cli.main import main; main()", "serve", model, "--aet", "EVIM3",
            "--port", str(port), "--host", "127.0.0.1", "--spool", str(spool), "--http-port", str(http_port),
            "--forward", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", *(["--secondary-capture"] * secondary_capture)]
    with open(folder / "node.log", "ab") as log:
        node = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    before = len(orthanc.instances("SR"))
    samples: list[tuple[int, int]] = []  # (jobs done, RSS kB)
    stop = threading.Event()
    try:
        _wait(lambda: _health(http_port), 120, "the node")

        def sample() -> None:
            while not stop.is_set():
                try:
                    done = _health(http_port)["jobs"]["done"]
                    samples.append((done, _rss_kb(node.pid)))
                except OSError:
                    pass
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.time()
        sent = subprocess.run([storescu, "-xy", "-aet", "CART", "-aec", "EVIM3", "127.0.0.1", str(port),
                               *map(str, cines)], capture_output=True, text=True, timeout=1800, check=False)
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stderr[-500:]}")
        _wait(lambda: _health(http_port)["deliveries"]["sent"] >= len(cines), 1800, "every SR delivered")
        wall = time.time() - t0
        stop.set()
        sampler.join()
        peak_kb = _peak_kb(node.pid)
    finally:
        stop.set()
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    audit = [json.loads(line) for line in (spool / "audit.jsonl").read_text().splitlines()]
    received = {e["job"]: _seconds(e["time"]) for e in audit if e["event"] == "received"}
    delivered = {e["job"]: _seconds(e["time"]) for e in audit if e["event"] == "sent"}
    latency = [delivered[j] - received[j] for j in received if j in delivered]
    span = max(delivered.values()) - min(received.values())
    in_orthanc = len(orthanc.instances("SR")) - before
    early = [rss for done, rss in samples if done <= EARLY]
    return {"output": "SR + secondary capture" if secondary_capture else "SR", "cines": len(cines),
            "delivered": len(latency), "srs_in_orthanc": in_orthanc,
            "cines_per_min": 60 * len(latency) / span, "latency_p50_s": float(np.percentile(latency, 50)),
            "latency_p95_s": float(np.percentile(latency, 95)), "wall_s": wall,
            f"peak_rss_first_{EARLY}_mb": max(early) / 1024 if early else float("nan"),
            "peak_rss_all_mb": max(rss for _, rss in samples) / 1024, "vm_hwm_mb": peak_kb / 1024}


def _health(http_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5) as r:
        return json.loads(r.read())


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmRSS")


def _peak_kb(pid: int) -> int:
    return _status_kb(pid, "VmHWM")


def _seconds(iso: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(iso).timestamp()
