"""The built-in synthetic cohort (`sscxr synth`): seeded chest X-ray phantoms, masks and a manifest.

No real data set can ship, so this is the project's default data. Anatomy and disease are drawn in
`phantom.py`; this module adds the acquisition of each site (exposure, tone curve, noise, blur,
collimation, burned-in markers), plans the cohort (sites, classes, patients, follow-ups, splits) and
writes it in parallel.

Determinism: the plan is a pure function of the config; image i uses `derive_seed(seed, 2, i)` and its
patient p `derive_seed(seed, 1, p)` (anatomy) and `derive_seed(seed, 3, p)` (lesion geometry), so
every file is the same whatever the worker count or order.

Output layout (paths in the manifest are relative to its folder):
    images/<patient>_<visit>.png   16-bit grey, value / 65535 = [0, 1] intensity, bright = dense
    masks/<patient>_<visit>.png    8-bit, 255 = lung field (heart and mediastinum excluded)
    manifest.csv                   path,label,patient_id,site,split,mask_path,age_group
    synth_config.json              the config and generator version (re-running it is a no-op)
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from sscxr.data.phantom import (
    LABELS,
    Anatomy,
    Pathology,
    pathology_map,
    render_anatomy,
    repose,
    sample_anatomy,
    sample_pathology,
)
from sscxr.errors import ConfigError
from sscxr.utils import atomic_write_json, atomic_write_text, derive_seed

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the pictures change, so stale folders are not taken for current ones
PEDIATRIC_SITE = "pediatric"
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "patient_id", "site", "split", "mask_path", "age_group")


@dataclass(frozen=True)
class SynthConfig:
    """What cohort to generate.

    `n_adult` / `n_pediatric` count images; `repeat_fraction` is the share of patients with a follow-up
    image. Class fractions are (healthy, pneumonia, covid-19). Splits: rows of `holdout_site` get
    `test_site`, pediatric rows `test_pediatric`, the rest train/val/test by patient, stratified by class
    (`assign_splits=False` leaves the column empty for the split helpers). `severity` bounds disease
    severity in [0, 1].
    """

    n_adult: int = 600
    n_pediatric: int = 90
    size: int = 256
    sites: tuple[str, ...] = ("site_a", "site_b", "site_c", "site_d")
    class_fractions: tuple[float, float, float] = (0.4, 0.3, 0.3)
    pediatric_fractions: tuple[float, float, float] = (0.5, 0.0, 0.5)
    repeat_fraction: float = 0.2
    seed: int = 0
    holdout_site: str | None = "site_d"
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    assign_splits: bool = True
    severity: tuple[float, float] = (0.3, 1.0)

    def __post_init__(self) -> None:
        """Reject configs that cannot be generated, naming the broken rule."""
        if self.n_adult < 0 or self.n_pediatric < 0 or self.n_adult + self.n_pediatric == 0:
            raise ValueError("n_adult and n_pediatric must be >= 0 and not both 0")
        if self.size < 32:
            raise ValueError(f"size must be >= 32 pixels, got {self.size}")
        if not self.sites or len(set(self.sites)) != len(self.sites) or PEDIATRIC_SITE in self.sites:
            raise ValueError(f"sites must be non-empty, unique and not {PEDIATRIC_SITE!r}: {self.sites}")
        for name in ("class_fractions", "pediatric_fractions", "split_fractions"):
            fr = getattr(self, name)
            if len(fr) != 3 or min(fr) < 0 or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
                raise ValueError(f"{name} must be 3 non-negative numbers summing to 1, got {fr}")
        if self.holdout_site not in (None, "", *self.sites):
            raise ValueError(f"holdout_site {self.holdout_site!r} is not one of the sites {self.sites}")
        if not 0.0 <= self.repeat_fraction <= 1.0:
            raise ValueError(f"repeat_fraction must be in [0, 1], got {self.repeat_fraction}")
        if not 0.0 <= self.severity[0] <= self.severity[1] <= 1.0:
            raise ValueError(f"severity must satisfy 0 <= low <= high <= 1, got {self.severity}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthConfig:
        """Build from plain values (JSON / YAML / CLI); unknown keys are rejected."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown SynthConfig keys {unknown}; known: {sorted(fields)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass(frozen=True)
class SiteStyle:
    """How one site acquires and post-processes its images.

    Args:
        exposure: attenuation scale before the detector's exponential response (higher = harsher).
        curve: tone curve, "gamma" or "sigmoid"; `curve_param` is the gamma or the sigmoid gain.
        window: output black and white levels.
        noise: quantum-noise std at mid grey; blur: detector blur sigma in pixels at 256 px.
        sharpen: unsharp-mask gain of the post-processing.
        collimation: "none", "sides", "top_bottom" or "frame"; `collimation_value` its grey level.
        marker: side-marker letter, "L" or "R", centred at `marker_xy` (fractions of width, height).
        text_xy: top-left corner of the burned-in text block.
    """

    exposure: float
    curve: str
    curve_param: float
    window: tuple[float, float]
    noise: float
    blur: float
    sharpen: float
    collimation: str
    collimation_value: float
    marker: str
    marker_xy: tuple[float, float]
    text_xy: tuple[float, float]


SITE_STYLES: dict[str, SiteStyle] = {
    "site_a": SiteStyle(
        1.3, "sigmoid", 5.0, (0.02, 0.97), 0.012, 0.6, 0.5, "none", 1.0, "R", (0.08, 0.08), (0.62, 0.93)
    ),
    "site_b": SiteStyle(
        1.6, "gamma", 1.3, (0.06, 0.92), 0.025, 0.9, 0.0, "sides", 0.95, "L", (0.9, 0.1), (0.04, 0.04)
    ),
    "site_c": SiteStyle(
        1.1, "gamma", 0.8, (0.0, 1.0), 0.018, 0.5, 1.0, "top_bottom", 0.9, "R", (0.1, 0.88), (0.6, 0.03)
    ),
    "site_d": SiteStyle(
        1.4, "sigmoid", 7.0, (0.1, 0.95), 0.03, 1.2, 0.3, "frame", 0.0, "L", (0.88, 0.86), (0.05, 0.9)
    ),
    PEDIATRIC_SITE: SiteStyle(
        1.2, "sigmoid", 4.0, (0.03, 0.96), 0.035, 0.8, 0.6, "frame", 0.92, "R", (0.1, 0.12), (0.55, 0.92)
    ),
}


def site_style(name: str) -> SiteStyle:
    """The style of a site: a preset for the default names; any other name gets a preset chosen and
    varied by a hash of the name, so custom site lists still differ from one another."""
    if name in SITE_STYLES:
        return SITE_STYLES[name]
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    base = list(SITE_STYLES.values())[int(rng.integers(len(SITE_STYLES)))]
    return dataclasses.replace(
        base,
        exposure=base.exposure * float(rng.uniform(0.85, 1.15)),
        noise=float(rng.uniform(0.01, 0.03)),
        blur=float(rng.uniform(0.5, 1.2)),
        marker_xy=(float(rng.choice([0.1, 0.9])), float(rng.choice([0.1, 0.88]))),
        text_xy=(float(rng.uniform(0.05, 0.6)), float(rng.choice([0.04, 0.9]))),
    )


# 5 x 7 bitmaps of the side-marker letters
_GLYPHS = {
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
}


def _tone(x: np.ndarray, style: SiteStyle, jitter: float) -> np.ndarray:
    """The site's tone curve, mapping [0, 1] onto [0, 1] monotonically."""
    p = style.curve_param * jitter
    if style.curve == "gamma":
        return np.clip(x, 0.0, 1.0) ** p
    lo, hi = 1.0 / (1.0 + math.exp(p * 0.5)), 1.0 / (1.0 + math.exp(-p * 0.5))
    return (1.0 / (1.0 + np.exp(-p * (x - 0.5))) - lo) / (hi - lo)


def _collimate(img: np.ndarray, style: SiteStyle, rng: np.random.Generator) -> np.ndarray:
    """Unexposed borders outside the collimator blades (slightly tilted, widths vary per image)."""
    if style.collimation == "none":
        return img
    s = img.shape[0]
    c = (np.arange(s, dtype=np.float32) + 0.5) / s
    x, y = c[None, :], c[:, None]
    w = rng.uniform(0.025, 0.06, 4)
    t = rng.normal(0.0, 0.01, 4)
    edges = {
        "sides": [x - w[0] - t[0] * (y - 0.5), 1 - w[1] - x - t[1] * (y - 0.5)],
        "top_bottom": [y - w[2] - t[2] * (x - 0.5), 1 - w[3] - y - t[3] * (x - 0.5)],
    }
    edges["frame"] = edges["sides"] + edges["top_bottom"]
    inside = np.ones_like(img)
    for e in edges[style.collimation]:
        inside = np.minimum(inside, np.clip(0.5 + e * s / 1.5, 0.0, 1.0))
    return img * inside + style.collimation_value * (1.0 - inside)


def _stamp(img: np.ndarray, bitmap: np.ndarray, x0: int, y0: int, value: float) -> None:
    """Burn a binary bitmap into `img` (in place) with its top-left corner at (x0, y0), clipped."""
    h, w = bitmap.shape
    s = img.shape[0]
    x1, y1 = min(s, x0 + w), min(s, y0 + h)
    x0c, y0c = max(0, x0), max(0, y0)
    if x1 > x0c and y1 > y0c:
        patch = bitmap[y0c - y0 : y1 - y0, x0c - x0 : x1 - x0]
        img[y0c:y1, x0c:x1] = np.where(patch, value, img[y0c:y1, x0c:x1])


def _markers(img: np.ndarray, style: SiteStyle, rng: np.random.Generator) -> None:
    """Burn in the side marker (a letter on a plate) and a few lines of text-like bars, in place."""
    s = img.shape[0]
    cell = max(1, round(s / 160))
    glyph = np.array([[ch == "1" for ch in row] for row in _GLYPHS[style.marker]])
    letter = np.kron(glyph, np.ones((cell, cell), dtype=bool))
    plate = np.ones((letter.shape[0] + 4 * cell, letter.shape[1] + 4 * cell), dtype=bool)
    jx, jy = rng.normal(0.0, 0.008, 2)
    x0 = round((style.marker_xy[0] + jx) * s - plate.shape[1] / 2)
    y0 = round((style.marker_xy[1] + jy) * s - plate.shape[0] / 2)
    _stamp(img, plate, x0, y0, 0.15)
    _stamp(img, letter, x0 + 2 * cell, y0 + 2 * cell, 1.0)
    bar_h = max(1, round(s / 110))
    for line in range(int(rng.integers(2, 4))):
        x = round(style.text_xy[0] * s)
        y = round(style.text_xy[1] * s) + line * 2 * bar_h
        for _ in range(int(rng.integers(3, 7))):
            length = max(2, round(rng.uniform(0.015, 0.06) * s))
            _stamp(img, np.ones((bar_h, length), dtype=bool), x, y, 0.95)
            x += length + max(1, bar_h)


def acquire(atten: np.ndarray, style: SiteStyle, rng: np.random.Generator) -> np.ndarray:
    """Turn an attenuation map into a site's processed radiograph.

    Args:
        atten: `(S, S)` attenuation (phantom units).
        style: the site's acquisition.
        rng: per-image randomness (exposure and curve jitter, noise, collimation, markers).

    Returns:
        `(S, S)` float32 in [0, 1], bright = dense.
    """
    s = atten.shape[0]
    px = s / 256.0  # blur widths are specified at 256 px so the look does not depend on the size
    mu = style.exposure * rng.uniform(0.9, 1.1)
    # detector response saturates in dense regions, which tames bone contrast over the abdomen
    x = (1.0 - np.exp(-mu * atten)) / (1.0 - math.exp(-mu * 1.4))
    noise = rng.standard_normal(atten.shape).astype(np.float32)
    x = x + style.noise * rng.uniform(0.8, 1.2) * np.sqrt(0.2 + np.clip(x, 0.0, 1.0)) * noise
    x = ndimage.gaussian_filter(x, style.blur * px)
    if style.sharpen > 0:
        x = x + style.sharpen * (x - ndimage.gaussian_filter(x, 6.0 * px))
    x = _tone(np.clip(x, 0.0, 1.0), style, rng.uniform(0.93, 1.07))
    lo, hi = style.window[0] + rng.normal(0, 0.01), style.window[1] + rng.normal(0, 0.01)
    x = lo + (hi - lo) * x
    x = _collimate(x, style, rng)
    _markers(x, style, rng)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


@dataclass
class Phantom:
    """One rendered image: `image` `(S, S)` float32 in [0, 1], `lung_mask` bool, `pathology` the
    disease's attenuation `(S, S)` float32 (zero outside the lung mask, all zero when healthy)."""

    image: np.ndarray
    lung_mask: np.ndarray
    pathology: np.ndarray


def render_phantom(
    anatomy: Anatomy, pathology: Pathology, style: SiteStyle, rng: np.random.Generator, size: int = 256
) -> Phantom:
    """Render one radiograph: anatomy + disease, acquired by a site. Same inputs give the same pixels,
    so one anatomy can be rendered with and without disease by reusing the rng seed."""
    maps = render_anatomy(anatomy, size)
    disease = pathology_map(anatomy, maps, pathology)
    image = acquire(maps.atten + disease, style, rng)
    return Phantom(image=image, lung_mask=maps.lung > 0.5, pathology=disease)


@dataclass(frozen=True)
class ImageJob:
    """One planned image: who, what, where, and the relative output paths."""

    index: int
    patient: int
    visit: int
    patient_id: str
    label: str
    site: str
    pediatric: bool
    split: str
    image: str
    mask: str


def _largest_remainder(n: int, weights: Sequence[float]) -> list[int]:
    """Split n into integer counts proportional to `weights` (counts within rounding, sum exactly n)."""
    total = float(sum(weights))
    raw = [n * w / total for w in weights]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _site_labels(
    n: int, sites: Sequence[str], fractions: Sequence[float], rng: np.random.Generator
) -> list[tuple[str, str]]:
    """Exact class and site counts, paired at random (so prevalence differs a little between sites by
    chance), after first dealing one image of every class to every site where the counts allow it: the
    site alone must never rule a class in or out."""
    site_left = dict(zip(sites, _largest_remainder(n, [1.0] * len(sites)), strict=True))
    class_left = dict(zip(LABELS, _largest_remainder(n, fractions), strict=True))
    pairs: list[tuple[str, str]] = []
    for label in LABELS:
        if class_left[label] >= len(sites) and min(site_left.values()) > 0:
            for site in sites:
                pairs.append((site, label))
                site_left[site] -= 1
                class_left[label] -= 1
    rest_sites = [s for s in sites for _ in range(site_left[s])]
    rest_labels = [c for c in LABELS for _ in range(class_left[c])]
    order = rng.permutation(len(rest_labels))
    return pairs + [(site, rest_labels[i]) for site, i in zip(rest_sites, order, strict=True)]


def _patients(
    pairs: list[tuple[str, str]], repeat: float, rng: np.random.Generator
) -> list[tuple[str, str, int]]:
    """Group the images of each (site, class) cell into patients, some with a follow-up image, so a
    patient's images share label and site; returns (site, label, n_images) in random order."""
    out: list[tuple[str, str, int]] = []
    for (site, label), m in sorted(Counter(pairs).items()):
        twice = min(m // 2, round(m * repeat / (1.0 + repeat)))
        out += [(site, label, 2)] * twice + [(site, label, 1)] * (m - 2 * twice)
    return [out[i] for i in rng.permutation(len(out))]


def _splits(
    patients: list[tuple[str, str, int, bool]], cfg: SynthConfig, rng: np.random.Generator
) -> list[str]:
    """Split per patient: held-out site and pediatric rows are test sets of their own; the rest is
    train/val/test, stratified by class."""
    if not cfg.assign_splits:
        return [""] * len(patients)
    split = [
        "test_pediatric" if ped else "test_site" if site == cfg.holdout_site else ""
        for site, _, _, ped in patients
    ]
    for label in LABELS:
        pool = [i for i, p in enumerate(patients) if p[1] == label and not split[i]]
        pool = [pool[j] for j in rng.permutation(len(pool))]
        counts = _largest_remainder(len(pool), cfg.split_fractions)
        names = [name for name, k in zip(SPLITS, counts, strict=True) for _ in range(k)]
        for i, name in zip(pool, names, strict=True):
            split[i] = name
    return split


def plan_cohort(cfg: SynthConfig) -> list[ImageJob]:
    """Every image of the cohort, in manifest order; a pure function of the config."""
    rng = np.random.default_rng(derive_seed(cfg.seed, 0))
    adult = _patients(
        _site_labels(cfg.n_adult, cfg.sites, cfg.class_fractions, rng), cfg.repeat_fraction, rng
    )
    child_pairs = _site_labels(cfg.n_pediatric, [PEDIATRIC_SITE], cfg.pediatric_fractions, rng)
    child = _patients(child_pairs, cfg.repeat_fraction, rng)
    patients = [(*p, False) for p in adult] + [(*p, True) for p in child]
    splits = _splits(patients, cfg, rng)
    jobs: list[ImageJob] = []
    for pid, ((site, label, n, ped), split) in enumerate(zip(patients, splits, strict=True)):
        name = f"synth-{pid:05d}"
        for visit in range(n):
            jobs.append(
                ImageJob(
                    len(jobs),
                    pid,
                    visit,
                    name,
                    label,
                    site,
                    ped,
                    split,
                    f"images/{name}_{visit}.png",
                    f"masks/{name}_{visit}.png",
                )
            )
    return jobs


def render_job(cfg: SynthConfig, job: ImageJob) -> Phantom:
    """Render one planned image: the patient's anatomy (re-posed for a follow-up) and lesion, the
    image's severity and acquisition."""
    anatomy = sample_anatomy(np.random.default_rng(derive_seed(cfg.seed, 1, job.patient)), job.pediatric)
    rng = np.random.default_rng(derive_seed(cfg.seed, 2, job.index))
    if job.visit > 0:
        anatomy = repose(anatomy, rng)
    # the lesion's geometry is the patient's, so a follow-up shows the same lesion at another severity
    pathology = sample_pathology(job.label, rng, cfg.severity, seed=derive_seed(cfg.seed, 3, job.patient))
    return render_phantom(anatomy, pathology, site_style(job.site), rng, cfg.size)


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write a PNG so a crash never leaves a half-written file under the final name."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=4)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _render_chunk(cfg: SynthConfig, jobs: list[ImageJob], out: str) -> int:
    """Worker: render and write a chunk of jobs, skipping files a previous, interrupted run finished."""
    root = Path(out)
    for job in jobs:
        img_path, mask_path = root / job.image, root / job.mask
        if img_path.exists() and mask_path.exists():
            continue
        ph = render_job(cfg, job)
        _write_png(mask_path, ph.lung_mask.astype(np.uint8) * 255)
        _write_png(img_path, np.round(ph.image * 65535.0).astype(np.uint16))
    return len(jobs)


def _config_record(cfg: SynthConfig) -> dict[str, Any]:
    """What synth_config.json holds: the config plus the generator version that drew it."""
    return {"generator_version": GENERATOR_VERSION, "config": cfg.to_dict()}


def _prepare_folder(cfg: SynthConfig, out: Path, force: bool) -> bool:
    """Check `out` against an earlier run; True when it already holds this exact cohort (a no-op)."""
    record_path = out / "synth_config.json"
    if record_path.exists():
        try:
            same = json.loads(record_path.read_text()) == _config_record(cfg)
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            return (out / "manifest.csv").exists()
        if not force:
            raise ConfigError(
                f"{out} already holds a synthetic cohort made with another config or generator version "
                f"(see {record_path}); choose another folder or pass --force to regenerate it"
            )
        logger.info("regenerating %s with a new config (--force)", out)
        for sub in ("images", "masks"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "manifest.csv").unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(
            f"{out} is not empty and holds no synth_config.json; choose an empty or new folder, "
            f"or pass --force to write the cohort into it anyway"
        )
    return False


def _default_workers() -> int:
    """Cores this process may use (respects affinity masks and container CPU sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run(cfg: SynthConfig, jobs: list[ImageJob], out: Path, workers: int, progress: bool) -> None:
    """Render all jobs, in this process or over a process pool, with a progress bar."""
    bar = tqdm(total=len(jobs), desc="synth", unit="img", disable=not progress)
    if workers <= 1:
        for job in jobs:
            bar.update(_render_chunk(cfg, [job], str(out)))
    else:
        size = max(1, min(16, math.ceil(len(jobs) / (4 * workers))))
        chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_render_chunk, cfg, chunk, str(out)) for chunk in chunks]
            for fut in as_completed(futures):
                bar.update(fut.result())
    bar.close()


def _write_manifest(jobs: Iterable[ImageJob], path: Path) -> None:
    """Write the manifest CSV atomically (last, so its presence marks a finished cohort)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for j in jobs:
        age = "pediatric" if j.pediatric else "adult"
        writer.writerow([j.image, j.label, j.patient_id, j.site, j.split, j.mask, age])
    atomic_write_text(path, buf.getvalue())


def generate_cohort(
    cfg: SynthConfig,
    out_dir: str | os.PathLike[str],
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Generate the synthetic cohort into `out_dir` and return its manifest path.

    Args:
        cfg: what to generate.
        out_dir: output folder (created). Re-running with the same config is a no-op; an interrupted
            run resumes; a different config raises `ConfigError` unless `force`.
        workers: processes (default: all usable cores); the output does not depend on it.
        progress: show a tqdm bar.
        force: regenerate over a cohort made with another config, or write into a non-empty folder.

    Returns:
        Path of `manifest.csv` (columns path,label,patient_id,site,split,mask_path,age_group).
    """
    out = Path(out_dir)
    manifest = out / "manifest.csv"
    if _prepare_folder(cfg, out, force):
        logger.info("%s already holds this cohort; nothing to do", out)
        return manifest
    jobs = plan_cohort(cfg)
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "synth_config.json", _config_record(cfg))
    _run(cfg, jobs, out, workers or _default_workers(), progress)
    _write_manifest(jobs, manifest)
    logger.info("wrote %d images to %s", len(jobs), out)
    return manifest


def read_png(path: str | os.PathLike[str]) -> np.ndarray:
    """A cohort PNG as float32 in [0, 1] (16-bit images / 65535, 8-bit masks / 255)."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    return arr.astype(np.float32) / (65535.0 if arr.dtype != np.uint8 else 255.0)
