"""`sscxr.evaluation.probe`: k-NN and linear probes, frozen features, shared labelled subsets, resume."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, normalize
from torch import nn

from sscxr.data.cache import ImageCache, prepare
from sscxr.engine.checkpoint import save_checkpoint
from sscxr.errors import CheckpointError, ConfigError
from sscxr.evaluation import parse_split_spec
from sscxr.evaluation import probe as P
from sscxr.models.loading import Normalization, export_encoder
from sscxr.models.vit import ViTConfig, build_vit, vit_preset
from sscxr.tasks.labels import resolve_task, select_rows

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
TINY = ViTConfig(img_size=SIZE, patch_size=8, embed_dim=16, depth=4, num_heads=2, drop_path_rate=0.0)
TASK = resolve_task("pneumonia_vs_healthy")
# Reference rows first, whatever order the sources are given in.
ROWS = ["pixels 8px linear", "random encoder linear", "random encoder knn", "SS-CXR linear", "SS-CXR knn"]


def _cohort_rows() -> list[tuple[str, str, str]]:
    """(label, patient, split): some patients with two images; test rows include a label the task drops."""
    counts = {"train": (12, 10), "val": (6, 6), "test": (5, 5)}
    rows = [
        (label, f"{split[:2]}{label[0]}{k}", split)
        for split, (n_healthy, n_pneumonia) in counts.items()
        for label, n in (("healthy", n_healthy), ("pneumonia", n_pneumonia))
        for k in range(n)
    ]
    rows += [("healthy", "trh0", "train"), ("pneumonia", "trp1", "train")]  # second images
    return [*rows, ("covid-19", "tec0", "test")]


def write_cache(root: Path, flip_test: bool = False, test_level: float | None = None) -> Path:
    """Noisy images whose brightness depends on the label (a signal the probes can find); the cache.
    `test_level`: every test image at this brightness whatever its label (a shifted test site)."""
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    lines = ["path,label,patient_id,site,split,mask_path"]
    flip = {"healthy": "pneumonia", "pneumonia": "healthy"}
    for k, (label, patient, split) in enumerate(_cohort_rows()):
        level = {"healthy": 0.35, "pneumonia": 0.55, "covid-19": 0.7}[label] + rng.normal(0, 0.08)
        if test_level is not None and split == "test":
            level = test_level + rng.normal(0, 0.02)
        img = np.clip(level + rng.normal(0, 0.1, (SIZE, SIZE)), 0, 1)
        Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(root / "imgs" / f"{k}.png")
        written = flip.get(label, label) if flip_test and split == "test" else label
        lines.append(f"imgs/{k}.png,{written},{patient},site_a,{split},")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    prepare(root / "manifest.csv", root / "cache", size=SIZE, workers=0, progress=False)
    return root / "cache"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cache(tmp_path_factory.mktemp("probe_cohort"))


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        encoder = build_vit(TINY)
    folder = tmp_path_factory.mktemp("gmml")
    export_encoder(encoder, TINY, Normalization(0.45, 0.2), folder / "encoder")
    return folder


def _sources(cache: ImageCache, export: Path, options: P.ProbeOptions) -> list[P.FeatureSource]:
    norm = Normalization(*cache.stats)
    enc, cfg = P.encoder_source("SS-CXR", str(export), cache.size, norm, options, "vit_small")
    # Given in "wrong" order on purpose: run_probe puts the reference rows first.
    return [enc, P.random_source(cfg, norm, options), P.pixel_source(8, cache.size)]


def _run(cache_dir: Path, export: Path, out: Path, **kw: Any) -> dict[str, Any]:
    options = P.ProbeOptions(n_boot=kw.pop("n_boot", 0), features=kw.pop("features", "avg4"))
    cache = ImageCache.open(cache_dir)
    tests = [("held-out", parse_split_spec(f"{kw.pop('test_cache', cache_dir)}:test"))]
    fractions, seeds = kw.pop("fractions", (0.5, 1.0)), kw.pop("seeds", (0, 1))
    return P.run_probe(_sources(cache, export, options), cache, TASK, tests, fractions, seeds, out, options)


# ---------------------------------------------------------------------------------------------- k-NN
def test_knn_scores_hand_checked_class_balanced_votes() -> None:
    # Class 0 has 3 labelled points, class 1 one; the query (0, 1) has neighbours c (sim 1, class 0),
    # d (0.96, class 1), b (0.8, class 0), then a (0, class 0).
    train = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.28, 0.96]])
    y = np.array([0, 0, 0, 1])
    t = 0.07
    p = P.knn_scores(train, y, np.array([[0.0, 1.0]]), k=3, n_classes=2, temperature=t)
    votes0 = (math.exp(1.0 / t) + math.exp(0.8 / t)) / 3  # two neighbours of class 0, 3 labelled
    votes1 = math.exp(0.96 / t) / 1
    assert p[0] == pytest.approx([votes0 / (votes0 + votes1), votes1 / (votes0 + votes1)], rel=1e-9)
    assert p[0, 1] > 0.5  # balanced: the single class-1 neighbour wins (unbalanced, class 0 would)
    assert math.exp(0.96 / t) < math.exp(1.0 / t) + math.exp(0.8 / t)
    p1 = P.knn_scores(train, y, np.array([[0.0, 1.0]]), k=1, n_classes=2, temperature=t)
    np.testing.assert_allclose(p1, [[1.0, 0.0]])


def _angles(a: np.ndarray) -> np.ndarray:
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_knn_probe_chooses_k_on_validation() -> None:
    # Two clusters of 10, each with one mislabelled point right where the validation images lie:
    # the nearest neighbour is always wrong (k=1: AUC 0), a few neighbours out-vote it.
    a0, a1 = np.linspace(0.0, 0.5, 10), np.linspace(1.0, 1.5, 10)
    x_train = _angles(np.concatenate([a0, a1, [0.25, 1.25]]))
    y_train = np.array([0] * 10 + [1] * 10 + [1, 0])
    x_val = _angles(np.array([0.25, 0.251, 1.25, 1.251]))
    y_val = np.array([0, 0, 1, 1])
    probe = P.fit_knn_probe(x_train, y_train, x_val, y_val, n_classes=2, ks=(1, 3, 5, 50))
    assert sorted(probe.grid) == [1, 3, 5, 22]  # 50 capped at the 22 labelled images
    assert probe.grid[1] == 0.0 and probe.grid[3] == 1.0
    assert probe.k == 3 and probe.val_auc == 1.0  # ties go to the smaller k
    scaler = StandardScaler().fit(x_train)  # the probe standardises with the training rows, then L2
    train, val = (normalize(scaler.transform(x)) for x in (x_train, x_val))
    ref = P.knn_scores(train, y_train, val, 3, 2)
    np.testing.assert_allclose(probe.predict_proba(x_val), ref)


# -------------------------------------------------------------------------------------------- linear
def _blobs(n: int, seed: int, shift: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(np.int64)  # imbalanced: a third positive
    x = rng.normal(size=(n, 6)) * np.array([1, 1, 5, 1, 1, 0.1]) + 7.0
    x[:, 0] += shift * y
    return x, y


def _sklearn_pipeline(c: float) -> Any:
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000, tol=1e-6)
    )


def test_linear_probe_chooses_c_on_validation_and_matches_sklearn() -> None:
    x_train, y_train = _blobs(30, 0)
    x_val, y_val = _blobs(40, 1)
    x_test, _ = _blobs(10, 2)
    grid = tuple(10.0 ** np.arange(-4, 2.01, 0.5))
    probe = P.fit_linear_probe(x_train, y_train, x_val, y_val, grid)
    expected = {}
    for c in grid:
        pipe = _sklearn_pipeline(c).fit(x_train, y_train)
        expected[c] = roc_auc_score(y_val, pipe.predict_proba(x_val)[:, 1])
    assert probe.grid == pytest.approx(expected)
    assert len(set(np.round(list(expected.values()), 9))) > 1  # the choice matters on this data
    best = max(expected.values())
    assert min(c for c in grid if expected[c] == best) == probe.C and probe.val_auc == best
    pipe = _sklearn_pipeline(probe.C).fit(x_train, y_train)
    np.testing.assert_allclose(probe.predict_proba(x_test), pipe.predict_proba(x_test))
    # The scaler saw the training rows only.
    np.testing.assert_allclose(probe.scaler.mean_, x_train.mean(axis=0))
    assert not np.allclose(probe.scaler.mean_, np.concatenate([x_train, x_val]).mean(axis=0))


def _penalised_loss(probe: P.LinearProbe, x: np.ndarray, y: np.ndarray) -> float:
    """The objective the probe minimises at its C: C x class-balanced log-loss sum + |W|^2 / 2."""
    z = probe.scaler.transform(x)
    logits = z @ probe.weights.T + probe.model.intercept_
    if logits.shape[1] == 1:  # binary: one weight vector for class 1
        logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    w = len(y) / (logits.shape[1] * np.bincount(y))
    return float(probe.C * -(w[y] * logp[np.arange(len(y)), y]).sum() + 0.5 * (probe.weights**2).sum())


@pytest.mark.parametrize("classes", [2, 3])
def test_linear_probe_with_more_features_than_rows_reaches_the_full_space_optimum(classes: int) -> None:
    """Grid features (F = 3,072) on a few hundred labels: the probe fits in the span of the training rows.
    That is the same problem (the optimum lies in that span), so it must reach the optimum of the
    regression over all F features, which a tightly converged sklearn fit in F dimensions finds."""
    rng = np.random.default_rng(classes)
    n, f = 40, 300
    y = np.arange(n) % classes
    x = rng.normal(size=(n, f)) + 0.6 * y[:, None] * (np.arange(f) < 20)
    x_val = rng.normal(size=(30, f)) + 0.6 * (np.arange(30) % classes)[:, None] * (np.arange(f) < 20)
    for c in (0.01, 1.0, 100.0):  # separable at large C: where lbfgs over all F features stops short
        probe = P.fit_linear_probe(x, y, x_val, np.arange(30) % classes, (c,))
        # the standardised rows are centred: they span n - 1 dimensions
        assert probe.basis is not None and probe.basis.shape == (f, n - 1)
        full = LogisticRegression(C=c, class_weight="balanced", tol=1e-12, max_iter=100_000)
        full.fit(probe.scaler.transform(x), y)
        exact = P.LinearProbe(probe.scaler, full, c, {}, 0.0)
        assert _penalised_loss(probe, x, y) == pytest.approx(_penalised_loss(exact, x, y), rel=1e-4)
        np.testing.assert_allclose(probe.predict_proba(x_val), exact.predict_proba(x_val), atol=0.02)
    # Fewer features than rows: fitted on the features themselves.
    assert P.fit_linear_probe(x[:, :10], y, x_val[:, :10], np.arange(30) % classes).basis is None


# ------------------------------------------------------------------------------------------ features
def test_encoder_features_match_timm_tokens() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        enc = build_vit(TINY).eval()
    x = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tokens = enc.forward_features(x)  # (B, 1 + N, D) after the final norm
        avg, cls, avg4 = (P.encoder_features(enc, x, k) for k in ("avg", "cls", "avg4"))
        shallow = build_vit(ViTConfig(img_size=SIZE, patch_size=8, embed_dim=16, depth=3, num_heads=2))
        n3 = P.encoder_features(shallow.eval(), x, "avg4").shape[1]
    torch.testing.assert_close(avg, tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(cls, tokens[:, 0])
    assert avg4.shape == (3, 4 * TINY.embed_dim) and n3 == 3 * TINY.embed_dim
    torch.testing.assert_close(avg4[:, -TINY.embed_dim :], avg)  # the last block comes last
    with pytest.raises(ConfigError, match="--features"):
        P.encoder_features(enc, x, "mean")


def test_extract_features_standardises_with_the_given_normalization(cache_dir: Path) -> None:
    cache = ImageCache.open(cache_dir)
    enc = build_vit(TINY).eval()
    idx = np.array([0, 3, 5])
    feats = P.extract_features(enc, cache, idx, Normalization(0.4, 0.2), "avg", batch_size=2, device="cpu")
    x = torch.from_numpy(np.stack([cache.image_float(i) for i in idx]))[:, None]
    with torch.inference_mode():
        ref = enc.forward_features((x - 0.4) / 0.2)[:, 1:].mean(dim=1).numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)
    pixels = P.pixel_features(cache, idx, 4, SIZE)
    assert pixels.shape == (3, 16)
    np.testing.assert_allclose(pixels[:, 0], x[:, 0, :8, :8].mean(dim=(1, 2)).numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------- the grid
def test_every_row_uses_the_select_rows_subsets(
    cache_dir: Path, export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fitted: list[np.ndarray] = []  # training features of every fit, in the order of the grid

    def spy(fit: Any) -> Any:
        def wrapped(x_train: np.ndarray, *args: Any, **kw: Any) -> Any:
            fitted.append(x_train)
            return fit(x_train, *args, **kw)

        return wrapped

    monkeypatch.setattr(P, "fit_linear_probe", spy(P.fit_linear_probe))
    monkeypatch.setattr(P, "fit_knn_probe", spy(P.fit_knn_probe))
    fractions, seeds = (0.3, 0.6), (0, 1, 2)
    doc = _run(cache_dir, export, tmp_path / "out", fractions=fractions, seeds=seeds)
    cache = ImageCache.open(cache_dir)
    sources = sorted(_sources(cache, export, P.ProbeOptions()), key=lambda s: s.start != "pixels")
    assert [s.start for s in sources] == ["pixels", "SS-CXR", "random"]
    expected, subsets = [], {}
    for f in fractions:
        for s in seeds:
            idx = select_rows(cache, TASK, "train", "val", f, None, s)[0]
            subsets[f, s] = idx
            rows = [r for r in doc["rows"] if (r["fraction"], r["seed"]) == (f, s)]
            assert [r["name"] for r in rows] == ROWS
            assert len({r["labelled"]["rows_sha"] for r in rows}) == 1
            with (tmp_path / "out" / rows[0]["labelled"]["rows"]).open() as fh:
                assert [int(r["index"]) for r in csv.DictReader(fh)] == idx.tolist()
            order = {"pixels": 0, "random": 1, "SS-CXR": 2}
            for src in sorted(sources, key=lambda x: order[x.start]):
                expected += [src.extract(cache, idx)] * len(src.probes)
    assert len(fitted) == len(expected) == len(doc["rows"])
    for got, want in zip(fitted, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    for f in fractions:  # different seeds draw different subsets below fraction 1
        drawn = [tuple(subsets[f, s]) for s in seeds]
        assert len(set(drawn)) == len(seeds)


def test_test_labels_fit_nothing(cache_dir: Path, export: Path, tmp_path: Path) -> None:
    flipped = write_cache(tmp_path / "flipped", flip_test=True)  # same images, test labels swapped
    a = _run(cache_dir, export, tmp_path / "a", test_cache=cache_dir, fractions=(0.5,), seeds=(0,))
    b = _run(flipped, export, tmp_path / "b", test_cache=flipped, fractions=(0.5,), seeds=(0,))
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert ra["hyper"] == rb["hyper"] and ra["val"] == rb["val"] and ra["threshold"] == rb["threshold"]
        val_a = (tmp_path / "a" / ra["predictions"]["val"]).read_text()
        assert val_a == (tmp_path / "b" / rb["predictions"]["val"]).read_text()
        auc_a, auc_b = ra["tests"]["held-out"]["auc_roc"], rb["tests"]["held-out"]["auc_roc"]
        assert auc_a == pytest.approx(1 - auc_b)  # the test labels were read, for scoring only


def test_outputs_and_resume(cache_dir: Path, export: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _run(cache_dir, export, out, n_boot=10)
    assert first["format"] == "sscxr-probe" and first["cells"] == {"computed": 20, "reused": 0}
    assert [r["start"] for r in first["rows"][:3]] == ["pixels", "random", "random"]
    row = next(r for r in first["rows"] if r["name"] == "SS-CXR linear" and r["fraction"] == 0.5)
    assert set(row["predictions"]) == {"val", "held-out"} and "C" in row["hyper"]
    assert row["predictions"]["held-out"] == "predictions/f0.5/s0/SS-CXR_linear/held-out.csv"
    with (out / row["predictions"]["held-out"]).open() as fh:
        lines = list(csv.DictReader(fh))
    columns = ["index", "path", "patient", "label", "class", "p_healthy", "p_pneumonia", "pred"]
    assert list(lines[0]) == columns  # write_predictions' format
    assert len(lines) == 10  # the covid-19 test image is left out by the task
    test = row["tests"]["held-out"]
    assert test["n_images"] == 10 and test["threshold"] == row["threshold"]["value"]
    assert any(m["metric"] == "sensitivity" and m["ci_low"] is not None for m in test["metrics"])
    assert (out / "report.md").read_text().index("pixels 8px linear") < (out / "report.md").read_text().index(
        "SS-CXR linear"
    )
    cells = sorted((out / "cells").rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in cells}
    second = _run(cache_dir, export, out, n_boot=10)
    assert second["cells"] == {"computed": 0, "reused": 20} and second["seconds"]["features"] == {}
    assert second["rows"] == first["rows"]
    assert {p: p.stat().st_mtime_ns for p in cells} == stamps
    assert json.loads((out / "probe.json").read_text())["rows"] == first["rows"]
    third = _run(cache_dir, export, out, n_boot=20)  # another setting: recomputed, not reused
    assert third["cells"]["computed"] == 20


def test_seeds_at_fraction_one_give_identical_rows(cache_dir: Path, export: Path, tmp_path: Path) -> None:
    doc = _run(cache_dir, export, tmp_path / "out", fractions=(1.0,), seeds=(0, 1))
    by_seed = [[r for r in doc["rows"] if r["seed"] == s] for s in (0, 1)]
    for r0, r1 in zip(*by_seed, strict=True):
        assert r0["hyper"] == r1["hyper"] and r0["tests"] == r1["tests"]
        assert (tmp_path / "out" / r0["predictions"]["val"]).read_text() == (
            tmp_path / "out" / r1["predictions"]["val"]
        ).read_text()


# ---------------------------------------------------------------------------------------- guards etc.
def test_a_degenerate_operating_point_on_a_test_set_is_flagged_on_its_row(
    cache_dir: Path, export: Path, tmp_path: Path
) -> None:  # fmt: skip
    # A test site far brighter than training: the brightness-reading pixel probe calls every test image
    # pneumonia at the threshold frozen on validation (sensitivity 1, specificity 0).
    bright = write_cache(tmp_path / "bright", test_level=0.95)
    doc = _run(bright, export, tmp_path / "out", test_cache=bright, fractions=(1.0,), seeds=(0,))
    pixels = next(r for r in doc["rows"] if r["name"] == "pixels 8px linear")
    rates = {
        m["metric"]: m["value"] for m in pixels["tests"]["held-out"]["metrics"] if m["class"] == "pneumonia"
    }
    assert (rates["sensitivity"], rates["specificity"]) == (1.0, 0.0)
    assert [f["code"] for f in pixels["flags"]] == ["degenerate_operating_point"]
    assert (
        pixels["flags"][0]["message"].startswith("held-out: ")
        and "every image called positive" in (pixels["flags"][0]["message"])
    )
    assert "degenerate_operating_point`: pixels 8px linear (fraction 1, seed 0), held-out" in (
        (tmp_path / "out" / "report.md").read_text()
    )
    # Every row of an ordinary run is flagged exactly where its rates are at 0 or 1 (and not both 1).
    plain = _run(cache_dir, export, tmp_path / "plain", fractions=(0.5, 1.0), seeds=(0, 1))
    for row in plain["rows"]:
        m = {
            x["metric"]: x["value"] for x in row["tests"]["held-out"]["metrics"] if x["class"] == "pneumonia"
        }
        edge = {m["sensitivity"], m["specificity"]} & {0.0, 1.0} and (m["sensitivity"], m["specificity"]) != (
            1,
            1,
        )
        assert bool(row["flags"]) == bool(edge), (row["name"], m)


def test_guards() -> None:
    y = np.array([0] * 30 + [1] * 19)
    patients = np.array([f"p{i}" for i in range(49)], dtype=object)
    flag = P.small_validation_flag(y, patients, ["healthy", "pneumonia"])
    assert flag is not None and flag["code"] == "small_validation" and "'pneumonia' has 19" in flag["message"]
    y = np.array([0] * 30 + [1] * 25)
    few_patients = np.array([f"p{i % 40}" if i < 30 else f"q{i % 10}" for i in range(55)], dtype=object)
    assert P.small_validation_flag(y, few_patients, ["a", "b"]) is not None  # 25 images, 10 patients
    assert P.small_validation_flag(y, np.arange(55).astype(str).astype(object), ["a", "b"]) is None
    assert P.below_chance_flag("x linear", 0.1, 0, 0.5)["code"] == "below_chance"  # type: ignore[index]
    assert P.below_chance_flag("x linear", 0.1, 0, 0.51) is None


def test_parse_grid_arguments() -> None:
    assert P.parse_fractions("0.01, 0.1,1") == (0.01, 0.1, 1.0)
    assert P.parse_seeds("0,1,2") == (0, 1, 2)
    for bad in ("0", "1.5", "0.1,0.1", "", "a"):
        with pytest.raises(ConfigError, match="--fractions"):
            P.parse_fractions(bad)
    for bad in ("-1", "0,0", "x"):
        with pytest.raises(ConfigError, match="--seeds"):
            P.parse_seeds(bad)


def test_random_source_is_seeded_without_touching_the_global_rng(cache_dir: Path) -> None:
    cache = ImageCache.open(cache_dir)
    norm, opts = Normalization(*cache.stats), P.ProbeOptions(features="cls")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        state = torch.random.get_rng_state()
        a = P.random_source(TINY, norm, opts)
        assert torch.equal(state, torch.random.get_rng_state())
        torch.manual_seed(6)  # another global state: the same encoder
        b, c = P.random_source(TINY, norm, opts), P.random_source(TINY, norm, opts, seed=1)
    idx = np.arange(4)
    np.testing.assert_array_equal(a.extract(cache, idx), b.extract(cache, idx))
    assert not np.allclose(a.extract(cache, idx), c.extract(cache, idx))
    assert a.info["seed"] == P.RANDOM_SEED


def test_load_frozen_encoder_from_a_checkpoint_run_folder_and_a_timm_file(tmp_path: Path) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        encoder = build_vit(TINY)
    holder = nn.Module()
    holder.encoder = encoder  # a task's state_dict keeps the ViT under "encoder."
    run = tmp_path / "pretrain"
    config = {"model": TINY.to_dict()}  # the resolved run config's model section
    save_checkpoint(run / "checkpoints" / "last.pt", holder, None, None, {"step": 1}, config)
    norm = Normalization(0.5, 0.25)
    loaded, cfg, used, record = P.load_frozen_encoder(str(run), 64, norm)
    assert cfg.embed_dim == 16 and cfg.img_size == 64 and used == norm  # its config; the cache's statistics
    assert record["source"] == "sscxr-checkpoint" and record["normalization_from"] == "cache"
    torch.testing.assert_close(loaded.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)
    # A timm / DeiT file has no config: the architecture is the --arch preset.
    timm_vit = build_vit(vit_preset("tiny_cpu", img_size=SIZE))
    torch.save(timm_vit.state_dict(), tmp_path / "deit.pth")
    _, cfg, _, record = P.load_frozen_encoder(str(tmp_path / "deit.pth"), SIZE, norm, arch="tiny_cpu")
    assert record["source"] == "timm" and cfg.embed_dim == 192
    with pytest.raises(CheckpointError, match="shapes do not match"):
        P.load_frozen_encoder(str(tmp_path / "deit.pth"), SIZE, norm, arch="vit_small")
    with pytest.raises(ConfigError, match="--arch"):
        P.load_frozen_encoder(str(tmp_path / "deit.pth"), SIZE, norm, arch="nope")
    with pytest.raises(CheckpointError, match="no such encoder"):
        P.load_frozen_encoder(str(tmp_path / "missing.safetensors"), SIZE, norm)


def test_grid4_features_keep_the_layout_of_the_patch_grid() -> None:
    """grid4 = mean of the last 4 blocks' normed patch tokens, average-pooled to 4 x 4 grid cells."""
    import torch

    from sscxr.evaluation.probe import encoder_features
    from sscxr.models.vit import ViTConfig, build_vit

    torch.manual_seed(0)
    enc = build_vit(ViTConfig(img_size=64, patch_size=8, embed_dim=16, depth=4, num_heads=2)).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        f = encoder_features(enc, x, "grid4")
        outs = enc.forward_intermediates(x, indices=4, norm=True, output_fmt="NLC", intermediates_only=True)
        tokens = torch.stack(outs).mean(0).reshape(2, 8, 8, 16)  # (B, gh, gw, D)
    assert f.shape == (2, 16 * 16)
    # Cell (0, 0) of the 4x4 grid is the mean of the top-left 2x2 patches; features are (D, 4, 4) flattened.
    cell = tokens[:, :2, :2].mean(dim=(1, 2))
    torch.testing.assert_close(f.reshape(2, 16, 4, 4)[:, :, 0, 0], cell)
    assert not torch.allclose(f[0], f[1])
