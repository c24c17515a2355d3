"""evim3.cli: the `evim3` Typer app. Command modules import torch lazily, inside the commands."""
