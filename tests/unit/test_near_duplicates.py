"""Near-duplicate images across splits: hashes that survive resize / 5% crop / JPEG, the blocked pair
search, `prepare` storing hashes and pairs, `sscxr check`, and the refusal in training and evaluate."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import sscxr.data.near_duplicates as nd
from sscxr.cli import main
from sscxr.data.cache import ImageCache, prepare
from sscxr.errors import DataError
from sscxr.synthetic import SynthConfig, plan_cohort, render_job

SIZE = 64  # cache side: enough detail for phantoms of different patients to stay apart
SPLITS = ["train", "train", "train", "train", "val", "val", "test", "test"]


def _phantoms(n: int, seed: int = 0, size: int = 160) -> list[np.ndarray]:
    """`n` synthetic radiographs of `n` different patients, `(size, size)` float32 in [0, 1]."""
    cfg = SynthConfig(n_adult=n, n_pediatric=0, size=size, seed=seed, repeat_fraction=0.0)
    return [render_job(cfg, job).image for job in plan_cohort(cfg)]


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L")


def _float(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("L"), dtype=np.float32) / 255


def _crop(im: Image.Image, fx: float, fy: float, keep: float = 0.95) -> Image.Image:
    """Keep `keep` of each side; the removed margin split `fx` : 1 - `fx` (left : right), same for y."""
    w, h = im.size
    cw, ch = round(w * keep), round(h * keep)
    left, top = round(fx * (w - cw)), round(fy * (h - ch))
    return im.crop((left, top, left + cw, top + ch))


def _jpeg(im: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def _copies(im: Image.Image) -> dict[str, Image.Image]:
    """What a collection does to a radiograph it republishes."""
    w, h = im.size
    return {
        "resized to 60%": im.resize((round(w * 0.6), round(h * 0.6)), Image.Resampling.BILINEAR),
        "resized to 150%": im.resize((round(w * 1.5), round(h * 1.5)), Image.Resampling.BICUBIC),
        "cropped 5% top-left": _crop(im, 0.0, 0.0),
        "cropped 5% bottom-right": _crop(im, 1.0, 1.0),
        "cropped 5% off-grid": _crop(im, 0.37, 0.81),
        "cropped 5% centred": _crop(im, 0.5, 0.5),
        "JPEG q75": _jpeg(im, 75),
        "JPEG q40": _jpeg(im, 40),
        "all three": _jpeg(_crop(im, 0.3, 0.6).resize((round(w * 0.7), round(h * 0.7))), 70),
    }


def _is_pair(a: np.ndarray, b: np.ndarray) -> tuple[bool, int]:
    """(found by `near_pairs`, fine distance) of two images' hashes."""
    ha, hb = nd.hash_image(a), nd.hash_image(b)
    assert ha is not None and hb is not None
    found = nd.near_pairs(np.stack([ha, hb]))
    return len(found) == 1, int(nd.fine_distance(ha[None], hb[None])[0])


# ------------------------------------------------------------------------------------------- hashing
def test_hash_survives_resize_crop_and_jpeg_and_tells_patients_apart() -> None:
    images = _phantoms(6)
    original = images[0]
    for name, copy in _copies(_pil(original)).items():
        found, distance = _is_pair(original, _float(copy))
        assert found, f"{name}: fine distance {distance} > {nd.THRESHOLD} (or not a coarse candidate)"
    for other in images[1:]:  # other patients: far beyond the threshold
        found, distance = _is_pair(original, other)
        assert not found and distance > nd.THRESHOLD + 20, distance


def test_blank_images_have_no_hash_and_the_hash_is_deterministic() -> None:
    assert nd.hash_image(np.full((50, 70), 0.4, np.float32)) is None
    assert nd.hash_image(np.zeros((8, 8), np.float32)) is None
    image = _phantoms(1)[0]
    h = nd.hash_image(image)
    assert h is not None and h.shape == (nd.HASH_WORDS,) and h.dtype == np.uint64
    np.testing.assert_array_equal(h, nd.hash_image(image.copy()))
    # the letterbox of fit="pad" is cut away: a padded row hashes like its content
    from sscxr.data.cache_format import _MAX, resize_to_cache

    wide = np.ascontiguousarray(image[:100])
    padded = np.round(resize_to_cache(wide, 96, "pad") * _MAX).astype(np.uint16)
    stretched = np.round(resize_to_cache(wide, 96, "stretch") * _MAX).astype(np.uint16)
    a, b = nd.hash_row(padded, wide.shape, "pad"), nd.hash_row(stretched, wide.shape, "stretch")
    assert int(nd.fine_distance(a[None], b[None])[0]) <= 12


def test_real_radiographs_copies_found_distinct_ones_not(shared_data: Path) -> None:
    """On real pediatric X-rays (Kermany, ../shared/data): the measured recall, and no false pair."""
    folder = shared_data / "kermany_train"
    if not folder.is_dir():
        pytest.skip("../shared/data/kermany_train absent")
    files = sorted(folder.rglob("*.jpeg"))[::173][:30]  # 30 children spread over the set
    originals = [Image.open(f).convert("L") for f in files]
    hashes = np.stack([nd.hash_image(_float(im)) for im in originals])
    assert len(nd.near_pairs(hashes)) == 0  # different children
    misses = {}
    for k, im in enumerate(originals):
        for name, copy in _copies(im).items():
            pair = np.stack([hashes[k], nd.hash_image(_float(copy))])
            misses[name] = misses.get(name, 0) + (len(nd.near_pairs(pair)) == 0)
    assert misses["resized to 60%"] == misses["JPEG q75"] == misses["JPEG q40"] == 0, misses
    assert sum(misses.values()) <= 3, misses  # benchmark: 99% of 5% crops on 600 images


# --------------------------------------------------------------------------------------- pair search
def test_blocked_pair_search_equals_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    n = 300
    hashes = rng.integers(0, 2**63, size=(n, nd.HASH_WORDS), dtype=np.uint64)
    flips = rng.integers(0, 64, size=(40, 6))
    for k, (i, j) in enumerate(rng.choice(n, size=(40, 2), replace=False)):  # planted near copies
        hashes[j] = hashes[i]
        for bit in flips[k]:
            hashes[j, bit % nd.HASH_WORDS] ^= np.uint64(1) << np.uint64(bit)
    monkeypatch.setattr(nd, "_BLOCK", 64)  # several blocks, and a last one that is not full
    monkeypatch.setattr(nd, "_CHUNK", 100)
    found = nd.near_pairs(hashes, threshold=40, coarse_threshold=20)
    i, j = np.triu_indices(n, 1)
    coarse = nd.coarse_distance(hashes[i, : nd._COARSE_WORDS], hashes[j, : nd._COARSE_WORDS])
    fine = nd.fine_distance(hashes[i], hashes[j])
    keep = (coarse <= 20) & (fine <= 40)
    expected = np.stack([i[keep], j[keep], fine[keep]], axis=1)
    assert len(expected) >= 30
    np.testing.assert_array_equal(found, expected[np.lexsort((expected[:, 1], expected[:, 0]))])


@pytest.mark.parametrize(
    ("a", "b", "same_patient", "leak"),
    [
        ("train", "test", False, True),
        ("train", "val", False, True),
        ("val", "test_site", False, True),
        ("train", "train", False, False),  # within a split: a patient's follow-ups look alike
        ("train", "test", True, False),  # one patient in two splits: the patient check's finding
        ("test", "test_site", False, False),  # two evaluation splits: nothing trained on either
        ("", "test", False, False),  # no split yet
    ],
)
def test_which_pairs_are_leaks(a: str, b: str, same_patient: bool, leak: bool) -> None:
    assert nd._is_leak(a, b, same_patient) is leak


# ----------------------------------------------------------------------------------- a tiny cache
def _write(folder: Path, planted: bool) -> Path:
    """Eight phantoms of eight patients in train / val / test, and with `planted` a republished copy
    (cropped 5%, resized, JPEG) of train image 1 under a new patient id in the test split."""
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    lines = ["path,label,patient_id,site,split,mask_path"]
    for k, (image, split) in enumerate(zip(_phantoms(len(SPLITS), seed=4), SPLITS, strict=True)):
        _pil(image).save(folder / "imgs" / f"x{k}.png")
        lines.append(f"imgs/x{k}.png,healthy,p{k},a,{split},")
    if planted:
        original = Image.open(folder / "imgs" / "x1.png")
        _jpeg(_crop(original, 0.2, 0.7).resize((140, 140)), 80).save(folder / "imgs" / "copy.jpg")
        lines.append("imgs/copy.jpg,covid-19,other-collection-7,b,test,")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A clean cache and one with the planted cross-split copy (both prepared at SIZE)."""
    out = {}
    for name, planted in (("clean", False), ("leaky", True)):
        root = tmp_path_factory.mktemp(name)
        prepare(_write(root, planted), root / "cache", size=SIZE, workers=0, progress=False)
        out[name] = root / "cache"
    return out


def test_prepare_stores_hashes_and_pairs(caches: dict[str, Path]) -> None:
    cache = ImageCache.open(caches["leaky"])
    assert cache.has_hashes and cache.hashed.all() and cache.hashes.shape == (9, nd.HASH_WORDS)
    for i in range(len(cache)):  # hashes.npy = the hashes of the cached rows, recomputed
        np.testing.assert_array_equal(
            cache.hashes[i], nd.hash_row(cache.images[i], cache.original_shape(i), "stretch")
        )
    stored = cache.index["near_duplicates"]
    assert stored["threshold"] == nd.THRESHOLD and stored["hash_words"] == nd.HASH_WORDS
    assert [p[:2] for p in stored["pairs"]] == [[1, 8]]
    np.testing.assert_array_equal(nd.cache_pairs(cache), nd.cache_pairs(cache, nd.THRESHOLD + 1))
    assert ImageCache.open(caches["clean"]).index["near_duplicates"]["pairs"] == []


def test_check_lists_the_planted_copy_and_exits_nonzero(
    caches: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(caches["leaky"])]) == 1
    out = capsys.readouterr().out
    assert "1 of different patients in different splits" in out
    line = next(s for s in out.splitlines() if "imgs/copy.jpg" in s)
    assert "train  p1  imgs/x1.png  ~  test  other-collection-7  imgs/copy.jpg  (rows 1, 8)" in line
    assert main(["check", str(caches["leaky"]), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_leak_pairs"] == 1 and doc["pairs"][0]["paths"] == ["imgs/x1.png", "imgs/copy.jpg"]
    assert doc["pairs"][0]["splits"] == ["train", "test"] and doc["patient_leakage"] == []
    assert main(["check", str(caches["clean"])]) == 0
    assert "0 pair(s)" in capsys.readouterr().out


def test_check_reports_patient_leakage_too(caches: dict[str, Path], tmp_path: Path) -> None:
    manifest = caches["clean"].parent / "manifest.csv"
    leaky = tmp_path / "m.csv"
    leaky.write_text(manifest.read_text().replace("imgs/x7.png,healthy,p7", "imgs/x7.png,healthy,p0"))
    shutil.copytree(caches["clean"].parent / "imgs", tmp_path / "imgs")
    prepare(leaky, tmp_path / "cache", size=SIZE, workers=0, progress=False)
    assert main(["check", str(tmp_path / "cache")]) == 1


def test_training_refuses_the_planted_copy_unless_allowed(
    caches: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from sscxr.tasks.common import open_cache

    named = r"imgs/x1\.png \(patient p1, train\) ~ imgs/copy\.jpg \(patient other-collection-7, test\)"
    with pytest.raises(DataError, match=rf"1 near-duplicate image pair.*{named}.*data\.allow_leakage=true"):
        open_cache(caches["leaky"], SIZE)  # what pretrain, finetune and segment open their cache with
    with caplog.at_level("WARNING"):
        assert len(open_cache(caches["leaky"], SIZE, allow_leakage=True)) == 9
    assert "near-duplicate" in caplog.text and "Going on (set data.allow_leakage=true)" in caplog.text
    assert len(open_cache(caches["clean"], SIZE)) == 8


def test_a_look_alike_pair_beyond_the_refusal_distance_is_warned_not_refused(
    caches: dict[str, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Look-alike phantoms of different patients reach 68 bits: only close pairs stop a run."""
    from sscxr.data import near_duplicates as nd
    from sscxr.tasks.common import open_cache

    real = nd.cache_pairs
    far = nd.REFUSE_THRESHOLD + 1

    def farther(cache: object, *args: object, **kwargs: object) -> np.ndarray | None:
        pairs = real(cache, *args, **kwargs)  # type: ignore[arg-type]
        return None if pairs is None else np.column_stack([pairs[:, :2], np.full(len(pairs), far)])

    monkeypatch.setattr(nd, "cache_pairs", farther)
    with caplog.at_level("WARNING"):
        assert len(open_cache(caches["leaky"], SIZE)) == 9
    assert f"look alike ({far}-{nd.THRESHOLD} of 576 bits" in caplog.text and "sscxr check" in caplog.text


class _Mean(nn.Module):
    """Stand-in classifier on two classes: P(covid-19) = mean input intensity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x.mean(dim=(1, 2, 3)).clamp(1e-4, 1 - 1e-4)
        return torch.stack([torch.zeros_like(p), torch.logit(p)], dim=1)


_META = {
    "format": "sscxr-classifier",
    "class_names": ["healthy", "covid-19"],
    "task": "covid_vs_healthy",
    "label_map": {"healthy": 0, "covid-19": 1},
    "normalization": {"mean": 0.0, "std": 1.0},
    "thresholds": {"default": 0.5},
    "img_size": SIZE,
}


def _evaluate(cache: Path, out: Path, allow: bool) -> dict[str, object]:
    from sscxr.evaluation import EvalOptions, ModelSpec, SplitSpec, TestSpec, evaluate_models, parse_threshold

    model = ModelSpec("m", _Mean(), dict(_META))
    options = EvalOptions(
        parse_threshold("default"), n_boot=5, progress=False, device="cpu", allow_leakage=allow
    )
    return evaluate_models([model], [TestSpec("test", SplitSpec(cache, ("test",)))], None, options, out)


def test_evaluate_refuses_the_planted_copy_or_flags_it(caches: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"near-duplicate image pair.*copy\.jpg.*pass --allow-leakage"):
        _evaluate(caches["leaky"], tmp_path / "refused", allow=False)
    doc = _evaluate(caches["leaky"], tmp_path / "flagged", allow=True)
    flags = doc["results"][0]["flags"]  # type: ignore[index]
    assert any(f["code"] == "leakage" and "copy.jpg" in f["message"] for f in flags)
    clean = _evaluate(caches["clean"], tmp_path / "clean", allow=False)
    codes = [f["code"] for f in clean["results"][0]["flags"]]  # type: ignore[index]
    assert "leakage" not in codes and "near-duplicates-unchecked" not in codes


def test_evaluation_results_name_the_cache_as_the_user_gave_it(
    caches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No path of the user's machine above the working folder goes into shared result files."""
    monkeypatch.chdir(caches["clean"].parent)
    doc = _evaluate(Path(caches["clean"].name), tmp_path / "rel", allow=False)  # metrics.json's content
    text = json.dumps(doc)
    assert str(caches["clean"].parent) not in text, "an absolute path leaked into the results"
    assert f'"cache": "{caches["clean"].name}"' in text


# ---------------------------------------------------------------------------- caches from before
def _strip_hashes(cache: Path) -> None:
    """Make `cache` look like one prepared before hashes existed: no hashes.npy, no hash fields."""
    (cache / "hashes.npy").unlink()
    index = json.loads((cache / "index.json").read_text())
    for key in ("near_duplicates", "n_hashed"):
        del index[key]
    for row in index["rows"]:
        row.pop("hash_crc", None)
        row.pop("blank", None)
    (cache / "index.json").write_text(json.dumps(index))
    lines = (cache / "progress.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[1:]]
    for rec in records:
        rec.pop("hash_crc", None)
        rec.pop("blank", None)
    (cache / "progress.jsonl").write_text("\n".join([lines[0], *map(json.dumps, records)]) + "\n")


def test_an_older_cache_warns_then_prepare_adds_its_hashes(
    caches: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sscxr.tasks.common import open_cache

    old = tmp_path / "old"
    shutil.copytree(caches["leaky"], old)
    _strip_hashes(old)
    cache = ImageCache.open(old)
    assert not cache.has_hashes and not cache.hashed.any()
    with caplog.at_level("WARNING"):  # training goes on, saying loudly what was not checked and the fix
        assert len(open_cache(old, SIZE)) == 9
    assert (
        "near-duplicate check skipped" in caplog.text
        and f"sscxr prepare {caches['leaky'].parent}" in caplog.text
    )
    doc = _evaluate(old, tmp_path / "eval", allow=False)
    assert "near-duplicates-unchecked" in [f["code"] for f in doc["results"][0]["flags"]]  # type: ignore[index]
    assert main(["check", str(old)]) == 1  # `check` hashes the rows itself (not stored)
    assert "computed now, not stored" in capsys.readouterr().out and not (old / "hashes.npy").exists()
    manifest = caches["leaky"].parent / "manifest.csv"
    report = prepare(manifest, old, size=SIZE, workers=0, progress=False)
    assert (report.n_done, report.n_hashed, report.n_leak_pairs) == (0, 9, 1)  # nothing decoded again
    for name in ("hashes.npy", "index.json"):  # the same bytes as a cache prepared with hashes
        assert (old / name).read_bytes() == (caches["leaky"] / name).read_bytes(), name
    with pytest.raises(DataError, match="near-duplicate"):
        open_cache(old, SIZE)


class _Reached(Exception):
    """Raised by a stand-in for the step after the leakage check."""


def test_probe_refuses_the_planted_copy_unless_allowed(
    caches: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sscxr.cli.probe_cmds as probe_cmds

    def reached(*args: object) -> None:
        raise _Reached

    monkeypatch.setattr(probe_cmds, "build_sources", reached)

    def argv(cache: Path) -> list[str]:
        return ["probe", "--cache", str(cache), "--task", "healthy_vs_pathology", "--test", f"t={cache}:test",
                "--out", "o"]  # fmt: skip

    assert main(argv(caches["leaky"])) == 2
    err = capsys.readouterr().err
    assert "near-duplicate image pair" in err and "copy.jpg" in err and "pass --allow-leakage" in err
    with pytest.raises(_Reached):  # allowed: the check warns and the probe goes on
        main([*argv(caches["leaky"]), "--allow-leakage"])
    with pytest.raises(_Reached):
        main(argv(caches["clean"]))


def test_segment_evaluate_refuses_the_planted_copy_before_any_model_runs(
    caches: dict[str, Path], tmp_path: Path
) -> None:
    from sscxr.errors import SSCXRError
    from sscxr.evaluation.segmentation import SegTestSpec, run_evaluation

    missing = tmp_path / "no-model"
    tests = [SegTestSpec("t", caches["leaky"])]
    with pytest.raises(DataError, match=r"near-duplicate image pair.*copy\.jpg.*pass --allow-leakage"):
        run_evaluation([("m", missing)], tests, progress=False)
    with pytest.raises(SSCXRError, match="no-model"):  # allowed: on to loading the model
        run_evaluation([("m", missing)], tests, progress=False, allow_leakage=True)
