"""`augment`: identity, determinism, paired geometry, intensity range."""

from __future__ import annotations

import pytest
import torch

from sscxr.data.transforms import AugmentConfig, augment, identity_config


def _image(seed: int = 0, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return (0.3 + 0.4 * xx * yy + 0.05 * torch.rand(size, size, generator=g)).clamp(0, 1)[None]


def test_identity_config_leaves_image_and_mask_unchanged() -> None:
    x = _image()
    mask = x > 0.5
    out, out_mask = augment(x, torch.Generator().manual_seed(3), identity_config(), mask)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)
    assert torch.equal(out_mask, mask)


def test_disabled_returns_inputs() -> None:
    x = _image()
    out, _ = augment(x, torch.Generator().manual_seed(0), AugmentConfig(enabled=False))
    assert out is x


def test_same_generator_same_output_and_seeds_differ() -> None:
    x = _image()
    a, _ = augment(x, torch.Generator().manual_seed(7), AugmentConfig())
    b, _ = augment(x, torch.Generator().manual_seed(7), AugmentConfig())
    c, _ = augment(x, torch.Generator().manual_seed(8), AugmentConfig())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1


def test_draw_count_does_not_depend_on_config() -> None:
    # Later draws (donor, corruption) must not shift when an augmentation is switched off.
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    augment(_image(), g1, AugmentConfig())
    augment(_image(), g2, AugmentConfig(enabled=False))
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


@pytest.mark.parametrize("seed", range(6))
def test_image_and_mask_get_the_same_geometry(seed: int) -> None:
    size = 96
    blob = torch.zeros(1, size, size)
    blob[:, 20:70, 30:60] = 1.0
    blob[:, 75:85, 10:90] = 1.0
    cfg = AugmentConfig(rotate_deg=15.0, brightness=0.0, contrast=0.0, gamma=(1.0, 1.0), hflip=True)
    img, mask = augment(blob, torch.Generator().manual_seed(seed), cfg, blob > 0.5)
    assert mask.dtype == torch.bool
    moved = (img > 0.5) != (blob > 0.5)
    assert moved.float().mean() > 0.04  # the geometry did change something
    # Bilinear image vs nearest mask: they may differ only at isolated edge pixels (ties at 0.5).
    assert ((img > 0.5) != mask).float().mean() < 0.002


def test_pure_rotation_keeps_centre_and_intensity_jitter_spares_mask() -> None:
    x = torch.zeros(1, 65, 65)
    x[:, 30:35, 30:35] = 1.0
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotate_deg=30.0)
    out, mask = augment(x, torch.Generator().manual_seed(0), cfg, x.clone())
    assert out[0, 32, 32] > 0.7  # rotation is about the image centre
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.dtype == torch.float32


def test_bad_config_rejected() -> None:
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="shape"):
        augment(torch.zeros(8, 8), torch.Generator(), AugmentConfig())
