"""Importer of the pediatric pneumonia set of Kermany et al. (Mendeley Data v2, doi:10.17632/rscbjbr9sj.2).

Published layout: `chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`, or one split's class folders
alone. The patient is only in the file name, and one child can have several images, so a split by image
would leak patients between train and test; `patient_of` reads it:

    person123_bacteria_456.jpeg  -> person123     (pneumonia; subtype "bacteria")
    IM-0115-0001.jpeg            -> IM-0115       (healthy; also IM-0429-0001-0002)
    NORMAL2-IM-1427-0001.jpeg    -> NORMAL2-IM-1427
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from sscxr.data.importers.common import _listing
from sscxr.data.importers.labelled import import_folder
from sscxr.data.manifest import Manifest
from sscxr.errors import DataError

__all__ = ["import_kermany", "patient_of"]

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)(?:_\d+)+$", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)


def patient_of(stem: str) -> tuple[str, str]:
    """(patient id, pneumonia subtype or "") from a Kermany file name without its suffix.

    Raises:
        DataError: the name follows neither of the published patterns (a file that does not belong
            to the set, or a renamed copy).
    """
    if m := _PERSON.match(stem):
        return m.group(1), m.group(2).lower()
    if m := _IM.match(stem):
        return m.group(1), ""
    raise DataError(
        f"{stem!r}: not a Kermany file name (expected 'personN_bacteria_M', 'personN_virus_M', "
        "'IM-NNNN-NNNN' or 'NORMAL2-IM-NNNN-NNNN'); use 'sscxr import folder' for other layouts"
    )


def import_kermany(root: str | os.PathLike[str], site: str = "kermany") -> Manifest:
    """The Kermany set under `root` with per-patient ids, the published split (if any) and the subtype.

    Args:
        root: the `chest_xray` folder (with train/val/test) or one split's folder (NORMAL, PNEUMONIA).
        site: site written on every row (all images come from one hospital).

    Returns:
        Manifest with labels `healthy` / `pneumonia`, the patient id read from the file name, and an
        extra column `subtype` (bacteria / virus for pneumonia).
    """
    m = import_folder(root, class_subfolders=True, site=site)
    rows, bad = [], []
    for row in m.rows:
        try:
            patient, subtype = patient_of(Path(row.path).stem)
        except DataError:
            bad.append(row.path)
            continue
        rows.append(dataclasses.replace(row, patient_id=patient, extra={**row.extra, "subtype": subtype}))
    if bad:
        raise DataError(
            f"{m.root}: {len(bad)} files do not follow the Kermany naming (patient id in the name): "
            f"{_listing(bad)}. "
            "Remove them, or import with 'sscxr import folder' (one patient per image)."
        )
    labels = {r.label for r in rows}
    if not labels <= {"healthy", "pneumonia"}:
        raise DataError(f"{m.root}: class folders should be NORMAL and PNEUMONIA, found {sorted(labels)}")
    return Manifest(rows, m.root)
