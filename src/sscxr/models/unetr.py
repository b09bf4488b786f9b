"""2D UNETR: the timm ViT encoder with a convolutional decoder built from MONAI's UNETR blocks.

Hatamizadeh et al. (UNETR, WACV 2022) read the token outputs of four evenly spaced blocks of a 12-block
ViT (3, 6, 9, 12), reshape them to the patch grid and bring each back towards the input resolution with
transposed convolutions; a U-Net-like decoder merges them, from the deepest (the final, normed tokens)
to a full-resolution convolutional stem on the image itself.

Here nothing is fixed to ViT-B/16 at 96^3: the number of up-sampling levels is log2(patch size) (4 for
16-pixel patches, 3 for 8-pixel ones), so the decoder ends exactly at the input resolution, and the ViT
blocks read are spread evenly over the encoder's depth (`skip_blocks`). Level `l` of the decoder works at
1 / 2^l of the input resolution with `feature_size * 2^l` channels, as in MONAI's UNETR.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sscxr.engine.distributed import precision_autocast
from sscxr.errors import CheckpointError
from sscxr.models.loading import (
    Normalization,
    model_files,
    read_model_meta,
    read_safetensors,
    write_model_files,
)
from sscxr.models.vit import ViTConfig, build_vit, vit_config_from_dict

__all__ = [
    "SEGMENTER_FORMAT",
    "UNETR",
    "Segmenter",
    "SegmenterSpec",
    "build_unetr",
    "export_segmenter",
    "load_segmenter",
    "lung_probability",
    "n_levels",
    "skip_blocks",
]


def n_levels(patch_size: int) -> int:
    """Up-sampling levels from the patch grid to the input: log2(patch_size) (16 -> 4).

    Raises:
        ValueError: patch_size is not a power of two >= 2 (the decoder doubles the resolution per level).
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 2:
        raise ValueError(f"patch_size must be a power of two >= 2, got {patch_size!r}")
    if patch_size & (patch_size - 1):
        raise ValueError(f"patch_size must be a power of two (the decoder doubles per level): {patch_size}")
    return int(math.log2(patch_size))


def skip_blocks(depth: int, n: int = 4) -> tuple[int, ...]:
    """`n` evenly spaced 1-based block indices ending at the last block: round(k * depth / n), k = 1..n.

    depth 12, n 4 -> (3, 6, 9, 12) (the paper's UNETR); depth 6 -> (2, 3, 5, 6); depth 12, n 3 ->
    (4, 8, 12); depth 4, n 4 -> (1, 2, 3, 4).

    Raises:
        ValueError: n < 1 or depth < n (the blocks would repeat).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if depth < n:
        raise ValueError(f"a depth-{depth} encoder has fewer blocks than the {n} skip features needed")
    # floor(x + 0.5) rather than round(): Python's round() goes to even (4.5 -> 4) and would bunch blocks.
    return tuple(math.floor(k * depth / n + 0.5) for k in range(1, n + 1))


def _check_blocks(blocks: Sequence[int], depth: int, levels: int) -> tuple[int, ...]:
    out = tuple(int(b) for b in blocks)
    if len(out) != levels:
        raise ValueError(f"skip_blocks needs {levels} blocks (log2 of the patch size), got {out}")
    if any(b2 <= b1 for b1, b2 in itertools.pairwise(out)) or out[0] < 1:
        raise ValueError(f"skip_blocks must be strictly increasing and 1-based, got {out}")
    if out[-1] != depth:
        # Blocks after the deepest one read would get no gradient (and DDP would fail on them).
        raise ValueError(f"the last skip block must be the encoder's last block ({depth}), got {out}")
    return out


class UNETR(nn.Module):
    """ViT encoder + UNETR decoder; logits at the input resolution.

    Args:
        encoder: timm `VisionTransformer` with one prefix (class) token, e.g. from `build_vit`; stored as
            `self.encoder` so that its weights sit under the `encoder.` prefix.
        out_channels: output channels (2: background / lung logits for softmax; 1: a sigmoid logit).
        feature_size: channels of the full-resolution level; level l has feature_size * 2^l.
        blocks: 1-based ViT blocks read, shallowest first, len = log2(patch), last = depth;
            None = `skip_blocks(depth, log2(patch))`.
        norm_name: normalisation of the decoder's convolutions ("instance", "batch", ...; MONAI names).
        res_block: residual convolution blocks (MONAI's UNETR default).
        normalization: the intensity standardisation the encoder expects, kept as buffers and applied
            in `forward`, so the model takes [0, 1] images like every sscxr model; None = identity.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        out_channels: int = 2,
        feature_size: int = 16,
        blocks: Sequence[int] | None = None,
        norm_name: str = "instance",
        res_block: bool = True,
        normalization: Normalization | None = None,
    ) -> None:
        super().__init__()
        if out_channels < 1 or feature_size < 1:
            raise ValueError(
                f"out_channels and feature_size must be >= 1, got {out_channels}, {feature_size}"
            )
        if encoder.num_prefix_tokens != 1 or encoder.cls_token is None:
            raise ValueError("the encoder must have exactly one prefix token, the class token")
        patch = encoder.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"square patches only, got {tuple(patch)}")
        self.patch_size = int(patch[0])
        self.levels = n_levels(self.patch_size)
        depth = len(encoder.blocks)
        self.blocks = _check_blocks(
            skip_blocks(depth, self.levels) if blocks is None else blocks, depth, self.levels
        )
        self.img_size = tuple(int(s) for s in encoder.patch_embed.img_size)
        self.in_chans = int(encoder.patch_embed.proj.in_channels)
        self.encoder = encoder
        self.out_channels, self.feature_size = out_channels, feature_size
        self._build_decoder(int(encoder.embed_dim), norm_name, res_block)
        norm = normalization or Normalization(mean=0.0, std=1.0)
        self.register_buffer("norm_mean", torch.tensor(float(norm.mean), dtype=torch.float64))
        self.register_buffer("norm_std", torch.tensor(float(norm.std), dtype=torch.float64))

    def set_normalization(self, norm: Normalization) -> None:
        """Replace the standardisation (e.g. with a pre-trained encoder's, after loading its weights)."""
        with torch.no_grad():
            self.norm_mean.fill_(float(norm.mean))
            self.norm_std.fill_(float(norm.std))

    def _build_decoder(self, hidden: int, norm: str, res: bool) -> None:
        fs, levels = self.feature_size, self.levels
        # Level 0: a convolution on the image itself (fine detail the 16-pixel patches cannot carry).
        self.stem = UnetrBasicBlock(
            2, self.in_chans, fs, kernel_size=3, stride=1, norm_name=norm, res_block=res
        )
        # Skip j (1..levels-1) comes from block blocks[j-1] at the patch grid and goes up levels-j times
        # to level j: one transposed convolution plus (levels-j-1) more (conv blocks between them).
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(
                2,
                hidden,
                fs * 2**j,
                num_layer=levels - j - 1,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name=norm,
                conv_block=True,
                res_block=res,
            )
            for j in range(1, levels)
        )
        # ups[l] takes level l+1 to level l and merges skip l; the deepest input is the final tokens.
        self.ups = nn.ModuleList(
            UnetrUpBlock(
                2,
                hidden if lvl == levels - 1 else fs * 2 ** (lvl + 1),
                fs * 2**lvl,
                kernel_size=3,
                upsample_kernel_size=2,
                norm_name=norm,
                res_block=res,
            )
            for lvl in range(levels)
        )
        self.head = UnetOutBlock(2, fs, self.out_channels)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """ViT features on the patch grid, shallowest first.

        Args:
            x: (B, C, H, W) standardised images.

        Returns:
            `levels` tensors (B, D, H / patch, W / patch): the raw outputs of `blocks[:-1]`, then the
            final block's output after the encoder's LayerNorm (as MONAI's UNETR).
        """
        inter: list[torch.Tensor] = []
        if self.levels > 1:
            final, inter = self.encoder.forward_intermediates(
                x, indices=[b - 1 for b in self.blocks[:-1]], norm=False, output_fmt="NCHW"
            )
        else:  # patch 2: only the final tokens
            final = self.encoder.forward_features(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = final[:, self.encoder.num_prefix_tokens :]  # (B, N, D), class token dropped
        deepest = tokens.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return [*inter, deepest]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch.

        Args:
            x: (B, C, H, W) intensities in [0, 1] (standardised here), (H, W) = the encoder's img_size.

        Returns:
            (B, out_channels, H, W) logits.
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"expected input (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), "
                f"got {tuple(x.shape)}; resize images to the model's img_size first"
            )
        x = (x - self.norm_mean) / self.norm_std
        feats = self.encode(x)
        skips = [self.stem(x)] + [up(f) for up, f in zip(self.skips, feats[:-1], strict=True)]
        y = feats[-1]
        for lvl in reversed(range(self.levels)):
            y = self.ups[lvl](y, skips[lvl])
        return self.head(y)


def lung_probability(logits: torch.Tensor) -> torch.Tensor:
    """Foreground probability from UNETR logits.

    Args:
        logits: (B, 2, H, W) background / lung logits (softmax) or (B, 1, H, W) lung logit (sigmoid).

    Returns:
        (B, H, W) float32 probabilities of "lung".
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    if logits.shape[1] == 2:
        return torch.softmax(logits, dim=1)[:, 1]
    raise ValueError(f"expected 1 or 2 output channels, got {logits.shape[1]}")


# ------------------------------------------------------------------------------ export and loading
SEGMENTER_FORMAT = "sscxr-segmenter"
SEGMENTER_VERSION = 1


@dataclass(frozen=True)
class SegmenterSpec:
    """Everything needed to rebuild a trained segmenter and feed it images the way it was trained.

    Attributes:
        vit: the encoder's architecture (img_size = the model's input side).
        normalization: (x - mean) / std applied to [0, 1] pixels before the model.
        out_channels, feature_size, blocks, norm_name, res_block: `UNETR` arguments (blocks resolved).
        fit: how images were fitted into the square training frame ("stretch" or "pad", as the cache).
        threshold: probability above which a pixel is lung.
    """

    vit: ViTConfig
    normalization: Normalization
    out_channels: int = 2
    feature_size: int = 16
    blocks: tuple[int, ...] = ()
    norm_name: str = "instance"
    res_block: bool = True
    fit: str = "stretch"
    threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the `model.json` written next to the weights, minus format and extras)."""
        d = dataclasses.asdict(self)
        d["vit"], d["blocks"] = self.vit.to_dict(), list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmenterSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["vit"] = vit_config_from_dict(d["vit"])
        kw["normalization"] = Normalization(**d["normalization"])
        kw["blocks"] = tuple(int(b) for b in d.get("blocks", ()))
        return cls(**kw)


def build_unetr(spec: SegmenterSpec) -> UNETR:
    """A freshly initialised UNETR of `spec` (encoder from `build_vit(spec.vit)`)."""
    return UNETR(
        build_vit(spec.vit),
        spec.out_channels,
        spec.feature_size,
        spec.blocks or None,
        spec.norm_name,
        spec.res_block,
        spec.normalization,
    )


def export_segmenter(
    state: dict[str, torch.Tensor], spec: SegmenterSpec, path: str | Path, extra: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write `<path>.safetensors` (the UNETR state_dict) and `<path>.json` (format, spec, extras).

    The JSON is written last: its presence means the export is complete. Returns both paths.
    """
    meta = {
        "format": SEGMENTER_FORMAT,
        "version": SEGMENTER_VERSION,
        **spec.to_dict(),
        "img_size": spec.vit.img_size,
        "extra": dict(extra or {}),
    }
    return write_model_files(path, state, meta)


def _segmenter_files(path: Path) -> tuple[Path, Path]:
    from sscxr.models.bundle import component_path

    return model_files(component_path(path, "segmenter") or path)


def load_segmenter(path: str | Path) -> Segmenter:
    """Load an exported segmenter: a run folder (holding `model.json`), a bundle with a segmenter, or the
    export's files / base name.

    Raises:
        CheckpointError: files missing or unreadable, not an sscxr segmenter, or weights that do not fit.
    """
    weights, meta_path = _segmenter_files(Path(path))
    if not meta_path.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{path}: no segmenter export ({meta_path.name} + {weights.name}); pass a run folder of "
            "`sscxr segment train` (written when training ends) or its model.json"
        )
    meta = read_model_meta(meta_path, SEGMENTER_FORMAT, SEGMENTER_VERSION, "segmenter")
    spec = SegmenterSpec.from_dict(meta)
    model = build_unetr(spec)
    state = read_safetensors(weights)
    result = model.load_state_dict(state, strict=False)
    # Exports written before the model carried its standardisation lack the two buffers: build_unetr
    # filled them from model.json's normalization, which is what those models were trained with.
    missing = [k for k in result.missing_keys if k not in ("norm_mean", "norm_std")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{weights}: does not fit the model of {meta_path.name}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return Segmenter(model.eval(), spec, meta)


class Segmenter:
    """A trained UNETR plus its input conventions: [0, 1] images in, lung probabilities out.

    Args:
        model: the network (put in eval mode by the caller or `load_segmenter`).
        spec: how it was built and trained.
        meta: the export's JSON (provenance), if any.
    """

    def __init__(self, model: UNETR, spec: SegmenterSpec, meta: dict[str, Any] | None = None) -> None:
        self.model, self.spec, self.meta = model, spec, dict(meta or {})
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> Segmenter:
        """Move the network to `device`; returns self."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, precision: str = "auto") -> torch.Tensor:
        """Lung probabilities at the images' own resolution.

        Args:
            images: (B, 1, H, W) float in [0, 1], already fitted into a square frame like the training
                cache (`fit`); resized (bilinear, antialiased) to the model's img_size when H, W differ.
            precision: "auto" | "bf16" | "fp16" | "fp32" (`precision_autocast`, the training policy).

        Returns:
            (B, H, W) float32 probabilities on the CPU.
        """
        size = self.spec.vit.img_size
        x = images.to(self.device, torch.float32)
        hw = tuple(x.shape[-2:])
        if hw != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        with precision_autocast(self.device, precision):  # the model standardises itself
            prob = lung_probability(self.model(x))
        if hw != (size, size):
            prob = F.interpolate(prob[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]
        return prob.float().cpu()
