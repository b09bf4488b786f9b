"""Importers: turn a public dataset's folder layout into a `Manifest` (the CLI writes it to CSV).

Every importer returns rows in a deterministic (sorted) order, canonical labels, and a patient id for
each row. DICOM patient identifiers never reach a manifest: they are replaced by a pseudonym.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from sscxr.data.io import IMAGE_SUFFIXES, RASTER_SUFFIXES, is_image_file
from sscxr.data.manifest import Manifest, ManifestRow, canonical_label, read_text_any
from sscxr.errors import DataError
from sscxr.utils import atomic_write_bytes

logger = logging.getLogger(__name__)

# Label images (JSRT/SCR) also come as GIF.
MASK_SUFFIXES = IMAGE_SUFFIXES | {".gif"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MASK_SUFFIX_CANDIDATES = ("", "_mask", "-mask", "_seg", "-seg", "_label", "-label")
_TB_SUFFIX = re.compile(r"_([01])$")  # Montgomery / Shenzhen: CHNCXR_0001_0 -> 0 normal, 1 TB
_TB_LABELS = {"0": "healthy", "1": "tuberculosis"}
_SHOWN = 5


# ---------------------------------------------------------------------------------------- helpers
def pseudonym(value: str, key: str = "") -> str:
    """12 hex digits standing for an identifier (sha256, or HMAC-sha256 when `key` is given).

    An unkeyed hash of a short numeric ID can be reversed by trying every ID; pass a secret `key`
    when the manifest leaves the site that holds the DICOMs.
    """
    data = value.encode("utf-8")
    if key:
        return hmac.new(key.encode("utf-8"), data, hashlib.sha256).hexdigest()[:12]
    return hashlib.sha256(data).hexdigest()[:12]


def _listing(items: Sequence[object]) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _report_missing(source: Path | str, what: str, items: Sequence[object], strict: bool, fix: str) -> None:
    """Warn about (or, when strict, raise on) `items` that `source` names but that are not there."""
    if not items:
        return
    message = f"{source}: {len(items)} {what}: {_listing(items)}. {fix}"
    if strict:
        raise DataError(message)
    logger.warning("%s", message)


def _hidden(path: Path, root: Path) -> bool:
    # macOS '._x.png' resource forks carry image suffixes but are not images.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _is_dicom(path: Path) -> bool:
    # Called on files `is_image_file` accepted: anything not raster-suffixed was sniffed as DICOM.
    return path.suffix.lower() not in RASTER_SUFFIXES


def _scan_images(root: Path, recursive: bool = True) -> list[Path]:
    """Image files under `root`, sorted by relative path, hidden files and folders skipped."""
    pattern = root.rglob("*") if recursive else root.glob("*")
    found = [p for p in pattern if p.is_file() and not _hidden(p, root) and is_image_file(p)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _image_id(path: Path, root: Path) -> str:
    """Per-image patient id: the relative path without suffix (stems alone clash across class folders)."""
    # Only image suffixes are dropped: '1.2.840.99' (a UID-named DICOM) has none to drop.
    return _rel(path.with_suffix("") if path.suffix.lower() in IMAGE_SUFFIXES else path, root)


def _dicom_patient(path: Path, key: str) -> str | None:
    """Pseudonym of a DICOM's PatientID, or None when it has none or cannot be read."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["PatientID"])
    except Exception as e:  # unreadable files are reported by the cache step, not here
        logger.debug("%s: no PatientID read (%s)", path, e)
        return None
    value = str(ds.get("PatientID", "") or "").strip()
    return pseudonym(value, key) if value else None


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found; check the dataset root and its layout.")
    return Path(os.path.abspath(path))


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


# ------------------------------------------------------------------------------------ folder scan
def _layout(rels: list[tuple[str, ...]], class_subfolders: bool | None) -> tuple[bool, bool]:
    """(first folder level is a split, next level is a class) for relative path parts `rels`."""
    has_split = bool(rels) and all(len(p) > 2 and p[0].lower() in SPLIT_NAMES for p in rels)
    level = 1 if has_split else 0
    if class_subfolders is not None:
        return has_split, class_subfolders
    # Auto: every image sits in a class folder and there are at least two classes ('images/' is no class).
    in_folder = bool(rels) and all(len(p) > level + 1 for p in rels)
    return has_split, in_folder and len({p[level] for p in rels}) >= 2


def import_folder(
    root: str | os.PathLike[str],
    class_subfolders: bool | None = None,
    site: str = "",
    pseudonym_key: str = "",
) -> Manifest:
    """Every image file under `root` (recursive), optionally labelled by its class folder.

    Layouts: `root/<class>/.../x.png`, `root/<split>/<class>/x.png` (split in train/val/test) or flat.

    Args:
        root: dataset folder.
        class_subfolders: the first folder level (after a split level) is the label; None = auto
            (every image lies in such a folder and there are at least two of them).
        site: site written on every row.
        pseudonym_key: secret for keyed DICOM patient pseudonyms (see `pseudonym`).

    Returns:
        Manifest rooted at `root`; patient id = pseudonym of the DICOM PatientID, else the image's
        relative path without suffix.
    """
    root_path = _require_dir(Path(root), "image")
    images = _scan_images(root_path)
    if not images:
        raise DataError(f"{root_path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found.")
    rels = [p.relative_to(root_path).parts for p in images]
    has_split, has_class = _layout(rels, class_subfolders)
    rows = []
    for path, parts in zip(images, rels, strict=True):
        level = 1 if has_split else 0
        patient = _dicom_patient(path, pseudonym_key) if _is_dicom(path) else None
        rows.append(
            ManifestRow(
                path=_rel(path, root_path),
                label=canonical_label(parts[level]) if has_class and len(parts) > level + 1 else "",
                patient_id=patient or _image_id(path, root_path),
                site=site,
                split=SPLIT_NAMES[parts[0].lower()] if has_split else "",
            )
        )
    return Manifest(rows, root_path)


# ------------------------------------------------------------------------------------------ COVIDx
def _split_of(label_file: Path) -> str:
    stem = label_file.stem.lower()
    for token, split in (("train", "train"), ("val", "val"), ("test", "test")):
        if token in stem:
            return split
    return stem


def _parse_covidx_line(label_file: Path, number: int, line: str) -> tuple[str, str, str, str]:
    """(patient, filename, class, source) from `patient filename class [source]`."""
    tokens = line.split()
    if len(tokens) < 3:
        raise DataError(
            f"{label_file}, line {number}: expected 'patient_id filename class [source]', got {line!r}."
        )
    # 3-column files end with the class; in 4-column ones the class is second to last. Filenames may
    # contain spaces, so the class position decides how many tokens the filename takes.
    if len(tokens) == 3 or canonical_label(tokens[-1]) in {"healthy", "pneumonia", "covid-19", "non-covid"}:
        return tokens[0], " ".join(tokens[1:-1]), tokens[-1], ""
    return tokens[0], " ".join(tokens[1:-2]), tokens[-2], tokens[-1]


def _covidx_rows(label_file: Path, image_dir: Path, root: Path) -> tuple[list[ManifestRow], list[str]]:
    """Rows of one label file, and the filenames it lists that are not in `image_dir`."""
    split = _split_of(label_file)
    rows: dict[str, ManifestRow] = {}
    missing: list[str] = []
    for number, line in enumerate(read_text_any(label_file).splitlines(), start=1):
        if not line.strip():
            continue
        patient, name, cls, source = _parse_covidx_line(label_file, number, line)
        path = image_dir / name
        if not path.is_file():
            missing.append(name)
            continue
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if rel in rows:
            logger.warning("%s, line %d: %s listed again; the first entry is kept", label_file, number, name)
            continue
        rows[rel] = ManifestRow(rel, canonical_label(cls), patient, source.lower(), split)
    return list(rows.values()), missing


def import_covidx(
    root: str | os.PathLike[str],
    label_files: Sequence[str] = ("train.txt", "test.txt"),
    image_dirs: Mapping[str, str | os.PathLike[str]] | None = None,
    strict: bool = False,
) -> Manifest:
    """COVIDx CXR (-2, -3, 8B, ...) from its label files.

    Args:
        root: dataset folder holding the label files and `train/`, `test/` (`val/`) image folders.
        label_files: label files (relative to `root` or absolute); the split is read from the name.
        image_dirs: split -> image folder, overriding `root/<split>`.
        strict: raise when a listed image is missing instead of warning and skipping it.

    Returns:
        Manifest rooted at `root`; site = the `source` column (lower-cased), split from the file name.
    """
    root_path = _require_dir(Path(root), "COVIDx")
    rows: list[ManifestRow] = []
    for name in label_files:
        label_file = root_path / name
        if not label_file.is_file():
            raise DataError(f"{label_file}: COVIDx label file not found; pass the label_files you have.")
        split = _split_of(label_file)
        image_dir = Path((image_dirs or {}).get(split, root_path / split))
        file_rows, missing = _covidx_rows(label_file, image_dir, root_path)
        _report_missing(
            label_file,
            f"listed image(s) missing from {image_dir}",
            missing,
            strict,
            "Skipped; download them or fix the path.",
        )
        rows.extend(file_rows)
    return Manifest(rows, root_path)


# ------------------------------------------------------------------------- Montgomery and Shenzhen
def _merge_masks(left: Path, right: Path, out: Path) -> None:
    """Write the union of two 8-bit masks (> 127) as one 0/255 PNG."""
    a, b = _grey_array(left), _grey_array(right)
    if a.shape != b.shape:
        raise DataError(f"{left} is {a.shape} but {right} is {b.shape}; the two lung masks must match.")
    _write_mask((a > 127) | (b > 127), out)


def import_montgomery(
    root: str | os.PathLike[str], out_dir: str | os.PathLike[str], require_masks: bool = False
) -> Manifest:
    """Montgomery County TB set: `CXR_png/`, `ManualMask/leftMask/`, `ManualMask/rightMask/`.

    Args:
        root: dataset folder (may be read-only).
        out_dir: where the merged (left + right lung) masks are written, one PNG per image.
        require_masks: raise when an image lacks either lung mask instead of keeping it without mask.

    Returns:
        Manifest rooted at `root`; labels healthy / tuberculosis from the `_0` / `_1` suffix,
        site "montgomery", mask paths absolute (in `out_dir`).
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
        rows.append(ManifestRow(_rel(image, root_path), label, base, "montgomery", "", mask))
    _report_missing(
        root_path / "ManualMask",
        "image(s) without both lung masks",
        unmasked,
        require_masks,
        "Kept unmasked.",
    )
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


def import_shenzhen(root: str | os.PathLike[str], require_masks: bool = False) -> Manifest:
    """Shenzhen TB set: `*.png` images, lung masks `<stem>_mask.png` alongside or in a mask folder.

    Every folder of images under `root` (other than mask folders) is imported; its masks are looked for
    in `<name with images->masks>`, `<name>_masks`, `masks`, `mask` next to it, or in it.

    Args:
        root: dataset folder.
        require_masks: raise when an image has no mask instead of keeping it without one.

    Returns:
        Manifest rooted at `root`; labels from the `_0` / `_1` suffix, site "shenzhen".
    """
    root_path = _require_dir(Path(root), "Shenzhen")
    images = [p for p in _scan_images(root_path) if "mask" not in _rel(p.parent, root_path).lower()]
    rows: list[ManifestRow] = []
    for folder in sorted({p.parent for p in images}):
        pairs, _ = _pair(folder, _mask_dir_for(folder), None)
        for image, mask in pairs:
            base, label = _tb_label(image.stem)
            mask_rel = _rel(mask, root_path) if mask else ""
            rows.append(ManifestRow(_rel(image, root_path), label, base, "shenzhen", "", mask_rel))
    if not rows:
        raise DataError(f"{root_path}: no Shenzhen images found; expected *.png files under it.")
    unmasked = [r.path for r in rows if not r.mask_path]
    _report_missing(root_path, "image(s) without a mask", unmasked, require_masks, "Kept unmasked.")
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
) -> Manifest:
    """Images and binary masks paired by file stem (non-recursive).

    Args:
        image_dir: folder of images.
        mask_dir: folder of masks; None = `image_dir` (then masks need a suffix).
        mask_suffix: mask stem = image stem + suffix ('_mask', '-mask', ''), or a pattern such as
            'mask_{stem}'; None = auto-detect among common suffixes.
        site, label: written on every row (label is canonicalised).
        require_masks: raise when an image has no mask instead of keeping it without one.

    Returns:
        Manifest rooted at `image_dir`; patient id = image stem. Masks without an image are warned about.
    """
    images_path = _require_dir(Path(image_dir), "image")
    masks_path = _require_dir(Path(mask_dir), "mask") if mask_dir is not None else images_path
    pairs, orphans = _pair(images_path, masks_path, mask_suffix)
    if not pairs:
        raise DataError(f"{images_path}: no image files found.")
    _report_missing(masks_path, "mask(s) match no image", orphans, False, "They are ignored.")
    unmasked = [image.name for image, mask in pairs if mask is None]
    _report_missing(images_path, "image(s) have no mask", unmasked, require_masks, "Kept unmasked.")
    rows = [
        ManifestRow(
            path=image.name,
            label=canonical_label(label),
            patient_id=image.stem,
            site=site,
            mask_path=os.path.relpath(mask, images_path).replace(os.sep, "/") if mask else "",
        )
        for image, mask in pairs
    ]
    return Manifest(rows, images_path)


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
        label_dir, f"label image(s) contain none of {list(lung_values)}", empty, False, "Check lung_values."
    )
    unmasked = [image.name for image, label_image in pairs if label_image is None]
    _report_missing(images_path, "image(s) have no label image", unmasked, False, "Kept unmasked.")
    return Manifest(rows, images_path)


# --------------------------------------------------------------------------------------- CSV files
def _find_image(image_dir: Path, value: str, by_stem: dict[str, Path]) -> Path | None:
    """The file a CSV cell names: as written, or (no suffix given) by stem with any image suffix."""
    path = image_dir / value
    if path.is_file():
        return path
    if Path(value).suffix.lower() in IMAGE_SUFFIXES:
        return None
    if not by_stem:
        # Built lazily: only CSVs that leave out the suffix (fig1's 'patientid') pay for the scan.
        by_stem.update((_rel(p.with_suffix(""), image_dir), p) for p in _scan_images(image_dir))
    return by_stem.get(Path(value).as_posix())


def _patient_of(
    record: dict[str, str], patient_col: str, pattern: re.Pattern[str] | None, fallback: str
) -> str:
    value = record.get(patient_col, "").strip() if patient_col else ""
    value = value or fallback
    if pattern is not None and (m := pattern.search(value)):
        return m.group(1) if m.groups() else m.group(0)
    return value


def _check_columns(csv_path: Path, header: Sequence[str], wanted: Iterable[str]) -> None:
    absent = [c for c in wanted if c and c not in header]
    if absent:
        raise DataError(f"{csv_path}: column(s) {absent} not found; the columns are {list(header)}.")


def import_csv(
    csv_path: str | os.PathLike[str],
    path_col: str,
    label_col: str = "",
    patient_col: str = "",
    *,
    image_dir: str | os.PathLike[str] | None = None,
    site: str = "",
    site_col: str = "",
    split_col: str = "",
    mask_col: str = "",
    patient_pattern: str | None = None,
    extra_cols: Sequence[str] = (),
    strict: bool = False,
) -> Manifest:
    """Any CSV metadata file with one row per image.

    Args:
        csv_path: the CSV (UTF-8, or cp1252 with a warning).
        path_col: column naming the image, relative to `image_dir`; the suffix may be left out.
        label_col, patient_col, site_col, split_col, mask_col: optional columns ("" = none).
        image_dir: folder the image (and mask) names are relative to; None = the CSV's folder.
        site: site for rows without a `site_col` value.
        patient_pattern: regex applied to the patient value (or, without `patient_col`, to the path
            value); group 1 (or the whole match) is the patient id, e.g. r"^(COVID-\\d+)" groups
            fig1's COVID-00003a and COVID-00003b.
        extra_cols: columns copied into the manifest as extra columns.
        strict: raise when a named image is missing instead of warning and skipping it.

    Returns:
        Manifest rooted at `image_dir`, in CSV order.
    """
    csv_file = Path(csv_path)
    folder = _require_dir(Path(image_dir) if image_dir is not None else csv_file.parent, "image")
    reader = csv.DictReader(io.StringIO(read_text_any(csv_file), newline=""))
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    cols = [path_col, label_col, patient_col, site_col, split_col, mask_col, *extra_cols]
    _check_columns(csv_file, header, cols)
    pattern = re.compile(patient_pattern) if patient_pattern else None
    rows: dict[str, ManifestRow] = {}
    missing: list[str] = []
    by_stem: dict[str, Path] = {}
    for record in reader:
        cells = {k: (v or "").strip() for k, v in record.items() if k is not None}
        value = cells[path_col]
        image = _find_image(folder, value, by_stem) if value else None
        if image is None:
            missing.append(value or f"(empty {path_col!r}, line {reader.line_num})")
            continue
        rel = os.path.relpath(image, folder).replace(os.sep, "/")
        if rel in rows:
            raise DataError(f"{csv_file}, line {reader.line_num}: {rel} is listed twice; keep one row.")
        rows[rel] = ManifestRow(
            path=rel,
            label=canonical_label(cells.get(label_col, "")) if label_col else "",
            patient_id=_patient_of(cells, patient_col, pattern, Path(value).with_suffix("").as_posix()),
            site=(cells.get(site_col, "") if site_col else "") or site,
            split=cells.get(split_col, "") if split_col else "",
            mask_path=cells.get(mask_col, "") if mask_col else "",
            extra={c: cells.get(c, "") for c in extra_cols},
        )
    _report_missing(
        csv_file,
        f"listed image(s) not found in {folder}",
        missing,
        strict,
        "Skipped; fix the names or image_dir.",
    )
    return Manifest(list(rows.values()), folder)
