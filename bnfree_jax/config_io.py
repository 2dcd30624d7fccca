"""Load ml_collections config files (`path.py[:arg]`), apply `key=value` overrides, and
compare a job's config with the one its workdir was started with. (Values are checked by
`pipeline.validate`: `load_valid_config` is what the command line calls.)"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
from pathlib import Path
from typing import Sequence

import ml_collections


class ConfigError(ValueError):
    """A bad config file, key or value (reported as one line)."""


# Keys older configs carried that nothing reads: a workdir pinned with them still resumes.
RETIRED = ("export.logit_bits", "distributed.")


# Keys whose value is a number or a name (model.act_init: a constant clip, or a calibrator
# that sets the clips): an override may change one kind for the other.
NUMBER_OR_NAME = ("model.act_init",)


# Keys added later with a default: a workdir pinned before them, without the key, was
# started with that default and still resumes.
ADDED = {"model.weight_quantizer": "maxabs", "model.act_quantizer": "pact", "model.plugins": [],
         "model.layers": [], "model.bias_grid": False,
         # the input pipeline and metrics fetches as they were before these keys existed
         "checkpoint.log_every": 50, "checkpoint.grad_diagnostics": True, "data.workers": 0, "data.read_threads": 2,
         "data.prefetch": 4, "ptl.train_own_activation": False, "ptl.block_layers": 1,
         "ptl.stage_budget": "equal",
         "mesh.cpu_devices": 0, "sweep.ptl": "first"}


def setting(config, key: str):
    """`config`'s value at the dotted `key`; a key of `ADDED` that an older config lacks
    reads as its default (the one place those defaults live)."""
    node = config
    for part in key.split("."):
        if part not in node:
            return ADDED[key]
        node = node[part]
    return node


def with_added(config, section: str) -> ml_collections.ConfigDict:
    """A copy of `config[section]` holding every key of `ADDED` under it, the absent ones at
    their defaults (what a workdir pinned before them ran with): code handed the section
    (distill's `Env.ptl`) reads its keys without defaults of its own."""
    out = ml_collections.ConfigDict(config[section].to_dict())
    for key in ADDED:
        head, _, name = key.partition(".")
        if head == section and name not in out:
            out[name] = ADDED[key]
    return out


def is_retired(key: str) -> bool:
    """True for a flattened key of `RETIRED` (an entry ending in '.' retires a whole section)."""
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RETIRED)


def _first_line(exc: BaseException, named: bool = True) -> str:
    """The exception as one line: 'Type: first line of its message' (or the message alone)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if not named and line:
        return line
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of `path.py[:arg]` with `key=value` overrides applied (its values are
    checked by `pipeline.validate.validate_config`, which every command calls first).

    Whatever goes wrong in the user's file (it raises, defines no get_config, returns
    no ConfigDict) ends as one ConfigError line naming the file."""
    path, _, arg = spec.partition(":")
    config = _call_get_config(path, arg)
    for item in overrides:
        apply_override(config, item)
    return config


def config_of_file(path: str, arg: str = "") -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path` (one config file building on another,
    e.g. the sweep configs on configs/mnist_alexnet.py), its failures one ConfigError line."""
    return _call_get_config(str(path), arg)


def _call_get_config(path: str, arg: str) -> ml_collections.ConfigDict:
    """Import the file and call its get_config(arg), turning every failure into a ConfigError."""
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    mod_spec = importlib.util.spec_from_file_location("bnfree_user_config", path)
    if mod_spec is None or mod_spec.loader is None:
        raise ConfigError(f"{path} is not a Python config file (FILE.py[:ARG])")
    try:
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is one line
        raise ConfigError(f"{path} cannot be loaded: {_first_line(e)}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"{path} defines no get_config()")
    where = f"{path}:{arg}" if arg else path
    try:
        config = get_config(arg) if arg else get_config()
    except ValueError as e:  # the file's own refusal (e.g. an unknown argument): its message as is
        raise ConfigError(f"{where}: {_first_line(e, named=False)}") from None
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{where}: get_config() failed: {_first_line(e)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{where}: get_config() returned {type(config).__name__}, "
                          "not an ml_collections.ConfigDict")
    if isinstance(config, ml_collections.FrozenConfigDict):  # overrides need a mutable one
        config = ml_collections.ConfigDict(config)
    return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """`a.b.c=value` with value a Python literal (or a bare string); unknown keys, whole
    sections (`model=3`) and values of another type than the key's are refused."""
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
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"override {item!r}: {key!r} is a section, not a value; "
                          f"override one of its keys ({key}.KEY=VALUE)")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if key in NUMBER_OR_NAME and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with node.ignore_type():
            node[leaf] = float(value) if isinstance(value, int) else value
        return
    if old is not None and type(old) is not type(value):
        raise ConfigError(f"{key}={raw!r}: expected {type(old).__name__}, got {type(value).__name__}")
    node[leaf] = value


def import_plugins(names: Sequence[str]) -> list[str]:
    """Import the user's plug-in modules (`model.plugins`), which register quantizers, and
    return the sha256 of each one's file, in order, so a job can pin what it trained with.

    Any failure (not importable, its code raises, no file to pin) is one ConfigError line
    naming the module."""
    hashes = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module is one line
            raise ConfigError(f"model.plugins: cannot import {name!r}: {_first_line(e)}") from None
        path = getattr(module, "__file__", None)
        if not path or not Path(path).is_file():
            raise ConfigError(f"model.plugins: {name!r} has no source file whose sha256 could be pinned")
        hashes.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
    return hashes


def flatten(d, prefix: str = "") -> dict:
    """{'a.b.c': leaf} of a nested dict or ConfigDict."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (dict, ml_collections.ConfigDict)):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    """Keys whose value differs between two configs (retired keys do not count; an absent
    key of `ADDED` counts as its default)."""
    a, b = flatten(old), flatten(new)
    get = lambda d, k: d.get(k, ADDED.get(k, "<absent>"))
    return sorted(k for k in a.keys() | b.keys() if not is_retired(k) and get(a, k) != get(b, k))


def to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())
