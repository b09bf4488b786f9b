"""Pre-training recipes compared by frozen-feature quality per CPU minute.

Each variant is one `sscxr pretrain` run (the base config plus the variant's dotted overrides, its
schedule run to the end), then one `sscxr probe` of its final encoder: logistic regression on frozen
features, C chosen on validation, the same labelled subsets (fraction x seeds) for every variant. One
line per variant: training seconds (the engine's wall clock, so keep the machine otherwise idle),
median images per second, mean validation and test AUC-ROC over the draws. Choose on the validation
column; the test column is there to report, not to choose. Finished runs and probes are reused, so an
interrupted sweep continues.

    python benchmarks/pretrain_sweep.py --cache runs/kermany/cache128 --task pneumonia_vs_healthy \
        --base pretrain/gmml_cpu --out runs/sweep \
        --variant "base24: train.epochs=24 gmml.snapshot_every=0" \
        --variant "depth4: train.epochs=24 model.depth=4 gmml.recon_blocks=[1,2,3,4]"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from probe_curve import _probe as probe_snapshot  # a sibling script in benchmarks/

from sscxr.cli import main as sscxr


def _parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    if not name.strip() or not overrides.strip():
        raise SystemExit(f"--variant must be 'NAME: key=value ...', got {text!r}")
    return name.strip(), overrides.split()


def _pretrain(name: str, overrides: list[str], args: argparse.Namespace) -> Path:
    run = args.out / name
    if not (run / "encoder.safetensors").is_file():
        argv = ["pretrain", "-c", args.base, f"data.cache={args.cache}", *overrides, "--out", str(run)]
        if sscxr(argv):
            raise SystemExit(f"sscxr pretrain failed for variant {name}")
    return run


def _timing(run: Path) -> tuple[float, float]:
    """(training seconds, median images per second) from the run's metrics log."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["metrics"]["train/img_per_s"] for r in rows if "train/img_per_s" in r.get("metrics", {})]
    return float(rows[-1]["elapsed_s"]), float(statistics.median(speeds)) if speeds else float("nan")


def _probe(run: Path, args: argparse.Namespace) -> dict:
    """The final encoder's probe: probe_curve's, on the same subsets (reused when already written)."""
    return probe_snapshot(run, args, run / "probe")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--task", default="pneumonia_vs_healthy")
    p.add_argument("--base", default="pretrain/gmml_cpu", help="config every variant starts from")
    p.add_argument("--variant", action="append", required=True, help="'NAME: key=value ...' (repeatable)")
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--features", default="grid4")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    lines = []
    for name, overrides in map(_parse_variant, args.variant):
        run = _pretrain(name, overrides, args)
        seconds, speed = _timing(run)
        rows = [r for r in _probe(run, args)["rows"] if r["kind"] == "linear"]
        val = np.mean([r["val"]["auc_roc"] for r in rows])
        test = [r["tests"]["test"]["auc_roc"] for r in rows]
        sd = np.std(test, ddof=1) if len(test) > 1 else 0.0
        lines.append(f"{name:>12} {seconds / 60:7.1f} {speed:7.0f} {val:8.3f} {np.mean(test):9.3f} {sd:8.3f}")
    print(f"{'variant':>12} {'train min':>7} {'img/s':>7} {'val AUC':>8} {'test AUC':>9} {'test SD':>8}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
