"""E-ViM3: Mamba-3D encoder with Enclosure Global Tokens, and the EF / classification head.

Read top to bottom:

    clip (N, 1, T, H, W)
      -> Conv3d patch embedding                       (N, L, H', W', D)      real tokens
      -> Enclosure Global Tokens (faces, edges,       (N, Lp*Hp*Wp, D)      padded volume, LHW-flattened
         corners, register planes) + factorised 3D positional embeddings
      -> depth x Mamba3DBlock: six residual Mamba units in series,
         HWL, reversed HWL, LWH, reversed LWH, LHW, reversed LHW (each direction one static Gather)
      -> the 27 tokens where the global planes cross -> LayerNorm -> concat -> Linear + SiLU
      -> MLP -> EF (bias initialised to the training EF mean) or class logits
      (task "seg" instead: every real token -> LayerNorm -> Linear -> its patch's background/LV logits)

Module structure and parameter shapes follow the paper's code (github.com/HenryZhou19/E-ViM3); the
parameter names are evim3's own (``evim3 convert`` maps the official names onto them).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from evim3.config import ModelConfig
from evim3.models.layout import (
    BLOCK_ORDER,
    NUM_CORNERS,
    NUM_EDGES,
    NUM_FACES,
    enclosure_layout,
    global_positions,
    intersection_positions,
    permute_tokens,
    real_positions,
    scan_orders,
)
from evim3.modules.mamba import ResidualMamba, init_residual_stack
from evim3.runtime.outputs import SEG_CLASSES


class PatchEmbed3D(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kernel = (cfg.time_patch, cfg.patch, cfg.patch)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=kernel, stride=kernel)

    def forward(self, clip: Tensor) -> Tensor:
        """(N, C, T, H, W) -> (N, L, H', W', D): the token volume keeps its axes."""
        return self.proj(clip).permute(0, 2, 3, 4, 1)


class Mamba3DBlock(nn.Module):
    """Six residual Mamba units in series: each direction forward, then reversed."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kw = {"d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand}
        for name in BLOCK_ORDER:
            self.add_module(name, ResidualMamba(cfg.dim, **kw))
            self.add_module(f"{name}_r", ResidualMamba(cfg.dim, **kw))

    def forward(self, x: Tensor, orders: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """x: (N, S, D) in LHW order; `orders` from layout.scan_orders. Returns (N, S, D) in LHW order."""
        for name, index in zip(BLOCK_ORDER, orders):
            x = permute_tokens(x, index)
            x = getattr(self, name)(x)
            x = getattr(self, f"{name}_r")(x.flip(1)).flip(1)
        return x


class EViM3Encoder(nn.Module):
    """Patch embedding, Enclosure Global Tokens, positional embeddings and the Mamba-3D blocks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        Lp, Hp, Wp = cfg.padded_grid
        self.patch_embed = PatchEmbed3D(cfg)
        # Parameter shapes as the paper's code; all zero-initialised.
        self.global_faces_token = nn.Parameter(torch.zeros(NUM_FACES, 1, 1, 1, 1, D))
        self.global_edges_token = nn.Parameter(torch.zeros(NUM_EDGES, 1, 1, 1, 1, D))
        self.global_corners_token = nn.Parameter(torch.zeros(NUM_CORNERS, 1, 1, 1, 1, D))
        self.global_reg_token = nn.Parameter(torch.zeros(1, 1, 1, 1, D))
        self.l_pos_embed = nn.Parameter(torch.randn(1, Lp, 1, 1, D) * 0.02)
        self.h_pos_embed = nn.Parameter(torch.randn(1, 1, Hp, 1, D) * 0.02)
        self.w_pos_embed = nn.Parameter(torch.randn(1, 1, 1, Wp, D) * 0.02)
        self.blocks = nn.ModuleList(Mamba3DBlock(cfg) for _ in range(cfg.depth))

        # Static index tables (not saved: they are a function of the config).
        self.register_buffer("layout", torch.as_tensor(enclosure_layout(cfg)), persistent=False)
        for i, order in enumerate(scan_orders(cfg.padded_grid)):
            self.register_buffer(f"order{i}", order, persistent=False)

        init_residual_stack(self.blocks, num_units=6 * cfg.depth)

    @property
    def full_orders(self) -> tuple[Tensor, Tensor, Tensor]:
        return (self.order0, self.order1, self.order2)

    def global_table(self) -> Tensor:
        """(27, D): faces, edges, corners, register -- the rows `layout` indexes past the real tokens."""
        D = self.cfg.dim
        return torch.cat([
            self.global_faces_token.reshape(-1, D), self.global_edges_token.reshape(-1, D),
            self.global_corners_token.reshape(-1, D), self.global_reg_token.reshape(-1, D),
        ])

    def pos_embed(self) -> Tensor:
        """(S, D): the factorised embedding of every padded position, LHW-flattened."""
        return (self.l_pos_embed + self.h_pos_embed + self.w_pos_embed).reshape(-1, self.cfg.dim)

    def assemble(self, real_tokens: Tensor) -> Tensor:
        """(N, R, D) real tokens in patch order -> (N, S, D) padded volume with global tokens and positions."""
        N = real_tokens.shape[0]
        table = self.global_table().to(real_tokens.dtype).expand(N, -1, -1)
        volume = torch.cat([real_tokens, table], dim=1).index_select(1, self.layout)
        return volume + self.pos_embed().to(volume.dtype)

    def check_clip(self, clip: Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.in_channels, cfg.frames, cfg.img_size, cfg.img_size)
        if clip.dim() != 5 or tuple(clip.shape[1:]) != expected:
            raise ValueError(
                f"clip shape {tuple(clip.shape)} does not fit this model: expected (N, {', '.join(map(str, expected))})"
                " = (batch, channels, frames, height, width)"
            )

    def forward(self, clip: Tensor) -> Tensor:
        """(N, C, T, H, W) -> (N, S, D) encoded padded volume, LHW order."""
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check_clip(clip)
        x = self.assemble(self.patch_embed(clip).flatten(1, 3))
        for block in self.blocks:
            x = block(x, self.full_orders)
        return x


class GlobalTokenHead(nn.Module):
    """The paper's final aggregation (cfg.aggregate: 'all_concat' or 'all_enclosure_mean') and its MLP head:
    EF regression or class logits."""

    def __init__(
        self, cfg: ModelConfig, num_outputs: int = 1, output_bias: float | None = None, output_scale: float = 1.0
    ):
        super().__init__()
        self.concat = cfg.aggregate == "all_concat"
        positions = intersection_positions(cfg) if self.concat else global_positions(cfg)
        self.norm = nn.LayerNorm(cfg.dim)
        in_features = len(positions) * cfg.dim if self.concat else cfg.dim
        self.proj = nn.Sequential(nn.Linear(in_features, cfg.final_dim), nn.SiLU())
        widths = [cfg.final_dim] * cfg.head_layers + [num_outputs]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < cfg.head_layers - 1:
                layers.append(nn.SiLU())
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("positions", torch.as_tensor(positions), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        if output_bias is not None:
            nn.init.constant_(self.mlp[-1].bias, output_bias / output_scale)
        self.output_scale = output_scale  # a constant, not a weight: the checkpoint's metadata carries it

    def forward(self, tokens: Tensor) -> Tensor:
        """(N, S, D) encoded volume -> (N, num_outputs)."""
        x = self.norm(tokens.index_select(1, self.positions).float())
        # The enclosure mean as a sum times 1/count: ReduceSum has one form from opset 13 on, while ReduceMean
        # changed at opset 18, and the opset-17 export (TensorRT 10.3) cannot downgrade it.
        pooled = x.flatten(1) if self.concat else x.sum(1) * (1.0 / x.shape[1])
        out = self.mlp(self.proj(pooled))
        return out if self.output_scale == 1.0 else out * self.output_scale


class SegHead(nn.Module):
    """The paper's segmentation head (VideoMamba3DSegFinal): LayerNorm, then one Linear that turns each real
    token into its tubelet's logits, SEG_CLASSES per pixel of each of its frames; the patches are put back
    in place: (N, SEG_CLASSES, frames, size, size). The global tokens are not read.

    The Linear's outputs are ordered (class, frame in tubelet, row, column), as the official reshape
    reads them, so its weight maps one to one (``evim3 convert``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch = (cfg.time_patch, cfg.patch, cfg.patch)
        self.grid = cfg.grid
        self.norm = nn.LayerNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, SEG_CLASSES * cfg.time_patch * cfg.patch**2)
        self.register_buffer("positions", torch.as_tensor(real_positions(cfg)), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """(N, S, D) encoded volume -> (N, SEG_CLASSES, frames, size, size) logits."""
        # LayerNorm is per token, so normalising only the real tokens equals the official norm-then-select.
        x = self.proj(self.norm(tokens.index_select(1, self.positions).float()))
        N, (L, H, W), (t, p, q) = x.shape[0], self.grid, self.patch
        x = x.reshape(N, L, H, W, SEG_CLASSES, t, p, q).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(N, SEG_CLASSES, L * t, H * p, W * q)


class EViM3(nn.Module):
    """The fine-tuned model: clip -> EF (task 'ef'), class logits ('classification') or per-pixel
    background/LV logits of every frame ('seg')."""

    def __init__(
        self, cfg: ModelConfig, task: str = "ef", num_classes: int = 0, ef_mean: float = 55.0, ef_std: float = 1.0
    ):
        """ef_mean starts the EF output there; EF = ef_std * network output (see ModelMeta.ef_std)."""
        # Imported here, not above: the task modules import this one for their heads.
        from evim3.tasks import task_class

        super().__init__()
        head = task_class(task).head  # ValueError naming the registered tasks
        self.cfg = cfg
        self.task = task
        self.encoder = EViM3Encoder(cfg)
        self.head: nn.Module = head(cfg, num_classes, ef_mean, ef_std)

    def forward(self, clip: Tensor) -> Tensor:
        return self.head(self.encoder(clip))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters AdamW must not decay: A_log and D (marked by the Mamba block), biases, norms,
    global tokens and positional embeddings."""
    names = set()
    for name, p in model.named_parameters():
        if getattr(p, "_no_weight_decay", False) or p.dim() <= 1 or "token" in name or "pos_embed" in name:
            names.add(name)
    return names


def model_flops(cfg: ModelConfig, num_tokens: int | None = None) -> int:
    """Forward multiply-adds x2 of the encoder over `num_tokens` tokens (default: the full padded volume)."""
    S = cfg.num_tokens if num_tokens is None else num_tokens
    Di, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
    per_unit = S * (
        2 * cfg.dim * 2 * Di  # in_proj
        + 2 * Di * cfg.d_conv  # depthwise conv
        + 2 * Di * (r + 2 * n)  # x_proj
        + 2 * r * Di  # dt_proj
        + 9 * Di * n  # discretise + recurrence + readout
        + 2 * Di * cfg.dim  # out_proj
    )
    patch = 2 * cfg.num_real_tokens * cfg.dim * cfg.in_channels * cfg.time_patch * cfg.patch**2
    head_inputs = (2 + cfg.reg) ** 3 * cfg.dim if cfg.aggregate == "all_concat" else cfg.dim
    head = 2 * (head_inputs * cfg.final_dim + cfg.head_layers * cfg.final_dim**2)
    return int(6 * cfg.depth * per_unit + patch + head)

