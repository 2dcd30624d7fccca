"""Load ml_collections config files (`path.py[:arg]`), apply `key=value` overrides, and
compare a job's config with the one its workdir was started with."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Sequence

import ml_collections


class ConfigError(ValueError):
    """A bad config file, key or value (reported as one line)."""


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    mod_spec = importlib.util.spec_from_file_location("bnfree_user_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
        raise ConfigError(f"{path}:{arg}: {e}") from None
    for item in overrides:
        apply_override(config, item)
    return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """`a.b.c=value` with value a Python literal (or a bare string); unknown keys refused."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            raise ConfigError(f"unknown config key {key!r}")
        node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(f"unknown config key {key!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if old is not None and type(old) is not type(value):
        raise ConfigError(f"{key}={raw!r}: expected {type(old).__name__}, got {type(value).__name__}")
    node[leaf] = value


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


def to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())
