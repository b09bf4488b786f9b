"""Attention maps read with hooks: they are the model's real attention (fused kernel or not), the hooks
leave nothing behind, rollout matches a hand computation, and the maps have the documented shape and range."""

from __future__ import annotations

import pytest
import torch

from sscxr.models.attention import (
    attention_rollout,
    capture_attention,
    last_block_attention,
    patch_maps_to_image,
)
from sscxr.models.vit import ViTConfig, build_vit

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.0)


def _vit(fused: bool) -> torch.nn.Module:
    torch.manual_seed(0)  # tests only: timm initialises from the global RNG
    vit = build_vit(TINY).eval()
    for block in vit.blocks:
        block.attn.fused_attn = fused
    return vit


@pytest.mark.parametrize("fused", [False, True])
def test_captured_maps_are_the_attention_the_block_applied(fused: bool) -> None:
    """A @ v through the block's output projection reproduces the attention module's real output."""
    vit, x = _vit(fused), torch.rand(2, 1, 32, 32)
    outputs, inputs = [], []

    def keep(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inputs.append(args[0])
        outputs.append(out)

    hooks = [b.attn.register_forward_hook(keep) for b in vit.blocks]
    with torch.no_grad(), capture_attention(vit) as maps:
        vit(x)
    for h in hooks:
        h.remove()
    assert len(maps) == TINY.depth
    for block, probs, tokens, out in zip(vit.blocks, maps, inputs, outputs, strict=True):
        attn = block.attn
        b, t, _ = tokens.shape
        assert probs.shape == (b, TINY.num_heads, t, t)
        torch.testing.assert_close(probs.sum(-1), torch.ones(b, TINY.num_heads, t))
        v = attn.qkv(tokens).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
        rebuilt = attn.proj((probs @ v).transpose(1, 2).reshape(b, t, -1))
        torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=1e-5)


def test_fused_and_plain_paths_give_the_same_maps_and_hooks_leave_nothing() -> None:
    x = torch.rand(2, 1, 32, 32)
    plain, fused = _vit(False), _vit(True)
    with torch.no_grad():
        before = fused(x)
        with capture_attention(plain) as a, capture_attention(fused) as b:
            plain(x)
            during = fused(x)
        after = fused(x)
    for m1, m2 in zip(a, b, strict=True):
        torch.testing.assert_close(m1, m2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(during, before)  # capturing changes nothing
    torch.testing.assert_close(after, before)
    assert all(not blk.attn.qkv._forward_hooks for blk in fused.blocks)
    assert all(blk.attn.fused_attn for blk in fused.blocks)  # no switch to the slow path


def test_hooks_are_removed_when_the_forward_fails() -> None:
    vit = _vit(True)
    with pytest.raises(RuntimeError), capture_attention(vit):
        vit(torch.rand(1, 3, 32, 32))  # one input channel expected
    assert all(not blk.attn.qkv._forward_hooks for blk in vit.blocks)


def test_rollout_equals_a_hand_computation_on_two_blocks() -> None:
    # One image, one class token + 2 patches; two heads whose mean is what rollout uses.
    a1 = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    a2 = torch.tensor([[0.2, 0.2, 0.6], [0.3, 0.4, 0.3], [0.5, 0.25, 0.25]])
    spread = torch.tensor([[0.1, -0.1, 0.0], [0.0, 0.05, -0.05], [-0.1, 0.0, 0.1]])  # cancels in the mean
    maps = [torch.stack([a + spread, a - spread])[None] for a in (a1, a2)]
    # By hand: Â = (I + A) / 2 (rows of A sum to 1, so Â's rows do too), R = Â2 Â1, class-token row.
    h1, h2 = (torch.eye(3) + a1) / 2, (torch.eye(3) + a2) / 2
    r0 = [sum(h2[0, k] * h1[k, j] for k in range(3)) for j in range(3)]
    expected = torch.tensor([[float(r0[1]), float(r0[2])]])
    torch.testing.assert_close(attention_rollout(maps, num_prefix_tokens=1), expected)
    # h2[0] = (0.6, 0.1, 0.3), h1 columns 1 and 2: (0.15, 0.9, 0.1) and (0.1, 0.05, 0.8).
    torch.testing.assert_close(expected, torch.tensor([[0.6 * 0.15 + 0.1 * 0.9 + 0.3 * 0.1,
                                                        0.6 * 0.1 + 0.1 * 0.05 + 0.3 * 0.8]]))  # fmt: skip
    torch.testing.assert_close(last_block_attention(maps, 1), torch.tensor([[0.2, 0.6]]))


def test_maps_on_the_image_have_its_size_and_span_zero_to_one() -> None:
    vit, x = _vit(True), torch.rand(3, 1, 32, 32)
    with torch.no_grad(), capture_attention(vit) as maps:
        vit(x)
    grid = tuple(vit.patch_embed.grid_size)
    for weights in (last_block_attention(maps, 1), attention_rollout(maps, 1)):
        assert weights.shape == (3, grid[0] * grid[1]) and (weights >= 0).all()
        image = patch_maps_to_image(weights, grid, (40, 50))
        assert image.shape == (3, 40, 50)
        assert torch.allclose(image.amin(dim=(1, 2)), torch.zeros(3))
        assert torch.allclose(image.amax(dim=(1, 2)), torch.ones(3))
    # The brightest patch of the map is where the class token attends most.
    w = torch.zeros(1, 16)
    w[0, 6] = 1.0  # row 1, column 2 of the 4 x 4 grid
    image = patch_maps_to_image(w, (4, 4), (32, 32))[0]
    row, col = divmod(int(image.argmax()), 32)
    assert row // 8 == 1 and col // 8 == 2
    assert patch_maps_to_image(torch.ones(1, 16), (4, 4), (8, 8)).abs().max() == 0  # constant: zeros
