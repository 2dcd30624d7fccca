"""A job's workdir: pins the config it was started with, refuses a silently changed one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bnfree_jax.config_io import ConfigError, changed_keys, to_dict

GENERATED = ("checkpoints", "teacher", "qat", "ptl", "baselines", "export", "report", "phases.json",
             "metrics.jsonl", "config.json")


def pin_config(config, workdir: Path, force: bool = False) -> None:
    """Write workdir/config.json, or check the existing one matches (`force` starts over)."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir {workdir} cannot be created: {e.strerror or e}") from None
    path = workdir / "config.json"
    new = to_dict(config)
    if path.exists() and not force:
        old = json.loads(path.read_text())
        diff = changed_keys(old, new)
        if diff:
            raise ConfigError(f"workdir {workdir} was started with a different config "
                              f"(changed: {', '.join(diff)}); use --force to start over")
        return
    if force:
        for name in GENERATED:
            p = workdir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    try:
        path.write_text(json.dumps(new, indent=1, sort_keys=True))
    except OSError as e:
        raise ConfigError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
