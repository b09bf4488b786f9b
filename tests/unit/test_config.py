"""Configs: defaults < YAML < overrides, typed, unknown keys rejected with a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest

from sscxr.config import CONFIG_DIR, PretrainConfig, config_to_yaml, load_config, load_yaml
from sscxr.errors import ConfigError


def test_merge_order_defaults_yaml_overrides(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  epochs: 7\n  batch_size: 8\nmodel:\n  depth: 4\n")
    b = tmp_path / "b.yaml"
    b.write_text("train:\n  epochs: 9\n")
    cfg = load_config(PretrainConfig, [str(a), str(b)], ["train.batch_size=2", "optim.blr=1e-4"])
    assert cfg.train.epochs == 9 and cfg.train.batch_size == 2 and cfg.model.depth == 4
    assert cfg.optim.blr == pytest.approx(1e-4) and isinstance(cfg.optim.blr, float)
    assert cfg.model.embed_dim == PretrainConfig().model.embed_dim  # untouched default


def test_unknown_key_suggests_nearest() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch'.*'train\.epochs'"):
        load_config(PretrainConfig, [], ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"'gmml\.corruption\.p_replace'"):
        load_config(PretrainConfig, [], ["gmml.corruption.p_replac=0.2"])


def test_unknown_key_in_yaml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  embed_dims: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'model\.embed_dims'.*'model\.embed_dim'"):
        load_config(PretrainConfig, [str(bad)])


def test_wrong_type_and_bad_value_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        load_config(PretrainConfig, [], ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"train\.amp"):
        load_config(PretrainConfig, [], ["train.amp=fp8"])


def test_yaml_12_booleans_and_floats() -> None:
    expected = {"a": "off", "b": False, "c": 1e-4, "d": [6, 8]}
    assert load_yaml("a: off\nb: false\nc: 1e-4\nd: [6, 8]") == expected
    assert load_config(PretrainConfig, [], ["train.amp=off"]).train.amp == "off"


def test_builtin_configs_load_and_round_trip(tmp_path: Path) -> None:
    names = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.glob("pretrain/*.yaml"))
    for name in [*names, "tiny"]:
        cfg = load_config(PretrainConfig, [name])
        saved = tmp_path / f"{name.replace('/', '_')}.yaml"
        saved.write_text(config_to_yaml(cfg))
        assert load_config(PretrainConfig, [str(saved)]) == cfg
    s16 = load_config(PretrainConfig, ["pretrain/gmml_vit_s16"])
    m = s16.model
    assert (m.img_size, m.patch_size, m.embed_dim, m.depth) == (256, 16, 384, 12)
    assert s16.gmml.recon_blocks == [6, 8, 10, 12] and s16.gmml.corruption.noise_ratio == (0.5, 0.7)


def test_missing_config_lists_builtins() -> None:
    with pytest.raises(ConfigError, match="tiny"):
        load_config(PretrainConfig, ["no_such_config"])
