"""The built-in synthetic cohort (`sscxr synth`): seeded chest X-ray phantoms, masks and a manifest.

No real data set can ship, so this is the project's default data. Anatomy and disease are drawn in
`phantom.py` and each site's acquisition (exposure, tone curve, noise, blur, collimation, burned-in
markers) is simulated in `acquisition.py`; this module renders phantoms through it, plans the cohort
(sites, classes, patients, follow-ups, splits) and writes it in parallel. The package (`sscxr.synthetic`)
re-exports the names callers use from all three modules.

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
from tqdm import tqdm

from sscxr.errors import ConfigError
from sscxr.synthetic.acquisition import PEDIATRIC_SITE, SiteStyle, acquire, site_style
from sscxr.synthetic.phantom import (
    LABELS,
    Anatomy,
    Pathology,
    pathology_map,
    render_anatomy,
    repose,
    sample_anatomy,
    sample_pathology,
)
from sscxr.utils import atomic_write_json, atomic_write_text, derive_seed

logger = logging.getLogger(__name__)

# Bump when the pictures change, so stale folders are not taken for current ones. 2: per-image acquisition
# variation calibrated on real sites (three times version 1's), pediatric pneumonia.
GENERATOR_VERSION = 2
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "patient_id", "site", "split", "mask_path", "age_group")


@dataclass(frozen=True)
class SynthConfig:
    """What cohort to generate.

    `n_adult` / `n_pediatric` count images; `repeat_fraction` is the share of patients with a follow-up
    image. Class fractions are (healthy, pneumonia, covid-19). Splits: rows of `holdout_site` get
    `test_site`, pediatric rows `test_pediatric`, the rest train/val/test by patient, stratified by class
    (`assign_splits=False` leaves the column empty for the split helpers). `severity` bounds disease
    severity in [0, 1]. `acquisition_jitter` scales how much a site's images vary in exposure, tone
    curve and window (1: calibrated on real single-hospital sets; 1/3: generator version 1's; see
    `synthetic.acquisition`). Children get pneumonia most often (Kermany's pediatric set is 74%
    pneumonia), covid-19 less.
    """

    n_adult: int = 600
    n_pediatric: int = 90
    size: int = 256
    sites: tuple[str, ...] = ("site_a", "site_b", "site_c", "site_d")
    class_fractions: tuple[float, float, float] = (0.4, 0.3, 0.3)
    pediatric_fractions: tuple[float, float, float] = (0.4, 0.4, 0.2)
    repeat_fraction: float = 0.2
    seed: int = 0
    holdout_site: str | None = "site_d"
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    assign_splits: bool = True
    severity: tuple[float, float] = (0.3, 1.0)
    acquisition_jitter: float = 1.0

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
        if not 0.0 <= self.acquisition_jitter <= 3.0:
            raise ValueError(f"acquisition_jitter must be in [0, 3], got {self.acquisition_jitter}")

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


@dataclass
class Phantom:
    """One rendered image: `image` `(S, S)` float32 in [0, 1], `lung_mask` bool, `pathology` the
    disease's attenuation `(S, S)` float32 (zero outside the lung mask, all zero when healthy)."""

    image: np.ndarray
    lung_mask: np.ndarray
    pathology: np.ndarray


def render_phantom(
    anatomy: Anatomy,
    pathology: Pathology,
    style: SiteStyle,
    rng: np.random.Generator,
    size: int = 256,
    jitter: float = 1.0,
) -> Phantom:
    """Render one radiograph: anatomy + disease, acquired by a site (`jitter`: see `acquire`). Same
    inputs give the same pixels, so one anatomy can be rendered with and without disease by reusing the
    rng seed."""
    maps = render_anatomy(anatomy, size)
    disease = pathology_map(anatomy, maps, pathology)
    image = acquire(maps.atten + disease, style, rng, jitter)
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
    return render_phantom(anatomy, pathology, site_style(job.site), rng, cfg.size, cfg.acquisition_jitter)


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
