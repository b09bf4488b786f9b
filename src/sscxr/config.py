"""Run configurations: typed dataclasses, then YAML, then dotted command-line overrides.

Merge order follows dinov2: the dataclass defaults, then each YAML file given with ``-c``, then
``a.b=value`` overrides. Unknown keys are rejected with the nearest valid key suggested (a typo in a
config must never be silently ignored). The resolved config is saved in the run folder and inside each
checkpoint, so every result can be traced back to exactly what produced it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sscxr.data.transforms import AugmentConfig
from sscxr.engine.config import OptimConfig, TrainConfig
from sscxr.errors import ConfigError
from sscxr.models.vit import ViTConfig
from sscxr.tasks.gmml import GMMLConfig
from sscxr.tasks.mae import MAEConfig

T = TypeVar("T")


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so `amp: off` stays the string "off"."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


# YAML 1.1 reads "1e-4" (no dot) as a string; accept it as a float, as YAML 1.2 does.
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text with 1.2 booleans (see `_Yaml12Loader`)."""
    # yaml.load is safe here: _Yaml12Loader is a SafeLoader subclass (no arbitrary objects).
    return yaml.load(text, Loader=_Yaml12Loader)


def yaml_error_text(e: yaml.YAMLError) -> str:
    """One line for a YAML parse error: where (line, column) and what, without PyYAML's caret drawing."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        context = f" ({e.context})" if e.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}{context}"
    return " ".join(str(e).split())


#: Folder of the built-in configs (`-c tiny` finds `configs/tiny.yaml`).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class DataConfig:
    """Which prepared cache to train on, and how to read it."""

    cache: str = ""  # folder written by `sscxr prepare`
    train_split: str = "train"
    val_split: str = "val"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # A patient in two splits (or a held-out site in training) is refused; true = warn and go on.
    allow_leakage: bool = False


@dataclass
class PretrainConfig:
    """Everything `sscxr pretrain` needs: the method (`sscxr.tasks.methods`) and its own section."""

    method: str = "gmml"  # gmml | mae (sscxr.tasks.methods)
    data: DataConfig = field(default_factory=DataConfig)
    model: ViTConfig = field(default_factory=ViTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gmml: GMMLConfig = field(default_factory=GMMLConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)


def _dataclass_keys(cls: type, prefix: str = "") -> set[str]:
    """All dotted keys a (nested) dataclass accepts, e.g. {"train.epochs", "model.depth", ...}."""
    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.add(key)
        ftype = f.type if isinstance(f.type, type) else None
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if ftype is None and default is not None and dataclasses.is_dataclass(default):
            ftype = type(default)
        if ftype is not None and dataclasses.is_dataclass(ftype):
            keys |= _dataclass_keys(ftype, key + ".")
    return keys


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.append(key)
            out += _flatten(v, key + ".")
        else:
            out.append(key)
    return out


def did_you_mean(key: str, valid: Sequence[str]) -> str:
    """ " Did you mean 'x'?" for the valid key nearest to `key`, or "" when none is near."""
    near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f" Did you mean '{near[0]}'?" if near else ""


def _check_keys(given: Mapping[str, Any], cls: type, origin: str) -> None:
    """Raise ConfigError for the first unknown key, suggesting the nearest valid one."""
    valid = _dataclass_keys(cls)
    for key in _flatten(given):
        if key not in valid:
            raise ConfigError(f"{origin}: unknown config key '{key}'.{did_you_mean(key, valid)}")


def resolve_builtin(name: str, folder: Path, what: str) -> Path:
    """A YAML file given by path, or by name among the built-in ones in `folder` (`tiny`, `pretrain/x`).

    Raises:
        ConfigError: neither, listing the built-in names (`what` names the kind: "config", "study").
    """
    path = Path(name)
    if path.is_file():
        return path
    for cand in (folder / name, folder / f"{name}.yaml"):
        if cand.is_file():
            return cand
    builtin = sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))
    raise ConfigError(f"{what} '{name}' not found: not a file, nor a built-in {what} ({', '.join(builtin)}).")


def resolve_config_path(name: str) -> Path:
    """A config given by path, or by name among the built-in ones (`tiny`, `pretrain/gmml_vit_s16`)."""
    return resolve_builtin(name, CONFIG_DIR, "config")


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.epochs=10).")
        key, raw = item.split("=", 1)
        value = load_yaml(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return nested


def _writable(node: Any) -> Any:
    """Clear the read-only flag OmegaConf puts on frozen dataclasses, so layers can be merged in."""
    OmegaConf.set_readonly(node, None)
    if isinstance(node, DictConfig):
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                _writable(child)
    return node


def load_config(cls: type[T], paths: Sequence[str] = (), overrides: Sequence[str] = ()) -> T:
    """Build a config of type `cls` from defaults, YAML files and dotted overrides.

    Args:
        cls: the run-config dataclass (e.g. `PretrainConfig`).
        paths: YAML files (or built-in names) merged in order.
        overrides: `a.b=value` strings; values are parsed as YAML (`1e-4`, `[6, 8]`, `true`).

    Returns:
        An instance of `cls` with types checked by OmegaConf.
    """
    merged = _writable(OmegaConf.structured(cls))
    layers: list[tuple[str, dict[str, Any]]] = []
    for p in paths:
        path = resolve_config_path(p)
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({yaml_error_text(e)}); fix the file.") from e
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, ...).")
        layers.append((str(path), data))
    layers.append(("command line", _parse_overrides(overrides)))
    for origin, data in layers:
        _check_keys(data, cls, origin)
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            raise ConfigError(f"{origin}: {key + ': ' if key else ''}{e}".split("\n")[0]) from None
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except (ValueError, TypeError) as e:  # a section's own check (e.g. ViTConfig: img_size % patch_size)
        origins = ", ".join(o for o, _ in layers)
        raise ConfigError(f"invalid config ({e}); from {origins}").with_traceback(None) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {e}".split("\n")[0]) from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-safe dict of a config (tuples become lists)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def config_to_yaml(cfg: Any) -> str:
    """The config as YAML text, as saved in run folders."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
