"""The node: SCP, analysis worker, sender and status server around one spool, and their restart semantics.

Threads: pynetdicom's (one per association, at most ``max_associations``) write the spool and the queue;
one worker analyses received jobs one at a time (the model uses the CPU threads); one sender delivers.

Stop (SIGTERM or SIGINT): the SCP stops accepting and ends its associations, the worker finishes the job it
is running (its result is queued for delivery), the sender finishes the delivery it is making, and the
process exits 0. Pending work stays in the queue for the next start. After SIGKILL (or a power cut) the next
start puts jobs left running back to received and removes unacknowledged temporary files; nothing
acknowledged is lost, and outputs are rebuilt with the same UIDs.
"""

from __future__ import annotations

import io
import signal
import socket
import threading
import time
import traceback

import pydicom
from evim3.runtime.errors import Evim3Error
from evim3.runtime.serve.analyse import Analyser, AnalysisError
from evim3.runtime.serve.audit import AuditLog, scrub
from evim3.runtime.serve.config import ServeConfig, server_tls_context
from evim3.runtime.serve.http import StatusServer
from evim3.runtime.serve.jobqueue import Delivery, Job, JobQueue
from evim3.runtime.serve.scp import StorageSCP
from evim3.runtime.serve.send import Destination, SendResult, retry_in, send
from evim3.runtime.serve.spool import Spool
from evim3.runtime.serve.sr import build_sr, derived_uid
from evim3.runtime.serve.triage import read_header, triage
from evim3.runtime.version import __version__

IDLE_WAIT_S = 1.0
SPOOL_RETRY_S = 5.0  # a job whose outputs the spool could not write is tried again after this


class Node:
    def __init__(self, config: ServeConfig, log=print):
        self.config = config
        self.log = log
        self.started = time.time()
        self.spool = Spool(config.spool)
        self.queue = JobQueue(self.spool.root / "queue.sqlite")
        self.audit = AuditLog(self.spool.root / "audit.jsonl")
        self.analyser = Analyser(config.models, threads=config.threads, scan=config.scan)
        self.destinations = config.destinations
        self.device_uid = derived_uid("evim3 serve device", config.aet, socket.gethostname())
        self.stopping = threading.Event()
        self._work = threading.Event()  # a job was queued
        self._deliver = threading.Event()  # a delivery became due
        self.scp = StorageSCP(config.aet, self.spool, self.queue, self.audit,
                              int(config.max_dataset_mb * 1024 * 1024), config.allow_aet, config.max_associations,
                              on_queued=self._work.set)
        self.http: StatusServer | None = None
        self._threads: list[threading.Thread] = []

    # --- lifecycle ---

    def start(self) -> None:
        requeued = self.queue.requeue_interrupted()
        removed = self.spool.remove_temp_files()
        self.audit.event("start", version=__version__, aet=self.config.aet, requeued=requeued,
                         temp_files_removed=removed, models=[m.sha256 for m in self.analyser.models])
        config = self.config
        if config.http_port:
            try:
                self.http = StatusServer(config.http_host, config.http_port, self.health, self.queue_status)
            except OSError as e:
                raise Evim3Error(None, f"--http-port {config.http_port}: cannot listen on {config.http_host}: "
                                       f"{e.strerror or e}") from None
            self.http.start()
        ssl_context = server_tls_context(config) if config.tls else None
        try:
            self.scp.start(config.host, config.port, ssl_context)
        except OSError as e:
            raise Evim3Error(None, f"--port {config.port}: cannot listen on {config.host}: {e.strerror or e}") from None
        for target, name in ((self._work_loop, "evim3-worker"), (self._send_loop, "evim3-sender")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        self.scp.stop()
        self._work.set()
        self._deliver.set()
        for thread in self._threads:
            thread.join()
        if self.http:
            self.http.stop()
        self.audit.event("stop")
        self.analyser.close()
        self.queue.close()
        self.audit.close()

    def serve_forever(self) -> int:
        """Start, wait for SIGTERM/SIGINT, stop; the exit code."""
        def on_signal(signum, frame) -> None:
            self.stopping.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            where = f"{self.config.aet}@{self.config.host}:{self.config.port}"
            http = f", status on http://{self.config.http_host}:{self.http.port}/health" if self.http else ""
            self.log(f"evim3 serve: {where} receiving echo cines{http}, forwarding to "
                     f"{', '.join(map(str, self.destinations))}")
            while not self.stopping.wait(0.5):
                pass
            self.log("evim3 serve: stopping (finishing the current job)")
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0

    # --- status ---

    def health(self, params: dict | None = None) -> dict:
        return {"status": "stopping" if self.stopping.is_set() else "ok", "version": __version__,
                "aet": self.config.aet, "port": self.config.port, "uptime_s": round(time.time() - self.started, 1),
                "models": [{"path": m.path, "task": m.task, "preset": m.preset, "sha256": m.sha256}
                           for m in self.analyser.models],
                "destinations": [str(d) for d in self.destinations],
                **self.queue.counts(), "last_error": self.queue.last_error()}

    def queue_status(self, params: dict | None = None) -> dict:
        """Counts, the last error, and the latest jobs and deliveries (?limit=N, 1-1000, default 50)."""
        limit = int((params or {}).get("limit", 50))
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be 1-1000")
        return {**self.queue.counts(), "last_error": self.queue.last_error(), **self.queue.recent(limit)}

    # --- analysis ---

    def _work_loop(self) -> None:
        while not self.stopping.is_set():
            job = self.queue.claim_job()
            if job is None:
                self._work.wait(IDLE_WAIT_S)
                self._work.clear()
                continue
            try:
                self.process(job)
            except Exception as e:  # noqa: BLE001 -- the queue itself failed: say so, keep the worker alive
                self.log(f"evim3 serve: worker error: {type(e).__name__}: {e}")
                self.stopping.wait(SPOOL_RETRY_S)

    def process(self, job: Job) -> None:
        self.audit.event("running", job=job.uid_hash, state="running")
        t0 = time.perf_counter()
        try:
            verdict = triage(job.path, self.analyser.min_seconds)
            if not verdict.analyse:
                state, reason = "failed" if verdict.failed else "skipped", scrub(verdict.reason)
                self.queue.finish_job(job.sop_instance_uid, state, reason)
                self.audit.event(state, job=job.uid_hash, state=state, reason=reason)
                return
            analysis = self.analyser.analyse(job.path)
            outputs = self._write_outputs(job, analysis)
        except AnalysisError as e:
            reason = scrub(str(e).replace(f"{job.path}: ", ""))
            self.queue.finish_job(job.sop_instance_uid, "failed", reason)
            self.audit.event("failed", job=job.uid_hash, state="failed", reason=reason)
            return
        except OSError as e:  # the spool cannot hold the outputs (disk full): keep the job, try again later
            self.queue.finish_job(job.sop_instance_uid, "received", f"waiting for the spool: {e}")
            self.audit.event("requeued", job=job.uid_hash, state="received", reason=f"spool: {e}")
            self.stopping.wait(SPOOL_RETRY_S)
            return
        except Exception as e:  # noqa: BLE001 -- one bad job must not stop the node
            reason = f"internal error: {type(e).__name__}: {scrub(e)}"
            self.queue.finish_job(job.sop_instance_uid, "failed", reason)
            where = traceback.extract_tb(e.__traceback__)[-1]
            self.audit.event("failed", job=job.uid_hash, state="failed", reason=reason,
                             at=f"{where.filename.rsplit('/', 1)[-1]}:{where.lineno}")
            return
        self.queue.finish_job(job.sop_instance_uid, "done", ef=analysis.ef, outputs=outputs,
                              destinations=[str(d) for d in self.destinations])
        self.audit.event("done", job=job.uid_hash, state="done", ef=analysis.ef, beats=len(analysis.beats),
                         seconds=round(time.perf_counter() - t0, 3))
        self._deliver.set()

    def _write_outputs(self, job: Job, analysis) -> list[str]:
        """The SR (and the secondary capture), durably in the spool; their paths."""
        header = read_header(job.path)
        presets = [m.preset for m in self.analyser.models]
        sr = build_sr(header, analysis, self.analyser.model_hash, presets, self.config.aet, self.device_uid)
        paths = [self._save(job, sr, "sr")]
        if self.config.secondary_capture:
            from evim3.runtime.serve.capture import build_capture

            capture = build_capture(header, analysis, self.analyser.model_hash, presets)
            paths.append(self._save(job, capture, "sc"))
        return paths

    def _save(self, job: Job, ds: pydicom.Dataset, kind: str) -> str:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        path = self.spool.out_path(job.sop_instance_uid, kind)
        self.spool.write(path, buffer.getvalue())
        return str(path)

    # --- delivery ---

    def _send_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                for delivery in self.queue.due_deliveries():
                    if self.stopping.is_set():
                        return
                    self.deliver(delivery)
            except Exception as e:  # noqa: BLE001 -- the queue itself failed: say so, keep the sender alive
                self.log(f"evim3 serve: sender error: {type(e).__name__}: {e}")
                self.stopping.wait(SPOOL_RETRY_S)
            upcoming = self.queue.next_delivery_at()
            wait = IDLE_WAIT_S if upcoming is None else min(IDLE_WAIT_S, max(0.0, upcoming - time.time()))
            self._deliver.wait(wait)
            self._deliver.clear()

    def deliver(self, delivery: Delivery) -> None:
        """One try of one delivery: sent, or retried later (backoff), or dead."""
        config = self.config
        attempt = delivery.attempts + 1
        try:
            result = send(delivery.outputs, Destination.parse(delivery.destination), config.aet)
        except Exception as e:  # noqa: BLE001 -- e.g. an output file gone: retried, then dead
            result = SendResult(False, False, f"{type(e).__name__}: {scrub(e)}")
        if result.ok:
            self.queue.delivery_sent(delivery.sop_instance_uid, delivery.destination)
            self.audit.event("sent", job=delivery.uid_hash, destination=delivery.destination, attempt=attempt,
                             state="sent")
            return
        dead = result.permanent or attempt >= config.max_tries
        wait = retry_in(attempt, config.retry_base_s, config.retry_cap_s)
        self.queue.delivery_failed(delivery.sop_instance_uid, delivery.destination, result.error, dead, wait)
        self.audit.event("dead" if dead else "retry", job=delivery.uid_hash, destination=delivery.destination,
                         attempt=attempt, error=result.error, state="dead" if dead else "pending",
                         retry_in_s=None if dead else wait)
