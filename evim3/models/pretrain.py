"""E-ViM3 masked-autoencoder pre-training: STC masking, the token-skipping encoder and the Mamba-3D decoder.

Read top to bottom (the paper's PretrainVideoMamba3DEfficientModel):

    clip (N, 1, T, H, W)                                  mask (N, L, H', W'), True = hidden
      -> patch embedding, Enclosure Global Tokens, positional embeddings: the padded volume (N, S, D)
      -> keep = every global position + the visible real ones (the same count per sample)
      -> the encoder's Mamba-3D blocks over the kept tokens only, in LHW order; the three scan
         permutations over the kept tokens are built once per batch (layout.scan_orders(shape, keep))
         and shared by every block -- the paper's Algorithm 1: no masked token enters the encoder
      -> scatter back into the full volume, hidden real positions = a learned mask token
      -> + the decoder's own positional embeddings -> decoder_depth Mamba-3D blocks over the full volume
      -> real positions -> LayerNorm -> Linear to the C x t x p x p pixels of each patch
      -> MSE against the clip's pixels on the hidden patches only

Ratio 0 (nothing hidden) runs the same path with every token kept; the loss is then a zero that is still
connected to every parameter (0 x the sum of the predictions), so backward() and DDP work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evim3.config import ModelConfig
from evim3.models.evim3 import EViM3Encoder, Mamba3DBlock
from evim3.models.layout import permute_tokens, real_positions, scan_orders
from evim3.models.masking import check_mask_options, default_mask_chains, make_mask
from evim3.modules.mamba import init_residual_stack


def patch_pixels(cfg: ModelConfig) -> int:
    """P: pixels per patch, C x t x p x p."""
    return cfg.in_channels * cfg.time_patch * cfg.patch**2


def patchify(clip: Tensor, cfg: ModelConfig) -> Tensor:
    """(N, C, T, H, W) -> (N, L, H', W', P), each patch's pixels in (C, t, p, p) order -- the order of the
    patch embedding's Conv3d kernel and of the paper's _do_external_patch_embed."""
    N, C = clip.shape[:2]
    L, H, W = cfg.grid
    t, p = cfg.time_patch, cfg.patch
    patches = clip.reshape(N, C, L, t, H, p, W, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return patches.reshape(N, L, H, W, patch_pixels(cfg))


class EViM3MAE(nn.Module):
    """The pre-training model. `.encoder` is the EViM3Encoder that fine-tuning initialises from."""

    def __init__(
        self,
        cfg: ModelConfig,
        mask_ratio: float = 0.8,
        strategy: str = "stc",
        time_chain: int | None = None,
        chain: int | None = None,
        shared_mask: bool = False,
        norm_pix_loss: bool = False,
    ):
        super().__init__()
        default_time_chain, default_chain = default_mask_chains(cfg) if strategy == "stc" else (1, 1)
        self.time_chain = default_time_chain if time_chain is None else time_chain
        self.chain = default_chain if chain is None else chain
        check_mask_options(cfg.grid, mask_ratio, strategy, self.time_chain, self.chain, shared_mask)
        self.cfg = cfg
        self.mask_ratio = mask_ratio
        self.strategy = strategy
        self.shared_mask = shared_mask
        self.norm_pix_loss = norm_pix_loss

        self.encoder = EViM3Encoder(cfg)
        D = cfg.dim
        self.mask_token = nn.Parameter(torch.randn(1, D))  # the paper's decoder mask token init
        # The paper deep-copies the encoder's positional embeddings at construction: N(0, 0.02), equal at start.
        self.decoder_l_pos_embed = nn.Parameter(self.encoder.l_pos_embed.detach().clone())
        self.decoder_h_pos_embed = nn.Parameter(self.encoder.h_pos_embed.detach().clone())
        self.decoder_w_pos_embed = nn.Parameter(self.encoder.w_pos_embed.detach().clone())
        self.decoder_blocks = nn.ModuleList(Mamba3DBlock(cfg) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(D)
        self.decoder_pred = nn.Linear(D, patch_pixels(cfg))
        init_residual_stack(self.decoder_blocks, num_units=6 * cfg.decoder_depth)
        self.register_buffer("real_positions", torch.as_tensor(real_positions(cfg)), persistent=False)

    def sample_mask(self, batch: int, device: torch.device | str | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        """A fresh (batch, L, H, W) mask with this model's strategy, ratio and chains."""
        return make_mask(batch, self.cfg.grid, self.mask_ratio, self.strategy, self.time_chain, self.chain,
                         self.shared_mask, generator=generator, device=device)

    def _check_mask(self, mask: Tensor, batch: int) -> None:
        expected = (batch, *self.cfg.grid)
        if mask.dtype != torch.bool or tuple(mask.shape) != expected:
            raise ValueError(f"mask must be a bool tensor of shape {expected}, got {mask.dtype} {tuple(mask.shape)}")
        counts = mask.flatten(1).sum(1)
        if (counts != counts[0]).any():
            raise ValueError(f"every sample must hide the same number of patches, got {counts.tolist()}")

    def keep_positions(self, mask: Tensor) -> Tensor:
        """(N, L, H, W) mask -> (N, S) bool over the padded volume: global positions and visible patches."""
        N = mask.shape[0]
        keep = torch.ones(N, self.cfg.num_tokens, dtype=torch.bool, device=mask.device)
        return keep.index_copy(1, self.real_positions, ~mask.flatten(1))

    def encode_visible(self, clip: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The token-skipping encoder. Returns the encoded kept tokens (N, S', D) in LHW order and their
        positions in the padded volume (N, S')."""
        encoder = self.encoder
        volume = encoder.assemble(encoder.patch_embed(clip).flatten(1, 3))
        keep = self.keep_positions(mask)
        kept = keep.nonzero()[:, 1].view(keep.shape[0], -1)  # row-major: ascending = LHW order per sample
        orders = scan_orders(self.cfg.padded_grid, keep)
        x = permute_tokens(volume, kept)
        for block in encoder.blocks:
            x = block(x, orders)
        return x, kept

    def decode(self, tokens: Tensor, kept: Tensor) -> Tensor:
        """Encoded kept tokens (N, S', D) at positions `kept` -> predicted pixels (N, R, P) of every patch."""
        N, _, D = tokens.shape
        volume = self.mask_token.to(tokens.dtype).expand(N, self.cfg.num_tokens, D)
        x = volume.scatter(1, kept[..., None].expand(-1, -1, D), tokens)
        pos = self.decoder_l_pos_embed + self.decoder_h_pos_embed + self.decoder_w_pos_embed
        x = x + pos.reshape(-1, D).to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x, self.encoder.full_orders)
        return self.decoder_pred(self.decoder_norm(x.index_select(1, self.real_positions)))

    def forward(self, clip: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """clip (N, C, T, H, W); mask (N, L, H', W') bool or None to draw one. Returns loss (scalar), pred and
        target (N_masked, P) of the hidden patches (sample-major, then LHW), and the mask used."""
        self.encoder.check_clip(clip)
        N = clip.shape[0]
        if mask is None:
            mask = self.sample_mask(N, clip.device)
        else:
            self._check_mask(mask, N)
        tokens, kept = self.encode_visible(clip, mask)
        pred_all = self.decode(tokens, kept)
        target_all = patchify(clip, self.cfg).flatten(1, 3)
        if self.norm_pix_loss:
            mean = target_all.mean(dim=-1, keepdim=True)
            var = target_all.var(dim=-1, keepdim=True)
            target_all = (target_all - mean) / torch.sqrt(var + 1e-6)
        hidden = mask.flatten(1)
        pred, target = pred_all[hidden], target_all[hidden]
        if pred.numel():
            loss = F.mse_loss(pred.float(), target.float())
        else:
            loss = pred_all.sum() * 0.0
        return {"loss": loss, "pred": pred, "target": target, "mask": mask}

