"""Pre-training methods: one registry that `sscxr pretrain` reads (`method: gmml | mae | ...`).

A method is a name, a builder `(cfg, seed, device) -> (task, train_set, val_set)` and the built-in config
used when the user names none. Adding a method is one `register_method` call next to its task; the
engine, checkpoints, resume, DDP, the CLI and `sscxr study` need no change. Builders are imported when
the method is used, so listing the methods (e.g. for `--help`) stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sscxr.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from sscxr.tasks.base import Task

    Built = tuple[Task, Dataset[Any], Dataset[Any] | None]

__all__ = ["PretrainMethod", "method_names", "pretrain_method", "register_method"]


@dataclass(frozen=True)
class PretrainMethod:
    """A pre-training method.

    Attributes:
        name: what `method:` in a pre-training config says.
        builder: "module:function" of the builder, `(cfg, seed, device) -> (task, train_set, val_set)`.
        default_config: the built-in config used when `sscxr pretrain` is given none.
        summary: one line for `--help` and errors.
    """

    name: str
    builder: str
    default_config: str
    summary: str

    def build(self, cfg: Any, seed: int, device: torch.device | None = None) -> Built:
        """Build this method's task and datasets from a resolved pre-training config."""
        module, _, function = self.builder.partition(":")
        build: Callable[..., Built] = getattr(importlib.import_module(module), function)
        return build(cfg, seed=seed, device=device)


_METHODS: dict[str, PretrainMethod] = {}


def register_method(method: PretrainMethod) -> PretrainMethod:
    """Add a method (a name may be registered once); returns it."""
    if method.name in _METHODS and _METHODS[method.name] != method:
        raise ValueError(f"a pre-training method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    """The registered methods' names, sorted."""
    return sorted(_METHODS)


def pretrain_method(name: str) -> PretrainMethod:
    """The method called `name`; ConfigError naming the known ones otherwise."""
    if name not in _METHODS:
        known = ", ".join(f"{m} ({_METHODS[m].summary})" for m in method_names())
        raise ConfigError(f"method={name!r} is not a pre-training method; known: {known}")
    return _METHODS[name]


register_method(
    PretrainMethod(
        "gmml",
        "sscxr.tasks.gmml:build_pretraining",
        "pretrain/gmml_vit_s16",
        "group-masked model learning: reconstruct noise- or image-corrupted patch groups",
    )
)
register_method(
    PretrainMethod(
        "mae",
        "sscxr.tasks.mae:build_mae",
        "pretrain/mae_vit_s16",
        "masked autoencoder: reconstruct 75% dropped patches from the visible ones",
    )
)
