"""ViTClassifier: forward, encoder initialisation (GMML export, GMML checkpoint, timm file), export / load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from timm.models.vision_transformer import VisionTransformer

from sscxr.errors import CheckpointError, ConfigError
from sscxr.models.classifier import ViTClassifier, export_classifier, load_classifier
from sscxr.models.gmml import GMMLModel
from sscxr.models.loading import Normalization, export_encoder
from sscxr.models.vit import ViTConfig, build_vit
from sscxr.tasks.classification import ClassifyConfig, init_encoder

TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0)
GMML_NORM = Normalization(mean=0.4, std=0.2)
CACHE_NORM = Normalization(mean=0.5, std=0.25)
HEAD = ["head.bias", "head.weight"]


def _classifier(
    names: tuple[str, ...] = ("non-covid", "covid-19"), seed: int = 0, pool: str = "avg"
) -> ViTClassifier:
    torch.manual_seed(seed)  # tests only: timm initialises from the global RNG
    return ViTClassifier(build_vit(TINY), names, drop_rate=0.1, seed=seed, pool=pool)


def _gmml_run(tmp_path: Path) -> tuple[Path, VisionTransformer]:
    """A pre-training run folder as `sscxr pretrain` leaves it: encoder.safetensors + encoder.json."""
    torch.manual_seed(5)
    encoder = build_vit(TINY)
    run = tmp_path / "gmml"
    export_encoder(encoder, TINY, GMML_NORM, run / "encoder", {"pretraining": "gmml", "manifest_hash": "ab"})
    return run, encoder


def _timm_file(tmp_path: Path, depth: int = 4) -> tuple[Path, VisionTransformer]:
    """An ImageNet-style timm checkpoint: RGB, 64 px (8x8 grid), a 10-class head, saved as a state_dict."""
    torch.manual_seed(7)
    model = VisionTransformer(
        img_size=64, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=depth, num_heads=2
    )
    path = tmp_path / f"deit_depth{depth}.pth"
    torch.save({"model": model.state_dict()}, path)  # DeiT releases wrap the state_dict in "model"
    return path, model


def test_forward_shapes_and_standardisation() -> None:
    model = _classifier(pool="token").eval()
    model.set_normalization(CACHE_NORM)
    x = torch.rand(3, 1, 32, 32)
    logits = model(x)
    assert logits.shape == (3, 2)
    assert model.features(x).shape == (3, 32)
    # The model standardises its [0, 1] input itself: with the class token, forward == timm's own
    # class-token classifier on the standardised image.
    expected = model.encoder((x - CACHE_NORM.mean) / CACHE_NORM.std)
    torch.testing.assert_close(logits, expected)
    probs = model.predict_proba(x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    assert model.thresholds == {"default": 0.5} and model.normalization == CACHE_NORM
    assert _classifier(("healthy", "pneumonia", "covid-19")).thresholds == {}


def test_avg_pool_is_the_mean_of_the_final_norm_patch_tokens() -> None:
    avg, token = _classifier(pool="avg").eval(), _classifier(pool="token").eval()
    assert avg.state_dict().keys() == token.state_dict().keys()  # the pooling owns no parameter
    token.load_state_dict(avg.state_dict())
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        tokens = avg.encoder.forward_features(avg.standardize(x))  # (B, 1 + 16, D), after encoder.norm
        assert tokens.shape == (3, 17, 32)
        torch.testing.assert_close(avg.features(x), tokens[:, 1:].mean(dim=1))
        torch.testing.assert_close(token.features(x), tokens[:, 0])
        assert not torch.allclose(avg.features(x), token.features(x))
        torch.testing.assert_close(avg(x), avg.encoder.head(tokens[:, 1:].mean(dim=1)))
    with pytest.raises(ValueError, match="pool"):
        ViTClassifier(build_vit(TINY), ("a", "b"), pool="max")


def test_every_parameter_gets_a_finite_gradient() -> None:
    model = _classifier().train()
    loss = torch.nn.functional.cross_entropy(model(torch.rand(4, 1, 32, 32)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    ("names", "kwargs"),
    [
        (("one",), {}),
        (("a", "a"), {}),
        (("a", "b"), {"drop_rate": 1.0}),
        (("a", "b"), {"thresholds": {"x": 2.0}}),
    ],
)
def test_bad_arguments_raise(names: tuple[str, ...], kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ViTClassifier(build_vit(TINY), names, **kwargs)


def test_init_from_gmml_export(tmp_path: Path) -> None:
    run, encoder = _gmml_run(tmp_path)
    model = _classifier()
    head_before = model.encoder.head.weight.clone()
    info = init_encoder(model, ClassifyConfig(init="sscxr", init_path=str(run)), CACHE_NORM)
    # Exactly the head is missing (trained from scratch); the export has nothing the classifier lacks.
    assert info["missing"] == HEAD and info["unexpected"] == []
    assert info["source"] == "sscxr-export" and info["path"] == str(run / "encoder.safetensors")
    assert info["pretraining"]["manifest_hash"] == "ab"
    # The export's normalisation wins over the cache's: the encoder was trained with it.
    assert info["normalization_from"] == "export" and model.normalization == GMML_NORM
    state = model.encoder.state_dict()
    for k, v in encoder.state_dict().items():
        assert torch.equal(state[k], v), k
    assert torch.equal(model.encoder.head.weight, head_before)


def test_init_from_gmml_training_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3)
    gmml = GMMLModel(build_vit(TINY), recon_blocks=[2, 4], hidden=16, bottleneck=8)
    ckpt = {
        "model": {f"model.{k}": v for k, v in gmml.state_dict().items()},
        "config": {},
        "format_version": 1,
    }
    (tmp_path / "checkpoints").mkdir()
    torch.save(ckpt, tmp_path / "checkpoints" / "last.pt")
    model = _classifier()
    info = init_encoder(model, ClassifyConfig(init="sscxr", init_path=str(tmp_path)), CACHE_NORM)
    assert info["source"] == "sscxr-checkpoint" and info["missing"] == HEAD and info["unexpected"] == []
    assert info["normalization_from"] == "cache" and model.normalization == CACHE_NORM
    assert torch.equal(model.encoder.pos_embed, gmml.encoder.pos_embed)


def test_init_from_timm_file(tmp_path: Path) -> None:
    path, src = _timm_file(tmp_path)
    model = _classifier()
    info = init_encoder(model, ClassifyConfig(init="timm", init_path=str(path)), CACHE_NORM)
    # The file's 10-class head is dropped (unexpected) and ours is new (missing): nothing else.
    assert info["missing"] == HEAD and info["unexpected"] == HEAD and info["source"] == "timm"
    notes = " ".join(info["adapted"])
    assert "3 input channels summed into 1" in notes and "8x8 -> 4x4" in notes
    expected = src.patch_embed.proj.weight.sum(dim=1, keepdim=True)
    torch.testing.assert_close(model.encoder.patch_embed.proj.weight, expected)
    assert torch.equal(model.encoder.blocks[2].mlp.fc1.weight, src.blocks[2].mlp.fc1.weight)
    assert model.encoder.head.weight.shape == (2, 32)
    # ImageNet weights get the X-ray cache's own standardisation (GMML.md), never ImageNet statistics.
    assert info["normalization_from"] == "cache" and model.normalization == CACHE_NORM


def test_auto_init_detects_the_file_kind(tmp_path: Path) -> None:
    run, _ = _gmml_run(tmp_path)
    path, _ = _timm_file(tmp_path)
    assert (
        init_encoder(_classifier(), ClassifyConfig(init="auto", init_path=str(run)), CACHE_NORM)["mode"]
        == "sscxr"
    )
    assert (
        init_encoder(_classifier(), ClassifyConfig(init="auto", init_path=str(path)), CACHE_NORM)["mode"]
        == "timm"
    )
    assert init_encoder(_classifier(), ClassifyConfig(init="auto"), CACHE_NORM)["mode"] == "scratch"


def test_mismatching_files_are_refused(tmp_path: Path) -> None:
    shallow, _ = _timm_file(tmp_path, depth=3)
    with pytest.raises(CheckpointError, match="missing"):
        init_encoder(_classifier(), ClassifyConfig(init="timm", init_path=str(shallow)), CACHE_NORM)
    wide = ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)
    export_encoder(build_vit(wide), wide, GMML_NORM, tmp_path / "wide" / "encoder")
    with pytest.raises(CheckpointError, match="embed_dim"):
        init_encoder(
            _classifier(), ClassifyConfig(init="sscxr", init_path=str(tmp_path / "wide")), CACHE_NORM
        )
    # The declared kind must match the file: a timm file is not a GMML export, and vice versa.
    path, _ = _timm_file(tmp_path)
    with pytest.raises(CheckpointError, match=r"classify\.init=timm"):
        init_encoder(_classifier(), ClassifyConfig(init="sscxr", init_path=str(path)), CACHE_NORM)
    run, _ = _gmml_run(tmp_path)
    with pytest.raises(CheckpointError, match=r"classify\.init=sscxr"):
        init_encoder(_classifier(), ClassifyConfig(init="timm", init_path=str(run)), CACHE_NORM)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"neither encoder\.safetensors"):
        init_encoder(
            _classifier(), ClassifyConfig(init="sscxr", init_path=str(tmp_path / "empty")), CACHE_NORM
        )
    with pytest.raises(ConfigError):
        ClassifyConfig(init="sscxr")


def test_export_and_load_round_trip(tmp_path: Path) -> None:
    model = _classifier(("healthy", "pneumonia", "covid-19")).eval()
    model.set_normalization(CACHE_NORM)
    with torch.no_grad():
        model.encoder.head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))  # something the loader must keep
    weights, meta_path = export_classifier(model, TINY, tmp_path / "model", {"task": "three_class"})
    assert weights == tmp_path / "model.safetensors" and meta_path == tmp_path / "model.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == "sscxr-classifier" and meta["class_names"] == [
        "healthy",
        "pneumonia",
        "covid-19",
    ]
    assert meta["normalization"] == {"mean": 0.5, "std": 0.25} and meta["decision"] == "argmax"
    assert meta["vit"]["embed_dim"] == 32 and meta["img_size"] == 32 and meta["task"] == "three_class"
    assert meta["pool"] == "avg"
    x = torch.rand(4, 1, 32, 32)
    for given in (tmp_path, weights, meta_path):
        loaded, got = load_classifier(given)
        assert not loaded.training and got == meta
        assert loaded.class_names == model.class_names and loaded.normalization == CACHE_NORM
        assert loaded.pool == "avg" and torch.equal(loaded(x), model(x))


def test_old_model_json_without_pool_loads_as_class_token(tmp_path: Path) -> None:
    model = _classifier(pool="token").eval()
    export_classifier(model, TINY, tmp_path / "model")
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["pool"]  # as written before pooling was an option
    (tmp_path / "model.json").write_text(json.dumps(meta))
    loaded, _ = load_classifier(tmp_path)
    x = torch.rand(2, 1, 32, 32)
    assert loaded.pool == "token" and torch.equal(loaded(x), model(x))


def test_load_refuses_foreign_or_broken_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no classifier metadata"):
        load_classifier(tmp_path)
    export_encoder(build_vit(TINY), TINY, GMML_NORM, tmp_path / "model")  # an encoder, not a classifier
    with pytest.raises(CheckpointError, match="not an sscxr classifier"):
        load_classifier(tmp_path)
    model = _classifier()
    export_classifier(model, TINY, tmp_path / "model")
    state = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    del state["encoder.head.weight"]
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match"):
        load_classifier(tmp_path)
