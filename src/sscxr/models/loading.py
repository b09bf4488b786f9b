"""Encoder weights in and out: sscxr exports, sscxr training checkpoints and timm / DeiT files.

An export is two files side by side: `<name>.safetensors` (the encoder's state_dict) and `<name>.json`
(format, version, ViT config, the intensity normalisation the encoder was trained with, extras).
Loading adapts what is safe to adapt (3 input channels summed into 1, position embeddings resampled to
the encoder's grid, classifier / distillation heads dropped), reports it, and refuses anything else.
Files are never unpickled beyond plain tensors and containers (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sscxr.errors import CheckpointError
from sscxr.models.vit import ARCH_FIELDS, ViTConfig, infer_vit_arch
from sscxr.utils import atomic_write_bytes, atomic_write_json

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "LoadReport",
    "Normalization",
    "export_encoder",
    "interpolate_pos_embed",
    "load_encoder_weights",
    "read_export_meta",
]

log = logging.getLogger(__name__)

EXPORT_FORMAT = "sscxr-encoder"
EXPORT_VERSION = 1
# Keys of external files that are dropped on purpose (reported as unexpected, never an error).
_DROPPED_PREFIXES = ("head.", "head_dist.", "pre_logits.")
_DROPPED_KEYS = ("dist_token",)
# Encoder keys that may stay missing: a task head is trained from scratch.
_ALLOWED_MISSING_PREFIXES = ("head.",)


@dataclass(frozen=True)
class Normalization:
    """Intensity standardisation of [0, 1] pixels the encoder was trained with: (x - mean) / std."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.mean):
            raise ValueError(f"mean must be finite, got {self.mean}")
        if not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"std must be finite and positive, got {self.std}")


@dataclass
class LoadReport:
    """What `load_encoder_weights` did.

    missing: encoder keys the file did not provide; unexpected: file keys not loaded (dropped heads
    included); source: "sscxr-export", "sscxr-checkpoint" or "timm"; adapted: human-readable notes on
    every change made to the weights; normalization: from an export's JSON, else None.
    """

    missing: list[str]
    unexpected: list[str]
    source: str
    adapted: list[str] = field(default_factory=list)
    path: str = ""
    normalization: Normalization | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _base_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def _with_suffix(base: Path, suffix: str) -> Path:
    # Not Path.with_suffix: a name such as "enc.v1" must keep its dot.
    return base.parent / (base.name + suffix)


def model_files(path: str | Path) -> tuple[Path, Path]:
    """(weights .safetensors, metadata .json) of a model given as a folder (its `model.*`), either
    file, or their common base name: the one naming rule of every exported model."""
    p = Path(path)
    base = p / "model" if p.is_dir() else _base_path(p)
    return _with_suffix(base, ".safetensors"), _with_suffix(base, ".json")


def write_model_files(
    path: str | Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> tuple[Path, Path]:
    """The one writer of an exported model: `.safetensors` (tensors copied to contiguous CPU memory,
    the format and version in its header) and then the `.json`, last, so that its presence means the
    export is complete. `path` as `model_files` reads it; `meta` must hold "format" and "version".

    Returns:
        (weights path, metadata path).
    """
    weights, meta_path = model_files(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    header = {"format": str(meta["format"]), "version": str(meta["version"])}
    atomic_write_bytes(weights, safetensors.torch.save(tensors, metadata=header))
    atomic_write_json(meta_path, dict(meta))
    return weights, meta_path


def _clean_key(key: str) -> str:
    """Drop wrapper prefixes: torch.compile's `_orig_mod.` anywhere, DDP's leading `module.`."""
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)


def export_encoder(
    encoder: VisionTransformer,
    vit_cfg: ViTConfig,
    norm: Normalization,
    path: str | Path,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write `<path>.safetensors` (weights) and `<path>.json` (metadata); `path` may carry either suffix.

    The JSON is written last, so its presence means the export is complete.

    Returns:
        (weights path, metadata path).
    """
    arch = infer_vit_arch(encoder)
    wrong = [f for f in ARCH_FIELDS if arch[f] != getattr(vit_cfg, f)]
    if wrong:
        raise ValueError(
            f"vit_cfg does not describe the encoder: {_describe(wrong, vit_cfg.to_dict(), arch)}"
        )
    state = {_clean_key(k): v for k, v in encoder.state_dict().items()}
    meta = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "vit": vit_cfg.to_dict(),
        "normalization": asdict(norm),
        "extra": dict(extra or {}),
    }
    return write_model_files(path, state, meta)


def read_export_meta(path: str | Path) -> dict[str, Any] | None:
    """The JSON of an sscxr export at `path` (either file or the base name), or None if there is none."""
    meta_path = _with_suffix(_base_path(path), ".json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable export metadata ({e}); re-export the encoder") from e
    return meta if isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT else None


def read_safetensors(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (on the CPU); a damaged or half-copied file is a
    CheckpointError that names it, not a raw SafetensorError from deep inside a command.

    Raises:
        CheckpointError: missing, truncated, or not a safetensors file.
    """
    try:
        return safetensors.torch.load_file(str(weights), device="cpu")
    except (OSError, ValueError, safetensors.SafetensorError) as e:
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"{weights}: not a readable safetensors file ({reason}); a half-copied or damaged file? "
            "Copy it again or export the model again."
        ) from None


def read_model_meta(meta_path: Path, fmt: str, version: int, kind: str) -> dict[str, Any]:
    """The `model.json` of a fine-tuned export (classifier, segmenter), checked before it is trusted.

    Args:
        meta_path: the JSON file (the caller has checked that it exists).
        fmt: the `format` value the file must carry.
        version: the newest `version` this sscxr reads.
        kind: what the export is ("classifier", "segmenter"), for the error message.

    Raises:
        CheckpointError: unreadable JSON, another format, or a newer version.
    """
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e}); re-export the model") from e
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if not isinstance(meta, dict) or found != fmt:
        raise CheckpointError(f"{meta_path}: not an sscxr {kind} (format {found!r}, expected {fmt!r})")
    if int(meta.get("version", 0)) > version:
        raise CheckpointError(f"{meta_path}: version {meta.get('version')} is newer than this sscxr reads")
    return meta


def interpolate_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Resample a square grid of position embeddings (bicubic), keeping the prefix tokens' as they are.

    Args:
        pos_embed: (1, P + g * g, D) with P = num_prefix_tokens.
        new_grid: (gh, gw) target grid.
        num_prefix_tokens: leading non-spatial embeddings (class token...).

    Returns:
        (1, P + gh * gw, D) in the input dtype.
    """
    prefix, spatial = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = spatial.shape[1]
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"{n} spatial position embeddings do not form a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    dim = spatial.shape[-1]
    grid = spatial.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    # antialias: when shrinking the grid, average rather than alias (as timm's resample_abs_pos_embed).
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    spatial = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, spatial], dim=1)


def _describe(fields: list[str], file_vals: dict[str, Any], enc_vals: dict[str, Any]) -> str:
    return ", ".join(f"{f} (file {file_vals.get(f)!r}, encoder {enc_vals.get(f)!r})" for f in fields)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...: all mean "not usable as is"
        raise CheckpointError(
            f"{path}: cannot be read as plain tensors ({type(e).__name__}: {e}); only weights-only files are "
            "loaded (re-save just the state_dict with torch.save(model.state_dict(), path))"
        ) from e


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded file: the object itself or its "model" / "state_dict" entry."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: no state_dict of tensors found (top level: {keys})")


def _find_prefix(state: dict[str, torch.Tensor], path: Path) -> str:
    """The prefix p under which the ViT sits: p + "pos_embed" and p + "patch_embed.proj.weight" exist."""
    tail = "patch_embed.proj.weight"
    found = [k[: -len(tail)] for k in state if k.endswith(tail) and k[: -len(tail)] + "pos_embed" in state]
    if not found:
        raise CheckpointError(f"{path}: no ViT found (no 'pos_embed' beside a 'patch_embed.proj.weight')")
    if len(found) > 1:
        # A task checkpoint may hold more than one ViT-shaped module; the encoder is the one to take.
        enc = [p for p in found if p.endswith("encoder.") or p == ""]
        if len(enc) != 1:
            raise CheckpointError(f"{path}: several ViTs found under prefixes {found}; cannot choose")
        found = enc
    return found[0]


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any] | None]:
    """Read a weight file. Returns (state_dict with clean keys, source, export metadata or None)."""
    base = _base_path(path)
    weights = _with_suffix(base, ".safetensors")
    if path.suffix in (".json", ".safetensors") or (not path.exists() and weights.is_file()):
        if not weights.is_file():
            raise CheckpointError(f"{weights}: weight file not found")
        meta = read_export_meta(weights)
        state = read_safetensors(weights)
        source = "sscxr-export" if meta is not None else "timm"
    elif path.is_file():
        obj = _torch_load(path)
        state, meta = _find_state_dict(obj, path), None
        is_ours = isinstance(obj, dict) and "model" in obj and ("config" in obj or "format_version" in obj)
        source = "sscxr-checkpoint" if is_ours else "timm"
    else:
        raise CheckpointError(f"{path}: weight file not found")
    return {_clean_key(k): v for k, v in state.items()}, source, meta


def _check_export_meta(
    meta: dict[str, Any], encoder: VisionTransformer, path: Path, notes: list[str]
) -> None:
    """Refuse an export whose ViT differs from the encoder (other than its image size)."""
    if int(meta.get("version", 0)) > EXPORT_VERSION:
        raise CheckpointError(f"{path}: export version {meta.get('version')} is newer than this sscxr reads")
    file_vit, arch = dict(meta.get("vit", {})), infer_vit_arch(encoder)
    wrong = [f for f in ARCH_FIELDS if f != "img_size" and file_vit.get(f) != arch[f]]
    if wrong:
        raise CheckpointError(
            f"{path}: the export's ViT does not match the encoder: {_describe(wrong, file_vit, arch)}; "
            "build the encoder from the export's JSON 'vit' section"
        )
    if file_vit.get("img_size") != arch["img_size"]:
        notes.append(f"img_size {file_vit.get('img_size')} -> {arch['img_size']}")


def _file_prefix_tokens(state: dict[str, torch.Tensor]) -> int:
    count = int("cls_token" in state) + int("dist_token" in state)
    return count + (int(state["reg_token"].shape[1]) if "reg_token" in state else 0)


def _adapt_pos_embed(
    state: dict[str, torch.Tensor], have_prefix: int, encoder: VisionTransformer, notes: list[str]
) -> None:
    """Make the file's pos_embed fit the encoder: keep the class token's, drop others, resample the grid.

    `have_prefix` is the number of prefix tokens of the file's model (class, distillation, registers).
    """
    pe = state["pos_embed"]
    want_prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
    n = pe.shape[1]
    if n < have_prefix:
        return  # left to the shape check
    if math.isqrt(n - have_prefix) ** 2 != n - have_prefix and math.isqrt(n) ** 2 == n:
        have_prefix = 0  # a file trained without position embeddings on its prefix tokens
    old = math.isqrt(n - have_prefix)
    if old * old != n - have_prefix:
        return  # not a square grid: left to the shape check, which names it
    prefix = pe[:, : min(have_prefix, want_prefix)]
    if have_prefix > want_prefix:
        notes.append(f"pos_embed: dropped {have_prefix - want_prefix} extra prefix token embedding(s)")
    if have_prefix < want_prefix:
        pad = torch.zeros(1, want_prefix - have_prefix, pe.shape[-1], dtype=pe.dtype)
        prefix = torch.cat([prefix, pad], dim=1)
        notes.append("pos_embed: the file has no class-token position embedding; zeros used")
    spatial = pe[:, have_prefix:]
    new_grid = tuple(int(v) for v in encoder.patch_embed.grid_size)
    if (old, old) != new_grid:
        spatial = interpolate_pos_embed(spatial, new_grid, num_prefix_tokens=0)
        notes.append(f"pos_embed: grid {old}x{old} -> {new_grid[0]}x{new_grid[1]} (bicubic)")
    state["pos_embed"] = torch.cat([prefix, spatial], dim=1)


def _adapt_patch_embed(state: dict[str, torch.Tensor], encoder: VisionTransformer, notes: list[str]) -> None:
    """Fit the patch projection's input channels: RGB summed into grey (or grey spread over RGB)."""
    w = state["patch_embed.proj.weight"]
    want = int(encoder.patch_embed.proj.in_channels)
    have = int(w.shape[1])
    if have == want:
        return
    if want == 1:
        # Summing keeps the response to a grey image fed as R = G = B identical.
        state["patch_embed.proj.weight"] = w.sum(dim=1, keepdim=True)
        notes.append(f"patch_embed.proj.weight: {have} input channels summed into 1")
    elif have == 1:
        state["patch_embed.proj.weight"] = w.repeat(1, want, 1, 1) / want
        notes.append(f"patch_embed.proj.weight: 1 input channel spread over {want}")


def _adapt(
    state: dict[str, torch.Tensor], encoder: VisionTransformer, notes: list[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Apply the safe adaptations. Returns (state to load, file keys dropped on purpose)."""
    model_keys = set(encoder.state_dict())
    file_prefix_tokens = _file_prefix_tokens(state)  # counted before the distillation token is dropped
    dropped = sorted(
        k
        for k in state
        if k.startswith(_DROPPED_PREFIXES)
        or k in _DROPPED_KEYS
        or (k.startswith("fc_norm.") and k not in model_keys)
    )
    if dropped:
        notes.append(f"dropped {len(dropped)} head / distillation key(s): {dropped}")
    state = {k: v for k, v in state.items() if k not in set(dropped)}
    if "patch_embed.proj.weight" in state:
        _adapt_patch_embed(state, encoder, notes)
    if "pos_embed" in state:
        _adapt_pos_embed(state, file_prefix_tokens, encoder, notes)
    return state, dropped


def _check_keys(
    state: dict[str, torch.Tensor], encoder: VisionTransformer, path: Path, strict: bool
) -> tuple[list[str], list[str]]:
    """Refuse shape mismatches always, and unplanned missing / unexpected keys when strict."""
    model_state = encoder.state_dict()
    bad_shapes = [
        f"{k}: file {tuple(v.shape)} vs encoder {tuple(model_state[k].shape)}"
        for k, v in state.items()
        if k in model_state and v.shape != model_state[k].shape
    ]
    if bad_shapes:
        raise CheckpointError(f"{path}: shapes do not match the encoder: {'; '.join(bad_shapes)}")
    missing = sorted(k for k in model_state if k not in state)
    unexpected = sorted(k for k in state if k not in model_state)
    surprise_missing = [k for k in missing if not k.startswith(_ALLOWED_MISSING_PREFIXES)]
    if strict and (surprise_missing or unexpected):
        raise CheckpointError(
            f"{path}: does not fit the encoder: missing {surprise_missing}, unexpected {unexpected}; "
            "check the ViT config (depth, width) or pass strict=False"
        )
    return missing, unexpected


def load_encoder_weights(encoder: VisionTransformer, path: str | Path, strict: bool = True) -> LoadReport:
    """Load encoder weights from an sscxr export, an sscxr training checkpoint or a timm / DeiT file.

    Args:
        encoder: the timm ViT to fill (e.g. from `build_vit`); changed in place only if the load succeeds.
        path: `<name>.safetensors`, `<name>.json`, the export's base name, or a `.pt` / `.pth` file.
        strict: raise on missing encoder keys (other than a head) or unexpected file keys (other than
            dropped heads). Shape mismatches always raise.

    Returns:
        `LoadReport` with the exact missing and unexpected keys and notes on every adaptation.

    Raises:
        CheckpointError: unreadable file, no ViT in it, a mismatching export config, a shape mismatch,
            or (strict) unplanned missing / unexpected keys.
    """
    path = Path(path)
    target = _unwrap(encoder)
    raw, source, meta = _read_weights(path)
    notes: list[str] = []
    if meta is not None:
        _check_export_meta(meta, target, path, notes)
    prefix = _find_prefix(raw, path)
    state = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    if prefix:
        notes.append(f"took the {len(state)} keys under '{prefix}' ({len(raw) - len(state)} others ignored)")
    state, dropped = _adapt(state, target, notes)
    missing, unexpected = _check_keys(state, target, path, strict)
    target.load_state_dict({k: v for k, v in state.items() if k not in unexpected}, strict=False)
    norm = Normalization(**meta["normalization"]) if meta and meta.get("normalization") else None
    report = LoadReport(
        missing=missing,
        unexpected=sorted(unexpected + dropped),
        source=source,
        adapted=notes,
        path=str(path),
        normalization=norm,
        meta=dict(meta or {}),
    )
    log.info("loaded %s weights from %s: missing %s, unexpected %s", source, path, missing, report.unexpected)
    return report
