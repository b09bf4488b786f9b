"""`sscxr.evaluation`: threshold rules, thresholds frozen on validation, metrics = the metrics module's,
undefined metrics, per-class counts, labels outside the task, prediction input conventions."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sscxr.data.cache import ImageCache, prepare
from sscxr.errors import ConfigError, DataError
from sscxr.evaluation import (
    EvalOptions,
    ModelSpec,
    SplitSpec,
    TestSpec,
    ThresholdRule,
    choose_threshold,
    class_targets,
    evaluate_arrays,
    evaluate_models,
    metric_summary,
    open_split,
    parse_split_spec,
    parse_threshold,
    predict,
)
from sscxr.metrics import bootstrap_metrics, classification_metrics, youden_threshold

SIZE = 32
# (intensity = P(covid-19) under the stand-in model, label, patient, split). Val and test would give
# different Youden thresholds (0.6 vs 0.35); the pediatric split has no covid-19 at all.
COHORT = [
    *[(v, "healthy", f"v{k}", "val") for k, v in enumerate((0.1, 0.2, 0.3, 0.15))],
    *[(v, "covid-19", f"vp{k}", "val") for k, v in enumerate((0.6, 0.7, 0.8, 0.65))],
    (0.05, "healthy", "t0", "test"),
    (0.1, "healthy", "t1", "test"),
    (0.15, "healthy", "t1", "test"),  # patient t1 has two images
    (0.2, "healthy", "t2", "test"),
    *[(v, "covid-19", f"tp{k}", "test") for k, v in enumerate((0.35, 0.4, 0.45, 0.5))],
    (0.5, "pneumonia", "tq0", "test"),  # labels the covid task does not use: left out and counted
    (0.6, "pneumonia", "tq1", "test"),
    *[(v, "healthy", f"p{k}", "pediatric") for k, v in enumerate((0.1, 0.3, 0.7))],
]
BINARY_META: dict[str, Any] = {
    "format": "sscxr-classifier",
    "class_names": ["healthy", "covid-19"],
    "task": "covid_vs_healthy",
    "label_map": {"healthy": 0, "covid-19": 1},
    "normalization": {"mean": 0.0, "std": 1.0},
    "thresholds": {"default": 0.5},
    "img_size": SIZE,
    "manifest_hash": "feedfacecafebeef",
    "command": "sscxr finetune -c classify/tiny --out runs/x",
}


class MeanModel(nn.Module):
    """Stand-in classifier: P(class 1) = mean input intensity (inputs standardised with mean 0, std 1)."""

    def __init__(self, sharpen: float = 1.0) -> None:
        super().__init__()
        self.sharpen = sharpen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x.mean(dim=(1, 2, 3)).clamp(1e-4, 1 - 1e-4)
        return torch.stack([torch.zeros_like(p), self.sharpen * torch.logit(p)], dim=1)


def write_cohort(tmp: Path, rows: list[tuple[float, str, str, str]] = COHORT) -> Path:
    """Flat 8-bit PNGs of the given intensities, their manifest and the cache; returns the cache folder."""
    img_dir = tmp / "imgs"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,patient_id,site,split,mask_path"]
    for k, (v, label, patient, split) in enumerate(rows):
        Image.fromarray(np.full((SIZE, SIZE), round(v * 255), np.uint8), mode="L").save(img_dir / f"{k}.png")
        lines.append(f"imgs/{k}.png,{label},{patient},site_a,{split},")
    (tmp / "manifest.csv").write_text("\n".join(lines) + "\n")
    prepare(tmp / "manifest.csv", tmp / "cache", size=SIZE, workers=0, progress=False)
    return tmp / "cache"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("cohort"))


def _opts(rule: str = "default", n_boot: int = 50) -> EvalOptions:
    return EvalOptions(parse_threshold(rule), n_boot=n_boot, progress=False, device="cpu")


def _value(result: dict[str, Any], cls: str, metric: str) -> dict[str, Any]:
    return next(m for m in result["metrics"] if m["class"] == cls and m["metric"] == metric)


# ------------------------------------------------------------------------------------------ parsing
def test_parse_threshold_rules() -> None:
    assert parse_threshold("default") == ThresholdRule("default")
    assert parse_threshold("0.3") == ThresholdRule("fixed", 0.3)
    assert parse_threshold("Youden") == ThresholdRule("youden")
    assert parse_threshold("sensitivity:0.95") == ThresholdRule("sensitivity", 0.95)
    assert parse_threshold("youden").needs_validation and not parse_threshold("0.5").needs_validation
    for bad in ("1.5", "0", "sensitivity:", "sensitivity:2", "median", "0.5:1"):
        with pytest.raises(ConfigError):
            parse_threshold(bad)


def test_parse_split_spec() -> None:
    assert parse_split_spec("cache/a:test") == SplitSpec(Path("cache/a"), ("test",))
    assert parse_split_spec("/x/c:val,test").splits == ("val", "test")
    with pytest.raises(ConfigError, match="CACHE_DIR:SPLIT"):
        parse_split_spec("cache/a")


def test_all_rows_tokens(cache_dir: Path) -> None:
    cache, every = open_split(parse_split_spec(f"{cache_dir}:*"))
    assert np.array_equal(open_split(parse_split_spec(f"{cache_dir}:all"))[1], every)
    assert np.array_equal(every, cache.indices())


def test_choose_threshold_rules() -> None:
    names = ["neg", "pos"]
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.2, 0.8], [0.1, 0.9]])
    assert choose_threshold(ThresholdRule(), names, {"default": 0.4}).value == 0.4
    assert choose_threshold(ThresholdRule(), names, None).value == 0.5
    youden = choose_threshold(ThresholdRule("youden"), names, None, y, p)
    assert youden.value == pytest.approx(youden_threshold(y, p[:, 1])) and youden.n_val == 6
    sens = choose_threshold(ThresholdRule("sensitivity", 1.0), names, None, y, p)
    assert sens.value == pytest.approx(0.6)
    with pytest.raises(ConfigError, match="--val"):
        choose_threshold(ThresholdRule("youden"), names, None)
    multi = choose_threshold(ThresholdRule("youden"), ["a", "b", "c"], None)
    assert multi.value is None and "binary" in (multi.note or "")


# -------------------------------------------------------------------------------------- arrays -> metrics
def _arrays(seed: int = 0, n_patients: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 3, n_patients)
    groups = np.repeat(np.arange(n_patients), per).astype(object)
    y = np.repeat(rng.integers(0, 3, n_patients), per)
    logits = rng.normal(size=(y.size, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs, groups


def test_metrics_equal_metrics_module() -> None:
    y, probs, groups = _arrays()
    names = ["healthy", "pneumonia", "covid-19"]
    res = evaluate_arrays(y, probs, groups, names, None, n_boot=80, seed=3)
    direct = classification_metrics(y, probs, names)
    cis = bootstrap_metrics(
        y, probs, groups, lambda a, b: metric_summary(a, b, names, None), n_boot=80, seed=3
    )
    for row in direct.rows:
        for metric in ("sensitivity", "specificity", "fpr", "fnr", "precision", "auc_pr", "auc_roc"):
            got = _value(res, row.name, metric)
            assert got["value"] == pytest.approx(getattr(row, metric).value, abs=1e-6)
            key = f"{row.name}/{metric}"
            assert (got["ci_low"], got["ci_high"]) == pytest.approx((cis[key].low, cis[key].high), abs=1e-6)
            assert got["ci_low"] <= got["value"] <= got["ci_high"]
    assert _value(res, "all", "accuracy")["value"] == pytest.approx(direct.accuracy.value)
    assert res["confusion"] == direct.confusion.tolist()
    assert _value(res, "covid-19", "sensitivity")["n"] == int((y == 2).sum())


def test_undefined_metric_is_none_with_reason() -> None:
    y = np.zeros(6, dtype=int)  # no positives: sensitivity, FNR and both AUCs are undefined
    probs = np.tile([[0.7, 0.3]], (6, 1))
    res = evaluate_arrays(y, probs, None, ["healthy", "covid-19"], 0.5, n_boot=20)
    for metric in ("sensitivity", "fnr", "auc_roc", "auc_pr"):
        row = _value(res, "covid-19", metric)
        assert row["value"] is None and row["ci_low"] is None and row["ci_high"] is None
        assert row["reason"]
    assert _value(res, "covid-19", "specificity")["value"] == 1.0
    assert res["curves"]["covid-19"] is None


def test_counts_images_and_patients_per_class() -> None:
    y = np.array([0, 0, 0, 1, 1])
    patients = np.array(["a", "a", "b", "c", "d"], dtype=object)
    res = evaluate_arrays(y, np.tile([[0.6, 0.4]], (5, 1)), patients, ["neg", "pos"], 0.5, n_boot=0)
    assert res["counts"] == {"neg": {"images": 3, "patients": 2}, "pos": {"images": 2, "patients": 2}}
    assert (res["n_images"], res["n_patients"]) == (5, 4)


# ----------------------------------------------------------------------------------------- prediction
def test_predict_standardises_for_plain_models(cache_dir: Path) -> None:
    cache = ImageCache.open(cache_dir)
    idx = cache.indices(split="val")
    probs = predict(MeanModel(), BINARY_META, cache, idx, batch_size=3, device="cpu", progress=False)
    expected = np.array([round(COHORT[i][0] * 255) / 255 for i in idx])
    np.testing.assert_allclose(probs[:, 1], expected, atol=1e-4)
    shifted = {**BINARY_META, "normalization": {"mean": 0.1, "std": 1.0}}
    probs2 = predict(MeanModel(), shifted, cache, idx, device="cpu", progress=False)
    np.testing.assert_allclose(probs2[:, 1], expected - 0.1, atol=1e-4)


def test_predict_feeds_raw_images_to_vit_classifier(cache_dir: Path) -> None:
    from sscxr.models.classifier import ViTClassifier
    from sscxr.models.loading import Normalization
    from sscxr.models.vit import ViTConfig, build_vit

    torch.manual_seed(0)
    cfg = ViTConfig(img_size=SIZE, patch_size=8, embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.0)
    model = ViTClassifier(build_vit(cfg), ["healthy", "covid-19"], normalization=Normalization(0.4, 0.2))
    nn.init.normal_(model.encoder.head.weight, std=1.0)
    cache = ImageCache.open(cache_dir)
    idx = cache.indices(split="test")
    got = predict(model, BINARY_META, cache, idx, device="cpu", progress=False, precision="fp32")
    x = torch.from_numpy(cache.images[idx].astype(np.float32) / 65535.0)[:, None]
    with torch.no_grad():
        want = model(x).softmax(1).numpy()  # the model standardises [0, 1] input itself
    np.testing.assert_allclose(got, want, atol=1e-5)
    # bf16 autocast (what "auto" picks on CPUs with AMX) stays close to it.
    bf16 = predict(model, BINARY_META, cache, idx, device="cpu", progress=False, precision="bf16")
    np.testing.assert_allclose(bf16, want, atol=0.05)


def test_class_targets_count_left_out_labels(cache_dir: Path) -> None:
    cache = ImageCache.open(cache_dir)
    t = class_targets(cache, cache.indices(split="test"), BINARY_META["label_map"])
    assert t.excluded == {"pneumonia": 2}
    assert t.indices.size == 8 and set(t.y.tolist()) == {0, 1}
    assert all(cache.rows[i].label != "pneumonia" for i in t.indices)


# ------------------------------------------------------------------------------------ evaluate_models
def _spec(cache_dir: Path, split: str) -> SplitSpec:
    return SplitSpec(cache_dir, (split,))


def test_threshold_chosen_on_validation_only(cache_dir: Path, tmp_path: Path) -> None:
    cache = ImageCache.open(cache_dir)
    tests = [TestSpec("training distribution", _spec(cache_dir, "test"))]
    model = ModelSpec("scratch", MeanModel(), dict(BINARY_META))
    doc = evaluate_models([model], tests, _spec(cache_dir, "val"), _opts("youden"), tmp_path)
    thr = doc["models"]["scratch"]["threshold"]
    val_t = class_targets(cache, cache.indices(split="val"), BINARY_META["label_map"])
    test_t = class_targets(cache, cache.indices(split="test"), BINARY_META["label_map"])
    val_p = np.array([round(COHORT[i][0] * 255) / 255 for i in val_t.indices])
    test_p = np.array([round(COHORT[i][0] * 255) / 255 for i in test_t.indices])
    # The construction: the two splits would pick different thresholds.
    assert youden_threshold(val_t.y, val_p) == pytest.approx(0.6, abs=1e-3)
    assert youden_threshold(test_t.y, test_p) == pytest.approx(0.35, abs=1e-3)
    assert thr["value"] == pytest.approx(0.6, abs=1e-3) and "validation" in thr["chosen_on"]
    res = doc["results"][0]
    assert res["threshold"] == thr["value"]
    # Frozen at 0.6, every covid-19 test image (p <= 0.5) is missed: with 0.35 they would all be found.
    assert _value(res, "covid-19", "sensitivity")["value"] == 0.0
    assert res["confusion"] == [[4, 0], [4, 0]]
    # ... a degenerate operating point (sensitivity 0, specificity 1): flagged in the result.
    assert [f["code"] for f in res["flags"]] == ["degenerate_operating_point"]
    assert "sensitivity 0.000, specificity 1.000" in res["flags"][0]["message"]


def test_evaluate_models_outputs(cache_dir: Path, tmp_path: Path) -> None:
    tests = [TestSpec("test", _spec(cache_dir, "test")), TestSpec("pediatric", _spec(cache_dir, "pediatric"))]
    doc = evaluate_models([ModelSpec("m", MeanModel(), dict(BINARY_META))], tests, None, _opts(), tmp_path)
    res = {r["test_set"]: r for r in doc["results"]}
    assert res["test"]["excluded"] == {"pneumonia": 2} and res["test"]["n_excluded"] == 2
    assert res["test"]["counts"]["healthy"] == {"images": 4, "patients": 3}
    assert doc["test_sets"]["test"]["labels"]["pneumonia"] == {"images": 2, "patients": 2}
    assert _value(res["pediatric"], "covid-19", "sensitivity")["value"] is None
    # At 0.5 on the test set: sensitivity 0.25, specificity 1.0 -> flagged; the pediatric set has no
    # covid-19 (sensitivity undefined) and specificity 2/3: nothing to flag.
    assert [f["code"] for f in res["test"]["flags"]] == ["degenerate_operating_point"]
    assert res["pediatric"]["flags"] == []
    with (tmp_path / res["test"]["predictions_csv"]).open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["label"] for r in rows} == {"healthy", "covid-19"}
    assert list(rows[0]) == ["index", "path", "patient", "label", "class", "p_healthy", "p_covid-19", "pred"]
    assert float(rows[-1]["p_covid-19"]) == pytest.approx(0.5, abs=3e-3)


def test_validation_overlapping_a_test_set_is_refused(cache_dir: Path, tmp_path: Path) -> None:
    tests = [TestSpec("leaky", SplitSpec(cache_dir, ("val", "test")))]
    with pytest.raises(DataError, match="shares"):
        evaluate_models([ModelSpec("m", MeanModel(), dict(BINARY_META))], tests, _spec(cache_dir, "val"),
                        _opts("youden"), tmp_path)  # fmt: skip


def test_empty_split_is_an_error(cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="splits present"):
        evaluate_models([ModelSpec("m", MeanModel(), dict(BINARY_META))],
                        [TestSpec("x", _spec(cache_dir, "nope"))], None, _opts(), tmp_path)  # fmt: skip


def test_test_set_without_task_labels_is_all_na(cache_dir: Path, tmp_path: Path) -> None:
    from sscxr.reports import write_report

    meta = {**BINARY_META, "class_names": ["pneumonia", "covid-19"], "task": "pneumonia_vs_covid",
            "label_map": {"pneumonia": 0, "covid-19": 1}}  # fmt: skip
    tests = [TestSpec("pediatric", _spec(cache_dir, "pediatric"))]
    doc = evaluate_models([ModelSpec("m", MeanModel(), meta)], tests, None, _opts(), tmp_path)
    res = doc["results"][0]
    assert res["excluded"] == {"healthy": 3} and res["n_images"] == 0
    assert all(m["value"] is None and "no image" in m["reason"] for m in res["metrics"])
    files = write_report(doc, tmp_path / "rep")
    assert "n/a (no image of this test set has a label the task uses)" in files.markdown.read_text()


def test_a_patient_in_train_and_test_is_refused_or_flagged(tmp_path: Path) -> None:
    from sscxr.tasks.common import open_cache

    rows = [*COHORT, (0.3, "healthy", "t0", "train")]  # t0 also has a test image: a hand-edited manifest
    leaky = write_cohort(tmp_path / "leaky", rows)
    with pytest.raises(
        DataError, match=r"1 patient\(s\) in more than one split: t0 .*data\.allow_leakage=true"
    ):
        open_cache(leaky, SIZE)  # what every training task opens its cache with
    assert len(open_cache(leaky, SIZE, allow_leakage=True)) == len(rows)
    model, tests = ModelSpec("m", MeanModel(), dict(BINARY_META)), [TestSpec("test", _spec(leaky, "test"))]
    with pytest.raises(DataError, match=r"t0 .*pass --allow-leakage"):
        evaluate_models([model], tests, None, _opts(), tmp_path / "refused")
    allowed = EvalOptions(
        parse_threshold("default"), n_boot=10, progress=False, device="cpu", allow_leakage=True
    )
    doc = evaluate_models([model], tests, None, allowed, tmp_path / "flagged")
    assert "leakage" in [f["code"] for f in doc["results"][0]["flags"]]
