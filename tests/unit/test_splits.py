"""Patient-level splits, held-out sites and the leak check."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sscxr.data.manifest import Manifest, ManifestRow
from sscxr.data.splits import check_no_leak, hold_out_sites, patient_split
from sscxr.errors import DataError


def cohort(n_patients: int, seed: int = 0, sites: tuple[str, ...] = ("a", "b", "c")) -> Manifest:
    """Patients with 1..8 images each (uneven), ~30% 'covid-19', the rest 'healthy'."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "covid-19" if rng.random() < 0.3 else "healthy"
        site = sites[int(rng.integers(len(sites)))]
        for i in range(int(rng.integers(1, 9))):
            rows.append(ManifestRow(f"p{p}/{i}.png", label, f"p{p}", site))
    # Shuffle rows so that a patient's images are not contiguous.
    return Manifest([rows[i] for i in rng.permutation(len(rows))], Path("/data"))


def splits_per_patient(manifest: Manifest) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for row in manifest:
        out.setdefault(row.patient_id, set()).add(row.split)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7])
def test_no_patient_in_two_splits(seed: int) -> None:
    manifest = patient_split(cohort(60, seed=seed), seed=seed)
    assert all(len(s) == 1 for s in splits_per_patient(manifest).values())
    assert {r.split for r in manifest} == {"train", "val", "test"}
    check_no_leak(manifest)


def test_rows_keep_order_and_fields() -> None:
    original = cohort(30)
    split = patient_split(original, seed=5)
    assert [r.path for r in split] == [r.path for r in original]
    assert [(r.label, r.patient_id, r.site) for r in split] == [
        (r.label, r.patient_id, r.site) for r in original
    ]
    assert split.root == original.root


def test_deterministic_for_a_seed() -> None:
    manifest = cohort(80)
    first = [r.split for r in patient_split(manifest, seed=3)]
    assert first == [r.split for r in patient_split(manifest, seed=3)]
    assert first != [r.split for r in patient_split(manifest, seed=4)]
    # Row order does not matter, only the seed.
    reversed_rows = manifest.with_rows(reversed(manifest.rows))
    again = {r.path: r.split for r in patient_split(reversed_rows, seed=3)}
    assert first == [again[r.path] for r in manifest]


def test_fractions_and_stratification() -> None:
    manifest = patient_split(cohort(400, seed=1), seed=11)
    n = len(manifest)
    by_split = Counter(r.split for r in manifest)
    for split, fraction in {"train": 0.7, "val": 0.15, "test": 0.15}.items():
        assert abs(by_split[split] / n - fraction) < 0.03, by_split
    overall = sum(r.label == "covid-19" for r in manifest) / n
    for split in ("train", "val", "test"):
        rows = manifest.filter(split=split)
        share = sum(r.label == "covid-19" for r in rows) / len(rows)
        assert abs(share - overall) < 0.05, (split, share, overall)


def test_majority_label_decides_stratum() -> None:
    rows = [ManifestRow(f"p{p}/{i}.png", "x" if i else "y", f"p{p}") for p in range(20) for i in range(3)]
    manifest = patient_split(Manifest(rows, Path("/d")), fractions={"train": 0.5, "test": 0.5}, seed=0)
    assert Counter(r.split for r in manifest) == {"train": 30, "test": 30}


def test_custom_fractions_stratify_by_site_and_no_strata() -> None:
    manifest = cohort(100)
    halves = patient_split(manifest, fractions={"train": 0.5, "test": 0.5}, stratify_by="site")
    assert {r.split for r in halves} == {"train", "test"}
    for site in ("a", "b", "c"):
        counts = Counter(r.split for r in halves.filter(sites=[site]))
        assert abs(counts["train"] - counts["test"]) <= 8  # one patient has at most 8 images
    plain = patient_split(manifest, stratify=False, seed=2)
    assert all(len(s) == 1 for s in splits_per_patient(plain).values())


def test_existing_splits_kept_and_patient_followed() -> None:
    rows = [ManifestRow(f"p{p}/{i}.png", "healthy", f"p{p}") for p in range(30) for i in range(2)]
    rows[0] = ManifestRow("p0/0.png", "healthy", "p0", split="test")  # p0's other image has no split
    rows[10] = ManifestRow("p5/0.png", "healthy", "p5", split="custom")
    manifest = patient_split(Manifest(rows, Path("/d")), seed=0)
    by_path = {r.path: r.split for r in manifest}
    assert by_path["p0/0.png"] == by_path["p0/1.png"] == "test"
    assert by_path["p5/0.png"] == by_path["p5/1.png"] == "custom"
    check_no_leak(manifest)
    redone = patient_split(Manifest(rows, Path("/d")), seed=0, only_empty=False)
    assert "custom" not in {r.split for r in redone}


@pytest.mark.parametrize(
    "fractions", [{}, {"train": 0.7, "val": 0.2}, {"train": 1.2, "test": -0.2}, {"": 1.0}]
)
def test_bad_fractions(fractions: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="patient_split"):
        patient_split(cohort(5), fractions=fractions)


def test_held_out_site_never_in_training() -> None:
    manifest = cohort(90)
    held = hold_out_sites(manifest, ["b"])
    assert {r.split for r in held.filter(sites=["b"])} == {"test_site"}
    assert {r.split for r in held.filter(sites=["a", "c"])} == {""}
    for seed in range(4):
        split = patient_split(held, seed=seed)
        assert "b" not in {r.site for r in split.filter(split=["train", "val"])}
        assert {r.split for r in split.filter(sites=["b"])} == {"test_site"}
        check_no_leak(split)
    with pytest.raises(DataError, match="'bb'"):
        hold_out_sites(manifest, ["bb"])


def test_patient_spanning_held_out_site_follows_it() -> None:
    rows = [ManifestRow("x/1.png", "healthy", "p1", "held"), ManifestRow("y/1.png", "healthy", "p1", "other")]
    rows += [ManifestRow(f"y/{p}.png", "healthy", f"q{p}", "other") for p in range(10)]
    split = patient_split(hold_out_sites(Manifest(rows, Path("/d")), ["held"]), seed=0)
    assert {r.split for r in split if r.patient_id == "p1"} == {"test_site"}
    check_no_leak(split)


def test_check_no_leak_catches_planted_leaks() -> None:
    manifest = patient_split(cohort(40), seed=0)
    victim = manifest[0]
    other = "test" if victim.split != "test" else "train"
    # Plant one more image of this patient in another split.
    planted = ManifestRow("planted.png", victim.label, victim.patient_id, victim.site, other)
    leaky = manifest.with_rows([*manifest.rows, planted])
    with pytest.raises(DataError, match=f"{victim.patient_id} "):
        check_no_leak(leaky)
    # Empty splits are not a leak.
    check_no_leak(manifest.with_rows([*manifest.rows, ManifestRow("new.png", patient_id=victim.patient_id)]))


def test_check_no_leak_catches_held_out_site_in_train() -> None:
    rows = [
        ManifestRow("1.png", patient_id="p1", site="s", split="test_site"),
        ManifestRow("2.png", patient_id="p2", site="s", split="train"),
        ManifestRow("3.png", patient_id="p3", site="t", split="train"),
    ]
    with pytest.raises(DataError, match="s in train"):
        check_no_leak(Manifest(rows, Path("/d")))
    # Named explicitly, a held-out site is checked even with no row in the held-out split yet.
    with pytest.raises(DataError, match="t in train"):
        check_no_leak(Manifest(rows[2:], Path("/d")), held_out_sites=["t"])
    check_no_leak(Manifest(rows[1:], Path("/d")))


@pytest.mark.parametrize("seed", range(6))
def test_stratification_balances_small_strata(seed: int) -> None:
    rows = [ManifestRow(f"{k}.png", "covid-19" if k < 10 else "healthy", f"p{k}") for k in range(20)]
    manifest = patient_split(Manifest(rows, Path("/d")), fractions={"train": 0.5, "test": 0.5}, seed=seed)
    for split in ("train", "test"):
        assert manifest.filter(split=split).counts("label") == {"covid-19": 5, "healthy": 5}
