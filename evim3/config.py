"""One model config dataclass and the named presets (nanoGPT style). Pure Python: no torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# The paper code's final_aggregate_mode values that evim3 implements:
#   all_concat          the (2+reg)^3 tokens where global planes of all three axes cross, concatenated
#   all_enclosure_mean  the mean of every global token (faces, edges, corners, register planes)
AGGREGATES = ("all_concat", "all_enclosure_mean")


@dataclass(frozen=True)
class ModelConfig:
    """Geometry and width of an E-ViM3 model. Names follow the paper's code where one exists."""

    frames: int = 64  # clip length in frames (data.length)
    img_size: int = 112  # square frames (data.resize_to)
    in_channels: int = 1
    time_patch: int = 1  # model.time_patch_size
    patch: int = 16  # model.patch_size
    dim: int = 384  # model.embed_dim
    depth: int = 6  # model.macro_block_num: Mamba-3D blocks, six Mamba units each
    reg: int = 1  # register planes per axis (l/h/w_reg_num): 2 + reg global planes per axis
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    final_dim: int = 512
    head_layers: int = 3
    aggregate: str = "all_concat"  # model.final_aggregate_mode: how the head reads the global tokens (AGGREGATES)
    decoder_depth: int = 2  # pre-training decoder Mamba-3D blocks
    scan_chunk: int = 0  # chunk length of the chunked scan; 0 = about sqrt(L)

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {self.aggregate!r}: expected one of {', '.join(AGGREGATES)}")
        if self.frames % self.time_patch or self.img_size % self.patch:
            raise ValueError(
                f"clip {self.frames}x{self.img_size}^2 is not divisible by patch "
                f"{self.time_patch}x{self.patch}^2"
            )

    @property
    def grid(self) -> tuple[int, int, int]:
        """Patch grid (L, H, W) of real tokens."""
        return (self.frames // self.time_patch, self.img_size // self.patch, self.img_size // self.patch)

    @property
    def padded_grid(self) -> tuple[int, int, int]:
        """Token volume after the Enclosure Global Tokens: each axis grows by 2 faces + reg planes."""
        return tuple(s + 2 + self.reg for s in self.grid)  # type: ignore[return-value]

    @property
    def global_planes(self) -> tuple[list[int], list[int], list[int]]:
        """Indices of the global planes per axis: integer-truncated linspace(0, size-1, 2+reg), as the paper."""
        return tuple(  # type: ignore[return-value]
            np.linspace(0, s - 1, 2 + self.reg, dtype=np.int64).tolist() for s in self.padded_grid
        )

    @property
    def num_real_tokens(self) -> int:
        return int(np.prod(self.grid))

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.padded_grid))

    @property
    def d_inner(self) -> int:
        return self.expand * self.dim

    @property
    def dt_rank(self) -> int:
        return -(-self.dim // 16)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # The paper's two EchoNet-Dynamic models (configs/finetune_echo_mamba_3d{,_patch4}.yaml).
    "evim3": ModelConfig(frames=64, time_patch=1, patch=16, dim=384, depth=6),
    "evim3-p4": ModelConfig(frames=64, time_patch=2, patch=4, dim=192, depth=6),
    # CPU-sized models with the same architecture, for tests, the demo and edge CPUs.
    "evim3-small": ModelConfig(frames=32, time_patch=2, patch=8, dim=128, depth=4, final_dim=256),
    # evim3-tiny reads the mean of all global tokens: with only 12 Mamba units, the 27 crossing tokens that
    # all_concat reads barely depend on the clip at initialisation (6 % of their spread after LayerNorm,
    # against 20 % for the enclosure as a whole), and EF fine-tuning from scratch collapsed to the mean
    # predictor (val MAE 14.6, prediction spread 0.00 after 350 steps); all_enclosure_mean left it by
    # step 200. Measured on the synthetic data, batch 8, lr 1e-3 (BENCHMARKS.md, train).
    # Tubelets of 2 frames (as evim3-p4's): the patch embedding sees a frame difference, so motion -- what EF
    # is made of -- is in every token from the first step, and half the tokens make a step ~2x cheaper.
    # From scratch with mse+corr at lr 2e-3 (batch 8) it left the mean predictor by step 100-175 in 4 of 4
    # seeds, where 1-frame tubelets at 1e-3 took 200 (one seed) and 150 to 300+ in the old demo (BENCHMARKS.md
    # "learning: tubelets" and "demo across seeds").
    "evim3-tiny": ModelConfig(
        frames=32, time_patch=2, patch=16, dim=64, depth=2, final_dim=128, aggregate="all_enclosure_mean"
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
