"""Steps the task builders share: opening the cache (all tasks), starting the encoder (fine-tunings)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from sscxr.data.cache import ImageCache
from sscxr.data.near_duplicates import require_no_leakage
from sscxr.errors import CheckpointError, ConfigError
from sscxr.models.loading import LoadReport, load_encoder_weights

log = logging.getLogger(__name__)

#: Encoder starts of the fine-tuning tasks (`classify.init`, `seg.init`).
INIT_MODES = ("scratch", "sscxr", "timm", "auto")


def open_cache(cache_dir: str | os.PathLike[str], img_size: int, allow_leakage: bool = False) -> ImageCache:
    """Open the prepared cache at `cache_dir` for training: `img_size` pixels square, no leak between splits.

    The model's position embeddings are sized for `model.img_size`; a cache prepared at another size
    would fail deep inside the first forward pass, so the mismatch is reported here with both fixes.
    A patient in two splits, or a held-out site with training rows, is refused (`require_no_leak`),
    and so are near-duplicate images of different patients in different splits (the pairs `prepare`
    stored: `require_no_near_duplicates`, a few ms), unless `allow_leakage` (`data.allow_leakage=true`),
    which only warns. A cache prepared before hashes existed is not checked for near-duplicates: a
    warning names the command that adds them.

    Raises:
        DataError: no (finished) cache at `cache_dir` (from `ImageCache.open`), or a leak.
        ConfigError: the cache holds images of another size than `img_size`.
    """
    cache = ImageCache.open(cache_dir)
    require_no_leakage(cache, allow_leakage, "set data.allow_leakage=true")
    if cache.size != img_size:
        raise ConfigError(
            f"the cache {cache_dir} holds {cache.size} px images but model.img_size is "
            f"{img_size}: set model.img_size={cache.size} or prepare a cache with --size "
            f"{img_size}."
        )
    return cache


def resolve_init_path(path: str) -> Path:
    """The weight file behind `classify.init_path` / `seg.init_path`: a file, or a run folder's export."""
    p = Path(path)
    if not p.is_dir():
        return p
    if (p / "encoder.safetensors").is_file():
        return p / "encoder.safetensors"
    if (p / "checkpoints" / "last.pt").is_file():
        log.warning("%s has no encoder.safetensors (unfinished pre-training?): using checkpoints/last.pt", p)
        return p / "checkpoints" / "last.pt"
    raise CheckpointError(
        f"{p}: neither encoder.safetensors (written when `sscxr pretrain` ends) nor checkpoints/last.pt; "
        "give the pre-training run folder or a weight file"
    )


def load_encoder_start(
    encoder: nn.Module, init: str, init_path: str, key: str
) -> tuple[dict[str, Any], LoadReport]:
    """Load the weights behind `init_path` into `encoder`, checking they are the kind `init` asks for.

    Args:
        encoder: the ViT to fill.
        init: "sscxr", "timm" or "auto" (the caller handles "scratch").
        init_path: a weight file or a pre-training run folder (see `resolve_init_path`).
        key: the config section ("classify", "seg") named in the error message.

    Returns:
        The start's record for `model.json` ("mode", "path", "source", the LoadReport's exact
        "missing" / "unexpected" keys and "adapted" notes) and the LoadReport itself.

    Raises:
        CheckpointError: `init` is "sscxr" but the file is not an sscxr export / checkpoint, or the
            other way round for "timm".
    """
    path = resolve_init_path(init_path)
    report = load_encoder_weights(encoder, path)
    ours = report.source in ("sscxr-export", "sscxr-checkpoint")
    if (init == "sscxr" and not ours) or (init == "timm" and ours):
        raise CheckpointError(
            f"{path}: {key}.init={init} but the file is a {report.source} file; "
            f"use {key}.init={'sscxr' if ours else 'timm'} (or auto)"
        )
    record = {
        "mode": "sscxr" if ours else "timm",
        "path": str(path),
        "source": report.source,
        "missing": report.missing,
        "unexpected": report.unexpected,
        "adapted": report.adapted,
    }
    return record, report
