"""The ViT encoder: a typed config, named presets and a builder around timm's `VisionTransformer`.

timm's class is used as is (class token, learned position embeddings, LayerNorm eps 1e-6) so that
external timm / DeiT checkpoints load into it key for key, and `forward_intermediates` gives the
per-block token outputs that GMML and UNETR read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = [
    "ARCH_FIELDS",
    "VIT_PRESETS",
    "ViTConfig",
    "build_vit",
    "infer_vit_arch",
    "set_fused_attn",
    "vit_config_from_dict",
    "vit_preset",
]

# The fields that decide the shapes of the weights (the others are regularisation or kernels).
ARCH_FIELDS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "in_chans",
)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of the ViT encoder (defaults: the paper's ViT-S/16 at 256 px, one grey channel).

    Args:
        img_size: square input side in pixels; must be a multiple of patch_size.
        patch_size: square patch side in pixels.
        embed_dim: token width; must be a multiple of num_heads.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias: bias on the qkv projection.
        drop_path_rate: stochastic depth rate of the last block (linearly increasing), in [0, 1).
        in_chans: input channels (1 for X-rays).
        fused_attn: force scaled_dot_product_attention on (True) or off (False); None keeps timm's default.
    """

    img_size: int = 256
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    in_chans: int = 1
    fused_attn: bool | None = None

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be a multiple of num_heads ({self.num_heads})"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.fused_attn is not None and not isinstance(self.fused_attn, bool):
            raise ValueError(f"fused_attn must be True, False or None, got {self.fused_attn!r}")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON / YAML ready)."""
        return dataclasses.asdict(self)


VIT_PRESETS: dict[str, ViTConfig] = {
    # Small enough to pre-train on two CPU cores at 128 px (64 tokens) for smoke runs and tests.
    "tiny_cpu": ViTConfig(
        img_size=128, patch_size=16, embed_dim=192, depth=6, num_heads=3, drop_path_rate=0.0
    ),
    "vit_tiny": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    # The paper's encoder: ViT-S/16.
    "vit_small": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ViTConfig(embed_dim=768, depth=12, num_heads=12),
}


def vit_preset(name: str, **overrides: Any) -> ViTConfig:
    """A preset with some fields replaced, e.g. `vit_preset("vit_small", img_size=224)`."""
    if name not in VIT_PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; known: {sorted(VIT_PRESETS)}")
    return dataclasses.replace(VIT_PRESETS[name], **overrides)


def vit_config_from_dict(data: dict[str, Any]) -> ViTConfig:
    """Build a `ViTConfig` from a dict (a JSON / YAML section), rejecting unknown keys.

    A `"preset"` key, if present, is the starting point and the other keys override it.
    """
    data = dict(data)
    base = VIT_PRESETS[data.pop("preset")] if "preset" in data else ViTConfig()
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown ViT config keys {unknown}; known: {sorted(known)}")
    return dataclasses.replace(base, **data)


def set_fused_attn(model: nn.Module, fused: bool) -> int:
    """Switch every timm `Attention` in `model` to fused (SDPA) or explicit attention.

    Explicit attention is needed when attention maps are read by hooks. Returns the number of
    attention modules changed.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, Attention) or hasattr(module, "fused_attn"):
            module.fused_attn = fused
            count += 1
    return count


def build_vit(cfg: ViTConfig) -> VisionTransformer:
    """The encoder: timm `VisionTransformer` with a class token, learned position embeddings and no head.

    Args:
        cfg: architecture.

    Returns:
        A model whose `forward(x: (B, in_chans, S, S))` gives the class token's features (B, embed_dim),
        and whose `forward_features` gives all tokens (B, 1 + N, embed_dim).
    """
    model = VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=0,
        global_pool="token",
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        class_token=True,
        pos_embed="learn",
        drop_path_rate=cfg.drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    if cfg.fused_attn is not None:
        set_fused_attn(model, cfg.fused_attn)
    return model


def infer_vit_arch(encoder: VisionTransformer) -> dict[str, Any]:
    """The `ARCH_FIELDS` of a built timm ViT, read from its modules (used to check weight files)."""
    encoder = getattr(encoder, "_orig_mod", encoder)  # torch.compile wrapper
    patch = encoder.patch_embed
    block = encoder.blocks[0]
    img = patch.img_size
    return {
        "img_size": int(img[0]) if img[0] == img[1] else tuple(int(v) for v in img),
        "patch_size": int(patch.patch_size[0]),
        "embed_dim": int(encoder.embed_dim),
        "depth": len(encoder.blocks),
        "num_heads": int(block.attn.num_heads),
        "mlp_ratio": block.mlp.fc1.out_features / block.mlp.fc1.in_features,
        "qkv_bias": block.attn.qkv.bias is not None,
        "in_chans": int(patch.proj.in_channels),
    }
