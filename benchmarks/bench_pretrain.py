"""Pre-training step time: the token-skipping encoder against the encoder over the full padded volume.

evim3-p4 geometry (64 frames of 112 x 112 in 2 x 4 x 4 patches: 32 x 28 x 28 real tokens, 33,635 in the
padded volume) at a CPU-sized width (dim 32, one Mamba-3D block, batch 1) on 2 CPU threads. Mask: the
paper's STC at ratio 0.8 (time_chain 2, chain 4), so the token-skipping encoder runs on the global tokens
and the 20% visible patches only. Each step is forward + backward of the encoder (loss = mean of the
squared outputs); the mask's scan orders are built inside the timed step, as in training. Both variants
alternate in the same process, median of the repeats. Target: token-skipping <= 0.5x the full volume.

    python -m benchmarks.bench_pretrain      # print (--threads N, --repeats N)
    python -m benchmarks pretrain            # print and append to BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

THREADS = 2
REPEATS = 5
WIDTH = {"dim": 32, "depth": 1}
MASK_RATIO = 0.8


def _seconds(step: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def run(repeats: int = REPEATS, threads: int = THREADS) -> dict:
    import torch

    from evim3.config import PRESETS
    from evim3.models.pretrain import EViM3MAE

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = PRESETS["evim3-p4"].replace(**WIDTH)
    model = EViM3MAE(cfg, mask_ratio=MASK_RATIO)  # STC, the paper's chains for evim3-p4
    clip = torch.randn(1, cfg.in_channels, cfg.frames, cfg.img_size, cfg.img_size)
    mask = model.sample_mask(1, generator=torch.Generator().manual_seed(0))
    kept_tokens = int(model.keep_positions(mask).sum())

    def token_skipping() -> None:
        model.zero_grad(set_to_none=True)
        tokens, _ = model.encode_visible(clip, mask)
        tokens.square().mean().backward()

    def full_volume() -> None:
        model.zero_grad(set_to_none=True)
        model.encoder(clip).square().mean().backward()

    steps = {
        "token-skipping encoder": (token_skipping, kept_tokens),
        "full-volume encoder": (full_volume, cfg.num_tokens),
    }
    for step, _ in steps.values():  # warm-up: allocator, thread pool, first-call dispatch
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # alternate, so drifting machine load hits both alike
        for name, (step, _) in steps.items():
            times[name].append(_seconds(step))

    median = {name: statistics.median(t) for name, t in times.items()}
    rows = [
        {"variant": name, "encoder tokens": tokens, "fwd+bwd s (median)": median[name],
         "runs s": [round(t, 3) for t in times[name]]}
        for name, (_, tokens) in steps.items()
    ]
    return {
        "rows": rows,
        "config": {"preset": "evim3-p4", **WIDTH, "batch": 1, "threads": threads, "mask_ratio": MASK_RATIO,
                   "strategy": "stc", "time_chain": model.time_chain, "chain": model.chain, "repeats": repeats},
        "skipping_over_full": median["token-skipping encoder"] / median["full-volume encoder"],
        "target_skipping_over_full": 0.5,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (a shared machine: try 1)")
    args = parser.parse_args()
    print(json.dumps(run(args.repeats, args.threads), indent=2))
