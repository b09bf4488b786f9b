"""`sscxr check CACHE`: leakage between the splits of a prepared cache, before anything trains on it.

Lists patients in more than one split and near-duplicate images (perceptual hashes, see
`sscxr.data.near_duplicates`) of different patients in different splits, with their rows, paths,
patients, splits and distance; exits 1 when there is any, 0 on a clean cache. Training and `evaluate`
refuse the pairs within `REFUSE_THRESHOLD` bits unless allowed (`data.allow_leakage=true` /
`--allow-leakage`) and warn of the others.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sscxr.cli.argtypes import int_at_least


def _patient_leaks(cache: Any) -> list[str]:
    """`check_no_leak`'s finding on the cache's manifest ([] when there is none)."""
    from sscxr.data.splits import check_no_leak
    from sscxr.errors import DataError

    try:
        check_no_leak(cache.manifest)
    except DataError as e:
        return [str(e)]
    return []


def _line(pair: Any, rows: Any) -> str:
    """`  41 bits  train  p1  imgs/a.png  ~  test  p7  imgs/b.png` (rows i, j)."""
    a, b = rows[pair.i], rows[pair.j]
    return (
        f"  {pair.distance:3d} bits  {a.split or '-'}  {a.patient_id}  {a.path}  ~  "
        f"{b.split or '-'}  {b.patient_id}  {b.path}  (rows {pair.i}, {pair.j})"
    )


def _listing(title: str, pairs: list[Any], rows: Any, limit: int) -> list[str]:
    shown = pairs if limit == 0 else pairs[:limit]
    more = len(pairs) - len(shown)
    tail = [f"  ... and {more} more (--limit 0 lists all)"] if more else []
    return [f"{title}:", *(_line(p, rows) for p in shown), *tail] if pairs else []


def _check(args: argparse.Namespace) -> int:
    from sscxr.data.cache import ImageCache
    from sscxr.data.near_duplicates import REFUSE_THRESHOLD, THRESHOLD, cache_pairs, pairs_of

    cache = ImageCache.open(args.cache)  # refuses an unfinished or damaged cache, with the fix
    threshold = THRESHOLD if args.threshold is None else args.threshold
    start = time.perf_counter()
    found = cache_pairs(cache, threshold, compute=True)  # an older cache: hashed now, not stored
    seconds = time.perf_counter() - start
    pairs = pairs_of(cache.rows, found)
    leaks = [p for p in pairs if p.leak]
    patients = _patient_leaks(cache)
    blank = sum(bool(r.get("blank")) for r in cache.index["rows"])
    if args.json:
        doc: dict[str, Any] = {
            "cache": str(cache.root),
            "rows": len(cache),
            "failed": int((~cache.ok).sum()),
            "blank": blank,
            "hashes_stored": cache.has_hashes,
            "threshold": threshold,
            "seconds": round(seconds, 3),
            "patient_leakage": patients,
            "n_leak_pairs": len(leaks),
            "pairs": [p.to_dict(cache.rows) for p in pairs],
        }
        print(json.dumps(doc, indent=2))
        return 1 if leaks or patients else 0
    stored = "stored" if cache.has_hashes else "computed now, not stored: see the warning above"
    print(
        f"cache {cache.root}: {len(cache)} rows, {int(cache.ok.sum())} decoded, {blank} blank (not "
        f"hashed); perceptual hashes {stored}"
    )
    print(f"patient leakage: {patients[0] if patients else 'none'}")
    others = [p for p in pairs if not p.leak]
    print(
        f"near-duplicates within {threshold} bits ({seconds:.2f} s): {len(pairs)} pair(s), {len(leaks)} of "
        f"different patients in different splits, {len(others)} of one patient or within one split"
    )
    title = (
        f"across splits (training and evaluate refuse the pairs within {REFUSE_THRESHOLD} bits and warn "
        "of the others)"
    )
    lines = _listing(title, leaks, cache.rows, args.limit)
    if args.within:
        lines += _listing("same patient or same split (allowed)", others, cache.rows, args.limit)
    for line in lines:
        print(line)
    if leaks:
        print(
            "fix: keep one image of each pair across splits (or give both the same patient id) in the "
            "manifest, re-split it (`sscxr split MANIFEST --resplit ...`) and prepare the cache again"
        )
    return 1 if leaks or patients else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `check` subcommand."""
    p = sub.add_parser(
        "check",
        help="list leakage between a cache's splits: patients in two splits, near-duplicate images",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("cache", type=Path, help="a cache folder written by `sscxr prepare`")
    p.add_argument("--within", action="store_true", help="also list pairs within a split or of one patient")
    p.add_argument(
        "--threshold",
        type=int_at_least(0),
        default=None,
        help="largest distance of a pair listed, in bits of 576 (default: the stored search's, 78)",
    )
    p.add_argument(
        "--limit", type=int_at_least(0), default=20, help="pairs listed per section (0: all; default 20)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON document (every pair) instead")
    p.set_defaults(func=_check)
