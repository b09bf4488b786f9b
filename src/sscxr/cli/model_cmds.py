"""`sscxr bundle` (a trained model as one folder or archive) and `sscxr export` (ONNX)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _bundle(args: argparse.Namespace) -> int:
    from sscxr.models.bundle import read_bundle, write_bundle

    path = write_bundle(
        args.run, args.out, segmenter=args.segmenter, evaluation=args.evaluation,
        evaluation_model=args.evaluation_model, archive=args.archive,
    )  # fmt: skip
    _, index = read_bundle(path)  # checks what was written
    decision = index["decision"]
    print(
        f"bundle {path}: {', '.join(index['components'])}; decision threshold '{decision['threshold']}' "
        f"({decision['from']}); model card {Path(args.out) / 'MODEL_CARD.md'}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `bundle` subcommand."""
    p = sub.add_parser(
        "bundle",
        help="pack a trained classifier (+ segmenter, evaluation) into one folder or .zip with a model card",
        description=(
            "A bundle holds everything needed to use a model and nothing that needs unpickling: safetensors "
            "weights, architecture, normalisation, input size, class names, decision thresholds, the "
            "segmenter if given, and a generated MODEL_CARD.md (training data hashes, config, evaluation "
            "with intervals). Every command that takes a model accepts it. Example: sscxr bundle "
            "runs/finetune/ss-cxr --segmenter runs/segment/ss-cxr --evaluation runs/evaluate --out models/cxr"
        ),
    )
    p.add_argument("run", type=Path, help="the fine-tuning run folder (model.safetensors + model.json)")
    p.add_argument("--out", required=True, type=Path, help="the bundle folder to create (or replace)")
    p.add_argument("--segmenter", type=Path, help="a `sscxr segment train` run folder to include")
    p.add_argument(
        "--evaluation", type=Path,
        help="an `sscxr evaluate` output folder that scored this model: its results (with intervals) go "
             "into the card, and its validation-chosen threshold becomes the bundle's decision threshold",
    )  # fmt: skip
    p.add_argument("--evaluation-model", help="the model's NAME in that evaluation (default: by run folder)")
    p.add_argument("--archive", action="store_true", help="also write OUT.zip (one file to hand over)")
    p.set_defaults(func=_bundle)
