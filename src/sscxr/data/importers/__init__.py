"""Importers: turn a public dataset's folder layout into a `Manifest` (the CLI writes it to CSV).

Every importer returns rows in a deterministic (sorted) order, canonical labels, and a patient id for
each row. DICOM patient identifiers never reach a manifest: they are replaced by a pseudonym.

The importers live in `labelled.py` (folder trees, COVIDx, CSV) and `masks.py` (Montgomery, Shenzhen,
image + mask pairs, JSRT label images); shared helpers in `common.py`. Import them from here.
"""

from __future__ import annotations

from sscxr.data.importers.common import pseudonym
from sscxr.data.importers.kermany import import_kermany
from sscxr.data.importers.labelled import SPLIT_NAMES, import_covidx, import_csv, import_folder
from sscxr.data.importers.masks import (
    MASK_SUFFIX_CANDIDATES,
    MASK_SUFFIXES,
    import_image_mask_pairs,
    import_jsrt_masks,
    import_montgomery,
    import_shenzhen,
)

__all__ = [
    "MASK_SUFFIXES",
    "MASK_SUFFIX_CANDIDATES",
    "SPLIT_NAMES",
    "import_covidx",
    "import_csv",
    "import_folder",
    "import_image_mask_pairs",
    "import_jsrt_masks",
    "import_kermany",
    "import_montgomery",
    "import_shenzhen",
    "pseudonym",
]
