"""Patient-level splits: every image of a patient lands in one split, and held-out sites stay out of training.

Typical use: `hold_out_sites` first (those rows get `test_site`), then `patient_split` fills the rows that
still have no split, then `check_no_leak` before training. Every command that trains or evaluates on a
cache calls `require_no_leak`, so a manifest edited by hand (a patient in train and test) is refused
there too, not only when splits are assigned.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import replace

import numpy as np

from sscxr.data.manifest import Manifest, ManifestRow
from sscxr.errors import DataError

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
HELD_OUT_SPLIT = "test_site"
TRAINING_SPLITS: tuple[str, ...] = ("train", "val")
_SHOWN = 5

logger = logging.getLogger(__name__)


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    if not fractions:
        raise ValueError("patient_split: fractions must name at least one split")
    if any(not name for name in fractions):
        raise ValueError("patient_split: split names must be non-empty")
    if any(not math.isfinite(f) or f < 0 for f in fractions.values()):
        raise ValueError(f"patient_split: fractions must be finite and >= 0, got {dict(fractions)}")
    if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"patient_split: fractions must sum to 1, got {dict(fractions)}")
    return dict(fractions)


def _key_of(row: ManifestRow, by: str) -> str:
    """The stratification value of a row: a core field, else an extra column ('' when absent)."""
    value = getattr(row, by, None)
    return value if isinstance(value, str) else row.extra.get(by, "")


def _majority(values: Iterable[str]) -> str:
    """Most common value; ties go to the smallest so the result does not depend on row order."""
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, n in counts.items() if n == best)


def _allocate(
    patients: list[str],
    sizes: Mapping[str, int],
    fractions: dict[str, float],
    totals: dict[str, int],
    rng: np.random.Generator,
) -> dict[str, str]:
    """Assign the patients of one stratum to splits, filling each split towards its share of images.

    Patients come in random order; each goes to the split furthest below its target image count (so
    uneven patient sizes still give close-to-target fractions). Ties go to the split furthest below
    its overall target (`totals`, updated in place), so small strata do not all feed the same split.
    """
    order = [patients[i] for i in rng.permutation(len(patients))]
    n_images = sum(sizes[p] for p in patients)
    counts = dict.fromkeys(fractions, 0)
    out: dict[str, str] = {}
    for patient in order:
        done = sum(totals.values())
        split = max(
            fractions,
            key=lambda s: (
                round(fractions[s] * n_images - counts[s], 9),
                round(fractions[s] * done - totals[s], 9),
            ),
        )
        out[patient] = split
        counts[split] += sizes[patient]
        totals[split] += sizes[patient]
    return out


def _fixed_splits(manifest: Manifest, only_empty: bool) -> dict[str, str]:
    """Patients with rows that already have a split (kept when only_empty): patient -> that split."""
    if not only_empty:
        return {}
    existing: dict[str, list[str]] = {}
    for row in manifest.rows:
        if row.split:
            existing.setdefault(row.patient_id, []).append(row.split)
    # A patient's unassigned images join the split its other images are in (its majority one).
    return {p: _majority(splits) for p, splits in existing.items()}


def patient_split(
    manifest: Manifest,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    stratify_by: str | None = "label",
    only_empty: bool = True,
    stratify: bool = True,
) -> Manifest:
    """Assign splits at patient level, stratified by each patient's majority value of `stratify_by`.

    Args:
        manifest: rows with patient ids (read_manifest fills missing ones per image).
        fractions: split name -> share of images (sum 1); default train 0.7, val 0.15, test 0.15.
        seed: the only source of randomness: the same seed gives the same splits.
        stratify_by: row field ("label", "site", ...) or extra column to stratify on; None = no strata.
        only_empty: keep rows that already have a split (and send the rest of such a patient's rows
            to the same split); False = reassign every row.
        stratify: False is the same as `stratify_by=None`.

    Returns:
        A new manifest (same row order and root) whose rows all have a split.
    """
    fracs = _check_fractions(DEFAULT_FRACTIONS if fractions is None else fractions)
    fixed = _fixed_splits(manifest, only_empty)
    by = stratify_by if stratify else None
    groups: dict[str, list[ManifestRow]] = {}
    for row in manifest.rows:
        if row.patient_id not in fixed:
            groups.setdefault(row.patient_id, []).append(row)
    strata: dict[str, list[str]] = {}
    for patient in sorted(groups):  # sorted: the result must not depend on row order
        key = _majority(_key_of(r, by) for r in groups[patient]) if by else ""
        strata.setdefault(key, []).append(patient)
    rng = np.random.default_rng(seed)
    sizes = {p: len(rows) for p, rows in groups.items()}
    totals = dict.fromkeys(fracs, 0)
    assigned = dict(fixed)
    for key in sorted(strata):
        assigned.update(_allocate(strata[key], sizes, fracs, totals, rng))
    return manifest.with_rows(
        row if (row.split and only_empty) else replace(row, split=assigned[row.patient_id])
        for row in manifest.rows
    )


def hold_out_sites(manifest: Manifest, sites: Collection[str], split: str = HELD_OUT_SPLIT) -> Manifest:
    """Put every row of the given sites into `split`, so no model trains on them.

    Args:
        manifest: rows with sites.
        sites: site names to hold out; each must occur in the manifest (a typo would hold out nothing).
        split: the split name given to their rows.

    Returns:
        A new manifest; other rows are unchanged.
    """
    if not split:
        raise ValueError("hold_out_sites: split must be a non-empty name")
    known = {r.site for r in manifest.rows}
    unknown = sorted(set(sites) - known)
    if unknown:
        named = sorted(s for s in known if s)
        fix = (
            f"its sites are {named}; name one of those with --hold-out-site (names are case-sensitive)"
            if named
            else "its rows name no site; give them one when importing (--site, or --site-col for a CSV)"
        )
        raise DataError(f"manifest in {manifest.root}: site(s) {unknown} not found; {fix}.")
    held = set(sites)
    return manifest.with_rows(replace(r, split=split) if r.site in held else r for r in manifest.rows)


def _patient_leaks(manifest: Manifest) -> list[str]:
    splits: dict[str, Counter[str]] = {}
    for row in manifest.rows:
        if row.split:
            splits.setdefault(row.patient_id, Counter())[row.split] += 1
    return [
        f"{patient} ({', '.join(f'{s}: {n}' for s, n in sorted(c.items()))})"
        for patient, c in sorted(splits.items())
        if len(c) > 1
    ]


def _held_out_sites(manifest: Manifest, held_out_split: str) -> set[str]:
    """Sites with at least half of their assigned rows in `held_out_split`.

    Not "any row": a patient seen at a held-out site and elsewhere takes all their images to the
    held-out split, which must not mark the other site as held out.
    """
    held, assigned = Counter[str](), Counter[str]()
    for row in manifest.rows:
        if row.split:
            assigned[row.site] += 1
            held[row.site] += row.split == held_out_split
    return {site for site, n in held.items() if n and 2 * n >= assigned[site]}


def _site_leaks(manifest: Manifest, sites: set[str], training_splits: Collection[str]) -> list[str]:
    counts = Counter(
        (r.site, r.split) for r in manifest.rows if r.site in sites and r.split in training_splits
    )
    return [f"{site} in {split} ({n} rows)" for (site, split), n in sorted(counts.items())]


def check_no_leak(
    manifest: Manifest,
    held_out_split: str = HELD_OUT_SPLIT,
    training_splits: Collection[str] = TRAINING_SPLITS,
    held_out_sites: Collection[str] | None = None,
) -> None:
    """Raise DataError when a patient spans several splits or a held-out site has training rows.

    Args:
        manifest: rows with splits (rows without a split are ignored).
        held_out_split: the split `hold_out_sites` writes.
        training_splits: splits a model learns from or is selected on.
        held_out_sites: sites that must have no training rows; None = the sites with at least half
            of their assigned rows in `held_out_split`.
    """
    problems = []
    leaks = _patient_leaks(manifest)
    if leaks:
        shown = "; ".join(leaks[:_SHOWN]) + (
            f"; and {len(leaks) - _SHOWN} more" if len(leaks) > _SHOWN else ""
        )
        problems.append(f"{len(leaks)} patient(s) in more than one split: {shown}")
    held = set(held_out_sites) if held_out_sites is not None else _held_out_sites(manifest, held_out_split)
    sites = _site_leaks(manifest, held, training_splits)
    if sites:
        problems.append(f"held-out site(s) also in training splits: {'; '.join(sites)}")
    if problems:
        raise DataError(
            f"manifest in {manifest.root}: " + ". ".join(problems) + ". Re-split it with `sscxr split "
            "MANIFEST --split 0.7,0.15,0.15 --resplit` (with --hold-out-site if sites are held out), "
            "or fix the split column."
        )


def require_no_leak(manifest: Manifest, allow: bool, option: str) -> list[str]:
    """`check_no_leak` for a command about to train or evaluate: refuse a leak unless `allow`.

    Args:
        manifest: the rows the command reads (e.g. `ImageCache.manifest`).
        allow: report the leak as a warning and go on (results on the leaking splits are optimistic).
        option: how the user allows it, quoted in the error ("set data.allow_leakage=true").

    Returns:
        [] when there is no leak, else the leak's description (the run goes on only when `allow`).

    Raises:
        DataError: a leak and not `allow`.
    """
    try:
        check_no_leak(manifest)
    except DataError as e:
        if not allow:
            raise DataError(
                f"{e} To go on anyway (its test results would be optimistic): {option}."
            ) from None
        logger.warning("%s Going on (%s): results on the leaking splits are optimistic.", e, option)
        return [str(e)]
    return []
