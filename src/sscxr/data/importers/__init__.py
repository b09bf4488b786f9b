"""Importers: turn a public dataset's folder layout into a `Manifest` (the CLI writes it to CSV).

Every importer returns rows in a deterministic (sorted) order, canonical labels, and a patient id for
each row. DICOM patient identifiers never reach a manifest: they are replaced by a pseudonym.

The importers live in `labelled.py` (folder trees, COVIDx, CSV), `kermany.py` and `masks.py`
(Montgomery, Shenzhen, image + mask pairs, JSRT label images, masks joined onto a manifest); the CSV
row filters and label maps in `rules.py`; shared helpers in `common.py`. Import them from here.

`registry.py` maps importer names to `Importer` entries (summary, options, the function that runs
it); `sscxr import NAME` is built from it, and `builtin.py` registers the importers above. Importing
this package loads only those two light modules: the readers (which import torch, numpy and pydicom)
are loaded on first use of one of their names, so building the CLI parser stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sscxr.data.importers import builtin as _builtin  # noqa: F401  (registers the built-in importers)
from sscxr.data.importers.builtin import OPTIONS, option
from sscxr.data.importers.registry import (
    Importer,
    Option,
    importer,
    importer_names,
    register_importer,
    registered_importers,
    unregister_importer,
)

if TYPE_CHECKING:
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

# Name -> the module (beside this one) that defines it, imported on first use.
_LAZY = {
    "pseudonym": "common",
    "import_kermany": "kermany",
    **dict.fromkeys(
        ("DEDUPE_POLICIES", "SPLIT_NAMES", "CsvImport", "import_covidx", "import_csv", "import_folder",
         "read_csv_metadata", "read_patient_table"),
        "labelled",
    ),
    **dict.fromkeys(
        ("MASK_SUFFIX_CANDIDATES", "MASK_SUFFIXES", "import_image_mask_pairs", "import_jsrt_masks",
         "import_montgomery", "import_shenzhen", "join_masks"),
        "masks",
    ),
    **dict.fromkeys(("CANONICAL_LABELS", "LabelMap", "RowFilter", "label_map_from"), "rules"),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "CANONICAL_LABELS",
    "DEDUPE_POLICIES",
    "MASK_SUFFIXES",
    "MASK_SUFFIX_CANDIDATES",
    "OPTIONS",
    "SPLIT_NAMES",
    "CsvImport",
    "Importer",
    "LabelMap",
    "Option",
    "RowFilter",
    "import_covidx",
    "import_csv",
    "import_folder",
    "import_image_mask_pairs",
    "import_jsrt_masks",
    "import_kermany",
    "import_montgomery",
    "import_shenzhen",
    "importer",
    "importer_names",
    "join_masks",
    "label_map_from",
    "option",
    "pseudonym",
    "read_csv_metadata",
    "read_patient_table",
    "register_importer",
    "registered_importers",
    "unregister_importer",
]
