"""What a study is: a YAML file naming the data, the pre-training runs, the encoder starts, the tasks,
the label fractions, the subset draws (seeds), the test sets and the evaluation modes.

The file is read into typed dataclasses; an unknown key is an error naming the nearest valid one, as
for run configs (`sscxr.config`). Relative paths in the file are relative to the current folder, as
every path given to an `sscxr` command is (run the built-in studies from the repository root).

    name: kermany
    data:
      importer: {layout: kermany, root: ../shared/data/kermany_train, args: [--split, "0.7,0.15,0.15"]}
      size: 128
    pretrain:
      gmml: {config: pretrain/gmml_cpu}
    starts:
      scratch: {init: scratch}
      SS-CXR: {init: sscxr, pretrain: gmml}
    tasks: [pneumonia_vs_healthy]
    fractions: [0.01, 0.1, 1.0]
    seeds: [0, 1, 2, 3, 4]
    tests: {held-out patients: test}
    probe: {features: avg4, pixels: 64}
    finetune: {config: classify/tiny, modes: [finetune, lp_ft]}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sscxr.config import did_you_mean, load_yaml, resolve_builtin, yaml_error_text
from sscxr.errors import ConfigError

__all__ = [
    "DataSpec",
    "FinetuneSpec",
    "ImporterSpec",
    "PretrainSpec",
    "ProbeSpec",
    "StartSpec",
    "StudySpec",
    "SynthSpec",
    "load_study",
    "resolve_study_path",
]

T = TypeVar("T")

#: Folder of the built-in studies (`sscxr study demo` finds `studies/demo.yaml`).
STUDY_DIR = Path(__file__).resolve().parent.parent / "studies"

MODES = ("finetune", "lp_ft", "frozen")


@dataclass
class SynthSpec:
    """The built-in synthetic cohort (`sscxr synth`)."""

    n_adult: int = 600
    n_pediatric: int = 90
    size: int = 256
    seed: int = 0
    acquisition_jitter: float = 1.0


@dataclass
class ImporterSpec:
    """A published layout read by `sscxr import LAYOUT ROOT [ARGS...]`."""

    layout: str = "folder"
    root: str = ""
    args: list[str] = field(default_factory=list)


@dataclass
class DataSpec:
    """Where the images come from: an existing cache, an existing manifest, an importer or the synthetic
    cohort (first one given wins, in that order), and the cache's image size."""

    cache: str | None = None
    manifest: str | None = None
    importer: ImporterSpec | None = None
    synth: SynthSpec | None = None
    size: int = 128
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class PretrainSpec:
    """One pre-training run of the study: `sscxr pretrain -c CONFIG OVERRIDES`."""

    config: str = "pretrain/gmml_cpu"
    overrides: list[str] = field(default_factory=list)


@dataclass
class StartSpec:
    """An encoder start compared in the study.

    Attributes:
        init: "scratch", "sscxr" (a GMML run) or "timm" (an external file, e.g. ImageNet weights).
        pretrain: name of one of the study's `pretrain` runs (for init=sscxr).
        path: an existing weight file or run folder (instead of `pretrain`).
    """

    init: str = "scratch"
    pretrain: str | None = None
    path: str | None = None


@dataclass
class ProbeSpec:
    """Frozen-encoder evaluation (`sscxr probe`): linear and k-NN probes with the reference rows."""

    enabled: bool = True
    features: str = "avg4"
    pixels: int = 64
    random: bool = True
    knn: bool = True
    args: list[str] = field(default_factory=list)


@dataclass
class FinetuneSpec:
    """Fine-tuning (`sscxr finetune` then `sscxr evaluate`) for every start, mode, fraction and seed.

    Attributes:
        config: the fine-tuning config.
        modes: "finetune", "lp_ft" (head from a linear probe, then fine-tuning) and / or "frozen";
            a scratch start is only fine-tuned (a probe of random features is the probe's own row).
        overrides: dotted overrides for every run.
        fraction_overrides: extra overrides per label fraction (e.g. fewer epochs at 100%).
    """

    enabled: bool = True
    config: str = "classify/tiny"
    modes: list[str] = field(default_factory=lambda: ["finetune"])
    overrides: list[str] = field(default_factory=list)
    fraction_overrides: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class StudySpec:
    """A whole comparison; see the module docstring for an example.

    Attributes:
        seeds: the labelled-subset draws (also the training seed of each fine-tuning).
        fraction_seeds: draws for particular fractions (e.g. {"1.0": [0]}: at 100% of the labels every
            draw is the same subset, so more seeds only measure training noise).
        tests: test-set name -> "split" (of the study's cache) or "CACHE:SPLIT".
        compare_to: reference rows every row is compared with ("START MODE"; the paired difference).
        threshold: operating-point rule, chosen on validation (`sscxr evaluate --threshold`).
    """

    name: str = "study"
    data: DataSpec = field(default_factory=DataSpec)
    pretrain: dict[str, PretrainSpec] = field(default_factory=dict)
    starts: dict[str, StartSpec] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=lambda: ["healthy_vs_pathology"])
    fractions: list[float] = field(default_factory=lambda: [0.1])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    fraction_seeds: dict[str, list[int]] = field(default_factory=dict)
    tests: dict[str, str] = field(default_factory=lambda: {"test": "test"})
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    compare_to: list[str] = field(default_factory=lambda: ["scratch finetune", "pixels linear"])
    threshold: str = "youden"
    n_boot: int = 1000
    seed: int = 0

    def seeds_for(self, fraction: float) -> list[int]:
        """The draws run at `fraction`."""
        for key, seeds in self.fraction_seeds.items():
            if abs(float(key) - fraction) < 1e-12:
                return list(seeds)
        return list(self.seeds)

    def overrides_for(self, fraction: float) -> list[str]:
        """Fine-tuning overrides at `fraction` (the shared ones, then the fraction's own)."""
        extra: list[str] = []
        for key, values in self.finetune.fraction_overrides.items():
            if abs(float(key) - fraction) < 1e-12:
                extra = list(values)
        return [*self.finetune.overrides, *extra]


def _origin_type(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _origin_type(non_none[0]) if len(non_none) == 1 else (tp, ())
    return origin or tp, args


def _build(tp: Any, value: Any, where: str) -> Any:
    """`value` (parsed YAML) as type `tp`, recursively; ConfigError names the key `where`."""
    if value is None:
        return None
    origin, args = _origin_type(tp)
    if dataclasses.is_dataclass(origin):
        return _from_dict(origin, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _build(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if origin is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if origin in (int, float, str, bool) and not (
        isinstance(value, origin) and not (origin is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {origin.__name__}, got {value!r}")
    return value


def _from_dict(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{key}'.{did_you_mean(str(key), list(fields))}")
        kwargs[key] = _build(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


# Keys the study sets per run; an override of them would silently make every draw the same run.
STUDY_KEYS = ("train.seed", "classify.subset_seed", "classify.labelled_fraction", "classify.task",
              "classify.init", "classify.init_path", "classify.mode", "data.cache")  # fmt: skip


def _check_overrides(spec: StudySpec, origin: str) -> None:
    """Refuse fine-tuning overrides of the keys the study sets itself for each draw and row."""
    lists = {"finetune.overrides": spec.finetune.overrides}
    lists.update({f"finetune.fraction_overrides.{k}": v for k, v in spec.finetune.fraction_overrides.items()})
    for where, overrides in lists.items():
        for item in overrides:
            key = item.split("=", 1)[0].strip()
            if key in STUDY_KEYS:
                raise ConfigError(
                    f"{origin}: {where} sets {key!r}, which the study sets for each run (draws come from "
                    "'seeds', rows from 'starts' and 'finetune.modes'); remove it"
                )


def _check(spec: StudySpec, origin: str) -> None:
    """Cross-field checks: every reference names something the study defines."""
    if not spec.starts:
        raise ConfigError(f"{origin}: 'starts' is empty: name at least one encoder start (e.g. scratch)")
    for name, start in spec.starts.items():
        if start.init not in ("scratch", "sscxr", "timm"):
            raise ConfigError(
                f"{origin}: starts.{name}.init must be scratch, sscxr or timm, got {start.init!r}"
            )
        if start.init != "scratch" and not (start.pretrain or start.path):
            raise ConfigError(f"{origin}: starts.{name} (init={start.init}) needs 'pretrain' or 'path'")
        if start.pretrain and start.pretrain not in spec.pretrain:
            known = ", ".join(spec.pretrain) or "none"
            raise ConfigError(
                f"{origin}: starts.{name}.pretrain={start.pretrain!r} is not a pretrain run ({known})"
            )
    for f in spec.fractions:
        if not 0.0 < f <= 1.0:
            raise ConfigError(f"{origin}: fractions must lie in (0, 1], got {f}")
    for key in [*spec.fraction_seeds, *spec.finetune.fraction_overrides]:
        try:
            float(key)
        except ValueError:
            raise ConfigError(f"{origin}: {key!r} is not a label fraction (e.g. 1.0)") from None
    _check_overrides(spec, origin)
    bad = [m for m in spec.finetune.modes if m not in MODES]
    if bad:
        raise ConfigError(f"{origin}: finetune.modes {bad} not in {MODES}")
    if not spec.seeds or not spec.tasks or not spec.tests:
        raise ConfigError(f"{origin}: 'seeds', 'tasks' and 'tests' must not be empty")
    d = spec.data
    if not (d.cache or d.manifest or d.importer or d.synth):
        raise ConfigError(f"{origin}: data needs one of cache, manifest, importer or synth")


def resolve_study_path(name: str) -> Path:
    """A study given by path, or by name among the built-in ones (`demo`, `kermany`)."""
    return resolve_builtin(name, STUDY_DIR, "study")


def load_study(name: str, overrides: dict[str, Any] | None = None) -> StudySpec:
    """Read and check a study file (path or built-in name); `overrides` replace top-level keys."""
    path = resolve_study_path(name)
    try:
        data = load_yaml(path.read_text()) or {}
    except Exception as e:  # yaml errors carry the line
        raise ConfigError(f"{path}: not valid YAML ({yaml_error_text(e)}); fix the file") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (name, data, starts, ...)")
    data.update(overrides or {})
    spec = _from_dict(StudySpec, data, str(path))
    _check(spec, str(path))
    return spec
