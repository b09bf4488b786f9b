"""`sscxr predict` and `sscxr explain`: a trained classifier on image files, folders or manifests."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from sscxr.cli.argtypes import int_at_least

_EXAMPLE = "Example: sscxr {cmd} runs/finetune/ss-cxr new_xrays/ scan.dcm --out {out}"


def _options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from sscxr.evaluation.files import PredictOptions

    return PredictOptions(
        threshold=args.threshold, batch_size=args.batch_size, device=args.device, precision=args.precision,
        progress=True,
    )  # fmt: skip


def _summary(results, out: Path, table: str) -> int:  # type: ignore[no-untyped-def]
    failed = [r for r in results if r.error]
    counts = Counter(r.predicted for r in results if not r.error)
    shown = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
    print(f"{len(results) - len(failed)} images classified ({shown}); {out / table}")
    for r in failed:
        print(f"  skipped: {r.error}" if r.error.startswith(r.input) else f"  skipped: {r.input}: {r.error}")
    # Non-zero when some inputs failed, so scripts notice; the readable ones were still processed.
    return 1 if failed else 0


def _predict(args: argparse.Namespace) -> int:
    from sscxr.evaluation.files import predict_files
    from sscxr.models.bundle import bundled_segmenter
    from sscxr.models.classifier import load_classifier

    if args.backend == "onnx":
        from sscxr.models.onnx_export import OnnxClassifier

        model = OnnxClassifier(args.model)
        meta = model.meta
    else:
        model, meta = load_classifier(args.model)
    segmenter = None
    # A bundle's own segmenter writes the masks unless another is given or --no-masks.
    seg_path = None if args.no_masks else args.segmenter or bundled_segmenter(args.model)
    if seg_path is not None:
        from sscxr.models.unetr import load_segmenter

        segmenter = load_segmenter(seg_path)
    results = predict_files(model, meta, args.inputs, args.out, _options(args), segmenter, args.postprocess)
    return _summary(results, args.out, "predictions.csv")


def _explain(args: argparse.Namespace) -> int:
    from sscxr.evaluation.files import explain_files
    from sscxr.models.classifier import load_classifier

    model, meta = load_classifier(args.model)
    results = explain_files(model, meta, args.inputs, args.out, _options(args), save_maps=args.save_maps)
    return _summary(results, args.out, "explain.csv")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", type=Path, help="a trained classifier: a fine-tuning run folder or its model.json"
    )
    p.add_argument(
        "inputs",
        nargs="+",
        help="image files (DICOM, PNG, JPEG, TIFF), folders (searched recursively), manifests",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--threshold", default=None,
        help="binary models: a threshold of the model by name (default: 'default') or a number in [0, 1]",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int_at_least(1), default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp32")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `predict` and `explain` subcommands."""
    p = sub.add_parser(
        "predict",
        help="classify image files: a row per image with each class's probability and the decision",
        description=(
            "Writes OUT/predictions.csv and OUT/predictions.json: per image, each class's probability, the "
            "predicted class at the model's threshold and, with --segmenter, the lung mask "
            "(OUT/masks/<name>_mask.png). Unreadable files get a row saying why; the others go on. "
            + _EXAMPLE.format(cmd="predict", out="preds/")
        ),
    )
    _common(p)
    p.add_argument(
        "--segmenter", type=Path,
        help="also write lung masks with this segmenter (run folder or bundle; default: the bundle's own)",
    )  # fmt: skip
    p.add_argument("--no-masks", action="store_true", help="no lung masks, even from a bundle's segmenter")
    p.add_argument(
        "--backend", choices=["torch", "onnx"], default="torch",
        help="onnx: run MODEL as exported by `sscxr export --format onnx` (its folder) with ONNX Runtime",
    )  # fmt: skip
    p.add_argument(
        "--postprocess", action="store_true", help="masks: keep the two largest components, fill holes"
    )
    p.set_defaults(func=_predict)

    p = sub.add_parser(
        "explain",
        help="attention heat maps (last block and rollout) over each image, with the prediction",
        description=(
            "Writes OUT/<name>_heatmap.png per image: the class token's attention in the last block (mean "
            "over heads) and attention rollout through all blocks, up-sampled and overlaid (the paper's "
            "Figure 4), and OUT/explain.csv. " + _EXAMPLE.format(cmd="explain", out="heatmaps/")
        ),
    )
    _common(p)
    p.add_argument("--save-maps", action="store_true", help="also write the maps as <name>_heatmap.npz")
    p.set_defaults(func=_explain)
