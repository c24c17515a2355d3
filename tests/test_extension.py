"""The seams hold: a task and a backend defined outside the project, in temporary modules, registered there,
run end to end (export where it applies, then load(...).predict(...)) without any project file changing. A
task is two modules: its edge half (a TaskSpec, torch-free) and its torch half (a Task: head, training,
evaluation), each registered once."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import evim3.runtime as rt
import numpy as np
import pytest
from evim3.runtime import formats, tasks
from evim3.runtime.meta import ModelMeta, PreprocessSpec

PLUGIN = '''
"""A throwaway task (mean brightness of a clip, one value) and a throwaway numpy backend (.npmodel: the
metadata as JSON; output = mean of the normalised clip times a gain)."""
import json

import numpy as np
from evim3.runtime.backends import Backend
from evim3.runtime.formats import ModelFormat
from evim3.runtime.meta import ModelMeta
from evim3.runtime.tasks import TaskSpec

GAIN = 2.0


class BrightnessTask(TaskSpec):
    name = "brightness"
    diff_name = "mean |d brightness|"

    def video_entry(self, mean, names):
        return {"brightness": None if mean is None else mean[0]}

    def output_description(self, meta):
        return "output (N, 1) mean brightness"


class NumpyBackend(Backend):
    def __init__(self, path):
        self.path = path
        with open(path) as f:
            self.meta = ModelMeta.from_json(f.read())

    @property
    def device(self):
        return "numpy"

    def _run_batch(self, clips):
        return (GAIN * clips.reshape(len(clips), -1).mean(axis=1, keepdims=True)).astype(np.float32)


def open_npmodel(path, provider=None, threads=None, spinning=None, scan="auto"):
    return NumpyBackend(path)


def export_npmodel(meta, path):
    with open(path, "w") as f:
        f.write(meta.to_json())


FORMAT = ModelFormat("npmodel", ".npmodel", "numpy", (), "toy_plugin:export_npmodel", "toy_plugin:open_npmodel")
'''

TORCH_PLUGIN = '''
"""The throwaway task's torch half, all of it: its head (a linear readout of the first token, ops the
opset-17 export writes as they are), its training and its `evim3 eval`, registered once."""
import torch
import torch.nn.functional as F
from torch import nn

from evim3.tasks import Task, register


class FirstTokenHead(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    def forward(self, tokens):
        return self.proj(tokens[:, 0])


@register
class BrightnessTask(Task):
    name = "brightness"
    monitor = "val_loss"
    higher_is_better = False

    @staticmethod
    def head(cfg, num_classes, ef_mean, ef_std):
        return FirstTokenHead(cfg.dim)

    def loss(self, model, batch, device):
        x = batch["x"].to(device)
        return F.mse_loss(model(x)[:, 0], x.mean((1, 2, 3, 4)))

    @staticmethod
    def evaluate(job):
        return {"files": []}
'''

SPEC = PreprocessSpec(size=32, fps=25.0, frames=8, period=1, mean=100.0, std=50.0)


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The module, imported from a temporary folder, its task and format registered for this test only."""
    (tmp_path / "toy_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_plugin", raising=False)
    import toy_plugin

    monkeypatch.setitem(tasks._REGISTRY, "brightness", toy_plugin.BrightnessTask())
    monkeypatch.setitem(formats.FORMATS, ".npmodel", toy_plugin.FORMAT)
    return toy_plugin


@pytest.fixture
def torch_plugin(plugin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The task's torch half, imported from a temporary folder; its registration lasts this test only."""
    from evim3.tasks import base

    monkeypatch.setattr(base, "TASKS", dict(base.TASKS))
    (tmp_path / "toy_task.py").write_text(textwrap.dedent(TORCH_PLUGIN))
    monkeypatch.delitem(sys.modules, "toy_task", raising=False)
    import toy_task

    return toy_task


def frames(count: int = 40) -> list[np.ndarray]:
    return [np.full((48, 48), 60 + 3 * i, np.uint8) for i in range(count)]


def test_a_new_task_and_backend_run_end_to_end(plugin, tmp_path: Path) -> None:
    meta = ModelMeta("toy", {}, SPEC, task="brightness")
    path = tmp_path / "m.npmodel"
    formats.format_of(path).exporter()(meta, path)
    with rt.load(path) as model:
        assert model.task == "brightness" and model.device == "numpy"
        result = model.predict(frames(), fps=25)
    entry = result.to_dict()
    clips = [c.values[0] for c in result.clips]
    assert entry["brightness"] == pytest.approx(np.mean(clips)) and "ef" not in entry
    # Frames 60 + 3 i, still (no motion: the whole picture), normalised: the first clip's mean is known.
    assert clips[0] == pytest.approx(plugin.GAIN * (np.mean([60 + 3 * i for i in range(8)]) - 100) / 50, abs=1e-4)
    assert result.source.model_frames == 40 and len(result.clips) == len(entry["clips"])
    # `evim3 infer --csv` asks the task's spec for its columns (the base: one value, named after the task).
    from evim3.cli.report import write_csv

    write_csv(tmp_path / "r.csv", [result.raw], [], clip_task="brightness")
    header = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
    assert {"brightness", "clip_brightness"} <= set(header) and "ef" not in header


def test_a_new_task_is_one_torch_module_the_model_trainer_and_eval_find(torch_plugin, tmp_path: Path) -> None:
    """The torch half: one registration gives the model its head, `evim3 train` its Task and `evim3 eval` its
    evaluation; `evim3 export`'s exporter writes the ONNX file and ONNX Runtime runs it through the same API."""
    import torch
    from evim3.export.onnx import export_onnx

    from evim3.config import get_preset
    from evim3.models.evim3 import EViM3
    from evim3.tasks import task_class
    from evim3.train.recipe import TrainConfig
    from evim3.train.tasks import make_task

    cfg = get_preset("evim3-tiny").replace(frames=8, img_size=32, dim=16, depth=1, d_state=4, final_dim=32)
    train_cfg = TrainConfig(stage="finetune", out=str(tmp_path / "run"), task="brightness")
    assert isinstance(make_task(train_cfg), torch_plugin.BrightnessTask)
    assert task_class("brightness").evaluate is torch_plugin.BrightnessTask.evaluate
    torch.manual_seed(0)
    model = EViM3(cfg, task="brightness").eval()
    assert isinstance(model.head, torch_plugin.FirstTokenHead)
    meta = ModelMeta("evim3-tiny", cfg.to_dict(), SPEC, task="brightness")
    onnx_path = tmp_path / "m.onnx"
    export_onnx(model, meta, onnx_path)
    clip = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 8, 32, 32), dtype=np.float32))
    with rt.load(onnx_path, scan="graph") as loaded, torch.no_grad():
        assert loaded.task == "brightness"
        np.testing.assert_allclose(loaded.backend.run(clip.numpy()), model(clip).numpy(), atol=1e-4)
        result = loaded.predict(frames(), fps=25)
    assert result.to_dict()["brightness"] == pytest.approx(np.mean([c.values[0] for c in result.clips]))
