"""`evim3 train`'s flags come from TrainConfig: names and kinds as before, and the config's defaults."""

from __future__ import annotations

import dataclasses

import pytest
import typer
from evim3.cli.demo import recipe_flags
from evim3.cli.main import app
from typer.testing import CliRunner

import evim3.train.loop
from evim3.train.recipe import DEMO_RECIPE, TrainConfig

# flag: (type, min, max), as the CLI had them written out by hand before they came from TrainConfig.
SHARED_FLAGS = {
    "--data": ("Path", None, None), "--csv": ("Path", None, None), "--preset": ("str", None, None),
    "--out": ("Path", None, None), "--epochs": ("int", 1, None), "--max-steps": ("int", 1, None),
    "--batch": ("int", 1, None), "--accum": ("int", 1, None), "--lr": ("float", None, None),
    "--warmup-epochs": ("float", None, None), "--decay-fraction": ("float", 0.0, 1.0),
    "--period": ("int", 1, None), "--frames": ("int", 1, None),
    "--keep-ratio": ("float", 0.0, 1.0), "--max-videos": ("int", 1, None), "--pad": ("int", 0, None),
    "--ema-start": ("int", 0, None), "--ema-beta": ("float", 0.0, 1.0), "--ema-every": ("int", 1, None),
    "--resume": ("bool", None, None),
    "--ckpt-every": ("int", 0, None), "--eval-every": ("int", 1, None), "--log-every": ("int", 1, None),
    "--workers": ("int", 0, None), "--cache-videos": ("bool", None, None), "--strict": ("bool", None, None),
    "--device": ("str", None, None), "--nproc": ("int", 1, None), "--seed": ("int", None, None),
    "--model-set": ("list", None, None),
}
STAGE_FLAGS = {
    "pretrain": {"--mask-ratio": ("float", None, None), "--mask": ("str", None, None),
                 "--time-chain": ("int", None, None), "--chain": ("int", None, None),
                 "--shared-mask": ("bool", None, None), "--norm-pix-loss": ("bool", None, None)},
    "finetune": {"--task": ("str", None, None), "--ef-loss": ("str", None, None), "--init": ("Path", None, None)},
}


def parsed_config(monkeypatch: pytest.MonkeyPatch, *args: str) -> TrainConfig:
    """The TrainConfig `evim3 train ARGS` would train with (training itself replaced by a recorder)."""
    seen = []
    monkeypatch.setattr(evim3.train.loop, "train", seen.append)
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    return cfg


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_flags_keep_their_names_and_kinds(stage: str) -> None:
    command = typer.main.get_command(app).commands["train"].commands[stage]
    found = {p.opts[0]: (p.type_descriptor.annotation.__name__, p.min, p.max) for p in command.params}
    assert found == SHARED_FLAGS | STAGE_FLAGS[stage]
    flags = {p.opts[0] for p in command.params if p.is_flag}
    assert flags == {name for name, (kind, _, _) in found.items() if kind == "bool"}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_every_field_not_given_has_the_configs_default(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parsed_config(monkeypatch, stage, "--out", "run")
    assert cfg == TrainConfig(stage=stage, out="run")


def test_given_flags_reach_their_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parsed_config(monkeypatch, "pretrain", "--mask", "tube", "--batch", "3", "--strict", "--data", "d",
                        "--model-set", "depth=1", "--lr", "0.5")
    expected = TrainConfig(stage="pretrain", out="runs/pretrain-evim3", mask_strategy="tube", batch=3, strict=True,
                           data="d", model_overrides={"depth": 1}, lr=0.5)
    assert cfg == expected
    changed = {f.name for f in dataclasses.fields(TrainConfig)
               if getattr(cfg, f.name) != getattr(TrainConfig(stage="pretrain", out=cfg.out), f.name)}
    assert changed == {"mask_strategy", "batch", "strict", "data", "model_overrides", "lr"}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_the_demos_flags_give_its_recipe(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # `evim3 demo` writes DEMO_RECIPE as flags (recipe_flags; model_overrides as --model-set KEY=VALUE): parsed
    # back, they must give the very config that `python -m benchmarks step` times from the recipe directly.
    cfg = parsed_config(monkeypatch, stage, "--out", "run", *recipe_flags(DEMO_RECIPE))
    assert cfg == TrainConfig(stage=stage, out="run", **DEMO_RECIPE)
    assert DEMO_RECIPE["model_overrides"] and cfg.model_overrides == DEMO_RECIPE["model_overrides"]
