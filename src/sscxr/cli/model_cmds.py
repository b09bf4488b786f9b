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


def _export(args: argparse.Namespace) -> int:
    from sscxr.models.onnx_export import export_onnx

    report = export_onnx(args.model, args.out, segmenter=args.segmenter, parity_inputs=args.parity_inputs)
    for name, g in report["graphs"].items():
        print(
            f"{name}: {Path(args.out) / g['file']}; parity on {report['parity_inputs']}: max |PyTorch - ONNX "
            f"Runtime| {g['max_abs_diff']:.2e} (tolerance {report['tolerance']:g})"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `bundle` and `export` subcommands."""
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

    p = sub.add_parser(
        "export",
        help="export a classifier (and segmenter) to ONNX, with a parity check against PyTorch",
        description=(
            "Writes OUT/classifier.onnx (input 'image' (B, 1, S, S) in [0, 1], dynamic batch; outputs "
            "'logits' and 'probabilities'), OUT/segmenter.onnx (output 'lung_probability') when the model is "
            "a bundle with a segmenter or --segmenter is given, their model.json beside them, and "
            "OUT/export.json with the largest |PyTorch - ONNX Runtime| difference measured on "
            "--parity-inputs (default: synthetic radiographs). `sscxr predict OUT --backend onnx` runs them."
        ),
    )
    p.add_argument("model", type=Path, help="a bundle, a fine-tuning run folder or its model.json")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--segmenter", type=Path, help="a segmenter to export too (default: the bundle's)")
    p.add_argument(
        "--parity-inputs", nargs="*", default=[], metavar="IMAGE", help="images to check parity on"
    )
    p.set_defaults(func=_export)
