"""Import checkpoints trained with the paper's public code (github.com/HenryZhou19/E-ViM3).

The official trainer saves ``{'model': state_dict, 'ema_container': EMA state_dict or None, ...}`` with
``torch.save``. The model is the fine-tuned EF regressor (``net.*``, ``final.*``, ``ef_head.*``), the LV
segmentation model (``net.*``, ``final.final_norm``, ``final.patch_reconstruct``) or the masked-autoencoder
pre-training model (``net.*``, ``pretrain_decoder*``, two ``*_mask_maker.mask_token``).
evim3's modules have the same structure and parameter shapes under shorter names, so conversion is a pure
renaming: one table of name templates (below), read left to right to import and right to left to export.
Every tensor is checked against the evim3 model it is meant for -- each used exactly once, with the right shape
-- and anything unknown or missing is an error that names the keys. The only official tensor left out is the
pre-training encoder's mask token, which never reaches an output (UNUSED).

Nothing here unpickles: the official file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from evim3.checkpoint import load_checkpoint, load_model, save_checkpoint
from evim3.config import PRESETS, ModelConfig, get_preset
from evim3.models.evim3 import EViM3
from evim3.models.pretrain import EViM3MAE
from evim3.runtime.errors import CheckpointError
from evim3.runtime.meta import ModelMeta, PreprocessSpec

Kind = Literal["finetune", "seg", "pretrain"]

# The official EchoNet-Dynamic recipe (src/datasets/echo_dynamic_dataset.py): every split is normalised with
# the TRAIN split's grey-level statistics, MEAN_GRAY / STD_GRAY (0..255 pixel units), and the EF head's output
# bias starts at _EF_MEAN_OFFSET = EF_MEAN['train'] - 0. Clips are 64 frames taken every 2nd frame of the
# 50 fps videos, resized to 112 x 112 (configs/finetune_echo_mamba_3d*.yaml: data.length, period, resize_to).
OFFICIAL_MEAN = 32.843
OFFICIAL_STD = 50.020
OFFICIAL_EF_MEAN = 55.777
OFFICIAL_FPS = 50.0
OFFICIAL_PERIOD = 2

# --- the name table -----------------------------------------------------------------------------------
# A template is a dotted name with {fields}; a field matches only the values listed here, so no two rules
# can claim the same key. Each rule is (official template, evim3 template) over the same fields.
_FIELDS = {
    "i": r"\d+",  # block index
    "j": r"\d+",  # layer index inside an nn.Sequential MLP
    "dir": "hwl|lwh|lhw",  # scan direction of a Mamba unit
    "kind": "faces|edges|corners|reg",  # Enclosure Global Token family
    "axis": "l|h|w",
    "param": "weight|bias",
    # mamba_ssm.modules.mamba_simple.Mamba's own parameter names, which evim3.modules.Mamba keeps.
    "mixer": r"(?:in_proj|conv1d|x_proj|dt_proj|out_proj)\.(?:weight|bias)|A_log|D",
}


# One Mamba-3D block, per direction a forward and a reversed unit. An official unit is a Mamba wrapper with
# n_mamba_per_block=1 (one pre-norm MambaLayer, no final norm) around mamba-ssm's Mamba ("mamba_block").
_BLOCK_RULES = (
    ("{dir}_mamba.mamba_layers.0.norm.{param}", "{dir}.norm.{param}"),
    ("r_{dir}_mamba.mamba_layers.0.norm.{param}", "{dir}_r.norm.{param}"),
    ("{dir}_mamba.mamba_layers.0.mamba_block.{mixer}", "{dir}.mixer.{mixer}"),
    ("r_{dir}_mamba.mamba_layers.0.mamba_block.{mixer}", "{dir}_r.mixer.{mixer}"),
)


def _blocks(official: str, ours: str) -> list[tuple[str, str]]:
    """A list of Mamba-3D blocks: official[i] -> ours[i]."""
    return [(official + ".{i}." + theirs, ours + ".{i}." + mine) for theirs, mine in _BLOCK_RULES]


def _encoder(ours: str) -> list[tuple[str, str]]:
    """The official VideoMamba3D ("net") onto an EViM3Encoder at `ours`."""
    return [
        ("net.patch_embed.proj.{param}", ours + ".patch_embed.proj.{param}"),
        ("net.global_{kind}_token", ours + ".global_{kind}_token"),
        ("net.{axis}_pos_embed", ours + ".{axis}_pos_embed"),
        *_blocks("net.encoder", ours + ".blocks"),
    ]


RULES: dict[str, tuple[tuple[str, str], ...]] = {
    # EchoDynamicVideoMamba3DModel: net, final (VideoMamba3DFinal, all_concat), ef_head (EchoDynamicEFHead).
    "finetune": (
        *_encoder("encoder"),
        ("final.final_norm.{param}", "head.norm.{param}"),
        ("final.final_linear.mlp.0.{param}", "head.proj.0.{param}"),  # Linear + SiLU (final_activation)
        ("ef_head.net.mlp.{j}.{param}", "head.mlp.{j}.{param}"),  # Linear, SiLU, Linear, SiLU, Linear
    ),
    # EchoDynamicVideoMamba3DSegModel: net and final (VideoMamba3DSegFinal: LayerNorm, then a Linear to the
    # 2-class logits of every pixel of a tubelet, in (class, t, p, p) order, the order SegHead reads).
    "seg": (
        *_encoder("encoder"),
        ("final.final_norm.{param}", "head.norm.{param}"),
        ("final.patch_reconstruct.{param}", "head.proj.{param}"),
    ),
    # PretrainVideoMamba3DEfficientModel: net, the decoder's positional embeddings, its
    # VideoMamba3DDecoderForPretraining (Mamba-3D blocks, LayerNorm, Linear to pixels in (C, t, p, p) order,
    # the order evim3.models.pretrain.patchify uses) and the decoder's RandomPatchMaskMaker token.
    "pretrain": (
        *_encoder("encoder"),
        ("pretrain_decoder_{axis}_pos_embed", "decoder_{axis}_pos_embed"),
        *_blocks("pretrain_decoder.decoder_blocks", "decoder_blocks"),
        ("pretrain_decoder.final_norm.{param}", "decoder_norm.{param}"),
        ("pretrain_decoder.patch_reconstruct.{param}", "decoder_pred.{param}"),
        ("decoder_random_patch_mask_maker.mask_token", "mask_token"),
    ),
}

# Official parameters that never affect an output, dropped on import. The encoder's mask token is written
# into the hidden patches and then skipped: the efficient encoder only runs the visible tokens.
UNUSED: dict[str, tuple[str, ...]] = {
    "finetune": (),
    "seg": (),
    "pretrain": ("encoder_random_patch_mask_maker.mask_token",),
}


@functools.cache
def _template_regex(template: str) -> re.Pattern:
    pieces = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(
        re.escape(piece) if k % 2 == 0 else f"(?P<{piece}>{_FIELDS[piece]})" for k, piece in enumerate(pieces)
    ))


def rename(key: str, kind: Kind, to_evim3: bool = True) -> str | None:
    """The other side's name of `key` under the `kind` table, or None when no rule covers it."""
    for official, ours in RULES[kind]:
        source, target = (official, ours) if to_evim3 else (ours, official)
        match = _template_regex(source).fullmatch(key)
        if match:
            return target.format(**match.groupdict())
    return None


def to_official(state: Mapping[str, Tensor], kind: Kind) -> dict[str, Tensor]:
    """An evim3 state dict under the official names (the table read right to left), for the tests: what an
    official checkpoint of the same weights holds (less the UNUSED keys)."""
    official = {}
    for key, tensor in state.items():
        name = rename(key, kind, to_evim3=False)
        if name is None:
            raise ValueError(f"evim3 parameter {key!r} has no official name in the {kind} table")
        official[name] = tensor
    return official


# --- reading the official file -----------------------------------------------------------------------
def _short_list(names: Iterable[str], limit: int = 10) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _resave_hint(path: str) -> str:
    out = os.path.splitext(path)[0] + ".weights.pth"
    return (
        "re-save just the weights in the official environment, and only if you trust the file: python -c "
        f"\"import torch; c = torch.load({path!r}, map_location='cpu', weights_only=False); "
        f"torch.save({{k: c[k] for k in ('model', 'ema_container') if k in c}}, {out!r})\""
    )


def _load_weights_only(path: str) -> object:
    if not os.path.isfile(path):
        raise CheckpointError(path, "file not found" if not os.path.exists(path) else "not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(path, "file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, AttributeError) as e:
        # torch.save has written zip archives since PyTorch 1.6; anything else torch tries as a legacy pickle.
        if not zipfile.is_zipfile(path):
            problem = "not a complete torch.save archive (truncated, or another format)"
            raise CheckpointError(path, f"not a readable PyTorch checkpoint: {problem}") from None
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = f" (e.g. {refused.group(1)})" if refused else ""
            raise CheckpointError(
                path,
                f"the file also pickles Python objects{what}, which evim3 will not unpickle (it reads with "
                f"torch.load(weights_only=True)); {_resave_hint(path)}",
            ) from None
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"not a readable PyTorch checkpoint ({detail})") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _unwrap_ema(container: Mapping, path: str) -> dict[str, Tensor]:
    """ema_pytorch.EMA's state dict: the averaged model under 'ema_model.', its step counters, and (with
    include_online_model=True, not the official setting) a copy of the raw model under 'online_model.'."""
    if not isinstance(container, Mapping):
        raise CheckpointError(path, f"EMA entry is a {type(container).__name__}, not an ema_pytorch EMA state dict")
    prefix = "ema_model."
    weights = {k[len(prefix):]: v for k, v in container.items() if k.startswith(prefix)}
    other = [k for k in container if not k.startswith((prefix, "online_model.")) and k not in ("initted", "step")]
    if not weights or other:
        found = _short_list(other or list(container))
        raise CheckpointError(path, f"EMA entry is not an ema_pytorch EMA state dict (keys: {found})")
    return weights


def read_official(path: str | os.PathLike, ema: bool = False) -> dict[str, Tensor]:
    """The model state dict of an official checkpoint: its 'model' entry, or with `ema` the EMA weights
    ('ema_container', or 'ema_model' in older files). A file that is itself a state dict is accepted too."""
    path = os.fspath(path)
    saved = _load_weights_only(path)
    if not isinstance(saved, Mapping):
        raise CheckpointError(path, f"holds a {type(saved).__name__}, not a checkpoint dict")
    if _is_state_dict(saved):
        if ema:
            raise CheckpointError(path, "holds a bare state dict with no EMA weights; convert without --ema")
        state = dict(saved)
    elif ema:
        container = next((saved[k] for k in ("ema_container", "ema_model") if saved.get(k) is not None), None)
        if container is None:
            raise CheckpointError(
                path, "has no EMA weights (its 'ema_container' is empty: trained with model.ema.ema_enabled="
                "False); convert without --ema")
        state = _unwrap_ema(container, path)
    elif "model" in saved:
        state = saved["model"]
    else:
        raise CheckpointError(
            path, f"has no 'model' entry (top-level keys: {_short_list(map(str, saved))}); "
            "not a checkpoint of the official trainer")
    if not _is_state_dict(state):
        raise CheckpointError(path, "its model entry is not a state dict of named tensors")
    # A model saved while still wrapped in DistributedDataParallel carries 'module.' on every key.
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# --- checking and converting ---------------------------------------------------------------------------
def detect_kind(keys: Iterable[str], path: str | None = None) -> Kind:
    """'finetune' for the EF model (EF head present), 'seg' for the segmentation model (its patch
    reconstruction head present), 'pretrain' for the MAE (pre-training decoder present)."""
    keys = list(keys)
    has_head = any(k.startswith(("final.", "ef_head.")) for k in keys)
    has_seg_head = any(k.startswith("final.patch_reconstruct.") for k in keys)
    has_decoder = any(k.startswith("pretrain_decoder") for k in keys)
    if has_head and not has_decoder:
        # A file with both heads is refused by the key check (the seg table has no ef_head.* rule).
        return "seg" if has_seg_head else "finetune"
    if has_decoder and not has_head:
        return "pretrain"
    both, conj = ("both", "and") if has_head else ("neither", "nor")
    raise CheckpointError(
        path, f"not an official E-ViM3 model: it has {both} an EF or segmentation head (final.*, ef_head.*) "
        f"{conj} a pre-training decoder (pretrain_decoder*)")


Geometry = tuple[int, int, int, int, tuple[int, int, int]]  # dim, channels, time patch, patch, padded grid


def _config_geometry(cfg: ModelConfig) -> Geometry:
    return (cfg.dim, cfg.in_channels, cfg.time_patch, cfg.patch, cfg.padded_grid)


def official_geometry(official: Mapping[str, Tensor]) -> Geometry | None:
    """Width, patch and padded token grid read from the patch embedding and positional embeddings, or None
    when those tensors are absent or malformed (the key check then reports them)."""
    conv = official.get("net.patch_embed.proj.weight")
    pos = [official.get(f"net.{a}_pos_embed") for a in "lhw"]
    if conv is None or conv.dim() != 5 or any(p is None or p.dim() != 5 for p in pos):
        return None
    dim, channels, time_patch, patch, _ = conv.shape
    grid = (pos[0].shape[1], pos[1].shape[2], pos[2].shape[3])
    return (dim, channels, time_patch, patch, grid)


def _describe(geometry: Geometry) -> str:
    dim, channels, time_patch, patch, grid = geometry
    return (f"D={dim}, patch {time_patch}x{patch}x{patch}, {channels} channel(s), "
            f"padded token grid {'x'.join(map(str, grid))}")


def check_geometry(official: Mapping[str, Tensor], cfg: ModelConfig, preset: str | None = None,
                   path: str | None = None) -> None:
    """Refuse a checkpoint whose model is another geometry than `cfg` (preset `preset`), naming both."""
    found = official_geometry(official)
    wanted = _config_geometry(cfg)
    if found is None or found == wanted:
        return
    asked = f"preset {preset!r}" if preset else "the requested config"
    matches = [name for name, c in PRESETS.items() if _config_geometry(c) == found]
    if matches:
        raise CheckpointError(
            path, f"checkpoint holds an {matches[0]!r} model ({_describe(found)}), not {asked} "
            f"({_describe(wanted)}): use --preset {matches[0]}")
    raise CheckpointError(
        path, f"checkpoint's model ({_describe(found)}) matches no evim3 preset; {asked} is {_describe(wanted)}")


def build_target(cfg: ModelConfig, kind: Kind) -> nn.Module:
    """The evim3 model an official model of `kind` converts into: EViM3 (EF or seg) or EViM3MAE."""
    if kind == "finetune":
        return EViM3(cfg, task="ef", ef_mean=OFFICIAL_EF_MEAN)
    if kind == "seg":
        return EViM3(cfg, task="seg")
    return EViM3MAE(cfg)


def convert_state_dict(
    official: Mapping[str, Tensor], cfg: ModelConfig, preset: str | None = None, path: str | None = None
) -> tuple[Kind, dict[str, Tensor]]:
    """Official state dict -> (kind, evim3 state dict for build_target(cfg, kind)). Every official tensor
    must land on exactly one evim3 parameter of the same shape and every evim3 parameter must be filled."""
    kind = detect_kind(official, path)
    check_geometry(official, cfg, preset, path)
    template = build_target(cfg, kind).state_dict()
    converted: dict[str, Tensor] = {}
    unknown = []
    for key, tensor in official.items():
        if key in UNUSED[kind]:
            continue
        ours = rename(key, kind)
        if ours is None or ours not in template:
            unknown.append(key)
        else:
            converted[ours] = tensor
    missing = [rename(k, kind, to_evim3=False) or k for k in template if k not in converted]
    mismatched = [
        f"{rename(k, kind, to_evim3=False)} {tuple(v.shape)} {str(v.dtype)[6:]} "
        f"(expected {tuple(template[k].shape)} float)"
        for k, v in converted.items() if v.shape != template[k].shape or not v.is_floating_point()
    ]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s), not in the official {kind} model: {_short_list(unknown)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_short_list(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) of the wrong shape or type: {_short_list(mismatched)}")
    if problems:
        raise CheckpointError(path, "; ".join(problems))
    # Official weights are float32 (bf16 autocast leaves parameters in float32); anything else is cast.
    return kind, {k: converted[k].to(template[k].dtype) for k in template}


# --- the whole conversion -------------------------------------------------------------------------------
def official_preprocess(cfg: ModelConfig, mean: float = OFFICIAL_MEAN, std: float = OFFICIAL_STD) -> PreprocessSpec:
    """The official data pipeline as an evim3 PreprocessSpec (the clip length is the model's)."""
    if not std > 0:
        raise ValueError(f"--std must be positive, got {std}")
    return PreprocessSpec(size=cfg.img_size, fps=OFFICIAL_FPS, frames=cfg.frames, period=OFFICIAL_PERIOD,
                          mean=mean, std=std)


def convert_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    preset: str,
    ema: bool = False,
    mean: float = OFFICIAL_MEAN,
    std: float = OFFICIAL_STD,
) -> tuple[Kind, ModelMeta, str]:
    """Convert the official checkpoint `source` into the evim3 checkpoint `out` (".safetensors" is added when
    missing): an EF model for `evim3 eval/export/infer`, or a pre-training model (EViM3MAE, what `evim3 train
    pretrain` writes) for `evim3 train finetune --init`, or an LV segmentation model. Returns (kind, metadata, path written); the written
    file is read back and loaded strictly."""
    source, out = os.fspath(source), os.fspath(out)
    if not out.endswith(".safetensors"):
        out += ".safetensors"
    cfg = get_preset(preset)
    spec = official_preprocess(cfg, mean, std)
    kind, state = convert_state_dict(read_official(source, ema), cfg, preset, path=source)
    provenance = {"converted_from": os.path.basename(source), "weights": "ema" if ema else "model"}
    # Pre-training checkpoints carry the EF task and data['stage'] = 'pretrain', as evim3's own do.
    meta = ModelMeta(
        preset=preset, model=cfg.to_dict(), preprocess=spec, task="seg" if kind == "seg" else "ef",
        ef_mean=OFFICIAL_EF_MEAN if kind == "finetune" else None,
        data={"stage": "pretrain" if kind == "pretrain" else "finetune", **provenance},
    )
    save_checkpoint(out, state, meta)
    try:  # read back as its users will; a file that does not load is not left behind
        if kind != "pretrain":
            load_model(out, preset=preset)
        else:
            build_target(cfg, kind).load_state_dict(load_checkpoint(out)[0], strict=True)
    except Exception:
        for written in (out, os.path.splitext(out)[0] + ".json"):
            if os.path.exists(written):
                os.remove(written)
        raise
    return kind, meta, out
