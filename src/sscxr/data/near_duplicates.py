"""Near-duplicate radiographs across splits: perceptual hashes per cached row, and the pairs they find.

Public covid collections republish the same radiograph under another patient id (resized, cropped,
re-encoded): the patient-level check of `splits.check_no_leak` cannot see it, and a model tested on
an image it was trained on scores too well.

Why not one 64-bit pHash: chest X-rays all look alike at 8 x 8 DCT frequencies. On 5,216 distinct
real radiographs (Kermany) 182 pairs of different children are within 4 bits, and a copy cropped by
5% is 8 bits away (median): no threshold catches crops without flagging hundreds of strangers. So
every row stores (`hash_image`, `imagehash.phash` throughout):

- words 0-5: coarse keys, the 64-bit pHash of the whole image and of 5 crops keeping 95% of each side
  (the 4 corners and the centre), to find candidate pairs cheaply;
- then the 576-bit pHash (24 x 24 DCT signs of a 96 x 96 reduction) of 36 windows (`_boxes`): the
  whole image, `GRID` x `GRID` crops keeping 95% of each side (corner to corner), and crops keeping
  95% of the width only or of the height only: a copy cropped by 5% (anywhere, or off one edge) lands
  within a fraction of a pixel of one of them.

A pair is a candidate when its `coarse_distance` (the smallest of whole-whole and crop-whole, either
way round) is <= `COARSE_THRESHOLD`, and a near-duplicate when its `fine_distance` (the same on the
576-bit hashes) is <= `THRESHOLD`. Both thresholds were chosen on measurements (see `THRESHOLD`).

The hashes are computed from the cached row itself (`uint16` pixels, letterbox cut away), so a
resumed or repaired `prepare`, and one run on a cache written before hashes existed, give every row
the same hashes without decoding the source again. `prepare` stores them in hashes.npy and the pairs
in index.json, so the check at every training start reads a list instead of searching.

Only pairs of *different patients* in *different splits*, at least one of which is a training split
(train / val; not test* / holdout* against each other), are leaks: the same patient across splits is
already a patient leak, and a patient's follow-ups within one split are legitimately alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sscxr.data.cache_format import _MAX, fit_geometry, is_eval_split, resume_command
from sscxr.data.splits import require_no_leak
from sscxr.errors import DataError

if TYPE_CHECKING:
    from sscxr.data.cache import ImageCache
    from sscxr.data.manifest import ManifestRow

__all__ = [
    "COARSE_THRESHOLD",
    "HASH_WORDS",
    "REFUSE_THRESHOLD",
    "THRESHOLD",
    "Pair",
    "cache_pairs",
    "coarse_distance",
    "fine_distance",
    "hash_image",
    "hash_row",
    "near_pairs",
    "pairs_among",
    "pairs_of",
    "require_no_leakage",
    "require_no_near_duplicates",
    "search_info",
    "unchecked_message",
]

logger = logging.getLogger(__name__)

#: Largest `fine_distance` (of 576 bits) of a near-duplicate pair. Measured (benchmarks/
#: bench_near_duplicates.py): copies of 600 real X-rays resized, cropped by 5% (anywhere, or off one
#: edge), re-encoded as JPEG, or all three are within 78 (p95 <= 62); different children of Kermany's
#: 5,216 are >= 122 apart, different patients of the synthetic cohort >= 82 (at 32 px; 86 at 128 px).
THRESHOLD = 78
#: Largest `fine_distance` at which training and evaluation *refuse* a cross-split pair; pairs between
#: this and `THRESHOLD` are warned about and listed by `sscxr check`, not refused. Resized, JPEG
#: re-encoded and edge- or corner-cropped copies are within 36, half the copies cropped at a random
#: offset within 38; but look-alike phantoms of different patients come as close as 68 in a synthetic
#: cohort of 2,490 images (`sscxr synth --n-adult 2400`), so refusing up to `THRESHOLD` would stop
#: honest runs. Real children are >= 122 apart.
REFUSE_THRESHOLD = 48
#: Largest `coarse_distance` (of 64 bits) of a candidate pair: the same copies are within 10; 4% of
#: the pairs of different children are candidates.
COARSE_THRESHOLD = 12
GRID = 5  # crops per side whose fine hashes are stored
_KEEP = 0.95  # side of a stored crop, as a share of the image's
_PROBES = (0, GRID - 1, GRID * (GRID - 1), GRID * GRID - 1, GRID * GRID // 2)  # corners, centre
_COARSE_WORDS = 1 + len(_PROBES)
_FINE = 24  # side of the fine pHash's DCT block: 576 bits
_FINE_WORDS = _FINE * _FINE // 64
_WINDOWS = 1 + GRID * GRID + 2 * GRID  # the whole image, crops of both sides, crops of one side
#: uint64 words per row of hashes.npy: the coarse keys, then the fine hashes of every window.
HASH_WORDS = _COARSE_WORDS + _FINE_WORDS * _WINDOWS
#: A row whose pixels vary less than this (std, in 8-bit grey levels) is blank: its pHash is the sign
#: of rounding noise, the same for every blank image, so it is left out instead of matching them all.
_FLAT_STD = 0.5
_BLOCK = 2048  # rows per block of the coarse all-pairs search (2048 x 2048 uint8 distances: 4 MiB)
_CHUNK = 8192  # candidate pairs per step of the fine stage (8192 x 35 x 9 uint64: 20 MiB)
_SHOWN = 3  # pairs named in an error message


# -------------------------------------------------------------------------------------------- hashing
def _bits(h: Any) -> np.ndarray:
    """An `imagehash.ImageHash` as uint64 words, its bits row-major, most significant first."""
    return np.frombuffer(np.packbits(h.hash.ravel()).tobytes(), dtype=">u8").astype(np.uint64)


def _boxes() -> torch.Tensor:
    """`(WINDOWS, 4)` float64 windows `(top, left, height, width)` as shares of the image's sides: the
    whole image, `GRID` x `GRID` crops keeping `_KEEP` of both sides (corner to corner), then crops
    keeping `_KEEP` of the width only and of the height only (`GRID` offsets each)."""
    offsets = np.linspace(0.0, 1.0 - _KEEP, GRID)
    boxes = [(0.0, 0.0, 1.0, 1.0)]
    boxes += [(t, x, _KEEP, _KEEP) for t in offsets for x in offsets]
    boxes += [(0.0, x, 1.0, _KEEP) for x in offsets] + [(t, 0.0, _KEEP, 1.0) for t in offsets]
    return torch.tensor(boxes, dtype=torch.float64)


def _windows(content: torch.Tensor, side: int) -> torch.Tensor:
    """Every window of `_boxes()`, resampled to `side` x `side`: `(1, 1, H, W)` -> `(WINDOWS, 1, side,
    side)` float32.

    Windows are placed with sub-pixel accuracy (`grid_sample`), from one antialiased reduction to the
    size at which a crop's samples fall one pixel apart: a crop's offset then does not depend on the
    rounding of pixel boundaries, which would move the hash of a small cache row more than a shift.
    """
    reduced_side = round(side / _KEEP)
    reduced = F.interpolate(
        content, size=(reduced_side,) * 2, mode="bilinear", antialias=True, align_corners=False
    )
    top, left, height, width = _boxes().T
    theta = torch.zeros(len(top), 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = width, 2 * left + width - 1  # x_in = width * x_out + offset
    theta[:, 1, 1], theta[:, 1, 2] = height, 2 * top + height - 1
    grid = F.affine_grid(theta.float(), [len(top), 1, side, side], align_corners=False)
    return F.grid_sample(reduced.expand(len(top), -1, -1, -1), grid, mode="bilinear", align_corners=False)


def _grey(window: torch.Tensor) -> Image.Image:
    """A `(side, side)` float window as an 8-bit PIL image (pHash's input; at 4x the hash size, it is
    not resized again)."""
    # numpy, not torch, for the element-wise rest: torch's thread pool costs more than 96 x 96 pixels do
    grey = np.clip(np.round(window.numpy() * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L")


def hash_image(image: np.ndarray) -> np.ndarray | None:
    """The near-duplicate hashes of one `(H, W)` float image in [0, 1]; None when it is blank.

    Returns:
        `(HASH_WORDS,)` uint64: the 64-bit pHashes of the whole image and of its corner and centre
        crops, then 9 words each for the 576-bit pHash of every window of `_boxes()`.
    """
    import imagehash  # imported here: only prepare and the checks need it

    image = np.ascontiguousarray(image, dtype=np.float32)
    if float(image.std()) * 255 < _FLAT_STD:
        return None
    with torch.no_grad():
        windows = _windows(torch.from_numpy(image)[None, None], 4 * _FINE)
        probes = windows[[0, *(1 + k for k in _PROBES)]]
        small = F.interpolate(probes, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    coarse = [_bits(imagehash.phash(_grey(w[0]), hash_size=8)) for w in small]
    fine = [_bits(imagehash.phash(_grey(w[0]), hash_size=_FINE)) for w in windows]
    return np.concatenate(coarse + fine)


def hash_row(pixels: np.ndarray, shape: Sequence[int], fit: str) -> np.ndarray | None:
    """`hash_image` of one cached row: `(S, S)` uint16 pixels of an image originally `shape` (H, W).

    The letterbox of `fit="pad"` is cut away first: a cropped copy has another aspect ratio, hence other
    padding, which would otherwise move the hash more than the crop itself does.
    """
    h, w, top, left = fit_geometry((int(shape[0]), int(shape[1])), pixels.shape[0], fit)
    content = np.asarray(pixels[top : top + h, left : left + w], dtype=np.float32) / np.float32(_MAX)
    return hash_image(content)


# ----------------------------------------------------------------------------------------- pair search
def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has `bitwise_count`; numpy 1.26 counts bytes in a table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.uint8)


def coarse_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Crop-tolerant distance of the 64-bit keys: `(..., _COARSE_WORDS)` uint64 x 2 (broadcast) ->
    `(...)` bits of 64: the smallest of whole vs whole, each probe crop of one vs the whole other."""
    best = _popcount(a[..., 0] ^ b[..., 0])
    for k in range(1, _COARSE_WORDS):
        best = np.minimum(
            best, np.minimum(_popcount(a[..., k] ^ b[..., 0]), _popcount(a[..., 0] ^ b[..., k]))
        )
    return best


def _candidates(coarse: np.ndarray, threshold: int) -> np.ndarray:
    """`(P, 2)` int64 pairs `i < j` whose `(N, _COARSE_WORDS)` keys are within `threshold` (blocked
    all-pairs: 5,216 rows take ~0.7 s)."""
    found = [np.zeros((0, 2), dtype=np.int64)]
    for start in range(0, len(coarse), _BLOCK):
        block = coarse[start : start + _BLOCK, None]
        for other in range(start, len(coarse), _BLOCK):  # upper triangle of blocks only
            d = coarse_distance(block, coarse[None, other : other + _BLOCK])
            i, j = np.nonzero(d <= threshold)
            i, j = i + start, j + other
            found.append(np.stack([i[i < j], j[i < j]], axis=1).astype(np.int64))
    return np.concatenate(found)


def fine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Crop-tolerant distance of row pairs: two `(P, HASH_WORDS)` uint64 arrays -> `(P,)` bits of 576.

    The smallest of: whole vs whole, each crop of `a` vs whole `b`, whole `a` vs each crop of `b`; so a
    copy cropped by 5% (on either side of the pair) meets the stored crop that matches it.
    """
    first = _COARSE_WORDS + _FINE_WORDS  # the crops' hashes start here
    whole_a, whole_b = a[:, _COARSE_WORDS:first], b[:, _COARSE_WORDS:first]
    crops_a = a[:, first:].reshape(len(a), -1, _FINE_WORDS)
    crops_b = b[:, first:].reshape(len(b), -1, _FINE_WORDS)
    best = _popcount(whole_a ^ whole_b).sum(-1, dtype=np.int32)
    best = np.minimum(best, _popcount(crops_a ^ whole_b[:, None]).sum(-1, dtype=np.int32).min(-1))
    return np.minimum(best, _popcount(crops_b ^ whole_a[:, None]).sum(-1, dtype=np.int32).min(-1))


def near_pairs(
    hashes: np.ndarray, threshold: int = THRESHOLD, coarse_threshold: int = COARSE_THRESHOLD
) -> np.ndarray:
    """Every near-duplicate pair among rows of hashes.

    Args:
        hashes: `(N, HASH_WORDS)` uint64 from `hash_image`.
        threshold: largest `fine_distance` of a pair.
        coarse_threshold: largest `coarse_distance` of a candidate pair.

    Returns:
        `(P, 3)` int64 rows `(i, j, distance)` with i < j, sorted by (i, j). 5,216 real X-rays take
        ~5 s on one core (4% of their pairs are candidates: X-rays look alike to the coarse hash).
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    cand = _candidates(hashes[:, :_COARSE_WORDS].copy(), coarse_threshold)
    pairs = [np.zeros((0, 3), dtype=np.int64)]
    for start in range(0, len(cand), _CHUNK):  # chunks bound the temporaries of the fine stage
        c = cand[start : start + _CHUNK]
        d = fine_distance(hashes[c[:, 0]], hashes[c[:, 1]])
        keep = d <= threshold
        pairs.append(np.concatenate([c[keep], d[keep, None].astype(np.int64)], axis=1))
    out = np.concatenate(pairs)
    return out[np.lexsort((out[:, 1], out[:, 0]))]


def pairs_among(hashes: np.ndarray, rows: np.ndarray, threshold: int = THRESHOLD) -> np.ndarray:
    """`near_pairs` of the rows `rows` of `(N, HASH_WORDS)` hashes (the hashed ones), as `(P, 3)`
    `(i, j, distance)` with i, j row numbers of the cache."""
    if len(rows) < 2:
        return np.zeros((0, 3), dtype=np.int64)
    found = near_pairs(hashes[rows], threshold)
    return np.column_stack([rows[found[:, 0]], rows[found[:, 1]], found[:, 2]]).astype(np.int64)


def search_info(pairs: np.ndarray) -> dict[str, Any]:
    """What `prepare` stores in index.json ("near_duplicates"): the method, thresholds and pairs."""
    return {
        "method": f"imagehash.phash 8 (whole, 5 crops), {_FINE} (whole, {GRID}x{GRID} crops of {_KEEP:.0%})",
        "hash_words": HASH_WORDS,
        "threshold": THRESHOLD,
        "coarse_threshold": COARSE_THRESHOLD,
        "pairs": [[int(i), int(j), int(d)] for i, j, d in pairs],
    }


# ------------------------------------------------------------------------------------------ the cache
@dataclass(frozen=True)
class Pair:
    """Two near-duplicate rows of a cache (`i < j`), their distance, and whether they are a leak."""

    i: int
    j: int
    distance: int
    leak: bool  # different patients in different splits, at least one of them a training split
    same_patient: bool

    @property
    def refused(self) -> bool:
        """A leak close enough to be a copy: training and evaluation refuse it (farther ones: a warning)."""
        return self.leak and self.distance <= REFUSE_THRESHOLD

    def describe(self, rows: Sequence[ManifestRow]) -> str:
        """`a.png (patient p1, train) ~ b.png (patient p7, test), 3 bits`; `rows`: the cache's rows."""
        a, b = rows[self.i], rows[self.j]
        return (
            f"{a.path} (patient {a.patient_id}, {a.split or 'no split'}) ~ {b.path} (patient "
            f"{b.patient_id}, {b.split or 'no split'}), {self.distance} bits"
        )

    def to_dict(self, rows: Sequence[ManifestRow]) -> dict[str, Any]:
        a, b = rows[self.i], rows[self.j]
        return {
            "rows": [self.i, self.j],
            "paths": [a.path, b.path],
            "patients": [a.patient_id, b.patient_id],
            "splits": [a.split, b.split],
            "distance": self.distance,
            "leak": self.leak,
            "same_patient": self.same_patient,
        }


def _is_leak(split_a: str, split_b: str, same_patient: bool) -> bool:
    """Different splits, not two evaluation splits (test vs test_site shares no training), other patients."""
    if same_patient or not split_a or not split_b or split_a == split_b:
        return False
    return not (is_eval_split(split_a) and is_eval_split(split_b))


def pairs_of(rows: Sequence[ManifestRow], pairs: np.ndarray) -> list[Pair]:
    """`(P, 3)` `(i, j, distance)` pairs of the cache rows `rows` as `Pair`s: leaks first, then by
    distance and row."""
    out = []
    for i, j, d in pairs:
        a, b = rows[int(i)], rows[int(j)]
        same = a.patient_id == b.patient_id
        out.append(Pair(int(i), int(j), int(d), _is_leak(a.split, b.split, same), same))
    return sorted(out, key=lambda p: (not p.leak, p.distance, p.i, p.j))


def _hash_in_memory(cache: ImageCache) -> np.ndarray:
    """`(N, HASH_WORDS)` hashes of a cache that stores none (zero rows: failed or blank), logged."""
    hashes = np.zeros((len(cache), HASH_WORDS), dtype=np.uint64)
    start = time.perf_counter()
    for i in np.flatnonzero(cache.ok):
        value = hash_row(cache.images[i], cache.original_shape(i) or (cache.size,) * 2, cache.fit)
        if value is not None:
            hashes[i] = value
    logger.warning(
        "%s: the cache stores no perceptual hashes (prepared before sscxr stored them); computed them "
        "in %.0f s, not stored. Store them once (nothing is decoded again) with: %s",
        cache.root, time.perf_counter() - start, resume_command(cache.index, cache.root),
    )  # fmt: skip
    return hashes


def cache_pairs(cache: ImageCache, threshold: int = THRESHOLD, compute: bool = False) -> np.ndarray | None:
    """The cache's near-duplicate pairs within `threshold`: `(P, 3)` `(i, j, distance)`.

    The pairs `prepare` stored when `threshold` is at most the stored one (no search), else a search of
    the stored hashes. A cache written before hashes existed gives None, unless `compute`: then its
    rows are hashed here (~10 ms a row, nothing stored; `sscxr check` does this).
    """
    stored = cache.index.get("near_duplicates")
    if stored is not None and threshold <= stored["threshold"]:
        pairs = np.asarray(stored["pairs"], dtype=np.int64).reshape(-1, 3)
        return pairs[pairs[:, 2] <= threshold]
    if stored is None and not compute:
        return None
    if stored is not None and stored["hash_words"] != HASH_WORDS:
        raise DataError(
            f"{cache.root}: its hashes are of another sscxr ({stored['hash_words']} words a row, this one "
            f"has {HASH_WORDS}); recompute them with: {resume_command(cache.index, cache.root)}"
        )
    hashes = np.asarray(cache.hashes) if stored is not None else _hash_in_memory(cache)
    rows = np.flatnonzero(cache.hashed if stored is not None else hashes.any(axis=1))
    return pairs_among(hashes, rows, threshold)


def unchecked_message(cache: ImageCache) -> str:
    """Why a cache written before hashes existed was not checked, and the command that fixes it."""
    command = resume_command(cache.index, cache.root)
    return (
        f"{cache.root}: near-duplicate check skipped: the cache has no perceptual hashes (prepared before "
        f"sscxr stored them). Add them (nothing is decoded again) with: {command}"
    )


def require_no_leakage(cache: ImageCache, allow: bool, option: str) -> list[str]:
    """Every leakage check a command runs before it trains or evaluates on `cache`: patients in two
    splits (`require_no_leak`), then near-duplicate images (`require_no_near_duplicates`); the
    descriptions of the allowed leaks, [] when there is none."""
    return require_no_leak(cache.manifest, allow, option) + require_no_near_duplicates(cache, allow, option)


def require_no_near_duplicates(cache: ImageCache, allow: bool, option: str) -> list[str]:
    """Refuse near-duplicate images of different patients across splits unless `allow` (then warn).

    Reads the pairs `prepare` stored (a few ms). A cache written before hashes existed is not checked:
    a warning says so and names the command that adds them.

    Args:
        cache: the cache a command is about to train or evaluate on.
        allow: report the pairs as a warning and go on (results on the leaking splits are optimistic).
        option: how the user allows it, quoted in the error ("set data.allow_leakage=true").

    Returns:
        [] when there is no such pair (or no hashes to look), else the leak's description (the run
        goes on only when `allow`).

    Raises:
        DataError: such a pair and not `allow`.
    """
    pairs = cache_pairs(cache)
    if pairs is None:
        logger.warning("%s", unchecked_message(cache))
        return []
    found = pairs_of(cache.rows, pairs)
    leaks = [p for p in found if p.refused]
    possible = [p for p in found if p.leak and not p.refused]
    if possible:
        logger.warning(
            "%s: %d image pair(s) of different patients in different splits look alike (%d-%d of 576 "
            "bits: a copy cropped at an offset, or two similar images), e.g. %s. Look at them with "
            "`sscxr check %s`.",
            cache.root, len(possible), REFUSE_THRESHOLD + 1, THRESHOLD, possible[0].describe(cache.rows),
            cache.root,
        )  # fmt: skip
    if not leaks:
        return []
    shown = "; ".join(p.describe(cache.rows) for p in leaks[:_SHOWN])
    more = f"; and {len(leaks) - _SHOWN} more" if len(leaks) > _SHOWN else ""
    text = (
        f"{cache.root}: {len(leaks)} near-duplicate image pair(s) of different patients in different "
        f"splits: {shown}{more}. List them with `sscxr check {cache.root}`; keep one image of each "
        "pair, or give both the same patient id, and re-split."
    )
    if not allow:
        raise DataError(f"{text} To go on anyway (its test results would be optimistic): {option}.")
    logger.warning("%s Going on (%s): results on the leaking splits are optimistic.", text, option)
    return [text]
