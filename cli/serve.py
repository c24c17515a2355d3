"""`evim3 serve`: a DICOM node that answers every echo cine it receives with a Structured Report
(evim3.runtime.serve). Runs on the edge runtime only: never imports torch."""

from __future__ import annotations

import typer
from evim3.cli.common import EXIT_FAILED, cli_errors, echo_err


@cli_errors
def serve(
    models: list[str] = typer.Argument(..., metavar="MODEL", help="Model files from `evim3 export` (.onnx or "
                                       ".engine): an EF model and/or a seg model."),
    aet: str = typer.Option("EVIM3", "--aet", help="The node's AE title."),
    port: int = typer.Option(11112, "--port", help="DICOM port."),
    spool: str = typer.Option(..., "--spool", help="Folder of the spool: received datasets, queue, outputs, "
                              "audit log (created 0700, files 0600)."),
    forward: list[str] = typer.Option(..., "--forward", help="Destination of the SRs, AET@HOST:PORT; repeat for "
                                      "several."),
    allow_aet: str | None = typer.Option(None, "--allow-aet", help="Calling AE titles allowed to send, "
                                         "comma-separated [default: any]."),
    http_port: int = typer.Option(8080, "--http-port", help="Port of /health and /queue (0: off)."),
    tls_cert: str | None = typer.Option(None, "--tls-cert", help="PEM certificate of the node: mutual TLS."),
    tls_key: str | None = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
    tls_ca: str | None = typer.Option(None, "--tls-ca", help="PEM CA that signs the senders' certificates."),
    secondary_capture: bool = typer.Option(False, "--secondary-capture", help="Also send an image of the EF per "
                                           "clip (and beats)."),
    check: bool = typer.Option(False, "--check", help="Validate the configuration, C-ECHO every destination, print "
                               "one line per problem, exit 0 or 1 without serving."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address the DICOM port listens on."),
    http_host: str = typer.Option("127.0.0.1", "--http-host", help="Address /health and /queue listen on."),
    max_associations: int = typer.Option(4, "--max-associations", help="Concurrent associations accepted."),
    max_dataset_mb: float = typer.Option(512.0, "--max-dataset-mb", help="Largest dataset accepted (MiB)."),
    max_tries: int = typer.Option(8, "--max-tries", help="Tries of a delivery before it is dead."),
    retry_base: float = typer.Option(2.0, "--retry-base", help="Seconds before the first retry (then doubled)."),
    retry_cap: float = typer.Option(300.0, "--retry-cap", help="Longest wait between tries (seconds)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads for ONNX Runtime."),
    scan: str = typer.Option("auto", "--scan", help="auto | fused | graph: how ONNX Runtime runs the scans."),
) -> None:
    """A DICOM node: receive echo cines (C-STORE), analyse them, send a TID 1500 SR to every --forward."""
    from evim3.runtime.serve.config import ServeConfig
    from evim3.runtime.serve.config import check as check_config

    config = ServeConfig(
        models=models, spool=spool, aet=aet, port=port, host=host, forward=forward,
        allow_aet=[a.strip() for a in allow_aet.split(",") if a.strip()] if allow_aet else [],
        http_port=http_port, http_host=http_host, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca,
        secondary_capture=secondary_capture, max_associations=max_associations, max_dataset_mb=max_dataset_mb,
        max_tries=max_tries, retry_base_s=retry_base, retry_cap_s=retry_cap, threads=threads, scan=scan)
    problems = check_config(config) if check else config.problems()
    for problem in problems:
        echo_err(f"error: {problem}")
    if problems:
        raise typer.Exit(EXIT_FAILED)
    if check:
        typer.echo(f"ok: configuration valid, {len(config.forward)} destination(s) answer C-ECHO")
        return
    from evim3.runtime.serve.node import Node

    raise typer.Exit(Node(config, log=lambda line: typer.echo(line, err=True)).serve_forever())
