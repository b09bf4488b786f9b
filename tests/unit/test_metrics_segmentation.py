"""Segmentation metrics on analytic shapes, the empty-mask policy, summaries and post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from sscxr.metrics import SegmentationAccumulator, postprocess_lungs, segmentation_metrics, summarize

SIZE = 128


def disc(cy: float, cx: float, r: float, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def values(m: dict) -> dict:
    return {k: v.value for k, v in m.items()}


def test_identical_masks() -> None:
    a = disc(64, 64, 30)
    m = values(segmentation_metrics(a, a.copy(), spacing_mm=(0.7, 0.7)))
    assert m == {"dice": 1.0, "iou": 1.0, "hd95_px": 0.0, "hd_px": 0.0, "hd95_mm": 0.0, "hd_mm": 0.0}


@pytest.mark.parametrize("k", [3, 5, 8])
@pytest.mark.parametrize("axis", [0, 1])
def test_shifted_disc_hausdorff_is_shift(k: int, axis: int) -> None:
    a = disc(60, 60, 30)
    b = np.roll(a, k, axis=axis)
    m = values(segmentation_metrics(a, b))
    assert m["hd_px"] == pytest.approx(k, abs=0.5)
    assert abs(m["hd95_px"] - k) <= 1.0
    assert 0 < m["dice"] < 1


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_hausdorff_matches_monai() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3):
        a = disc(*rng.uniform(40, 80, 2), rng.uniform(10, 30))
        b = disc(*rng.uniform(40, 80, 2), rng.uniform(10, 30)) | disc(20, 100, 8)
        m = values(segmentation_metrics(a, b))
        t = lambda x: torch.as_tensor(x)[None, None].float()  # noqa: E731
        hd95 = compute_hausdorff_distance(t(a), t(b), include_background=True, percentile=95)
        hd = compute_hausdorff_distance(t(a), t(b), include_background=True)
        assert m["hd95_px"] == pytest.approx(float(hd95), rel=1e-5)
        assert m["hd_px"] == pytest.approx(float(hd), rel=1e-5)


def test_dice_iou_identity_on_random_masks() -> None:
    rng = np.random.default_rng(1)
    for density in (0.1, 0.5, 0.9):
        p, g = rng.random((64, 64)) < density, rng.random((64, 64)) < density
        m = values(segmentation_metrics(p, g))
        assert m["dice"] == pytest.approx(2 * m["iou"] / (1 + m["iou"]))
        ref = compute_dice(torch.as_tensor(p)[None, None].float(), torch.as_tensor(g)[None, None].float())
        assert m["dice"] == pytest.approx(float(ref), rel=1e-6)
        inter, union = (p & g).sum(), (p | g).sum()
        assert m["iou"] == pytest.approx(inter / union)


def test_spacing_scales_hd_mm() -> None:
    a = disc(60, 60, 25)
    b = np.roll(a, 6, axis=0)  # a shift along rows: the row spacing applies
    iso = values(segmentation_metrics(a, b, spacing_mm=(0.5, 0.5)))
    assert iso["hd95_mm"] == pytest.approx(0.5 * iso["hd95_px"])
    assert iso["hd_mm"] == pytest.approx(0.5 * iso["hd_px"])
    aniso = values(segmentation_metrics(a, b, spacing_mm=(2.0, 0.1)))
    assert aniso["hd_mm"] == pytest.approx(12.0, abs=0.5)
    no = segmentation_metrics(a, b)
    assert no["hd95_mm"].value is None and no["hd95_mm"].reason == "pixel spacing unknown"


def test_empty_mask_policy() -> None:
    z, a = np.zeros((SIZE, SIZE), bool), disc(64, 64, 20)
    both = values(segmentation_metrics(z, z, spacing_mm=(1.0, 1.0)))
    assert both == {"dice": 1.0, "iou": 1.0, "hd95_px": 0.0, "hd_px": 0.0, "hd95_mm": 0.0, "hd_mm": 0.0}
    for pred, gt, reason in ((z, a, "empty prediction"), (a, z, "empty ground truth")):
        m = segmentation_metrics(pred, gt, spacing_mm=(1.0, 1.0))
        assert m["dice"].value == 0.0 and m["iou"].value == 0.0
        for k in ("hd95_px", "hd_px", "hd95_mm", "hd_mm"):
            assert m[k].value is None, k  # never 0: predicting nothing must not look perfect
            assert m[k].reason == reason
    with pytest.raises(ValueError):
        segmentation_metrics(z, np.zeros((4, 4), bool))


def test_summarize_skips_and_counts_undefined() -> None:
    s = summarize([1.0, None, 3.0, float("nan"), 2.0], n_boot=200, seed=0)
    assert (s.n, s.n_undefined) == (3, 2)
    assert s.mean == pytest.approx(2.0) and s.std == pytest.approx(1.0)
    assert s.ci is not None and s.ci.low <= 2.0 <= s.ci.high
    assert summarize([None, None], n_boot=10).mean is None
    assert summarize([0.5, 0.7], n_boot=0).ci is None


def test_summarize_groups_patients() -> None:
    # Two patients with opposite values: resampling patients (not images) can draw one patient twice.
    vals = [0.0] * 5 + [1.0] * 5
    by_patient = summarize(vals, groups=["a"] * 5 + ["b"] * 5, n_boot=300, seed=1)
    by_image = summarize(vals, n_boot=300, seed=1)
    assert by_patient.ci.high - by_patient.ci.low > by_image.ci.high - by_image.ci.low


def test_postprocess_keeps_two_lungs_and_fills_holes() -> None:
    left, right = disc(64, 35, 20), disc(64, 95, 20)
    blob = disc(10, 64, 3)
    mask = left | right | blob
    mask[60:66, 30:36] = False  # a hole inside the left lung
    out = postprocess_lungs(mask)
    np.testing.assert_array_equal(out, left | right)
    one = postprocess_lungs(left | disc(64, 95, 15), keep=1, fill_holes=False)
    np.testing.assert_array_equal(one, left)
    assert not postprocess_lungs(np.zeros((8, 8), bool)).any()


def test_segmentation_accumulator() -> None:
    a = disc(64, 64, 20)
    preds = torch.as_tensor(np.stack([a, a, np.zeros_like(a)]))[:, None].float()
    gts = torch.as_tensor(np.stack([a, np.roll(a, 4, 1), a]))[:, None]
    acc = SegmentationAccumulator()
    acc.update(torch.tensor([0, 1, 2]), preds, gts, spacings=[(0.5, 0.5)] * 3)
    acc.update(torch.tensor([1]), preds[1:2], gts[1:2])  # a padded duplicate is dropped
    out = acc.compute(n_boot=50)
    assert out["dice"].n == 3 and out["hd95_px"].n == 2 and out["hd95_px"].n_undefined == 1
    assert out["hd_px"].mean == pytest.approx(2.0, abs=0.25)
