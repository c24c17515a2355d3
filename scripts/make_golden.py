"""Record the golden outputs of the edge pipeline (tests/golden.py says what and why): write the exported models
and tests/data/golden/golden.json. Run once, from the repository root, on purpose only:

    python scripts/make_golden.py            # models and outputs
    python scripts/make_golden.py --outputs  # outputs only, from the committed models

Rerunning changes the golden record; a behaviour change must be explained in its commit.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the golden helpers and the test fixtures' builders live there

from conftest import SYNTH_FRAME_RANGE, SYNTH_SEED, SYNTH_VIDEOS
from golden import GOLDEN_DIR, build_models, compute, write_golden

from evim3.data.synth import generate_dataset


def main() -> None:
    if "--outputs" not in sys.argv[1:]:
        build_models(GOLDEN_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synth = work / "synth" / "echonet"
        generate_dataset(synth, SYNTH_VIDEOS, seed=SYNTH_SEED, frame_range=SYNTH_FRAME_RANGE)  # as conftest's
        write_golden(compute(work, synth))
    print(f"wrote {GOLDEN_DIR}")


if __name__ == "__main__":
    main()
