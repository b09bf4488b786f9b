"""Tiny trained-model folders for the tests of the commands that use a model (predict, explain, bundle,
export): a classifier and a segmenter exported the way `sscxr finetune` / `sscxr segment train` do."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from sscxr.models.classifier import ViTClassifier, export_classifier
from sscxr.models.loading import Normalization
from sscxr.models.unetr import SegmenterSpec, build_unetr, export_segmenter
from sscxr.models.vit import ViTConfig, build_vit

#: 32 px, patches of 8, width 32, 4 blocks (UNETR takes its 4 skips from them).
TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0)
NORM = Normalization(mean=0.45, std=0.25)


def classifier_run(
    folder: Path, extra: dict[str, Any] | None = None, thresholds: dict[str, float] | None = None
) -> Path:
    """A fine-tuning run folder (model.safetensors + model.json) of a random pneumonia classifier."""
    torch.manual_seed(0)  # tests only: timm initialises from the global RNG
    model = ViTClassifier(
        build_vit(TINY), ["healthy", "pneumonia"], normalization=NORM, thresholds=thresholds
    )
    info = {"task": "pneumonia_vs_healthy", "fit": "stretch", **(extra or {})}
    export_classifier(model, TINY, folder / "model", info)
    return folder


def segmenter_run(folder: Path) -> Path:
    """A `sscxr segment train` run folder of a random UNETR segmenter."""
    spec = SegmenterSpec(vit=TINY, normalization=NORM, feature_size=4, fit="stretch", threshold=0.5)
    torch.manual_seed(0)
    model = build_unetr(spec).eval()
    export_segmenter(model.state_dict(), dataclasses.replace(spec, blocks=model.blocks), folder / "model")
    return folder
