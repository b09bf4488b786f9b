"""Importers that yield lung masks: Montgomery (left + right masks merged), Shenzhen, images paired with
masks by file stem (`import_image_mask_pairs`), JSRT-style label images turned into binary masks, and
masks joined onto the rows of an existing manifest by image stem (`join_masks`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sscxr.data.importers.common import (
    _dicom_patient,
    _hidden,
    _is_dicom,
    _listing,
    _patient_matcher,
    _rel,
    _report_missing,
    _require_dir,
    _scan_images,
)
from sscxr.data.io import IMAGE_SUFFIXES
from sscxr.data.manifest import Manifest, ManifestRow, canonical_label
from sscxr.errors import DataError
from sscxr.utils import atomic_write_bytes

# Label images (JSRT/SCR) also come as GIF.
MASK_SUFFIXES = IMAGE_SUFFIXES | {".gif"}
MASK_SUFFIX_CANDIDATES = ("", "_mask", "-mask", "_seg", "-seg", "_label", "-label")
_TB_SUFFIX = re.compile(r"_([01])$")  # Montgomery / Shenzhen: CHNCXR_0001_0 -> 0 normal, 1 TB
_TB_LABELS = {"0": "healthy", "1": "tuberculosis"}
_KEPT = "Kept unmasked (--require-masks refuses the import instead)."
_REFUSED = "Add their masks, or drop --require-masks to keep them unmasked."

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- helpers
def _grey_array(path: Path) -> np.ndarray:
    """Pixel values of a mask/label image as a 2-D array (palette and RGB images as grey)."""
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "PA", "RGB", "RGBA", "LA", "1"):
                im = im.convert("L")
            return np.asarray(im)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read this mask/label image ({e}); replace or remove it.") from e


def _write_mask(mask: np.ndarray, path: Path) -> None:
    """Write a boolean mask as an 8-bit 0/255 PNG, atomically."""
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _tb_label(stem: str) -> tuple[str, str]:
    """(base id, label) from a Montgomery/Shenzhen stem like 'CHNCXR_0001_0'."""
    m = _TB_SUFFIX.search(stem)
    return (stem[: m.start()], _TB_LABELS[m.group(1)]) if m else (stem, "")


# ------------------------------------------------------------------------- Montgomery and Shenzhen
def _merge_masks(left: Path, right: Path, out: Path) -> None:
    """Write the union of two 8-bit masks (> 127) as one 0/255 PNG."""
    a, b = _grey_array(left), _grey_array(right)
    if a.shape != b.shape:
        raise DataError(f"{left} is {a.shape} but {right} is {b.shape}; the two lung masks must match.")
    _write_mask((a > 127) | (b > 127), out)


def import_montgomery(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    require_masks: bool = False,
    site: str = "montgomery",
) -> Manifest:
    """Montgomery County TB set: `CXR_png/`, `ManualMask/leftMask/`, `ManualMask/rightMask/`.

    Args:
        root: dataset folder (may be read-only).
        out_dir: where the merged (left + right lung) masks are written, one PNG per image.
        require_masks: raise when an image lacks either lung mask instead of keeping it without mask.
        site: written on every row.

    Returns:
        Manifest rooted at `root`; labels healthy / tuberculosis from the `_0` / `_1` suffix,
        mask paths absolute (in `out_dir`).
    """
    root_path = Path(os.path.abspath(root))
    image_dir = _require_dir(root_path / "CXR_png", "Montgomery CXR_png")
    out_path = Path(os.path.abspath(out_dir))
    rows, unmasked = [], []
    for image in _scan_images(image_dir, recursive=False):
        left, right = (root_path / "ManualMask" / side / image.name for side in ("leftMask", "rightMask"))
        mask = ""
        if left.is_file() and right.is_file():
            _merge_masks(left, right, out_path / f"{image.stem}.png")
            mask = (out_path / f"{image.stem}.png").as_posix()
        else:
            unmasked.append(image.name)
        base, label = _tb_label(image.stem)
        rows.append(ManifestRow(_rel(image, root_path), label, base, site, "", mask))
    where, what = root_path / "ManualMask", "image(s) without both lung masks"
    _report_missing(where, what, unmasked, require_masks, _KEPT, _REFUSED)
    return Manifest(rows, root_path)


def _mask_dir_for(image_dir: Path) -> Path:
    """The mask folder next to an image folder (`x_images` -> `x_masks`, `masks`, ...), else itself."""
    name = image_dir.name
    candidates = [name.replace("images", "masks"), name.replace("image", "mask"), f"{name}_masks"]
    candidates += ["masks", "mask"]
    for candidate in candidates:
        if candidate != name and (image_dir.parent / candidate).is_dir():
            return image_dir.parent / candidate
    return image_dir


def import_shenzhen(
    root: str | os.PathLike[str], require_masks: bool = False, site: str = "shenzhen"
) -> Manifest:
    """Shenzhen TB set: `*.png` images, lung masks `<stem>_mask.png` alongside or in a mask folder.

    Every folder of images under `root` (other than mask folders) is imported; its masks are looked for
    in `<name with images->masks>`, `<name>_masks`, `masks`, `mask` next to it, or in it.

    Args:
        root: dataset folder.
        require_masks: raise when an image has no mask instead of keeping it without one.
        site: written on every row.

    Returns:
        Manifest rooted at `root`; labels from the `_0` / `_1` suffix.
    """
    root_path = _require_dir(Path(root), "Shenzhen")
    images = [p for p in _scan_images(root_path) if "mask" not in _rel(p.parent, root_path).lower()]
    rows: list[ManifestRow] = []
    for folder in sorted({p.parent for p in images}):
        pairs, _ = _pair(folder, _mask_dir_for(folder), None)
        for image, mask in pairs:
            base, label = _tb_label(image.stem)
            mask_rel = _rel(mask, root_path) if mask else ""
            rows.append(ManifestRow(_rel(image, root_path), label, base, site, "", mask_rel))
    if not rows:
        raise DataError(f"{root_path}: no Shenzhen images found; expected *.png files under it.")
    unmasked = [r.path for r in rows if not r.mask_path]
    _report_missing(root_path, "image(s) without a mask", unmasked, require_masks, _KEPT, _REFUSED)
    return Manifest(rows, root_path)


# --------------------------------------------------------------------------------- image + mask pairs
def _mask_regex(suffix: str) -> re.Pattern[str]:
    """Regex whose group 1 is the image stem, for a suffix ('_mask') or a pattern ('{stem}_mask')."""
    pattern = suffix if "{stem}" in suffix else "{stem}" + suffix
    head, _, tail = pattern.partition("{stem}")
    return re.compile("^" + re.escape(head) + "(.+)" + re.escape(tail) + "$")


def _match_masks(files: list[Path], stems: set[str], suffix: str) -> dict[str, Path]:
    """Image stem -> the mask file among `files` named after it with `suffix`."""
    regex, out = _mask_regex(suffix), {}
    for f in files:
        m = regex.match(f.stem)
        # Several masks for one image (x_mask.png, x_mask.gif): the first in sorted order wins.
        if m and m.group(1) in stems and m.group(1) not in out:
            out[m.group(1)] = f
    return out


def _pair(
    image_dir: Path, mask_dir: Path, suffix: str | None
) -> tuple[list[tuple[Path, Path | None]], list[Path]]:
    """Pair the images of `image_dir` with masks in `mask_dir` by stem (non-recursive).

    Args:
        suffix: mask stem = image stem + suffix, or a pattern with '{stem}'; None = the candidate in
            `MASK_SUFFIX_CANDIDATES` that pairs the most images.

    Returns:
        (image, mask or None) pairs sorted by image name, and mask files that match no image.
    """
    same = os.path.abspath(image_dir) == os.path.abspath(mask_dir)
    files = _scan_images(image_dir, recursive=False)
    masks = files if same else [p for p in sorted(mask_dir.glob("*")) if p.suffix.lower() in MASK_SUFFIXES]
    if suffix is None:
        # In one folder an empty suffix would pair every image with itself.
        candidates = [s for s in MASK_SUFFIX_CANDIDATES if not (same and s == "")]
        stems = {p.stem for p in files}
        suffix = max(candidates, key=lambda s: len(_match_masks(masks, stems, s)))
        if not _match_masks(masks, stems, suffix):
            return [(p, None) for p in files], [] if same else masks
    if same and _mask_regex(suffix).pattern == "^(.+)$":
        raise DataError(f"{image_dir}: images and masks share this folder, so masks need a suffix.")
    regex = _mask_regex(suffix)
    mask_like = [f for f in masks if regex.match(f.stem)]
    # In a shared folder, files named like masks are masks even when their image is missing.
    images = [f for f in files if f not in set(mask_like)] if same else files
    matched = _match_masks(mask_like, {p.stem for p in images}, suffix)
    used = set(matched.values())
    return [(p, matched.get(p.stem)) for p in images], [m for m in mask_like if m not in used]


def import_image_mask_pairs(
    image_dir: str | os.PathLike[str],
    mask_dir: str | os.PathLike[str] | None = None,
    mask_suffix: str | None = None,
    *,
    site: str = "",
    label: str = "",
    require_masks: bool = False,
    patients: Mapping[str, str] | None = None,
    patient_pattern: str = "",
    pseudonym_key: str = "",
) -> Manifest:
    """Images and binary masks paired by file stem (non-recursive).

    Args:
        image_dir: folder of images.
        mask_dir: folder of masks; None = `image_dir` (then masks need a suffix).
        mask_suffix: mask stem = image stem + suffix ('_mask', '-mask', ''), or a pattern such as
            'mask_{stem}'; None = auto-detect among common suffixes.
        site, label: written on every row (label is canonicalised).
        require_masks: raise when an image has no mask instead of keeping it without one.
        patients: image file name (or stem) -> patient, e.g. `read_patient_table` of a metadata CSV.
        patient_pattern: regex searched in each image stem whose first group (or whole match) is the
            patient (as for `import_folder`); stems it does not match keep their own id (a warning).
        pseudonym_key: secret for keyed DICOM patient pseudonyms (see `pseudonym`).

    Returns:
        Manifest rooted at `image_dir`; patient id = the `patients` entry, else the pseudonym of a DICOM
        image's PatientID, else the `patient_pattern` match, else the image stem. Masks without an
        image, and images `patients` does not list, are warned about.
    """
    images_path = _require_dir(Path(image_dir), "image")
    masks_path = (
        _require_dir(Path(mask_dir), "mask", "check --masks") if mask_dir is not None else images_path
    )
    pairs, orphans = _pair(images_path, masks_path, mask_suffix)
    if not pairs:
        raise DataError(f"{images_path}: no image files found.")
    _report_missing(masks_path, "mask(s) match no image", orphans, False, "They are ignored.")
    unmasked = [image.name for image, mask in pairs if mask is None]
    _report_missing(images_path, "image(s) have no mask", unmasked, require_masks, _KEPT, _REFUSED)
    ids = _pair_patients(images_path, [image for image, _ in pairs], patients, patient_pattern, pseudonym_key)
    rows = [
        ManifestRow(
            path=image.name,
            label=canonical_label(label),
            patient_id=patient,
            site=site,
            mask_path=os.path.relpath(mask, images_path).replace(os.sep, "/") if mask else "",
        )
        for (image, mask), patient in zip(pairs, ids, strict=True)
    ]
    return Manifest(rows, images_path)


def _pair_patients(
    images_path: Path, images: list[Path], patients: Mapping[str, str] | None, pattern: str, key: str
) -> list[str]:
    """Patient id of each image: table entry, DICOM pseudonym, `pattern` match, else the stem."""
    by_pattern = _patient_matcher(pattern)
    out, unlisted, tried, unmatched = [], [], 0, 0
    for image in images:
        patient = None
        if patients is not None:
            patient = patients.get(image.name) or patients.get(image.stem)
            if patient is None:
                unlisted.append(image.name)
        if patient is None and _is_dicom(image):
            patient = _dicom_patient(image, key)
        if patient is None and by_pattern is not None:
            patient = by_pattern(image.stem)
            tried, unmatched = tried + 1, unmatched + (patient is None)
        out.append(patient or image.stem)
    # One patient's images with different ids could land in train and test: never let it pass unsaid.
    _report_missing(
        images_path, "image(s) have no row in the patient table (--meta-csv)", unlisted, False,
        "Each is its own patient; add them to the table.",
    )  # fmt: skip
    if unmatched:
        logger.warning(
            "%s: --patient-pattern %r matched %d of %d file names; the others are each their own patient",
            images_path, pattern, tried - unmatched, tried,
        )  # fmt: skip
    return out


def import_jsrt_masks(
    image_dir: str | os.PathLike[str],
    label_dir: str | os.PathLike[str],
    lung_values: Sequence[int],
    out_dir: str | os.PathLike[str],
    *,
    label_suffix: str | None = None,
    site: str = "jsrt",
) -> Manifest:
    """Images whose label images code several structures by grey value; lungs become binary masks.

    Args:
        image_dir: folder of images.
        label_dir: folder of label images, paired by stem (see `import_image_mask_pairs`).
        lung_values: the label values that mean "lung" (e.g. left and right lung values).
        out_dir: where the binary 0/255 lung masks are written (`<image stem>.png`).
        label_suffix: label stem = image stem + suffix, or a '{stem}' pattern; None = auto-detect.
        site: written on every row.

    Returns:
        Manifest rooted at `image_dir`; mask paths absolute (in `out_dir`). Images without a label image
        are kept unmasked (with a warning).
    """
    if not lung_values:
        raise ValueError("import_jsrt_masks: lung_values must name at least one label value")
    images_path = _require_dir(Path(image_dir), "image")
    pairs, orphans = _pair(images_path, _require_dir(Path(label_dir), "label"), label_suffix)
    _report_missing(label_dir, "label image(s) match no image", orphans, False, "They are ignored.")
    out_path = Path(os.path.abspath(out_dir))
    values = np.asarray(list(lung_values))
    rows, empty = [], []
    for image, label_image in pairs:
        mask_path = ""
        if label_image is not None:
            lungs = np.isin(_grey_array(label_image), values)
            if not lungs.any():
                empty.append(label_image.name)
            _write_mask(lungs, out_path / f"{image.stem}.png")
            mask_path = (out_path / f"{image.stem}.png").as_posix()
        rows.append(ManifestRow(path=image.name, patient_id=image.stem, site=site, mask_path=mask_path))
    _report_missing(
        label_dir, f"label image(s) contain none of {list(lung_values)}", empty, False, "Check --lung-values."
    )
    unmasked = [image.name for image, label_image in pairs if label_image is None]
    _report_missing(images_path, "image(s) have no label image", unmasked, False, "Kept unmasked.")
    return Manifest(rows, images_path)


# ------------------------------------------------------------------------ masks onto a manifest
def _image_stem(path: str) -> str:
    """File name without an image suffix ('1.2.840.99', a UID-named DICOM, keeps its dots)."""
    name = Path(path).name
    return Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name


def _mask_files(mask_dir: Path, images: set[str]) -> list[Path]:
    """Mask-suffixed files under `mask_dir` (recursive, hidden skipped), less the manifest's own images."""
    found = (p for p in mask_dir.rglob("*") if p.is_file() and p.suffix.lower() in MASK_SUFFIXES)
    files = [p for p in found if not _hidden(p, mask_dir) and os.path.abspath(p) not in images]
    return sorted(files, key=lambda p: _rel(p, mask_dir))


def _masks_by_stem(files: list[Path], stems: Mapping[str, list[int]], suffix: str) -> dict[str, list[Path]]:
    """Image stem -> the files named after it with `suffix` (only stems of the manifest)."""
    regex, out = _mask_regex(suffix), {}
    for f in files:
        m = regex.match(f.stem)
        if m and m.group(1) in stems:
            out.setdefault(m.group(1), []).append(f)
    return out


def join_masks(
    manifest: Manifest,
    mask_dir: str | os.PathLike[str],
    mask_suffix: str | None = None,
    *,
    replace: bool = False,
    require_masks: bool = False,
    source: str | os.PathLike[str] = "",
) -> Manifest:
    """The rows of `manifest` with `mask_path` set from the masks in `mask_dir`, matched by image stem.

    Every other column (labels, patients, sites, splits, extra columns) is kept as it is, so a manifest
    already split by patient gets its masks without being imported again.

    Args:
        manifest: e.g. `read_manifest(path)`.
        mask_dir: folder of masks, searched recursively; mask file names follow `mask_suffix`.
        mask_suffix: mask stem = image stem + suffix ('_mask', '-mask', ''), or a pattern such as
            'mask_{stem}'; None = the one of `MASK_SUFFIX_CANDIDATES` that matches the most images.
        replace: give rows that already have a mask the new one (default: they keep theirs).
        require_masks: raise when an image has no mask instead of keeping it without one.
        source: the manifest's file, named in messages.

    Returns:
        A manifest with the same root and row order; mask paths absolute (`write_manifest` writes them
        relative to its folder when they lie inside it). Images without a mask and masks matching no
        image are warned about.

    Raises:
        DataError: no mask matches any image; one image stem matches several masks, or several images
            share the stem a mask matches (a join by name cannot tell them apart).
    """
    where = str(source or manifest.root)
    masks_path = _require_dir(Path(mask_dir), "mask", "check --masks")
    stems: dict[str, list[int]] = {}
    for i, row in enumerate(manifest.rows):
        stems.setdefault(_image_stem(row.path), []).append(i)
    files = _mask_files(masks_path, {str(manifest.resolve(r)) for r in manifest.rows})
    candidates = (mask_suffix,) if mask_suffix is not None else MASK_SUFFIX_CANDIDATES
    suffix = max(candidates, key=lambda s: len(_masks_by_stem(files, stems, s)))
    matched = _masks_by_stem(files, stems, suffix)
    if not matched:
        tried = (
            f"suffix {suffix!r}" if mask_suffix is not None else f"suffixes {list(MASK_SUFFIX_CANDIDATES)}"
        )
        raise DataError(
            f"{masks_path}: no mask matches an image of {where} by stem (tried {tried}; masks "
            f"{_listing([f.name for f in files]) or 'none'}; images {_listing(list(stems))}); "
            "check --masks, or name the mask suffix with --mask-suffix (e.g. '_mask' or 'mask_{stem}')."
        )
    for stem, masks in matched.items():
        if len(masks) > 1:
            raise DataError(
                f"{masks_path}: {len(masks)} masks match the image stem {stem!r} "
                f"({_listing([_rel(m, masks_path) for m in masks])}); keep one of them."
            )
        if len(stems[stem]) > 1:
            shown = _listing([manifest.rows[i].path for i in stems[stem]])
            raise DataError(
                f"{where}: mask {_rel(masks[0], masks_path)} matches {len(stems[stem])} images by stem "
                f"({shown}); masks are joined by file name, so rename those images apart (or pair each "
                "folder with `sscxr import pairs`)."
            )
    rows, kept_own = [], 0
    for row in manifest.rows:
        masks = matched.get(_image_stem(row.path))
        if masks and row.mask_path and not replace:
            kept_own += 1
        elif masks:
            row = dataclasses.replace(row, mask_path=masks[0].as_posix())
        rows.append(row)
    if kept_own:
        logger.warning(
            "%s: %d row(s) already had a mask and keep it (--replace-masks gives them the new one)",
            where, kept_own,
        )  # fmt: skip
    used = {m[0] for m in matched.values()}
    orphans = [_rel(f, masks_path) for f in files if f not in used]
    _report_missing(masks_path, f"mask(s) match no image of {where}", orphans, False, "They are ignored.")
    unmasked = [r.path for r in rows if not r.mask_path]
    _report_missing(where, f"image(s) have no mask in {masks_path}", unmasked, require_masks, _KEPT, _REFUSED)
    return manifest.with_rows(rows)
