"""The `evim3` command. Each command lives in its own module and imports torch only when it runs,
so `evim3 infer` works where only the runtime's dependencies are installed."""

from __future__ import annotations

import os

import typer
from evim3.cli import bench, check, convert, data, demo, evaluate, export_cmd, infer, info, serve, train

from evim3 import __version__

app = typer.Typer(
    name="evim3",
    help="E-ViM3 echocardiography models: train, export, check and run at the edge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"evim3 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        os.environ["EVIM3_DEBUG"] = "1"


app.command("info")(info.info)
app.add_typer(data.app, name="data")
app.add_typer(train.app, name="train")
app.command("eval")(evaluate.evaluate)
app.command("export")(export_cmd.export)
app.command("check")(check.check)
app.command("infer")(infer.infer)
app.command("bench")(bench.bench)
app.command("convert")(convert.convert)
app.command("demo")(demo.demo)
app.command("serve")(serve.serve)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
