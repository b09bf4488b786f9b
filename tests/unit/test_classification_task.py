"""Classification fine-tuning: label mappings, labelled subsets, metrics, learning, and test-set isolation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from sscxr.config import load_config
from sscxr.data.cache import ImageCache, prepare
from sscxr.data.manifest import Manifest, ManifestRow, write_manifest
from sscxr.engine.checkpoint import load_checkpoint
from sscxr.engine.logging import read_metrics
from sscxr.engine.trainer import fit
from sscxr.errors import ConfigError, DataError
from sscxr.models.classifier import ViTClassifier, load_classifier
from sscxr.models.vit import ViTConfig, build_vit
from sscxr.tasks.classification import ClassificationTask, FinetuneConfig, build_finetuning, label_task_of
from sscxr.tasks.labels import (
    TASKS,
    class_weights,
    count_excluded,
    labelled_subset,
    resolve_task,
    select_rows,
)

TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0)
TINY_OVERRIDES = [
    "model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=4", "model.num_heads=2",
    "model.drop_path_rate=0.0", "train.workers=0", "train.amp='off'", "train.progress=false",
    "train.batch_size=8", "train.log_every=1", "optim.lr=2e-3", "optim.warmup_epochs=1",
    "train.min_steps=null",  # short runs on purpose; the floor has its own test
    # the toy images of one class are near-copies of each other in every split, by design
    "data.allow_leakage=true",
]  # fmt: skip
LABELS = ["healthy", "pneumonia", "covid-19", "non-covid", "tuberculosis", ""]


# Tiny models: one intra-op thread is faster on a shared CPU (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _image(label: str, rng: np.random.Generator) -> np.ndarray:
    """(32, 32) uint8: a bright disc for covid-19, bright stripes for pneumonia, dark noise otherwise."""
    yy, xx = np.mgrid[0:32, 0:32]
    img = 40 + 20 * rng.random((32, 32))
    if label == "covid-19":
        img[(yy - 16) ** 2 + (xx - 16) ** 2 < 80] = 220
    elif label == "pneumonia":
        img[(yy // 4) % 2 == 0] = 200
    return img.astype(np.uint8)


def _toy_cache(root: Path, per_split: dict[str, dict[str, int]]) -> ImageCache:
    """A prepared 32 px cache; `per_split[split][label]` images, one patient each except every 4th
    image, which shares its patient with the previous one."""
    rng = np.random.default_rng(0)
    rows, k = [], 0
    for split, counts in per_split.items():
        for label, n in counts.items():
            for _ in range(n):
                path = root / "png" / f"{k:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_image(label, rng)).save(path)
                patient = f"p{k - 1 if k % 4 == 3 else k}"
                rows.append(ManifestRow(str(path), label, patient, "site_a", split))
                k += 1
    write_manifest(Manifest(rows, root), root / "manifest.csv")
    prepare(root / "manifest.csv", root / "cache", size=32, workers=0, progress=False)
    return ImageCache.open(root / "cache")


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory: pytest.TempPathFactory) -> ImageCache:
    # Binary covid task: 24 + 24 training images, 8 + 8 validation images; extra labels to leave out;
    # a test split that fine-tuning must never read.
    per_split = {
        "train": {"healthy": 14, "pneumonia": 10, "covid-19": 24, "tuberculosis": 3, "": 2},
        "val": {"healthy": 4, "pneumonia": 4, "covid-19": 8, "tuberculosis": 1},
        "test": {"healthy": 6, "covid-19": 6},
    }
    return _toy_cache(tmp_path_factory.mktemp("toy"), per_split)


@pytest.mark.parametrize(
    ("task", "expected", "positive"),
    [
        ("covid_vs_noncovid", {"healthy": 0, "pneumonia": 0, "non-covid": 0, "covid-19": 1}, "covid-19"),
        ("healthy_vs_pathology", {"healthy": 0, "pneumonia": 1, "covid-19": 1}, "pathology"),
        ("pneumonia_vs_healthy", {"healthy": 0, "pneumonia": 1}, "pneumonia"),
        ("pneumonia_vs_covid", {"pneumonia": 0, "covid-19": 1}, "covid-19"),
        ("three_class", {"healthy": 0, "pneumonia": 1, "covid-19": 2}, None),
    ],
)
def test_task_label_mappings_and_exclusions(
    task: str, expected: dict[str, int], positive: str | None
) -> None:
    t = resolve_task(task)
    assert t.label_map == expected and t.positive_class == positive
    labels = LABELS * 2
    excluded = count_excluded(labels, t.label_map)
    assert excluded == {lab: 2 for lab in LABELS if lab not in expected}
    assert sum(excluded.values()) + sum(lab in expected for lab in labels) == len(labels)


def test_user_defined_classes_and_invalid_mappings() -> None:
    cfg = load_config(
        FinetuneConfig,
        [],
        ["classify.classes=[{name: ok, labels: [healthy]}, {name: sick, labels: [pneumonia, covid-19]}]"],
    )
    t = label_task_of(cfg.classify)
    assert t.name == "custom" and t.class_names == ("ok", "sick") and t.positive_class == "sick"
    assert t.label_map == {"healthy": 0, "pneumonia": 1, "covid-19": 1}
    with pytest.raises(ConfigError, match="more than one class"):
        resolve_task("x", [("a", ["healthy"]), ("b", ["healthy"])])
    with pytest.raises(ConfigError, match="at least 2"):
        resolve_task("x", [("a", ["healthy"])])
    with pytest.raises(ConfigError, match="not a known task"):
        resolve_task("covid_vs_everything")
    paper = ("covid_vs_noncovid", "healthy_vs_pathology", "pneumonia_vs_healthy", "pneumonia_vs_covid")
    assert set(TASKS) == {*paper, "three_class"}


def test_labelled_subset_keeps_patients_whole_and_is_seeded() -> None:
    pids = [f"p{i // 2}" for i in range(40)] + [f"q{i}" for i in range(20)]  # 20 two-image patients
    classes = [0] * 40 + [1] * 20
    pos = labelled_subset(pids, classes, fraction=0.25, seed=3)
    kept = {pids[i] for i in pos}
    assert all((pids[i] in kept) == (i in set(pos.tolist())) for i in range(60))  # whole patients
    assert sum(classes[i] == 0 for i in pos) == 10 and sum(classes[i] == 1 for i in pos) == 5
    assert np.array_equal(pos, labelled_subset(pids, classes, fraction=0.25, seed=3))
    assert not np.array_equal(pos, labelled_subset(pids, classes, fraction=0.25, seed=4))
    capped = labelled_subset(pids, classes, max_per_class=5, seed=0)
    assert sum(classes[i] == 0 for i in capped) == 4 and sum(classes[i] == 1 for i in capped) == 5
    # Row order does not change which patients are drawn.
    perm = np.random.default_rng(0).permutation(60)
    again = labelled_subset([pids[i] for i in perm], [classes[i] for i in perm], fraction=0.25, seed=3)
    assert {pids[perm[i]] for i in again} == kept


def test_select_rows_counts_exclusions_and_refuses_test_splits(toy_cache: ImageCache) -> None:
    t = resolve_task("covid_vs_noncovid")
    train, val, info = select_rows(toy_cache, t)
    assert info["excluded"] == {"train": {"": 2, "tuberculosis": 3}, "val": {"tuberculosis": 1}}
    assert info["n_images"] == {
        "train": {"non-covid": 24, "covid-19": 24},
        "val": {"non-covid": 8, "covid-19": 8},
    }
    splits = {toy_cache.rows[i].split for i in np.r_[train, val]}
    assert splits == {"train", "val"}
    _, _, info = select_rows(toy_cache, resolve_task("pneumonia_vs_covid"))
    assert info["excluded"]["train"] == {"": 2, "healthy": 14, "tuberculosis": 3}
    with pytest.raises(ConfigError, match="never reads a test split"):
        select_rows(toy_cache, t, val_split="test")
    sub_train, _, info = select_rows(toy_cache, t, fraction=0.5, subset_seed=1)
    assert info["labelled_subset"]["images"] == sub_train.size < train.size
    with pytest.raises(DataError, match="no image of class"):
        select_rows(toy_cache, resolve_task("x", [("a", ["healthy"]), ("b", ["non-covid"])]))


def test_class_weights() -> None:
    torch.testing.assert_close(class_weights([30, 10]), torch.tensor([2 / 3, 2.0]))
    torch.testing.assert_close(class_weights([5, 5, 5]), torch.ones(3))
    with pytest.raises(ConfigError):
        class_weights([3, 0])


def _task(names: tuple[str, ...]) -> ClassificationTask:
    torch.manual_seed(0)
    t = resolve_task("three_class" if len(names) == 3 else "covid_vs_noncovid")
    return ClassificationTask(ViTClassifier(build_vit(TINY), names), TINY, t).eval()


@pytest.mark.parametrize("names", [("non-covid", "covid-19"), ("healthy", "pneumonia", "covid-19")])
def test_validation_metrics_match_sklearn(names: tuple[str, ...]) -> None:
    task = _task(names)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(24, 1, 32, 32, generator=g), torch.arange(24) % len(names)
    task.reset_metrics()
    with torch.no_grad():
        for s in (slice(0, 10), slice(10, 24)):
            task.validation_step({"image": images[s], "label": labels[s], "index": torch.arange(24)[s]})
        probs = task.model(images).float().softmax(-1).numpy()
        logits = task.model(images).float()
    m = task.compute_metrics()
    y = labels.numpy()
    want = roc_auc_score(y, probs[:, 1]) if len(names) == 2 else roc_auc_score(y, probs, multi_class="ovr")
    assert m["auc_roc"] == pytest.approx(want)
    assert m["accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()))
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert all(isinstance(v, float) for v in m.values())
    assert ("sensitivity" in m) == (len(names) == 2) and ("covid-19/auc_roc" in m) == (len(names) == 3)


def test_undefined_metrics_are_left_out(caplog: pytest.LogCaptureFixture) -> None:
    task = _task(("non-covid", "covid-19"))
    task.reset_metrics()
    with torch.no_grad():
        task.validation_step({"image": torch.rand(4, 1, 32, 32), "label": torch.zeros(4, dtype=torch.long),
                              "index": torch.arange(4)})  # fmt: skip
    m = task.compute_metrics()
    assert "auc_roc" not in m and "sensitivity" not in m and "accuracy" in m and "specificity" in m
    assert "auc_roc is undefined" in caplog.text


def _no_test_reads(monkeypatch: pytest.MonkeyPatch, cache: ImageCache) -> list[int]:
    """Make reading any test row of `cache` an error; returns the list of rows read."""
    reads: list[int] = []
    original = ImageCache.image_float

    def spy(self: ImageCache, i: int) -> np.ndarray:
        if self.rows[i].split.startswith("test"):
            raise AssertionError(f"test row {i} was read during fine-tuning")
        reads.append(int(i))
        return original(self, i)

    monkeypatch.setattr(ImageCache, "image_float", spy)
    return reads


def test_learns_separable_cache_and_best_checkpoint_never_reads_test(
    toy_cache: ImageCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = _no_test_reads(monkeypatch, toy_cache)
    cfg = load_config(FinetuneConfig, [], [*TINY_OVERRIDES, f"data.cache={toy_cache.root}", "train.epochs=4"])
    torch.manual_seed(0)  # timm initialises from the global RNG
    task, train_set, val_set = build_finetuning(cfg, seed=0, command="sscxr finetune (test)")
    assert len(train_set) == 48 and val_set is not None and len(val_set) == 16
    result = fit(task, train_set, val_set, cfg.train, cfg.optim, tmp_path, None, None, resume=False)

    test_rows = set(toy_cache.indices(split="test").tolist())
    assert reads and not test_rows & set(reads)  # the spy was live, and no test row was ever read
    val_rows = set(toy_cache.indices(split="val").tolist())
    assert val_rows & set(reads)
    records = read_metrics(tmp_path)
    val_auc = [r["metrics"]["val/auc_roc"] for r in records if r["split"] == "val"]
    losses = [r["metrics"]["train/loss"] for r in records if r["split"] == "train"]
    # Mean-pooled patch tokens after a warm-up capped at 10% of the 24 steps: the loss falls by a third.
    assert max(val_auc) >= 0.95 and np.mean(losses[-6:]) < 0.7 * np.mean(losses[:6]) and len(val_auc) == 4
    # best.pt is the epoch with the highest validation AUC, and it is what was exported.
    assert result.best_metric == max(val_auc)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["checkpoint"]["weights"] == "best" and meta["checkpoint"]["value"] == max(val_auc)
    assert meta["checkpoint"]["split"] == "val" and meta["excluded"]["train"] == {"": 2, "tuberculosis": 3}
    assert meta["manifest_hash"] == toy_cache.manifest_hash and meta["command"] == "sscxr finetune (test)"
    assert meta["class_names"] == ["non-covid", "covid-19"] and meta["thresholds"] == {"default": 0.5}
    # 24 steps, 8 validation images per class: both flagged; AUC 1.0 is not.
    assert {f["code"] for f in meta["flags"]} == {"few_steps", "small_validation"}
    assert meta["pool"] == "avg" and meta["mode"] == "finetune"
    assert meta["class_balance"] == {"setting": "auto", "used": "none", "ratio": 1.0}
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")["model"]
    exported = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(exported[k], best[f"model.{k}"]) for k in exported)
    if meta["checkpoint"]["step"] != result.state.step:  # the best epoch was not the last one
        last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
        assert not all(torch.equal(exported[k], last[f"model.{k}"]) for k in exported)
    model, _ = load_classifier(tmp_path)
    x = torch.stack([train_set[k]["image"] for k in range(4)])
    assert torch.equal(model(x), task.model.eval()(x))
