"""GMML model: a ViT encoder, the mean of some blocks' tokens, and a light per-token decoder.

Only the encoder is kept after pre-training (see `models/loading.py`); the decoder exists to make the
encoder's tokens carry enough of the image to reconstruct the corrupted regions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["GMMLModel", "LightDecoder", "default_recon_blocks", "masked_l1_loss"]


def default_recon_blocks(depth: int) -> tuple[int, ...]:
    """Four evenly spaced blocks over the last half of the encoder, 1-based.

    depth 12 -> (6, 8, 10, 12) as in the paper; depth 6 -> (3, 4, 5, 6); duplicates are removed for very
    shallow encoders (depth 4 -> (2, 3, 4)).
    """
    if depth < 1:
        raise ValueError(f"depth must be positive, got {depth}")
    lo = max(1, depth // 2)
    picks = {math.floor(lo + k * (depth - lo) / 3 + 0.5) for k in range(4)}
    return tuple(sorted(picks))


class LightDecoder(nn.Module):
    """Per-token MLP then a patch-sized transposed convolution back to pixels.

    Linear(D, hidden) + GELU, Linear(hidden, hidden) + GELU, Linear(hidden, bottleneck), applied to each
    token; the (gh, gw) token grid is turned into an image by ConvTranspose2d(bottleneck, out_chans,
    kernel=patch, stride=patch).
    """

    def __init__(
        self, embed_dim: int, patch_size: int, hidden: int = 2048, bottleneck: int = 256, out_chans: int = 1
    ) -> None:
        super().__init__()
        for name, value in (
            ("embed_dim", embed_dim),
            ("patch_size", patch_size),
            ("hidden", hidden),
            ("bottleneck", bottleneck),
            ("out_chans", out_chans),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.patch_size = patch_size
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.to_pixels = nn.ConvTranspose2d(bottleneck, out_chans, kernel_size=patch_size, stride=patch_size)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Decode patch tokens.

        Args:
            tokens: (B, N, D) patch tokens in row-major grid order, N = gh * gw.
            grid: (gh, gw).

        Returns:
            (B, out_chans, gh * patch, gw * patch).
        """
        b, n, _ = tokens.shape
        gh, gw = grid
        if n != gh * gw:
            raise ValueError(f"{n} tokens do not fill a {gh}x{gw} grid")
        z = self.mlp(tokens)  # (B, N, bottleneck)
        z = z.transpose(1, 2).reshape(b, -1, gh, gw)
        return self.to_pixels(z)


class GMMLModel(nn.Module):
    """Encoder + reconstruction features + light decoder.

    Args:
        encoder: timm `VisionTransformer` (from `build_vit`); kept as `self.encoder` so its weights are
            found under the `encoder.` prefix.
        recon_blocks: 1-based indices of the blocks whose token outputs are averaged; None gives
            `default_recon_blocks(depth)` ((6, 8, 10, 12) for depth 12).
        hidden: decoder MLP width.
        bottleneck: decoder bottleneck width.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        recon_blocks: Sequence[int] | None = None,
        hidden: int = 2048,
        bottleneck: int = 256,
    ) -> None:
        super().__init__()
        depth = len(encoder.blocks)
        blocks = tuple(default_recon_blocks(depth) if recon_blocks is None else recon_blocks)
        if not blocks:
            raise ValueError("recon_blocks must name at least one block")
        if any(not 1 <= i <= depth for i in blocks):
            raise ValueError(f"recon_blocks are 1-based and must be within 1..{depth}, got {blocks}")
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"recon_blocks must not repeat a block, got {blocks}")
        if encoder.num_prefix_tokens != 1 or encoder.cls_token is None:
            raise ValueError("the encoder must have exactly one prefix token, the class token")
        self.encoder = encoder
        self.recon_blocks = tuple(sorted(blocks))
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.decoder = LightDecoder(encoder.embed_dim, self.patch_size, hidden, bottleneck, out_chans=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction features: mean of the chosen blocks' patch tokens, then the final norm.

        Args:
            x: (B, 1, H, W) corrupted standardised images.

        Returns:
            (B, N, D) patch tokens (class token dropped), N = (H / patch) * (W / patch).
        """
        # One pass through the blocks; stop_early skips the blocks after the last one read.
        outs = self.encoder.forward_intermediates(
            x,
            indices=[i - 1 for i in self.recon_blocks],
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        mean = torch.stack(outs, dim=0).mean(dim=0)
        return self.encoder.norm(mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct the clean image.

        Args:
            x: (B, 1, H, W) corrupted standardised images, H and W multiples of the patch size.

        Returns:
            (B, 1, H, W) reconstruction in standardised units.
        """
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return self.decoder(self.forward_features(x), grid)


def masked_l1_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    denominator: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean absolute error over the masked pixels only (GMML eq. 1).

    Args:
        pred: (B, C, H, W) reconstruction.
        target: (B, C, H, W) clean image.
        mask: bool or {0, 1}, broadcastable to pred (e.g. (B, 1, H, W)); True where a pixel was corrupted.
        denominator: number of masked values to divide by. Default: this batch's count. In multi-process
            training pass the all-reduced global count / world size so that averaging the gradients
            over processes gives the single-process loss.

    Returns:
        Scalar loss; 0 (with zero gradients) when nothing is masked.
    """
    mask = mask.bool().expand_as(pred)
    # where (not multiply) so that an infinite error outside the mask cannot turn into 0 * inf = nan.
    err = torch.where(mask, (pred - target).abs(), torch.zeros((), dtype=pred.dtype, device=pred.device))
    if denominator is None:
        denominator = mask.sum()
    denom = torch.as_tensor(denominator, dtype=err.dtype, device=err.device)
    # An empty mask has a zero numerator too: divide by 1 rather than produce nan.
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return err.sum() / denom
