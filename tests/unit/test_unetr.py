"""2D UNETR: skip blocks derived from depth, shapes, argument checks, gradients, encoder loading, export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from sscxr.errors import CheckpointError
from sscxr.models.gmml import GMMLModel
from sscxr.models.loading import Normalization, export_encoder
from sscxr.models.unetr import (
    UNETR,
    SegmenterSpec,
    build_unetr,
    export_segmenter,
    load_segmenter,
    lung_probability,
    n_levels,
    skip_blocks,
)
from sscxr.models.vit import ViTConfig, build_vit
from sscxr.tasks.segmentation import init_encoder

TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0)
NORM = Normalization(mean=0.4, std=0.2)


def _unetr(cfg: ViTConfig = TINY, seed: int = 0, **kw: object) -> UNETR:
    torch.manual_seed(seed)  # tests only: timm and MONAI initialise from the global RNG
    return UNETR(build_vit(cfg), feature_size=4, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- skip blocks
@pytest.mark.parametrize(
    ("depth", "n", "expected"),
    [
        (12, 4, (3, 6, 9, 12)),
        (6, 4, (2, 3, 5, 6)),
        (12, 3, (4, 8, 12)),
        (4, 4, (1, 2, 3, 4)),
        (4, 3, (1, 3, 4)),
        (24, 4, (6, 12, 18, 24)),
        (5, 1, (5,)),
    ],
)
def test_skip_blocks_evenly_spaced(depth: int, n: int, expected: tuple[int, ...]) -> None:
    assert skip_blocks(depth, n) == expected


def test_skip_blocks_and_levels_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="fewer blocks"):
        skip_blocks(3, 4)
    with pytest.raises(ValueError):
        skip_blocks(12, 0)
    assert [n_levels(p) for p in (2, 4, 8, 16, 32)] == [1, 2, 3, 4, 5]
    for bad in (1, 3, 12, 0):
        with pytest.raises(ValueError, match="power of two"):
            n_levels(bad)


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
    ("img", "patch", "depth"),
    [(32, 8, 4), (64, 8, 6), (96, 16, 12), (64, 16, 4), (32, 16, 6), (96, 8, 4)],
)
def test_output_shape_and_derived_blocks(img: int, patch: int, depth: int) -> None:
    cfg = dataclasses.replace(TINY, img_size=img, patch_size=patch, depth=depth)
    model = _unetr(cfg)
    assert model.blocks == skip_blocks(depth, n_levels(patch))
    assert len(model.ups) == n_levels(patch) and len(model.skips) == n_levels(patch) - 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, img, img)).shape == (2, 2, img, img)


def test_one_channel_output_and_explicit_blocks() -> None:
    cfg = dataclasses.replace(TINY, depth=6)
    model = _unetr(cfg, out_channels=1, blocks=(2, 4, 6))
    assert model.blocks == (2, 4, 6)
    with torch.no_grad():
        logits = model(torch.randn(3, 1, 32, 32))
    assert logits.shape == (3, 1, 32, 32)
    assert lung_probability(logits).shape == (3, 32, 32)


def test_lung_probability() -> None:
    two = torch.tensor([[[[0.0]], [[0.0]]]])  # equal logits -> 0.5
    assert torch.allclose(lung_probability(two), torch.tensor([[[0.5]]]))
    assert torch.allclose(lung_probability(torch.zeros(1, 1, 1, 1)), torch.tensor([[[0.5]]]))
    with pytest.raises(ValueError):
        lung_probability(torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blocks": (1, 2)}, "needs 3 blocks"),
        ({"blocks": (1, 3, 2)}, "strictly increasing"),
        ({"blocks": (0, 2, 4)}, "1-based"),
        ({"blocks": (1, 2, 3)}, "last skip block"),
        ({"out_channels": 0}, "out_channels"),
        ({"feature_size": 0}, "feature_size"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNETR(build_vit(TINY), **kwargs)  # type: ignore[arg-type]


def test_bad_patch_and_input_raise() -> None:
    with pytest.raises(ValueError, match="power of two"):
        UNETR(build_vit(dataclasses.replace(TINY, img_size=36, patch_size=12)))
    with pytest.raises(ValueError, match="fewer blocks"):
        UNETR(build_vit(dataclasses.replace(TINY, depth=2, img_size=32, patch_size=16)))
    model = _unetr()
    for shape in ((2, 1, 64, 64), (2, 3, 32, 32), (1, 32, 32)):
        with pytest.raises(ValueError, match="expected input"):
            model(torch.randn(*shape))


# -------------------------------------------------------------------------------- gradients
def test_every_parameter_gets_a_finite_gradient() -> None:
    model = _unetr(dataclasses.replace(TINY, depth=6))
    x = torch.randn(2, 1, 32, 32)
    target = (torch.rand(2, 32, 32) > 0.5).long()
    loss = torch.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("encoder.blocks.0.") for n in names) and any(n.startswith("ups.") for n in names)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]  # type: ignore[arg-type]
    assert not bad
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]  # type: ignore[union-attr]
    assert not zero, f"parameters with an all-zero gradient: {zero}"


# ------------------------------------------------------------------------- encoder loading
def _gmml_export(tmp_path: Path) -> dict[str, torch.Tensor]:
    """A GMML run folder holding `encoder.safetensors` + `.json`; returns the exported tensors."""
    torch.manual_seed(123)
    gmml = GMMLModel(build_vit(TINY), hidden=16, bottleneck=8)
    with torch.no_grad():  # make the weights unlike any fresh initialisation
        for p in gmml.encoder.parameters():
            p.add_(torch.randn_like(p))
    export_encoder(gmml.encoder, TINY, NORM, tmp_path / "encoder")
    return {k: v.clone() for k, v in gmml.encoder.state_dict().items()}


def test_gmml_export_weights_are_the_ones_used(tmp_path: Path) -> None:
    exported = _gmml_export(tmp_path)
    model = _unetr(seed=7)
    fresh = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    info = init_encoder(model, "sscxr", str(tmp_path), Normalization(0.0, 1.0))
    assert info["mode"] == "sscxr" and info["source"] == "sscxr-export"
    assert info["missing"] == [] and info["unexpected"] == []
    assert info["normalization"] == {"mean": NORM.mean, "std": NORM.std}
    state = model.encoder.state_dict()
    assert set(state) == set(exported)
    for key, value in exported.items():
        assert torch.equal(state[key], value), key
    assert not torch.equal(state["pos_embed"], fresh["pos_embed"])
    # The decoder reads the loaded encoder: its deepest feature is the loaded ViT's normed output.
    ref = build_vit(TINY)
    ref.load_state_dict(exported)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        deepest = model.encode(x)[-1]
        tokens = ref.forward_features(x)[:, 1:]
    assert torch.allclose(deepest.flatten(2).transpose(1, 2), tokens, atol=1e-5)


def test_init_refuses_mismatch(tmp_path: Path) -> None:
    _gmml_export(tmp_path)
    model = _unetr()
    with pytest.raises(CheckpointError, match=r"seg\.init=timm"):
        init_encoder(model, "timm", str(tmp_path / "encoder.safetensors"), NORM)
    wide = _unetr(dataclasses.replace(TINY, embed_dim=64))
    with pytest.raises(CheckpointError):
        init_encoder(wide, "sscxr", str(tmp_path), NORM)
    assert init_encoder(model, "scratch", "", NORM)["mode"] == "scratch"


# --------------------------------------------------------------------------- export / load
def test_export_load_round_trip(tmp_path: Path) -> None:
    spec = SegmenterSpec(vit=TINY, normalization=NORM, feature_size=4, fit="stretch", threshold=0.4)
    torch.manual_seed(0)
    model = build_unetr(spec).eval()
    spec = dataclasses.replace(spec, blocks=model.blocks)
    export_segmenter(model.state_dict(), spec, tmp_path / "model", {"note": "x"})
    seg = load_segmenter(tmp_path)
    assert seg.spec == spec and seg.meta["extra"] == {"note": "x"} and seg.meta["img_size"] == 32
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = lung_probability(model(images))
    assert torch.allclose(seg.probabilities(images, precision="fp32"), expected, atol=1e-6)
    assert seg.probabilities(torch.rand(1, 1, 50, 40)).shape == (1, 50, 40)  # resized in and out
    with pytest.raises(CheckpointError, match="no segmenter export"):
        load_segmenter(tmp_path / "missing")
    # An export written before the model carried its standardisation (no norm buffers) loads with
    # model.json's normalization and gives the same masks.
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("norm_")}
    export_segmenter(old, spec, tmp_path / "old" / "model")
    assert torch.equal(load_segmenter(tmp_path / "old").probabilities(images, precision="fp32"),
                       seg.probabilities(images, precision="fp32"))  # fmt: skip


def test_the_model_takes_zero_one_images_and_standardises_them_itself() -> None:
    """Outputs on [0, 1] input equal what the network gave before it carried the standardisation:
    the same weights fed (x - mean) / std with an identity standardisation."""
    spec = SegmenterSpec(vit=TINY, normalization=NORM, feature_size=4, fit="stretch", threshold=0.5)
    torch.manual_seed(0)
    model = build_unetr(spec).eval()
    before = build_unetr(spec).eval()
    before.load_state_dict(model.state_dict())
    before.set_normalization(Normalization(mean=0.0, std=1.0))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before((x - NORM.mean) / NORM.std))
    assert float(model.norm_mean) == NORM.mean and float(model.norm_std) == NORM.std


def test_skip_features_are_the_outputs_of_the_named_blocks() -> None:
    """Each skip is the token grid after block `blocks[k]` (1-based), the deepest one after the final
    norm: computed here block by block, by hand, so a skip taken one block early or late fails."""
    model = _unetr().eval()
    enc = model.encoder
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        feats = model.encode(x)
        tokens = enc.norm_pre(enc.patch_drop(enc._pos_embed(enc.patch_embed(x))))
        after = []
        for block in enc.blocks:
            tokens = block(tokens)
            after.append(tokens)
    grid = (32 // TINY.patch_size, 32 // TINY.patch_size)

    def as_grid(t: torch.Tensor) -> torch.Tensor:
        return t[:, enc.num_prefix_tokens :].transpose(1, 2).reshape(2, -1, *grid)

    assert len(feats) == len(model.blocks)
    for feat, block in zip(feats[:-1], model.blocks[:-1], strict=True):
        torch.testing.assert_close(feat, as_grid(after[block - 1]))
    torch.testing.assert_close(feats[-1], as_grid(enc.norm(after[model.blocks[-1] - 1])))
    # The blocks are distinct: a neighbouring block's output is not the same tensor.
    assert not torch.allclose(feats[0], as_grid(after[model.blocks[0]]))
