"""Behaviour is unchanged: `evim3 infer`'s report (JSON and CSV, minus timings) and a seg model's per-frame masks
for fixed models on fixed inputs equal the record in tests/data/golden/golden.json (tests/golden.py: what is
recorded, and the float tolerance; scripts/make_golden.py re-records it, on purpose only)."""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import MODELS, compute, differences, read_golden


@pytest.fixture(scope="module")
def outputs(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return compute(tmp_path_factory.mktemp("golden"), synth_dataset)


@pytest.mark.parametrize("model", MODELS)
def test_infer_reports_and_masks_equal_the_golden_record(outputs: dict, model: str) -> None:
    assert differences(outputs[model], read_golden()[model], model) == []
