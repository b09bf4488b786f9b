"""Encoder export / load: sscxr exports, training checkpoints, timm / DeiT files, refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from timm.models.vision_transformer import VisionTransformer

from sscxr.errors import CheckpointError
from sscxr.models.gmml import GMMLModel
from sscxr.models.loading import (
    Normalization,
    export_encoder,
    interpolate_pos_embed,
    load_encoder_weights,
)
from sscxr.models.vit import ViTConfig, build_vit

TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0)
NORM = Normalization(mean=0.5, std=0.25)


def _encoder(cfg: ViTConfig = TINY, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)  # tests only: timm initialises from the global RNG
    return build_vit(cfg).eval()


def _timm_rgb(seed: int = 1) -> VisionTransformer:
    """An ImageNet-style timm model: 3 channels, 64 px (8x8 grid), a 10-class head."""
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=64, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=4, num_heads=2
    ).eval()


def _assert_same_weights(a: VisionTransformer, b: VisionTransformer) -> None:
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, sb[k]), k


def test_export_then_load_round_trip(tmp_path: Path) -> None:
    src = _encoder(seed=0)
    weights, meta_path = export_encoder(src, TINY, NORM, tmp_path / "enc.safetensors", extra={"epoch": 3})
    assert weights == tmp_path / "enc.safetensors" and meta_path == tmp_path / "enc.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == "sscxr-encoder" and meta["vit"]["embed_dim"] == 32
    assert meta["normalization"] == {"mean": 0.5, "std": 0.25} and meta["extra"] == {"epoch": 3}

    for given in (weights, meta_path, tmp_path / "enc"):
        dst = _encoder(seed=1)
        report = load_encoder_weights(dst, given)
        assert report.missing == [] and report.unexpected == []
        assert report.source == "sscxr-export" and report.normalization == NORM
        _assert_same_weights(src, dst)
        x = torch.randn(2, 1, 32, 32)
        assert torch.equal(src(x), dst(x))


def test_export_strips_wrapper_prefixes(tmp_path: Path) -> None:
    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = _encoder()  # what torch.compile's wrapper holds
    src = compiled_like._orig_mod
    export_encoder(src, TINY, NORM, tmp_path / "enc")
    keys = safetensors.torch.load_file(str(tmp_path / "enc.safetensors")).keys()
    assert not any("_orig_mod" in k or k.startswith("module.") for k in keys)
    assert set(keys) == set(src.state_dict())


def test_export_refuses_a_config_that_does_not_describe_the_encoder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="embed_dim"):
        export_encoder(_encoder(), dataclasses.replace(TINY, embed_dim=64), NORM, tmp_path / "enc")


def test_export_with_mismatching_vit_is_refused_naming_fields(tmp_path: Path) -> None:
    export_encoder(_encoder(), TINY, NORM, tmp_path / "enc")
    other = _encoder(dataclasses.replace(TINY, depth=3, embed_dim=64, num_heads=4))
    with pytest.raises(CheckpointError, match=r"embed_dim.*depth|depth.*embed_dim"):
        load_encoder_weights(other, tmp_path / "enc")


def test_export_at_another_image_size_interpolates_pos_embed(tmp_path: Path) -> None:
    export_encoder(_encoder(), TINY, NORM, tmp_path / "enc")
    big = _encoder(dataclasses.replace(TINY, img_size=64))
    report = load_encoder_weights(big, tmp_path / "enc")
    assert report.missing == [] and report.unexpected == []
    assert big.pos_embed.shape == (1, 1 + 64, 32)
    assert any("pos_embed: grid 4x4 -> 8x8" in n for n in report.adapted)


@pytest.mark.parametrize("layout", ["plain_pth", "deit_model_wrapper", "state_dict_wrapper", "safetensors"])
def test_timm_layout_loads_into_grey_encoder(tmp_path: Path, layout: str) -> None:
    src = _timm_rgb()
    sd = src.state_dict()
    if layout == "safetensors":
        path = tmp_path / "in1k.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "in1k.pth"
        obj = {"plain_pth": sd, "deit_model_wrapper": {"model": sd}, "state_dict_wrapper": {"state_dict": sd}}
        torch.save(obj[layout], path)

    enc = _encoder()
    report = load_encoder_weights(enc, path)
    assert report.source == "timm"
    assert report.missing == []
    assert report.unexpected == ["head.bias", "head.weight"]
    # RGB patch filters summed into one grey channel.
    torch.testing.assert_close(
        enc.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(dim=1, keepdim=True)
    )
    # Class token's position embedding kept, the 8x8 grid resampled to the encoder's 4x4.
    torch.testing.assert_close(enc.pos_embed[:, :1], sd["pos_embed"][:, :1])
    torch.testing.assert_close(enc.pos_embed, interpolate_pos_embed(sd["pos_embed"], (4, 4)))
    assert enc.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(enc.blocks[2].mlp.fc1.weight, sd["blocks.2.mlp.fc1.weight"])
    # A grey image fed to the RGB model as R = G = B gives the same tokens before position embeddings.
    x = torch.randn(1, 1, 32, 32)
    rgb = x.expand(1, 3, 32, 32)
    torch.testing.assert_close(enc.patch_embed.proj(x), src.patch_embed.proj(rgb), atol=1e-5, rtol=1e-5)


def test_deit_distilled_tokens_are_dropped(tmp_path: Path) -> None:
    sd = _timm_rgb().state_dict()
    sd["dist_token"] = torch.zeros(1, 1, 32)
    sd["pos_embed"] = torch.cat(
        [sd["pos_embed"][:, :1], torch.zeros(1, 1, 32), sd["pos_embed"][:, 1:]], dim=1
    )
    sd["head_dist.weight"], sd["head_dist.bias"] = torch.zeros(10, 32), torch.zeros(10)
    torch.save({"model": sd}, tmp_path / "deit_distilled.pth")
    enc = _encoder()
    report = load_encoder_weights(enc, tmp_path / "deit_distilled.pth")
    assert report.missing == []
    assert report.unexpected == [
        "dist_token",
        "head.bias",
        "head.weight",
        "head_dist.bias",
        "head_dist.weight",
    ]
    torch.testing.assert_close(enc.pos_embed[:, :1], sd["pos_embed"][:, :1])


def test_wider_file_is_refused_naming_key_and_shapes(tmp_path: Path) -> None:
    torch.save(
        _encoder(dataclasses.replace(TINY, embed_dim=64, num_heads=4)).state_dict(), tmp_path / "w.pth"
    )
    enc = _encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"cls_token: file \(1, 1, 64\) vs encoder \(1, 1, 32\)"):
        load_encoder_weights(enc, tmp_path / "w.pth")
    for k, v in enc.state_dict().items():  # a refused load changes nothing
        assert torch.equal(v, before[k])


def test_deeper_file_is_refused_when_strict_and_reported_otherwise(tmp_path: Path) -> None:
    torch.save(_encoder(dataclasses.replace(TINY, depth=5)).state_dict(), tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match=r"unexpected \['blocks\.4\."):
        load_encoder_weights(_encoder(), tmp_path / "deep.pth")
    report = load_encoder_weights(_encoder(), tmp_path / "deep.pth", strict=False)
    assert report.missing == [] and all(k.startswith("blocks.4.") for k in report.unexpected)
    assert len(report.unexpected) == 12


def test_shallower_file_is_refused_when_strict(tmp_path: Path) -> None:
    torch.save(_encoder(dataclasses.replace(TINY, depth=3)).state_dict(), tmp_path / "shallow.pth")
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.3\."):
        load_encoder_weights(_encoder(), tmp_path / "shallow.pth")


def test_training_checkpoint_with_model_encoder_prefix_loads(tmp_path: Path) -> None:
    gmml = GMMLModel(_encoder(seed=3), hidden=16, bottleneck=8)
    task_state = {f"model.{k}": v for k, v in gmml.state_dict().items()}
    # Keys as saved from a compiled module: the loader strips `_orig_mod.`.
    task_state = {k.replace("model.encoder.", "model._orig_mod.encoder."): v for k, v in task_state.items()}
    torch.save(
        {"model": task_state, "config": {"model": {"embed_dim": 32}}, "format_version": 1}, tmp_path / "c.pt"
    )
    enc = _encoder(seed=4)
    report = load_encoder_weights(enc, tmp_path / "c.pt")
    assert report.source == "sscxr-checkpoint"
    assert report.missing == [] and report.unexpected == []
    _assert_same_weights(gmml.encoder, enc)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"model": _encoder().state_dict(), "args": Path("x")}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="plain tensors"):
        load_encoder_weights(_encoder(), tmp_path / "pickled.pth")


def test_files_without_a_vit_or_missing_are_refused(tmp_path: Path) -> None:
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "cnn.pth")
    with pytest.raises(CheckpointError, match="no ViT found"):
        load_encoder_weights(_encoder(), tmp_path / "cnn.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder_weights(_encoder(), tmp_path / "nothing.pth")


def test_interpolate_pos_embed_identity_and_shape() -> None:
    pe = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embed(pe, (4, 4)) is pe
    out = interpolate_pos_embed(pe, (6, 3))
    assert out.shape == (1, 1 + 18, 8)
    assert torch.equal(out[:, :1], pe[:, :1])
    const = torch.ones(1, 1 + 16, 8)
    torch.testing.assert_close(interpolate_pos_embed(const, (8, 8)), torch.ones(1, 65, 8))
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 8), (4, 4))


def test_normalization_validation() -> None:
    with pytest.raises(ValueError, match="std"):
        Normalization(0.5, 0.0)


def test_damaged_weight_files_are_one_checkpoint_error(tmp_path: Path) -> None:
    """A half-copied export must be named, with the fix, wherever weights are loaded."""
    from sscxr.models.classifier import ViTClassifier, export_classifier, load_classifier

    weights, _ = export_encoder(_encoder(), TINY, NORM, tmp_path / "enc.safetensors")
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])  # truncated copy
    with pytest.raises(CheckpointError, match=r"enc\.safetensors: not a readable safetensors file"):
        load_encoder_weights(_encoder(), weights)
    (tmp_path / "cls").mkdir()
    export_classifier(ViTClassifier(_encoder(), ["healthy", "covid-19"]), TINY, tmp_path / "cls")
    (tmp_path / "cls" / "model.safetensors").write_bytes(b"garbage, not a header")
    with pytest.raises(CheckpointError, match="Copy it again or export the model again"):
        load_classifier(tmp_path / "cls")
