"""MAE model (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"): a ViT encoder that sees
only the visible patches, and a light transformer decoder that predicts the pixels of the masked ones.

The encoder is the timm `VisionTransformer` of `build_vit`, used as it is (its own patch_embed,
pos_embed, cls_token, blocks and norm; only the order of operations changes: the position embeddings are
added before the masked patches are dropped). Its state_dict therefore has exactly timm's keys, so
`export_encoder` writes an export that fine-tuning and the probe load like a GMML one. The decoder
(`decoder_*` and `mask_token`) is thrown away after pre-training.

Which patches are masked is decided by per-patch uniform noise given by the caller (`mask_noise`, drawn
in the dataset per (seed, epoch, row)): the `keep = int(L * (1 - mask_ratio))` patches with the smallest
noise are visible, the same number for every image.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

__all__ = [
    "NORM_PIX_EPS",
    "MAEModel",
    "MAEOutput",
    "masked_patch_mse",
    "num_visible",
    "patch_mse",
    "patch_targets",
    "patchify",
    "random_masking",
    "sincos_pos_embed_2d",
    "unpatchify",
]

#: eps of the per-patch normalisation of `norm_pix_loss` (as the reference implementation).
NORM_PIX_EPS = 1e-6


class MAEOutput(NamedTuple):
    """What `MAEModel.forward` returns.

    Attributes:
        loss: scalar, the mean squared error over the masked patches (float32).
        pred: (B, L, p * p * C) predicted patches in `patchify` order (normalised patch units when
            `norm_pix_loss`), for every patch, visible ones included (the loss ignores those).
        mask: (B, L) bool, True where a patch was masked (hidden from the encoder).
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into flattened non-overlapping patches, in the row-major order of the ViT's tokens.

    Args:
        images: (B, C, H, W), H and W multiples of `patch_size`.
        patch_size: p.

    Returns:
        (B, L, p * p * C) with L = (H / p) * (W / p); within a patch the values are ordered (row, column,
        channel), as in the reference implementation.
    """
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of `patchify`.

    Args:
        patches: (B, L, p * p * C).
        patch_size: p.
        grid: (gh, gw) with gh * gw = L; None = a square grid.

    Returns:
        (B, C, gh * p, gw * p).
    """
    b, n, d = patches.shape
    p = patch_size
    if d % (p * p):
        raise ValueError(f"patch vectors of {d} values do not hold {p}x{p} patches")
    c = d // (p * p)
    if grid is None:
        side = math.isqrt(n)
        grid = (side, side)
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"{n} patches do not fill a {gh}x{gw} grid")
    x = patches.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return x.reshape(b, c, gh * p, gw * p)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept visible per image: `int(L * (1 - mask_ratio))`, the same for every image."""
    return int(num_patches * (1.0 - mask_ratio))


def random_masking(noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which patches each image keeps: the `keep` ones with the smallest noise.

    Args:
        noise: (B, L) per-patch noise (uniform in [0, 1) from the dataset).
        keep: visible patches per image, 1 <= keep <= L.

    Returns:
        ids_keep (B, keep) long: the visible patches in increasing order of their noise (the order the
            encoder sees them in); mask (B, L) bool, True = masked; ids_restore (B, L) long: for each grid
            position, its place in the shuffled order [visible..., masked...] (the decoder's gather).

    A stable argsort breaks ties by patch index, so the choice is the same on every device.
    """
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(noise.shape, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, ids_keep, False)
    return ids_keep, mask, ids_restore


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], prefix_tokens: int = 1) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (as the reference MAE decoder's).

    The first half of the channels encodes the patch's row, the second half its column; each half is
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 1 / 10000 ** (k / (dim / 4)), k = 0 .. dim / 4 - 1.

    Args:
        dim: embedding width, a multiple of 4.
        grid: (gh, gw).
        prefix_tokens: leading all-zero rows (the class token's).

    Returns:
        (1, prefix_tokens + gh * gw, dim) float32, rows in the row-major order of the patches.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]  # (L, dim / 4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(rows), encode(cols)], dim=1)  # (L, dim)
    emb = torch.cat([torch.zeros(prefix_tokens, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()[None]


def patch_targets(images: torch.Tensor, patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    """The reconstruction targets: (B, L, p * p * C) float32 patches of `images`, each normalised by its
    own mean and (unbiased) variance when `norm_pix_loss`: (x - mean) / sqrt(var + 1e-6)."""
    target = patchify(images.float(), patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
    return target


def patch_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, L) mean squared error of each patch (over its p * p * C values), in float32."""
    return (pred.float() - target.float()).pow(2).mean(dim=-1)


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss: the per-patch MSE averaged over the masked patches only.

    Args:
        pred, target: (B, L, D) patches.
        mask: (B, L) bool, True = masked (counted); visible patches get exactly zero gradient.

    Returns:
        Scalar float32; 0 (with zero gradients) when nothing is masked.
    """
    per_patch = patch_mse(pred, target)
    # where (not multiply) so that an infinite error on a visible patch cannot turn into 0 * inf = nan.
    err = torch.where(mask, per_patch, torch.zeros((), dtype=per_patch.dtype, device=per_patch.device))
    return err.sum() / mask.sum().clamp_min(1).to(err.dtype)


def _init_decoder(module: nn.Module) -> None:
    """The reference's decoder init: xavier-uniform linear maps, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MAEModel(nn.Module):
    """Masked autoencoder: timm ViT encoder on the visible patches + light transformer decoder.

    Args:
        encoder: timm `VisionTransformer` from `build_vit` (one class token with its own position
            embedding, learned position embeddings, fixed image size); kept as `self.encoder`, so its
            weights are the `encoder.` keys and export as plain timm keys.
        decoder_dim: decoder width (ViT-S default 256; the reference's ViT-B/L decoder is 512 wide).
        decoder_depth: decoder transformer blocks (default 4; the reference uses 8 for ViT-B/L).
        decoder_heads: decoder attention heads (default 8; `decoder_dim` must be a multiple).
        mask_ratio: fraction of the patches hidden from the encoder, in (0, 1); the visible count is
            `int(L * (1 - mask_ratio))` and must leave at least one patch visible and one masked.
        norm_pix_loss: predict each patch normalised by its own mean and variance (the paper's better
            target) instead of the standardised pixels.

    Decoder: Linear(embed_dim, decoder_dim); a learned mask token for every masked patch; FIXED 2-D
    sin-cos position embeddings (a non-persistent buffer, so not in checkpoints: it is a pure function
    of the grid); `decoder_depth` timm `Block`s (mlp ratio 4, qkv bias, LayerNorm eps 1e-6); LayerNorm;
    Linear(decoder_dim, p * p * in_chans).
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder_dim: int = 256,
        decoder_depth: int = 4,
        decoder_heads: int = 8,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if encoder.num_prefix_tokens != 1 or encoder.cls_token is None or encoder.no_embed_class:
            raise ValueError("the encoder must have exactly one prefix token, a class token with a pos embed")
        if encoder.pos_embed is None or getattr(encoder, "dynamic_img_size", False):
            raise ValueError("the encoder needs learned position embeddings of a fixed image size")
        for name, value in (("decoder_dim", decoder_dim), ("decoder_depth", decoder_depth)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if decoder_heads < 1 or decoder_dim % decoder_heads:
            raise ValueError(
                f"decoder_dim ({decoder_dim}) must be a multiple of decoder_heads ({decoder_heads})"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.in_chans = int(encoder.patch_embed.proj.in_channels)
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.mask_ratio = float(mask_ratio)
        self.keep = num_visible(self.num_patches, mask_ratio)
        if not 1 <= self.keep < self.num_patches:
            raise ValueError(
                f"mask_ratio {mask_ratio} keeps {self.keep} of {self.num_patches} patches visible; "
                "at least one must be visible and one masked"
            )
        self.norm_pix_loss = bool(norm_pix_loss)

        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed",
            sincos_pos_embed_2d(decoder_dim, self.grid, prefix_tokens=1),
            persistent=False,
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * self.in_chans)
        for name, module in self.named_modules():
            if name.startswith("decoder_"):
                _init_decoder(module)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(
        self, images: torch.Tensor, mask_noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches only.

        Args:
            images: (B, C, H, W) standardised images of the encoder's size.
            mask_noise: (B, L) per-patch noise; the `keep` smallest are visible.

        Returns:
            latent (B, 1 + keep, D): the class token then the visible patches (in `random_masking`'s
            order) after the blocks and the final norm; mask (B, L) bool, True = masked; ids_restore (B, L).
        """
        enc = self.encoder
        if mask_noise.shape != (images.shape[0], self.num_patches):
            raise ValueError(
                f"mask_noise must be (B, {self.num_patches}) = (B, L), got {tuple(mask_noise.shape)}"
            )
        ids_keep, mask, ids_restore = random_masking(mask_noise, self.keep)
        x = enc.patch_embed(images)  # (B, L, D)
        x = x + enc.pos_embed[:, 1:]  # position embeddings BEFORE the masked patches are dropped
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        x = enc.norm_pre(enc.patch_drop(enc.pos_drop(x)))
        x = enc.blocks(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch from the encoder's tokens and mask tokens.

        Args:
            latent: (B, 1 + keep, D) from `forward_encoder`.
            ids_restore: (B, L) from `forward_encoder`.

        Returns:
            (B, L, p * p * C) predicted patches in grid order.
        """
        y = self.decoder_embed(latent)
        b, n, dim = y.shape
        masked = self.mask_token.to(y.dtype).expand(b, self.num_patches + 1 - n, -1)
        patches = torch.cat([y[:, 1:], masked], dim=1)  # shuffled order: visible, then masked
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, dim))  # grid order
        y = torch.cat([y[:, :1], patches], dim=1) + self.decoder_pos_embed.to(y.dtype)
        for block in self.decoder_blocks:
            y = block(y)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, L, p * p * C) float32 targets of `images` (`patch_targets` with this model's settings)."""
        return patch_targets(images, self.patch_size, self.norm_pix_loss)

    def forward(self, images: torch.Tensor, mask_noise: torch.Tensor) -> MAEOutput:
        """Mask, encode, decode and score one batch.

        Args:
            images: (B, C, H, W) standardised images.
            mask_noise: (B, L) per-patch noise from the dataset (decides the mask).

        Returns:
            `MAEOutput(loss, pred (B, L, p * p * C), mask (B, L) bool True = masked)`.
        """
        latent, mask, ids_restore = self.forward_encoder(images, mask_noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = masked_patch_mse(pred, self.targets(images), mask)
        return MAEOutput(loss, pred, mask)
