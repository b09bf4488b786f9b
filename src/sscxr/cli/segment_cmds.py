"""`sscxr segment train | evaluate | predict`: lung segmentation with UNETR on the (pre-trained) ViT.

Heavy modules are imported inside the functions that run a command, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sscxr.cli.argtypes import int_at_least
from sscxr.cli.train_cmds import add_config_args, run_training

if TYPE_CHECKING:
    from sscxr.cli.train_cmds import Built
    from sscxr.engine.distributed import DistInfo
    from sscxr.engine.trainer import FitResult

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "segment/unetr_vit_s16"


def run_segment_train(args: argparse.Namespace) -> FitResult:
    """`sscxr segment train`: fine-tune UNETR on a prepared cache with masks (one or many processes).

    Args:
        args: `config` (list or None), `overrides`, `out`, `resume`, `device`, `verbose`.

    Returns:
        The engine's FitResult; `args.out` then holds `model.safetensors` + `model.json` (the best
        validation Dice weights), `metrics.jsonl`, `config.yaml`, `overlays/` and `checkpoints/`.
    """
    from sscxr.tasks.segmentation import SegmentConfig, build_segmentation

    def build(cfg: SegmentConfig, _dist: DistInfo) -> Built:
        task, train_set, val_set = build_segmentation(cfg, seed=cfg.train.seed)
        log.info(
            "segmentation on %d images (%d for validation); encoder start %s; skip blocks %s",
            len(train_set),
            len(val_set or []),
            task.extra_export["init"]["mode"],
            task.spec.blocks,
        )
        return task, train_set, val_set

    return run_training(args, SegmentConfig, DEFAULT_CONFIG, build)


def _train(args: argparse.Namespace) -> int:
    result = run_segment_train(args)
    best = "n/a" if result.best_metric is None else f"{result.best_metric:.4f}"
    print(
        f"done: {result.state.step} steps; best validation Dice {best}; "
        f"segmenter {Path(args.out) / 'model.safetensors'} (+ model.json)"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from sscxr.evaluation.segmentation import parse_model_spec, parse_test_spec, run_evaluation
    from sscxr.reports.segmentation import write_segmentation_report

    models = [parse_model_spec(m) for m in args.model]
    tests = [parse_test_spec(t) for t in args.test]
    evals = run_evaluation(
        models,
        tests,
        postprocess=args.postprocess,
        n_boot=args.n_boot,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        allow_leakage=args.allow_leakage,
    )
    paths = write_segmentation_report(evals, args.out)
    for ev in evals:
        variants = [("raw", ev.summary)] + ([("post-processed", ev.summary_pp)] if ev.summary_pp else [])
        for label, s in variants:
            dice, iou, hd = (s[k].mean for k in ("dice", "iou", "hd95_px"))
            hd_text = "n/a" if hd is None else f"{hd:.2f} px"
            print(
                f"{ev.model} on {ev.test.name} ({len(ev.records)} images, {label}): "
                f"Dice {dice:.4f}, IoU {iou:.4f}, HD95 {hd_text}"
            )
    print(f"report: {paths['markdown']} and {paths['html']}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from sscxr.evaluation.segmentation import predict_files, resolve_device
    from sscxr.models.unetr import load_segmenter

    segmenter = load_segmenter(args.model).to(resolve_device(args.device))
    result = predict_files(segmenter, args.inputs, args.out, postprocess=args.postprocess, progress=True)
    print(f"{len(result.written)} masks written to {args.out}")
    for path, reason in result.failures:
        print(f"  unreadable, skipped: {path}: {reason}")
    # Non-zero when some inputs failed, so scripts notice; the readable ones were still processed.
    return 1 if result.failures else 0


def _add_train(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "train",
        help="fine-tune UNETR (scratch / GMML / timm encoder start) on a cache",
        description="Example: sscxr segment train -c segment/unetr_vit_s16 data.cache=cache "
        "seg.init=sscxr seg.init_path=runs/gmml --out runs/seg",
    )
    add_config_args(p, DEFAULT_CONFIG)
    p.set_defaults(func=_train)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "evaluate",
        help="IoU, Dice, HD95 of segmenters on test sets; Table-5-like report",
        description="Example: sscxr segment evaluate --model scratch=runs/seg0 "
        "--model ss-cxr=runs/seg1 --test montgomery=cache_mc:test --out reports/seg "
        "--postprocess",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=RUN",
        help="a trained segmenter (run folder or model.json), repeatable; a row of the table",
    )
    p.add_argument(
        "--test",
        action="append",
        required=True,
        metavar="NAME=CACHE[:SPLIT]",
        help="a test set: rows of SPLIT (default test; 'all' or '*' = every row) with masks, repeatable",
    )
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument(
        "--postprocess",
        action="store_true",
        help="also score masks post-processed (two largest components, holes filled)",
    )
    p.add_argument(
        "--n-boot", type=int_at_least(0), default=1000, help="bootstrap resamples (by patient) for the CIs"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--batch-size", type=int_at_least(1), default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--allow-leakage",
        action="store_true",
        help="evaluate even when a patient or a near-duplicate image is in two splits of a test cache",
    )
    p.set_defaults(func=_evaluate)


def _add_predict(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "predict",
        help="write a lung mask PNG per image (DICOM or PNG), at its own size",
        description="Example: sscxr segment predict --model runs/seg new_xrays/ --out masks/",
    )
    p.add_argument("inputs", nargs="+", help="image files and / or folders (searched recursively)")
    p.add_argument("--model", required=True, type=Path, help="a trained segmenter (run folder or model.json)")
    p.add_argument("--out", required=True, type=Path, help="output folder (<stem>_mask.png, predictions.csv)")
    p.add_argument("--postprocess", action="store_true", help="keep the two largest components, fill holes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=_predict)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `segment` with its sub-subcommands `train`, `evaluate` and `predict`."""
    p = sub.add_parser("segment", help="lung segmentation: train, evaluate, predict (UNETR on the ViT)")
    inner = p.add_subparsers(dest="segment_command", required=True, metavar="SUBCOMMAND")
    _add_train(inner)
    _add_evaluate(inner)
    _add_predict(inner)
