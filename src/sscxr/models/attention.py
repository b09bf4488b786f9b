"""Attention maps of a timm ViT, read with hooks: the last block's class-token attention and attention
rollout (Abnar & Zuidema, 2020), the heat maps of the paper's Figure 4.

The hooks sit on each block's `attn.qkv` projection and recompute the attention probabilities
softmax(q k^T / sqrt(d)) from its output, so they work while timm runs the fused attention kernel
(`F.scaled_dot_product_attention`, which never materialises the probabilities) and leave the model as
it is: no switch to the slow path, no patched forward, nothing left behind when the context exits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, VisionTransformer

__all__ = ["attention_rollout", "capture_attention", "last_block_attention", "patch_maps_to_image"]


@contextmanager
def capture_attention(encoder: VisionTransformer) -> Iterator[list[torch.Tensor]]:
    """Record every block's attention probabilities during the forwards run inside the context.

    Yields:
        A list that fills with one (B, heads, T, T) float32 tensor per block and forward, in block
        order (T = prefix tokens + patches). The hooks are removed when the context exits, also on error.

    Raises:
        TypeError: a block's attention is not timm's standard `Attention` (its q / k layout is unknown).
    """
    maps: list[torch.Tensor] = []
    handles = []

    def hook_for(attn: Attention):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], qkv: torch.Tensor) -> None:
            b, t, _ = qkv.shape
            q, k, _v = qkv.reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = attn.q_norm(q).float(), attn.k_norm(k).float()
            maps.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).detach())

        return hook

    try:
        for i, block in enumerate(encoder.blocks):
            attn = block.attn
            if not isinstance(attn, Attention):
                raise TypeError(f"block {i}: attention {type(attn).__name__} is not timm's Attention")
            handles.append(attn.qkv.register_forward_hook(hook_for(attn)))
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def last_block_attention(maps: list[torch.Tensor], num_prefix_tokens: int) -> torch.Tensor:
    """The class token's attention to the patches in the last block, mean over heads.

    Args:
        maps: `capture_attention`'s list for one forward (one (B, heads, T, T) tensor per block).
        num_prefix_tokens: class (and register) tokens before the patches; the class token is first.

    Returns:
        (B, N) attention weights on the N patches (they sum to at most 1: the rest is on prefix tokens).
    """
    return maps[-1].mean(dim=1)[:, 0, num_prefix_tokens:]


def attention_rollout(
    maps: list[torch.Tensor], num_prefix_tokens: int, residual: float = 0.5
) -> torch.Tensor:
    """Attention rollout: how much each patch flows into the class token through all blocks.

    Each block's head-averaged attention A is mixed with the identity for the residual connection,
    Â = residual * I + (1 - residual) * A, rows renormalised to 1, and the blocks are chained,
    R = Â_L ... Â_2 Â_1 (Abnar & Zuidema, 2020).

    Args:
        maps: one (B, heads, T, T) tensor per block, in order.
        num_prefix_tokens: tokens before the patches; the class token is first.
        residual: weight of the identity (0.5 in the paper).

    Returns:
        (B, N) the class token's row of R, over the N patches.
    """
    a0 = maps[0]
    eye = torch.eye(a0.shape[-1], dtype=a0.dtype, device=a0.device)
    rollout = eye.expand(a0.shape[0], -1, -1)
    for attn in maps:
        mixed = residual * eye + (1 - residual) * attn.mean(dim=1)
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    return rollout[:, 0, num_prefix_tokens:]


def patch_maps_to_image(weights: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Patch weights as images: reshaped to the patch grid, up-sampled (bilinear) and scaled to [0, 1].

    Args:
        weights: (B, N) with N = grid[0] * grid[1], patches in row-major order.
        grid: (rows, cols) of the patch grid.
        size: (H, W) of the output.

    Returns:
        (B, H, W) float32, each map min-max scaled to [0, 1] (all zeros where a map is constant).
    """
    b = weights.shape[0]
    up = F.interpolate(weights.float().reshape(b, 1, *grid), size=size, mode="bilinear", align_corners=False)
    flat = up.reshape(b, -1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(b, *size)
