"""How much images vary within one site: real folders against a synthetic cohort's sites.

For every image, five intensity statistics ([0, 1] scale; `synthetic.acquisition.intensity_profile`):
the mean and SD of the whole image, and the 5th, 50th and 95th percentiles of its central chest. Printed
per group:
the mean of each statistic and its SD between images. A real folder of one hospital shows how much
exposure, processing and patient size move these; the phantoms of each synthetic site should vary as
much (`synthetic.acquisition.EXPOSURE_JITTER` and its neighbours were calibrated with this script).

    python benchmarks/phantom_realism.py --real kermany=../shared/data/kermany_train/NORMAL \
        --real shenzhen=../shared/data/shenzhen_mini --cohort runs/demo/data/cohort --label healthy
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from sscxr.data.importers.common import _scan_images
from sscxr.data.io import read_xray
from sscxr.synthetic.acquisition import intensity_profile

STATS = ("mean", "sd", "chest p5", "chest p50", "chest p95")


def group_stats(paths: list[Path], limit: int, seed: int = 0) -> tuple[int, np.ndarray, np.ndarray]:
    """(images used, mean (5,), SD between images (5,)) over at most `limit` images drawn at random."""
    rng = np.random.default_rng(seed)
    if len(paths) > limit:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), limit, replace=False))]
    rows = np.stack([intensity_profile(read_xray(p).image) for p in paths])
    return len(rows), rows.mean(axis=0), rows.std(axis=0, ddof=1)


def _real_images(root: Path) -> list[Path]:
    """Image files under `root` as the importers find them (hidden files skipped), masks left out."""
    return [p for p in _scan_images(root) if "mask" not in p.relative_to(root).as_posix().lower()]


def _cohort_sites(cohort: Path, label: str | None) -> dict[str, list[Path]]:
    """A synthetic cohort's image paths by site, of one label (None: all)."""
    sites: dict[str, list[Path]] = {}
    with open(cohort / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            if label is None or row["label"] == label:
                sites.setdefault(row["site"], []).append(cohort / row["path"])
    return dict(sorted(sites.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="append", default=[], metavar="NAME=FOLDER", help="repeatable")
    p.add_argument("--cohort", action="append", default=[], help="a synthetic cohort folder, repeatable")
    p.add_argument("--label", default="healthy", help="cohort label to measure ('' for all)")
    p.add_argument("--limit", type=int, default=400, help="images per group, drawn at random")
    args = p.parse_args()
    groups: list[tuple[str, list[Path]]] = []
    for spec in args.real:
        name, _, folder = spec.partition("=")
        groups.append((name, _real_images(Path(folder))))
    for cohort in args.cohort:
        for site, paths in _cohort_sites(Path(cohort), args.label or None).items():
            groups.append((f"{Path(cohort).name}:{site}", paths))
    print(f"{'group':28s} {'n':>4s}  " + "  ".join(f"{s:>17s}" for s in STATS))
    print(f"{'':28s} {'':>4s}  " + "  ".join(f"{'mean (SD)':>17s}" for _ in STATS))
    for name, paths in groups:
        if not paths:
            print(f"{name:28s} no images")
            continue
        n, mean, sd = group_stats(paths, args.limit)
        cells = (f"{m:9.3f} ({s:.3f})" for m, s in zip(mean, sd, strict=True))
        print(f"{name:28s} {n:4d}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
