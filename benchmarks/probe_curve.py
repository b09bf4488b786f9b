"""Frozen-feature quality against pre-training time: `sscxr probe` on every snapshot of a GMML run.

A pre-training run with `gmml.snapshot_every=N` keeps `snapshots/epoch_NNN/encoder.*`; this script
probes each (logistic regression, C chosen on validation, on the same labelled subsets for every
snapshot) and prints one line per snapshot: epoch, seconds of training when it was written, mean
validation and test AUC-ROC over the draws. Decisions are taken on the validation column.

    python benchmarks/probe_curve.py --run runs/gmml --cache cache/kermany --task pneumonia_vs_healthy \
        --fraction 0.01 --seeds 0,1,2,3,4 --out runs/curve
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sscxr.cli import main as sscxr


def _probe(snapshot: Path, args: argparse.Namespace, out: Path) -> dict:
    if not (out / "probe.json").is_file():
        code = sscxr([
            "probe", "--encoder", f"GMML={snapshot}", "--no-random", "--pixels", "0", "--no-knn",
            "--cache", args.cache, "--task", args.task, "--test", f"test={args.cache}:test",
            "--fractions", str(args.fraction), "--seeds", args.seeds, "--features", args.features,
            "--n-boot", "1", "--out", str(out),
        ])  # fmt: skip
        if code:
            raise SystemExit(f"sscxr probe failed on {snapshot}")
    return json.loads((out / "probe.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="pre-training run folder with snapshots/")
    p.add_argument("--cache", required=True)
    p.add_argument("--task", default="pneumonia_vs_healthy")
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--features", default="grid4")
    p.add_argument("--every", type=int, default=1, help="only snapshots whose epoch is a multiple of this")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    run = Path(args.run)
    snaps = [
        s
        for s in sorted((run / "snapshots").glob("epoch_*/encoder.safetensors"))
        if int(s.parent.name.split("_")[1]) % args.every == 0
    ]
    if (run / "encoder.safetensors").is_file():  # the final export (the last snapshot's weights, if any)
        snaps.append(run / "encoder.safetensors")
    print(f"{'snapshot':>10} {'epoch':>6} {'train s':>8} {'val AUC':>8} {'test AUC':>9} {'test SD':>8}")
    for snap in snaps:
        meta = json.loads(snap.with_suffix(".json").read_text()).get("extra", {})
        name = snap.parent.name if snap.parent != run else "final"
        doc = _probe(snap, args, args.out / name)
        rows = [r for r in doc["rows"] if r["kind"] == "linear"]
        val = np.mean([r["val"]["auc_roc"] for r in rows])
        test = [r["tests"]["test"]["auc_roc"] for r in rows]
        epoch = meta.get("epoch", "final")
        secs = meta.get("train_seconds")
        sd = np.std(test, ddof=1) if len(test) > 1 else 0.0
        secs_text = "" if secs is None else secs
        print(f"{name:>10} {epoch!s:>6} {secs_text:>8} {val:8.3f} {np.mean(test):9.3f} {sd:8.3f}", flush=True)


if __name__ == "__main__":
    main()
