"""Check `evim3 convert` against the paper's own model: same outputs on the same clips.

Needs a CUDA machine with the paper's code and its environment (mamba-ssm, causal-conv1d, ema-pytorch, timm,
the rest of its requirements.txt) plus evim3 installed with the [torch] extra:

    git clone https://github.com/HenryZhou19/E-ViM3 /opt/E-ViM3
    python scripts/verify_convert_official.py --official-repo /opt/E-ViM3            # both paper presets
    python scripts/verify_convert_official.py --official-repo /opt/E-ViM3 --preset evim3-p4

For each preset it builds the official fine-tuned EF model (EchoDynamicVideoMamba3DModel) and pre-training
model (PretrainVideoMamba3DEfficientModel) from the same configuration as the preset, perturbs every weight
(so zero-initialised tokens and biases cannot hide a swapped mapping), wraps them in ema_pytorch.EMA as the
official trainer does, saves a checkpoint in the official trainer's format, converts it with evim3's own
code (raw and --ema weights) and runs both models, in float32 with TF32 off, on the same random clips:

- fine-tuned: the official ``pred_ef`` against the converted evim3 model's EF, absolute difference in EF points;
- pre-training: the official encoder (``net``, full volume) against the converted MAE's encoder, and the
  official masked-patch predictions (``pred_masked``, under the mask the official forward drew and returns)
  against the converted MAE's predictions under that mask; both relative to the largest official value.

Prints one line per comparison and exits 0 when every difference is within tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from types import SimpleNamespace

import torch

from evim3.checkpoint import load_checkpoint, load_model
from evim3.config import ModelConfig, get_preset
from evim3.convert import convert_checkpoint
from evim3.models.masking import default_mask_chains
from evim3.models.pretrain import EViM3MAE

PAPER_PRESETS = ("evim3", "evim3-p4")


def official_config(cfg: ModelConfig) -> SimpleNamespace:
    """The fields the official model classes read, set as configs/{finetune,pretrain}_echo_mamba_3d*.yaml
    set them for this geometry."""
    ns = SimpleNamespace
    return ns(
        data=ns(in_channels=cfg.in_channels, resize_to=cfg.img_size, length=cfg.frames),
        env=ns(amp=ns(amp_mode="bf16")),
        trainer=ns(grad_checkpoint=False),
        model=ns(
            new_scan=True, time_patch_size=cfg.time_patch, patch_size=cfg.patch, embed_dim=cfg.dim,
            l_reg_num=cfg.reg, h_reg_num=cfg.reg, w_reg_num=cfg.reg, n_mamba_per_block=1,
            mamba_block_type="mamba", macro_block_num=cfg.depth, mamba_3d_forward_type="serial",
            extra_blocks_on_global=0, final_aggregate_mode=cfg.aggregate, final_dim=cfg.final_dim,
            head_layers=cfg.head_layers, decoder_additional_blocks=cfg.decoder_depth, mask_prob=0.8,
        ),
    )


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter: keeps the trained-like structure (LayerNorm ~1, A_log) but makes every
    tensor distinct and non-zero."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.02)


def save_official(path: str, model: torch.nn.Module, ema) -> None:
    """What the official trainer's best-checkpoint writer saves."""
    torch.save({"model": model.state_dict(), "ema_container": ema.state_dict(),
                "best_val_metrics": {"ema_L1_loss": 4.0}, "epoch": 1}, path)


def check_finetune(preset: str, official_cls, ema_cls, args, tmp: str) -> bool:
    cfg = get_preset(preset)
    official = official_cls(official_config(cfg)).to(args.device).eval()
    perturb(official, args.seed)
    ema = ema_cls(official, include_online_model=False)
    perturb(ema.ema_model, args.seed + 1)
    source = os.path.join(tmp, f"{preset}_finetune.pth")
    save_official(source, official, ema)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 2)
    clip = torch.randn(args.batch, cfg.in_channels, cfg.frames, cfg.img_size, cfg.img_size, generator=g)
    clip = clip.to(args.device)
    ok = True
    for use_ema, reference in ((False, official), (True, ema.ema_model.eval())):
        kind, _, written = convert_checkpoint(source, os.path.join(tmp, f"{preset}_ft"), preset, ema=use_ema)
        ours, _ = load_model(written, preset=preset, device=args.device)
        with torch.no_grad():
            theirs = reference({"x": clip})["pred_ef"].float()
            mine = ours(clip).float()
        diff = (theirs - mine).abs().max().item()
        passed = kind == "finetune" and diff <= args.ef_atol
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'} {preset} fine-tuned ({'EMA' if use_ema else 'raw'} weights): "
              f"EF official {theirs.flatten().tolist()} evim3 {mine.flatten().tolist()} "
              f"max |diff| {diff:.3g} points (tolerance {args.ef_atol:g})")
    return ok


def relative_difference(theirs: torch.Tensor, mine: torch.Tensor) -> float:
    return ((theirs.float() - mine.float()).abs().max() / theirs.float().abs().max()).item()


def check_pretrain(preset: str, official_cls, args, tmp: str) -> bool:
    cfg = get_preset(preset)
    official_cfg = official_config(cfg)
    official_cfg.model.time_mask_chain, official_cfg.model.mask_chain = default_mask_chains(cfg)
    official = official_cls(official_cfg).to(args.device).eval()
    perturb(official, args.seed + 3)
    source = os.path.join(tmp, f"{preset}_pretrain.pth")
    torch.save({"model": official.state_dict(), "ema_container": None, "epoch": 1}, source)
    kind, _, written = convert_checkpoint(source, os.path.join(tmp, f"{preset}_mae"), preset)
    mae = EViM3MAE(cfg)
    mae.load_state_dict(load_checkpoint(written)[0], strict=True)
    mae = mae.to(args.device).eval()
    g = torch.Generator(device="cpu").manual_seed(args.seed + 4)
    clip = torch.randn(args.batch, cfg.in_channels, cfg.frames, cfg.img_size, cfg.img_size, generator=g)
    clip = clip.to(args.device)
    with torch.no_grad():
        features = relative_difference(official.net(clip).flatten(1, 3), mae.encoder(clip))
        # The official forward draws its own mask and returns it: evim3 reconstructs under the same one.
        out = official({"x": clip})
        predictions = relative_difference(out["pred_masked"], mae(clip, out["patch_mask"].contiguous())["pred"])
    ok = kind == "pretrain"
    for what, diff in (("encoder output (full volume)", features), ("masked-patch predictions", predictions)):
        passed = ok and diff <= args.feature_rtol
        print(f"{'PASS' if passed else 'FAIL'} {preset} pre-training {what}: max |diff| / max |official| "
              f"{diff:.3g} (tolerance {args.feature_rtol:g})")
        ok &= passed
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-repo", required=True, help="clone of github.com/HenryZhou19/E-ViM3")
    parser.add_argument("--preset", choices=PAPER_PRESETS, action="append", help="default: both")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ef-atol", type=float, default=1e-3, help="EF points")
    parser.add_argument("--feature-rtol", type=float, default=1e-4, help="relative to the largest activation")
    args = parser.parse_args()

    sys.path.insert(0, os.path.abspath(args.official_repo))
    from ema_pytorch import EMA
    from src.models.echo_dynamic_video_mamba_3d import EchoDynamicVideoMamba3DModel
    from src.models.pretrain_video_mamba_3d_efficient import PretrainVideoMamba3DEfficientModel
    from src.utils.misc import DistMisc

    DistMisc.setup_for_distributed(True)  # the official modules call print(..., force=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.preset or PAPER_PRESETS:
            ok &= check_finetune(preset, EchoDynamicVideoMamba3DModel, EMA, args, tmp)
            ok &= check_pretrain(preset, PretrainVideoMamba3DEfficientModel, args, tmp)
    print("all comparisons passed" if ok else "SOME COMPARISONS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
