"""ViT builder, GMML model and the masked L1 loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sscxr.models.gmml import GMMLModel, LightDecoder, default_recon_blocks, masked_l1_loss
from sscxr.models.vit import VIT_PRESETS, ViTConfig, build_vit, infer_vit_arch, vit_config_from_dict

TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0)


def _model(recon_blocks: tuple[int, ...] | None = None, seed: int = 0) -> GMMLModel:
    torch.manual_seed(seed)  # tests only: timm initialises from the global RNG
    return GMMLModel(build_vit(TINY), recon_blocks, hidden=64, bottleneck=16)


# ---------------------------------------------------------------- ViT


def test_build_vit_shapes_and_layout() -> None:
    enc = build_vit(TINY)
    x = torch.randn(2, 1, 32, 32)
    assert enc(x).shape == (2, 32)
    assert enc.forward_features(x).shape == (2, 1 + 16, 32)
    assert enc.num_prefix_tokens == 1 and enc.pos_embed.shape == (1, 17, 32)
    assert enc.norm.eps == 1e-6
    assert infer_vit_arch(enc) == {f: getattr(TINY, f) for f in infer_vit_arch(enc)}


@pytest.mark.parametrize("fused", [True, False])
def test_fused_attn_reaches_every_block(fused: bool) -> None:
    enc = build_vit(dataclasses.replace(TINY, fused_attn=fused))
    assert [b.attn.fused_attn for b in enc.blocks] == [fused] * TINY.depth


def test_fused_and_explicit_attention_agree() -> None:
    torch.manual_seed(0)
    a = build_vit(dataclasses.replace(TINY, fused_attn=True)).eval()
    b = build_vit(dataclasses.replace(TINY, fused_attn=False)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"img_size": 30}, "multiple of patch_size"),
        ({"num_heads": 5}, "multiple of num_heads"),
        ({"depth": 0}, "depth"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"fused_attn": 1}, "fused_attn"),
    ],
)
def test_vit_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **kwargs)


def test_vit_config_dict_round_trip_and_presets() -> None:
    assert vit_config_from_dict(TINY.to_dict()) == TINY
    assert vit_config_from_dict({"preset": "vit_small", "img_size": 224}).img_size == 224
    with pytest.raises(ValueError, match="unknown ViT config keys"):
        vit_config_from_dict({"embed_dims": 3})
    assert set(VIT_PRESETS) == {"tiny_cpu", "vit_tiny", "vit_small", "vit_base"}
    small = VIT_PRESETS["vit_small"]
    assert (small.embed_dim, small.depth, small.num_heads, small.patch_size) == (384, 12, 6, 16)


# ---------------------------------------------------------------- GMML model


def test_default_recon_blocks() -> None:
    assert default_recon_blocks(12) == (6, 8, 10, 12)
    assert default_recon_blocks(6) == (3, 4, 5, 6)
    assert default_recon_blocks(4) == (2, 3, 4)
    assert default_recon_blocks(1) == (1,)


def test_gmml_validation() -> None:
    with pytest.raises(ValueError, match=r"within 1\.\.4"):
        GMMLModel(build_vit(TINY), (0, 2))
    with pytest.raises(ValueError, match=r"within 1\.\.4"):
        GMMLModel(build_vit(TINY), (2, 5))
    with pytest.raises(ValueError, match="repeat"):
        GMMLModel(build_vit(TINY), (2, 2))
    with pytest.raises(ValueError, match="hidden"):
        LightDecoder(32, 8, hidden=0)


def test_gmml_output_shape() -> None:
    model = _model()
    assert model.recon_blocks == (2, 3, 4)
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 1, 32, 32)


def test_recon_features_match_manual_forward() -> None:
    model = _model(recon_blocks=(1, 3)).eval()
    enc = model.encoder
    x = torch.randn(2, 1, 32, 32)
    h = enc.norm_pre(enc._pos_embed(enc.patch_embed(x)))
    outs = []
    for blk in enc.blocks:
        h = blk(h)
        outs.append(h)
    want = enc.norm((outs[0] + outs[2]) / 2)[:, 1:]
    torch.testing.assert_close(model.forward_features(x), want, atol=1e-6, rtol=1e-5)


def test_recon_features_run_blocks_once() -> None:
    model = _model(recon_blocks=(2, 3)).eval()
    calls = [0] * TINY.depth
    for i, blk in enumerate(model.encoder.blocks):
        blk.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model(torch.randn(1, 1, 32, 32))
    assert calls == [1, 1, 1, 0]  # block 4 is not needed and not run


def test_every_parameter_gets_a_finite_gradient() -> None:
    model = _model()
    x = torch.randn(2, 1, 32, 32)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[..., :16, :] = True
    masked_l1_loss(model(x), x, mask).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()), name
    assert any(float(p.grad.abs().sum()) > 0 for p in model.encoder.parameters())


def test_tiny_model_overfits_one_batch() -> None:
    model = _model(seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 32, generator=g)
    mask = torch.rand(4, 1, 4, 4, generator=g).repeat_interleave(8, 2).repeat_interleave(8, 3) < 0.5
    corrupted = torch.where(mask, torch.randn(x.shape, generator=g), x)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = masked_l1_loss(model(corrupted), x, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


# ---------------------------------------------------------------- loss


def test_masked_l1_hand_computed() -> None:
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[0.0, 0.0], [1.0, 10.0]]]])
    mask = torch.tensor([[[[True, False], [True, True]]]])
    # |1-0| + |3-1| + |4-10| = 9 over 3 pixels
    assert float(masked_l1_loss(pred, target, mask)) == pytest.approx(3.0)
    assert float(masked_l1_loss(pred, target, mask, denominator=6)) == pytest.approx(1.5)
    assert float(masked_l1_loss(pred, target, mask, denominator=torch.tensor(9.0))) == pytest.approx(1.0)


def test_masked_l1_ignores_outside_of_mask() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 1, 8, 8, generator=g)
    mask = torch.rand(2, 1, 8, 8, generator=g) < 0.4
    pred = torch.randn(2, 1, 8, 8, generator=g, requires_grad=True)
    loss = masked_l1_loss(pred, target, mask)
    loss.backward()
    assert pred.grad is not None
    assert bool((pred.grad[~mask] == 0).all()) and bool((pred.grad[mask] != 0).all())
    other = pred.detach().clone()
    other[~mask] = float("inf")
    assert float(masked_l1_loss(other, target, mask)) == float(loss.detach())


def test_masked_l1_empty_mask_is_zero_not_nan() -> None:
    pred = torch.randn(1, 1, 4, 4, requires_grad=True)
    loss = masked_l1_loss(pred, torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and pred.grad is not None and bool((pred.grad == 0).all())


def test_gmml_task_under_bf16_divides_by_the_exact_masked_count() -> None:
    """257 masked pixels: bf16 (8 mantissa bits) cannot hold 257, so a denominator summed in the
    model's dtype would divide by 256; the loss must use the exact count, with a finite value."""
    from sscxr.models.loading import Normalization
    from sscxr.tasks.gmml import GMMLTask

    task = GMMLTask(_model(), TINY, Normalization(mean=0.5, std=0.25))
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 32, 32, generator=g)
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    mask.view(-1)[torch.randperm(mask.numel(), generator=g)[:257]] = True
    batch = {"image": image, "corrupted": torch.where(mask, torch.randn(2, 1, 32, 32, generator=g), image),
             "mask": mask}  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task.training_step(batch)
        pred = task.model(batch["corrupted"])
    assert pred.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    expected = (pred.float() - image).abs()[mask].sum() / 257
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    assert not torch.isclose(out.loss, (pred.float() - image).abs()[mask].sum() / 256, rtol=1e-6, atol=0)
