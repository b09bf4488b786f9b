"""Fine-tuning with few labels: the step floor, class balance, layer decay, frozen and LP-FT modes."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from sscxr.config import load_config
from sscxr.data.cache import ImageCache
from sscxr.engine.logging import read_metrics
from sscxr.engine.schedule import build_optimizer
from sscxr.engine.trainer import fit
from sscxr.models.loading import Normalization, export_encoder
from sscxr.models.vit import build_vit
from sscxr.tasks.classification import ClassificationTask, FinetuneConfig, build_finetuning
from sscxr.tasks.finetune_recipe import resolve_class_balance, resolve_layer_decay
from sscxr.tasks.labels import class_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_classification_task import TINY, TINY_OVERRIDES, _toy_cache

pytestmark = pytest.mark.usefixtures("one_thread")

# healthy vs covid-19: 18 + 18 training images (1:1); pneumonia_vs_healthy: 4 + 18 (4.5:1).
HEALTHY_VS_COVID = "classify.classes=[{name: healthy, labels: [healthy]}, {name: covid, labels: [covid-19]}]"


@pytest.fixture(scope="module")
def few_cache(tmp_path_factory: pytest.TempPathFactory) -> ImageCache:
    per_split = {
        "train": {"healthy": 18, "covid-19": 18, "pneumonia": 4},
        "val": {"healthy": 4, "covid-19": 4, "pneumonia": 4},
    }
    return _toy_cache(tmp_path_factory.mktemp("few"), per_split)


@pytest.fixture(scope="module")
def gmml_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("gmml")
    torch.manual_seed(5)
    export_encoder(build_vit(TINY), TINY, Normalization(0.4, 0.2), run / "encoder")
    return run


def _build(cache: ImageCache, *overrides: str) -> tuple[FinetuneConfig, ClassificationTask, object, object]:
    cfg = load_config(FinetuneConfig, [], [*TINY_OVERRIDES, f"data.cache={cache.root}", *overrides])
    torch.manual_seed(0)  # timm initialises from the global RNG
    task, train_set, val_set = build_finetuning(cfg, seed=0)
    return cfg, task, train_set, val_set


def test_step_floor_is_honoured_with_36_labelled_images(few_cache: ImageCache, tmp_path: Path) -> None:
    # The defaults' floor (300 steps) on 36 images at batch 16: 2 steps per epoch, so 10 epochs would be
    # 20 steps; the run trains 150 epochs and validates about 25 times, not 150.
    cfg, task, train_set, val_set = _build(
        few_cache, HEALTHY_VS_COVID, "train.min_steps=300", "train.batch_size=16", "train.epochs=10",
        "train.log_every=50",
    )  # fmt: skip
    assert len(train_set) == 36 and cfg.train.min_steps == 300
    result = fit(task, train_set, val_set, cfg.train, cfg.optim, tmp_path, None, None, resume=False)
    assert result.state.step >= 300 and result.state.epoch == 150
    records = read_metrics(tmp_path)
    assert max(r["step"] for r in records if r["split"] == "train") == 300
    assert len([r for r in records if r["split"] == "val"]) == 25
    meta = json.loads((tmp_path / "model.json").read_text())
    assert "few_steps" not in {f["code"] for f in meta["flags"]}


def test_finetune_defaults_have_the_floor_and_warmup_cap() -> None:
    cfg = load_config(FinetuneConfig, ["classify/vit_s16"], [])
    assert cfg.train.min_steps == 300 and cfg.optim.warmup_max_fraction == 0.1
    assert cfg.classify.pool == "avg" and cfg.classify.class_balance == "auto"
    assert cfg.classify.pretrained_layer_decay == 0.75 and cfg.classify.mode == "finetune"
    tiny = load_config(FinetuneConfig, ["classify/tiny"], [])
    assert tiny.train.min_steps == 300 and tiny.optim.warmup_max_fraction == 0.1
    default = FinetuneConfig()
    assert default.train.min_steps == 300 and default.optim.warmup_max_fraction == 0.1


def test_class_balance_auto(few_cache: ImageCache, caplog: pytest.LogCaptureFixture) -> None:
    used, weights, ratio = resolve_class_balance("auto", [45, 10])
    assert used == "loss_weights" and ratio == 4.5
    torch.testing.assert_close(weights, class_weights([45, 10]))
    assert resolve_class_balance("auto", [20, 20]) == ("none", None, 1.0)
    assert resolve_class_balance("auto", [15, 10])[0] == "none"  # 1.5:1 is not above the ratio
    # On a cache: 4.5:1 (pneumonia_vs_healthy) gets weights, 1:1 none; both logged, in model.json.
    caplog.set_level(logging.INFO)
    _, task, _, _ = _build(few_cache, "classify.task=pneumonia_vs_healthy")
    torch.testing.assert_close(task.class_weight, class_weights([18, 4]))
    assert task.export_info["class_balance"] == {"setting": "auto", "used": "loss_weights", "ratio": 4.5}
    assert task.export_info["class_weights"] == pytest.approx(class_weights([18, 4]).tolist())
    assert "class balance auto -> loss_weights" in caplog.text and "loss weights" in caplog.text
    _, task, _, _ = _build(few_cache, HEALTHY_VS_COVID)
    assert task.class_weight is None and task.export_info["class_balance"]["used"] == "none"
    assert not task.flags or "unbalanced_loss" not in {f.code for f in task.flags}
    # "none" on 4.5:1 data is what the user asked for, but it is warned about and flagged.
    caplog.clear()
    _, task, _, _ = _build(few_cache, "classify.task=pneumonia_vs_healthy", "classify.class_balance=none")
    assert task.class_weight is None and "unbalanced_loss" in {f.code for f in task.flags}
    assert any(r.levelno == logging.WARNING and "unbalanced_loss" in r.message for r in caplog.records)


def test_layer_decay_default_for_pretrained_starts(few_cache: ImageCache, gmml_export: Path) -> None:
    assert resolve_layer_decay(None, 0.75, pretrained=True, frozen=False) == (
        0.75,
        "classify.pretrained_layer_decay",
    )
    assert resolve_layer_decay(0.6, 0.75, pretrained=True, frozen=False) == (0.6, "optim.layer_decay")
    assert resolve_layer_decay(None, 0.75, pretrained=False, frozen=False) == (None, "none")
    assert resolve_layer_decay(None, None, pretrained=True, frozen=False) == (None, "none")
    start = ["classify.init=sscxr", f"classify.init_path={gmml_export}", HEALTHY_VS_COVID]
    cfg, task, _, _ = _build(few_cache, *start)
    assert task.layer_decay == 0.75
    assert task.export_info["layer_decay"] == {"value": 0.75, "from": "classify.pretrained_layer_decay"}
    opt, _ = build_optimizer(task, cfg.optim, 1.0, torch.device("cpu"))
    scale = {
        n: g["lr_scale"]
        for g in opt.param_groups
        for p in g["params"]
        for n, q in task.named_parameters()
        if p is q
    }
    # depth 4: head and final norm on top (1.0), block i gets 0.75 ** (4 - i), embeddings 0.75 ** 5.
    assert scale["model.encoder.head.weight"] == scale["model.encoder.norm.weight"] == 1.0
    assert scale["model.encoder.blocks.3.mlp.fc1.weight"] == pytest.approx(0.75)
    assert scale["model.encoder.blocks.0.attn.qkv.weight"] == pytest.approx(0.75**4)
    assert (
        scale["model.encoder.pos_embed"]
        == scale["model.encoder.patch_embed.proj.weight"]
        == pytest.approx(0.75**5)
    )
    assert scale["model.encoder.cls_token"] == pytest.approx(0.75**5)
    # optim.layer_decay set: the engine applies it, the task does not apply a second one.
    cfg, task, _, _ = _build(few_cache, *start, "optim.layer_decay=0.5")
    assert task.layer_decay is None and task.export_info["layer_decay"]["from"] == "optim.layer_decay"
    _, task, _, _ = _build(few_cache, HEALTHY_VS_COVID)  # scratch: no decay
    assert task.layer_decay is None and task.export_info["layer_decay"] == {"value": None, "from": "none"}


def test_frozen_mode_trains_the_head_only(few_cache: ImageCache, gmml_export: Path, tmp_path: Path) -> None:
    cfg, task, train_set, val_set = _build(
        few_cache, "classify.mode=frozen", "classify.init=sscxr", f"classify.init_path={gmml_export}",
        HEALTHY_VS_COVID, "model.drop_path_rate=0.2", "classify.drop_rate=0.1", "train.epochs=2",
    )  # fmt: skip
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert trainable == ["model.encoder.head.weight", "model.encoder.head.bias"]
    opt, _ = build_optimizer(task, cfg.optim, 1.0, torch.device("cpu"))
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    task.train()  # the encoder stays in eval mode (no drop-path), the head's dropout follows
    assert not task.model.encoder.blocks[0].training and not task.model.encoder.norm.training
    assert task.model.encoder.head_drop.training and task.training
    x = torch.stack([train_set[k]["image"] for k in range(4)])
    torch.testing.assert_close(task.model.features(x), task.model.features(x), rtol=0, atol=0)
    fit(task, train_set, val_set, cfg.train, cfg.optim, tmp_path, None, None, resume=False)
    after = task.model.state_dict()
    for k, v in before.items():
        if k.startswith("encoder.head."):
            assert not torch.equal(after[k], v), k
        else:
            assert torch.equal(after[k], v), k
    assert json.loads((tmp_path / "model.json").read_text())["mode"] == "frozen"


def test_lp_ft_head_equals_sklearn_logistic_regression(few_cache: ImageCache, gmml_export: Path) -> None:
    # 4.5:1 data: class balance resolves to loss weights, so the regression is class-weight balanced.
    _, task, _, _ = _build(
        few_cache, "classify.mode=lp_ft", "classify.init=sscxr", f"classify.init_path={gmml_export}",
        "classify.task=pneumonia_vs_healthy",
    )  # fmt: skip
    info = task.export_info["lp_init"]
    assert info["class_weight"] == "balanced" and info["n_images"] == 22 and info["C"] == 1.0
    cache = ImageCache.open(few_cache.root)
    rows = cache.indices(split="train")
    rows = rows[[cache.rows[i].label in ("healthy", "pneumonia") for i in rows]]
    x = torch.stack([torch.from_numpy(cache.image_float(int(i)))[None] for i in rows])
    y = np.array([int(cache.rows[i].label == "pneumonia") for i in rows])
    model = task.model.eval()
    with torch.no_grad():
        feats = model.features(x).double().numpy()
        probs = model.predict_proba(x).double().numpy()
    scaler = StandardScaler().fit(feats)
    clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000).fit(scaler.transform(feats), y)
    want = clf.predict_proba(scaler.transform(feats))
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert 0.0 < want[:, 1].min() < want[:, 1].max() < 1.0  # a real fit, not saturated
