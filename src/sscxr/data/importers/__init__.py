"""Importers: turn a public dataset's folder layout into a `Manifest` (the CLI writes it to CSV).

Every importer returns rows in a deterministic (sorted) order, canonical labels, and a patient id for
each row. DICOM patient identifiers never reach a manifest: they are replaced by a pseudonym.

The importers live in `labelled.py` (folder trees, COVIDx, CSV) and `masks.py` (Montgomery, Shenzhen,
image + mask pairs, JSRT label images, masks joined onto a manifest); the CSV row filters and label
maps in `rules.py`; shared helpers in `common.py`. Import them from here.
"""

from __future__ import annotations

from sscxr.data.importers.common import pseudonym
from sscxr.data.importers.kermany import import_kermany
from sscxr.data.importers.labelled import (
    DEDUPE_POLICIES,
    SPLIT_NAMES,
    CsvImport,
    import_covidx,
    import_csv,
    import_folder,
    read_csv_metadata,
    read_patient_table,
)
from sscxr.data.importers.masks import (
    MASK_SUFFIX_CANDIDATES,
    MASK_SUFFIXES,
    import_image_mask_pairs,
    import_jsrt_masks,
    import_montgomery,
    import_shenzhen,
    join_masks,
)
from sscxr.data.importers.rules import CANONICAL_LABELS, LabelMap, RowFilter, label_map_from

__all__ = [
    "CANONICAL_LABELS",
    "DEDUPE_POLICIES",
    "MASK_SUFFIXES",
    "MASK_SUFFIX_CANDIDATES",
    "SPLIT_NAMES",
    "CsvImport",
    "LabelMap",
    "RowFilter",
    "import_covidx",
    "import_csv",
    "import_folder",
    "import_image_mask_pairs",
    "import_jsrt_masks",
    "import_kermany",
    "import_montgomery",
    "import_shenzhen",
    "join_masks",
    "label_map_from",
    "pseudonym",
    "read_csv_metadata",
    "read_patient_table",
]
