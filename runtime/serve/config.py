"""The node's configuration, its validation (one line per problem) and ``--check``."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

from evim3.runtime.backend_ort import SCAN_FORMS
from evim3.runtime.serve.send import Destination, check_aet

DEFAULT_PORT = 11112
DEFAULT_HTTP_PORT = 8080


@dataclass
class ServeConfig:
    models: list[str]
    spool: str
    aet: str = "EVIM3"
    port: int = DEFAULT_PORT
    host: str = "0.0.0.0"
    forward: list[str] = field(default_factory=list)
    allow_aet: list[str] = field(default_factory=list)  # empty: any calling AE
    http_port: int = DEFAULT_HTTP_PORT  # 0: no HTTP
    http_host: str = "127.0.0.1"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    secondary_capture: bool = False
    max_associations: int = 4
    max_dataset_mb: float = 512.0
    max_tries: int = 8
    retry_base_s: float = 2.0
    retry_cap_s: float = 300.0
    threads: int | None = None
    scan: str = "auto"

    @property
    def destinations(self) -> list[Destination]:
        return [Destination.parse(f) for f in self.forward]

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_key or self.tls_ca)

    def problems(self) -> list[str]:
        """Every configuration problem, one line each (nothing is started or connected)."""
        out = []
        try:
            check_aet(self.aet, "--aet")
        except ValueError as e:
            out.append(str(e))
        for a in self.allow_aet:
            try:
                check_aet(a, "--allow-aet")
            except ValueError as e:
                out.append(str(e))
        if not self.models:
            out.append("give at least one model file")
        for m in self.models:
            if not os.path.isfile(m):
                out.append(f"{m}: model file not found")
        for name, port, zero_ok in (("--port", self.port, False), ("--http-port", self.http_port, True)):
            if not (0 <= port < 65536) or (port == 0 and not zero_ok):
                out.append(f"{name} {port}: must be 1-65535" + (" (0: off)" if zero_ok else ""))
        if not self.forward:
            out.append("give at least one --forward AET@HOST:PORT: the SRs must go somewhere")
        for f in self.forward:
            try:
                Destination.parse(f)
            except ValueError as e:
                out.append(str(e))
        if len(set(self.forward)) != len(self.forward):
            out.append("--forward names a destination twice")
        out += _spool_problems(self.spool)
        if self.tls:
            missing = [n for n, v in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                                      ("--tls-ca", self.tls_ca)) if not v]
            if missing:
                out.append(f"mutual TLS needs --tls-cert, --tls-key and --tls-ca; missing {', '.join(missing)}")
            else:
                try:
                    server_tls_context(self)
                except (OSError, ssl.SSLError) as e:
                    out.append(f"TLS certificates cannot be used: {e}")
        if self.scan not in SCAN_FORMS:
            out.append(f"--scan {self.scan}: one of {', '.join(SCAN_FORMS)}")
        if self.max_associations < 1:
            out.append("--max-associations must be at least 1")
        if self.max_dataset_mb <= 0:
            out.append("--max-dataset-mb must be positive")
        if self.max_tries < 1 or self.retry_base_s <= 0 or self.retry_cap_s < self.retry_base_s:
            out.append("retries: --max-tries >= 1, --retry-base > 0 and --retry-cap >= --retry-base")
        return out


def _spool_problems(spool: str) -> list[str]:
    if os.path.exists(spool) and not os.path.isdir(spool):
        return [f"--spool {spool}: not a folder"]
    parent = spool if os.path.isdir(spool) else os.path.dirname(os.path.abspath(spool))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"--spool {spool}: not writable by this user"]
    return []


def server_tls_context(config: ServeConfig) -> ssl.SSLContext:
    """Mutual TLS for the SCP: our certificate, and a client certificate signed by the CA required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=config.tls_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    return ctx


def echo(destination: Destination, calling_aet: str, timeout_s: float = 10.0) -> str | None:
    """C-ECHO `destination`; None when it answers success, else the one-line problem."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.aet)
    if assoc.is_rejected:
        return f"--forward {destination}: association rejected (is {calling_aet} known to it?)"
    if not assoc.is_established:
        return f"--forward {destination}: no answer (down, wrong host or port)"
    try:
        status = assoc.send_c_echo()
        code = int(getattr(status, "Status", -1)) if status else -1
        return None if code == 0 else f"--forward {destination}: C-ECHO answered status {code:#06x}"
    finally:
        if assoc.is_established:
            assoc.release()


def check(config: ServeConfig) -> list[str]:
    """``--check``: the configuration's problems, the models opened, every destination C-ECHOed."""
    problems = config.problems()
    if not any(p.startswith(m) for p in problems for m in config.models):
        try:
            from evim3.runtime.serve.analyse import Analyser

            Analyser(config.models, threads=1, scan=config.scan).close()
        except Exception as e:  # noqa: BLE001 -- reported as one line
            problems.append(f"models: {e}")
    for f in config.forward:
        try:
            destination = Destination.parse(f)
        except ValueError:
            continue  # reported above
        problem = echo(destination, config.aet)
        if problem:
            problems.append(problem)
    return problems
