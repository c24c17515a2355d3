"""The seams hold: a task and a backend defined outside the project, in a temporary module, registered there,
run end to end (export where it applies, then load(...).predict(...)) without any project file changing."""

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


def test_a_new_task_exports_through_the_model_with_a_registered_head(plugin, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch half: a head registered under the task's name; `evim3 export`'s exporter writes the ONNX
    file and ONNX Runtime runs it through the same API."""
    import torch
    from evim3.export.onnx import export_onnx
    from torch import nn

    from evim3.config import get_preset
    from evim3.models import evim3 as models

    class FirstTokenHead(nn.Module):
        """A linear readout of the first token (ops the opset-17 export writes as they are)."""

        def __init__(self, dim: int):
            super().__init__()
            self.proj = nn.Linear(dim, 1)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.proj(tokens[:, 0])

    monkeypatch.setitem(models.HEADS, "brightness", lambda cfg, num_classes, ef_mean, ef_std: FirstTokenHead(cfg.dim))
    cfg = get_preset("evim3-tiny").replace(frames=8, img_size=32, dim=16, depth=1, d_state=4, final_dim=32)
    meta = ModelMeta("evim3-tiny", cfg.to_dict(), SPEC, task="brightness")
    torch.manual_seed(0)
    model = models.EViM3(cfg, task="brightness").eval()
    onnx_path = tmp_path / "m.onnx"
    export_onnx(model, meta, onnx_path)
    clip = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 8, 32, 32), dtype=np.float32))
    with rt.load(onnx_path, scan="graph") as loaded, torch.no_grad():
        assert loaded.task == "brightness"
        np.testing.assert_allclose(loaded.backend.run(clip.numpy()), model(clip).numpy(), atol=1e-4)
        result = loaded.predict(frames(), fps=25)
    assert result.to_dict()["brightness"] == pytest.approx(np.mean([c.values[0] for c in result.clips]))
