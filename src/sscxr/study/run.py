"""Running a study: the ordinary `sscxr` commands it needs, in order, skipping those already done.

Every step is a command a user could type (it is printed before it runs, and all of them are written
to `OUT/commands.sh`); each writes into its own folder under `OUT`, and a step counts as done when the
file it writes last exists. Training commands resume from their own checkpoints, so a study stopped
at any moment continues where it was when run again, and redoes nothing that finished.

    OUT/data/             manifest.csv (or cohort/), cache/
    OUT/pretrain/NAME/    `sscxr pretrain`
    OUT/probe/TASK/       `sscxr probe` (every fraction and draw)
    OUT/finetune/TASK/START-MODE/fF/sS/   `sscxr finetune`
    OUT/evaluate/TASK/fF/sS/              `sscxr evaluate` of every fine-tuned row of that draw
    OUT/report.{md,html,json,csv}         `sscxr study` itself, from all of the above
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sscxr.errors import SSCXRError
from sscxr.study.spec import StudySpec

__all__ = ["Layout", "Step", "plan", "run_steps"]

log = logging.getLogger(__name__)


def frac_label(fraction: float) -> str:
    """`0.01` -> "0.01", `1.0` -> "1" (folder names)."""
    return f"{fraction:g}"


def row_name(start: str, mode: str) -> str:
    """The name of a fine-tuned row in reports and `sscxr evaluate --model NAME=...`."""
    return f"{start} {mode}"


@dataclass(frozen=True)
class Layout:
    """Where each part of a study lives under its output folder."""

    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    def pretrain(self, name: str) -> Path:
        return self.out / "pretrain" / name

    def probe(self, task: str) -> Path:
        return self.out / "probe" / task

    def finetune(self, task: str, start: str, mode: str, fraction: float, seed: int) -> Path:
        return self.out / "finetune" / task / f"{start}-{mode}" / f"f{frac_label(fraction)}" / f"s{seed}"

    def evaluate(self, task: str, fraction: float, seed: int) -> Path:
        return self.out / "evaluate" / task / f"f{frac_label(fraction)}" / f"s{seed}"


@dataclass(frozen=True)
class Step:
    """One `sscxr` command and the file whose existence means it finished."""

    title: str
    argv: tuple[str, ...]
    marker: Path

    @property
    def done(self) -> bool:
        return self.marker.exists()

    @property
    def command(self) -> str:
        return "sscxr " + shlex.join(self.argv)


def cache_dir(spec: StudySpec, layout: Layout) -> Path:
    """The cache every step reads: the study's own one, or the one the file names."""
    return Path(spec.data.cache) if spec.data.cache else layout.data / "cache"


def _data_steps(spec: StudySpec, layout: Layout) -> list[Step]:
    d = spec.data
    if d.cache:
        return []
    steps: list[Step] = []
    if d.manifest:
        manifest = Path(d.manifest)
    elif d.importer:
        manifest = layout.data / "manifest.csv"
        argv = ("import", d.importer.layout, d.importer.root, *d.importer.args, "--out", str(manifest))
        steps.append(Step("data: import", argv, manifest))
    else:
        assert d.synth is not None  # checked by load_study
        cohort, s = layout.data / "cohort", d.synth
        manifest = cohort / "manifest.csv"
        argv = ("synth", "--out", str(cohort), "--n-adult", str(s.n_adult), "--n-pediatric",
                str(s.n_pediatric), "--size", str(s.size), "--seed", str(s.seed),
                "--acquisition-jitter", str(s.acquisition_jitter))  # fmt: skip
        steps.append(Step("data: synthetic cohort", argv, cohort / "contact_sheet.png"))
    cache = layout.data / "cache"
    argv = ("prepare", str(manifest), "--out", str(cache), "--size", str(d.size))
    steps.append(Step("data: cache", argv, cache / "index.json"))
    return steps


def encoder_path(spec: StudySpec, layout: Layout, start: str) -> str | None:
    """The weights behind an encoder start (None for scratch)."""
    s = spec.starts[start]
    if s.init == "scratch":
        return None
    return str(layout.pretrain(s.pretrain)) if s.pretrain else str(s.path)


def _tests(spec: StudySpec, cache: Path) -> list[str]:
    args: list[str] = []
    for name, where in spec.tests.items():
        args += ["--test", f"{name}={where if ':' in where else f'{cache}:{where}'}"]
    return args


def _probe_step(spec: StudySpec, layout: Layout, task: str, cache: Path) -> Step:
    p = spec.probe
    encoders = [
        a
        for s in spec.starts
        if (path := encoder_path(spec, layout, s))
        for a in ("--encoder", f"{s}={path}")
    ]
    seeds = sorted({k for f in spec.fractions for k in spec.seeds_for(f)})
    argv = [
        "probe", *encoders, "--cache", str(cache), "--task", task,
        "--train-split", spec.data.train_split, "--val-split", spec.data.val_split, *_tests(spec, cache),
        "--fractions", ",".join(frac_label(f) for f in spec.fractions),
        "--seeds", ",".join(map(str, seeds)), "--features", p.features, "--pixels", str(p.pixels),
        "--threshold", spec.threshold, *([] if p.random else ["--no-random"]),
        *([] if p.knn else ["--no-knn"]), *p.args, "--out", str(layout.probe(task)),
    ]  # fmt: skip
    return Step(f"probe: {task}", tuple(argv), layout.probe(task) / "report.md")


def finetuned_rows(spec: StudySpec) -> list[tuple[str, str]]:
    """(start, mode) of every fine-tuned row: scratch is only fine-tuned, pre-trained starts in every mode."""
    rows = []
    for start, s in spec.starts.items():
        modes = ["finetune"] if s.init == "scratch" else spec.finetune.modes
        rows += [(start, m) for m in modes]
    return rows


def _finetune_steps(spec: StudySpec, layout: Layout, task: str, cache: Path) -> list[Step]:
    steps: list[Step] = []
    for fraction in spec.fractions:
        for seed in spec.seeds_for(fraction):
            models: list[str] = []
            for start, mode in finetuned_rows(spec):
                run = layout.finetune(task, start, mode, fraction, seed)
                path = encoder_path(spec, layout, start)
                init = [f"classify.init={spec.starts[start].init}"] + (
                    [f"classify.init_path={path}"] if path else []
                )
                argv = [
                    "finetune", "-c", spec.finetune.config, f"data.cache={cache}",
                    f"data.train_split={spec.data.train_split}", f"data.val_split={spec.data.val_split}",
                    f"model.img_size={spec.data.size}", f"classify.task={task}", *init,
                    f"classify.mode={mode}", f"classify.labelled_fraction={fraction:g}",
                    f"classify.subset_seed={seed}", f"train.seed={seed}", *spec.overrides_for(fraction),
                    "--out", str(run),
                ]  # fmt: skip
                title = f"fine-tune: {task}, {row_name(start, mode)}, {fraction:.0%} labels, draw {seed}"
                steps.append(Step(title, tuple(argv), run / "model.json"))
                models += ["--model", f"{row_name(start, mode)}={run}"]
            ev = layout.evaluate(task, fraction, seed)
            argv = [
                "evaluate", *models, *_tests(spec, cache), "--val", f"{cache}:{spec.data.val_split}",
                "--threshold", spec.threshold, "--n-boot", "200", "--out", str(ev),
            ]  # fmt: skip
            title = f"evaluate: {task}, {fraction:.0%} labels, draw {seed}"
            steps.append(Step(title, tuple(argv), ev / "metrics.json"))
    return steps


def plan(spec: StudySpec, out: Path) -> list[Step]:
    """Every step of the study, in the order they must run."""
    layout = Layout(out)
    cache = cache_dir(spec, layout)
    steps = _data_steps(spec, layout)
    for name, p in spec.pretrain.items():
        if not any(s.pretrain == name for s in spec.starts.values()):
            continue  # a run no start uses is not trained
        run = layout.pretrain(name)
        argv = ("pretrain", "-c", p.config, f"data.cache={cache}", f"model.img_size={spec.data.size}",
                *p.overrides, "--out", str(run))  # fmt: skip
        steps.append(Step(f"pre-training: {name}", argv, run / "encoder.json"))
    for task in spec.tasks:
        if spec.probe.enabled:
            steps.append(_probe_step(spec, layout, task, cache))
        if spec.finetune.enabled:
            steps += _finetune_steps(spec, layout, task, cache)
    return steps


def run_steps(
    steps: Sequence[Step], runner: Callable[[list[str]], int], dry_run: bool = False
) -> dict[str, float]:
    """Run the steps not yet done, printing each command; return seconds per step title.

    Args:
        runner: runs one `sscxr` argv and returns its exit code (the CLI passes `sscxr.cli.main`, so
            this package never imports the command line).
        dry_run: only print what would run.

    Raises:
        SSCXRError: a step failed (the steps before it stay done; fix it and run the study again).
    """
    seconds: dict[str, float] = {}
    todo = [s for s in steps if not s.done]
    print(f"study: {len(steps)} steps, {len(steps) - len(todo)} already done, {len(todo)} to run", flush=True)
    for k, step in enumerate(todo, 1):
        print(f"\n== [{k}/{len(todo)}] {step.title} ==\n   $ {step.command}", flush=True)
        if dry_run:
            continue
        t0 = time.perf_counter()
        code = runner(list(step.argv))
        seconds[step.title] = round(time.perf_counter() - t0, 1)
        if code:
            raise SSCXRError(f"study step failed ({step.title}): '{step.command}' exited with {code}; "
                             "fix it, then run the study again (finished steps are kept)")  # fmt: skip
        if not step.done:
            raise SSCXRError(f"study step '{step.title}' ended without writing {step.marker}")
        print(f"   ({seconds[step.title]:.0f} s)", flush=True)
    return seconds


def write_commands(steps: Sequence[Step], path: Path) -> None:
    """Every command of the study as a shell script (for repeating any step by hand)."""
    from sscxr.utils import atomic_write_text

    lines = ["#!/usr/bin/env bash", "# The commands `sscxr study` runs, in order.", "set -euo pipefail", ""]
    for s in steps:
        lines += [f"# {s.title}", s.command, ""]
    atomic_write_text(path, "\n".join(lines))
