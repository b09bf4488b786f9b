"""The fine-tuned classifier: a ViT whose pooled tokens go through a linear head.

Pooling (`pool`): "avg" = mean of the final-norm patch tokens (MAE-style fine-tuning), "token" = the
class token (DeiT). The state_dict is the same for both, so any export loads either way; model.json
records which one the head was trained on (a file without "pool" predates the option: "token").

The model carries what is needed to use it correctly later: its class names (output k is class k;
for 2 classes output 1 is the positive class), the intensity standardisation of its encoder (as
buffers, applied inside `forward`, so callers feed plain [0, 1] images) and its decision thresholds.

On disk (`export_classifier`, read back by `load_classifier`), a model is two files side by side:
`model.safetensors` (the state_dict: `encoder.*` and the `norm_mean` / `norm_std` buffers) and
`model.json` (format "sscxr-classifier", class names, ViT config, normalisation, thresholds and the
provenance the training run adds). Files are never unpickled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sscxr.errors import CheckpointError
from sscxr.models.loading import (
    Normalization,
    model_files,
    read_model_meta,
    read_safetensors,
    write_model_files,
)
from sscxr.models.vit import ViTConfig, build_vit, infer_vit_arch, vit_config_from_dict

__all__ = [
    "CLASSIFIER_FORMAT",
    "CLASSIFIER_VERSION",
    "POOLS",
    "ViTClassifier",
    "export_classifier",
    "load_classifier",
]

CLASSIFIER_FORMAT = "sscxr-classifier"
CLASSIFIER_VERSION = 1
POOLS = ("avg", "token")
_IDENTITY = Normalization(mean=0.0, std=1.0)


class ViTClassifier(nn.Module):
    """A timm ViT with a linear head on its pooled output tokens (after the final LayerNorm).

    The head is timm's own (`encoder.head`, created with `reset_classifier`), and the final norm is
    timm's `encoder.norm`, so the state_dict has timm's layout under `encoder.` and external
    checkpoints load key for key. The pooling is done here, on `encoder.forward_features`, not by
    timm's `global_pool`, so switching it never changes the parameters.

    Pooling defaults to "avg": GMML pre-training reconstructs patches, so its features live in the
    patch tokens; the class token is never trained directly by that objective, and a head on it
    starts from an untrained summary (MAE fine-tunes with average pooling for the same reason).
    "token" is DeiT's class-token head (for encoders whose class token was trained, e.g. DeiT).

    Args:
        encoder: a timm ViT with a class token (e.g. `build_vit`); its head is replaced.
        class_names: C >= 2 class names, in output order.
        drop_rate: dropout on the pooled features before the head, in [0, 1).
        normalization: the standardisation the encoder expects; None = identity (inputs used as is).
        thresholds: decision thresholds by name (binary: P(class 1) >= t); default {"default": 0.5}
            for 2 classes, {} otherwise (arg-max).
        seed: seed of the head's initialisation (truncated normal, std 0.02; bias 0).
        pool: "avg" (mean of the patch tokens) or "token" (the class token).
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        class_names: Sequence[str],
        drop_rate: float = 0.0,
        normalization: Normalization | None = None,
        thresholds: Mapping[str, float] | None = None,
        seed: int = 0,
        pool: str = "avg",
    ) -> None:
        super().__init__()
        names = tuple(str(n) for n in class_names)
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"class_names must hold at least 2 distinct names, got {list(class_names)}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if not getattr(encoder, "has_class_token", False) or encoder.global_pool != "token":
            raise ValueError("the encoder must be a timm ViT with a class token and global_pool='token'")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool = pool
        self.class_names = names
        self.drop_rate = float(drop_rate)
        default = {"default": 0.5} if len(names) == 2 else {}
        self.thresholds: dict[str, float] = dict(default if thresholds is None else thresholds)
        for key, t in self.thresholds.items():
            if not 0.0 <= float(t) <= 1.0:
                raise ValueError(f"threshold {key!r} must be in [0, 1], got {t}")
        encoder.reset_classifier(len(names))
        encoder.head_drop = nn.Dropout(drop_rate)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            nn.init.trunc_normal_(encoder.head.weight, std=0.02, generator=g)
            nn.init.zeros_(encoder.head.bias)
        self.encoder = encoder
        norm = normalization or _IDENTITY
        # float64 0-d buffers: exact round trip of the statistics, and 0-d tensors never change the
        # dtype of the image they are applied to.
        self.register_buffer("norm_mean", torch.tensor(float(norm.mean), dtype=torch.float64))
        self.register_buffer("norm_std", torch.tensor(float(norm.std), dtype=torch.float64))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def normalization(self) -> Normalization:
        """The standardisation applied in `forward` (read back from the buffers)."""
        return Normalization(mean=float(self.norm_mean), std=float(self.norm_std))

    def set_normalization(self, norm: Normalization) -> None:
        """Replace the standardisation (e.g. with a pre-trained encoder's, after loading its weights)."""
        with torch.no_grad():
            self.norm_mean.fill_(float(norm.mean))
            self.norm_std.fill_(float(norm.std))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """`(x - mean) / std`; x: (B, 1, H, W) intensities in [0, 1]."""
        return (x - self.norm_mean) / self.norm_std

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pool the final-norm tokens (B, P + N, D) (P prefix tokens, N patches) into (B, D)."""
        if self.pool == "avg":
            return tokens[:, self.encoder.num_prefix_tokens :].mean(dim=1)
        return tokens[:, 0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features after the final norm (what the head sees, before its dropout).

        Args:
            x: (B, 1, H, W) intensities in [0, 1].

        Returns:
            (B, embed_dim).
        """
        pooled = self.pool_tokens(self.encoder.forward_features(self.standardize(x)))
        return self.encoder.fc_norm(pooled)  # Identity for encoders built with global_pool="token"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of images x: (B, 1, H, W) with intensities in [0, 1] (standardised here)."""
        return self.encoder.head(self.encoder.head_drop(self.features(x)))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (B, C) in float32; x: (B, 1, H, W) in [0, 1]."""
        return self(x).float().softmax(dim=-1)


def _paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, json) of a model given as a run folder, a bundle, either file, or their base name."""
    from sscxr.models.bundle import component_path

    return model_files(component_path(path, "classifier") or Path(path))


def export_classifier(
    model: ViTClassifier, vit_cfg: ViTConfig, path: str | Path, extra: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write `<path>.safetensors` and `<path>.json` (`path`: a run folder -> `model.*`, or a base name).

    The JSON is written last: its presence means the export is complete. `extra` (task, label
    mapping, data manifest hash, command, ...) is merged into the JSON's top level.

    Returns:
        (weights path, metadata path).
    """
    arch = infer_vit_arch(model.encoder)
    wrong = [k for k, v in arch.items() if getattr(vit_cfg, k) != v]
    if wrong:
        raise ValueError(f"vit_cfg does not describe the model's encoder: fields {wrong} differ")
    norm = model.normalization
    meta: dict[str, Any] = {
        "format": CLASSIFIER_FORMAT,
        "version": CLASSIFIER_VERSION,
        "class_names": list(model.class_names),
        "positive_class": model.class_names[1] if model.num_classes == 2 else None,
        "decision": "threshold" if model.num_classes == 2 else "argmax",
        "thresholds": dict(model.thresholds),
        "vit": vit_cfg.to_dict(),
        "img_size": vit_cfg.img_size,
        "drop_rate": model.drop_rate,
        "pool": model.pool,
        "normalization": {"mean": norm.mean, "std": norm.std},
        "input": "(B, 1, H, W) float intensities in [0, 1]; the model standardises them itself",
        **dict(extra or {}),
    }
    return write_model_files(path, model.state_dict(), meta)


def read_classifier_meta(path: str | Path) -> dict[str, Any]:
    """The `model.json` of a classifier export (run folder, either file or base name)."""
    _, meta_path = _paths(path)
    if not meta_path.is_file():
        raise CheckpointError(
            f"{meta_path}: no classifier metadata; give a fine-tuning run folder or its model.json "
            "(written by `sscxr finetune` when training ends)"
        )
    return read_model_meta(meta_path, CLASSIFIER_FORMAT, CLASSIFIER_VERSION, "classifier")


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[ViTClassifier, dict[str, Any]]:
    """Load an exported classifier (safetensors only) in eval mode.

    Args:
        path: a fine-tuning run folder, a bundle (folder or .zip, `sscxr bundle`), `model.safetensors`,
            `model.json` or their base name.
        device: where to put the model.

    Returns:
        (model, meta): the model, and the parsed `model.json`. A model.json without "pool" was
        written before pooling was an option, when the head always read the class token: "token".

    Raises:
        CheckpointError: missing / foreign files, or weights that do not match the JSON.
    """
    meta = read_classifier_meta(path)
    weights, _ = _paths(path)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weight file missing beside its model.json; re-export the model")
    cfg = vit_config_from_dict(meta["vit"])
    with torch.random.fork_rng(devices=[]):  # timm initialises from the global RNG: leave it untouched
        model = ViTClassifier(
            build_vit(cfg),
            meta["class_names"],
            float(meta.get("drop_rate", 0.0)),
            Normalization(**meta["normalization"]),
            thresholds=meta.get("thresholds"),
            pool=str(meta.get("pool", "token")),
        )
    state = read_safetensors(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: does not match {weights.with_suffix('.json').name} ({e})") from e
    return model.to(device).eval(), meta
