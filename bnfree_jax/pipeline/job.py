"""A job's workdir: pins the config it was started with, refuses a silently changed one."""

from __future__ import annotations

from bnfree_jax.config_io import ConfigError, changed_keys, flatten, to_dict
from bnfree_jax.data.storage import Path, as_path, remove
from bnfree_jax.pipeline.jsonfile import read_json, write_json
from bnfree_jax.pipeline.ledger import Ledger

GENERATED = ("checkpoints", "teacher", "qat", "ptl", "ptq", "baselines", "export", "report", "tensorboard", "profile",
             "phases.json", "metrics.jsonl", "config.json")


def read_pinned(workdir: Path) -> dict:
    """The config a workdir's job was started with (its config.json), or a one-line error."""
    path = as_path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{workdir} holds no job (no config.json); run `bnfree distill` or `bnfree run` first")
    return read_json(path, "it is this workdir's pinned config: restore it, or use --force to start over")


PLUGIN_HASHES = "model.plugin_sha256"
# Derived keys recorded from the others (pipeline.context.record_layer_table): a workdir
# pinned before one existed lacks it, and its other keys pin the same value.
DERIVED = ("model.layer_table",)


def config_changes(old: dict, new: dict) -> list[str]:
    """The keys a rerun changed (`changed_keys`), a derived key the pinned config lacks excepted."""
    pinned = flatten(old)
    return [k for k in changed_keys(old, new) if not (k in DERIVED and k not in pinned)]


def describe_change(key: str, old: dict, new: dict) -> str:
    """A changed key as the refusal names it; a plug-in's sha256 names the plug-in modules."""
    if key != PLUGIN_HASHES:
        return key
    pairs = lambda c: dict(zip(c.get("model", {}).get("plugins", []), c.get("model", {}).get("plugin_sha256", [])))
    a, b = pairs(old), pairs(new)
    names = [n for n in dict.fromkeys([*a, *b]) if a.get(n) != b.get(n)]
    return f"{key}: the file of plug-in {', '.join(repr(n) for n in names)}" if names else key


def pin_config(config, workdir: Path, force: bool = False) -> None:
    """Write workdir/config.json, or check the existing one matches (`force` starts over).

    Process 0 checks, deletes and writes first; the others check once it is done, so
    none reads a file process 0 is still writing."""
    import jax

    from bnfree_jax.train.distributed import primary_first

    workdir = as_path(workdir)
    primary_first(lambda: _pin(config, workdir, force, primary=jax.process_index() == 0),
                  "bnfree_pin_config")


def _pin(config, workdir: Path, force: bool, primary: bool) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir {workdir} cannot be created: {e.strerror or e}") from None
    path = workdir / "config.json"
    new = to_dict(config)
    if path.exists() and (not force or not primary):
        old = read_pinned(workdir)
        diff = config_changes(old, new)
        if diff:
            raise ConfigError(f"workdir {workdir} was started with a different config "
                              f"(changed: {', '.join(describe_change(k, old, new) for k in diff)}); "
                              "use --force to start over")
        if primary:
            _record_layers(workdir, new)
        return
    if not primary:
        return
    if force:
        for name in GENERATED:
            remove(workdir / name)
    try:  # atomic: a crash mid-write never leaves a truncated config
        write_json(path, new, indent=1, sort_keys=True)
    except OSError as e:
        raise ConfigError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
    _record_layers(workdir, new)


def _record_layers(workdir: Path, config: dict) -> None:
    """The pinned config's per-layer table also into the ledger (phases.json)."""
    table = config.get("model", {}).get("layer_table")
    if table is not None:
        Ledger(workdir).record_layers(table)
