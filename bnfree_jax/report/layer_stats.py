"""The per-layer statistics file of a job (`report/layer_stats.json` + `.npz`): what the
job measured on its final student, read back by the plots and the tables.

The job's pipeline measures and writes it; the report only reads it, so drawing a
report never runs a network."""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Optional

import numpy as np

from etils.epath import Path

JSON_FILE, NPZ_FILE = "layer_stats.json", "layer_stats.npz"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What the report shows of a layer; a float width is None."""

    name: str
    kind: str
    w_bits: Optional[int]
    a_bits: Optional[int]
    last: bool


@dataclasses.dataclass
class LayerStats:
    """Everything the per-layer plots need, one entry per layer (None = not applicable)."""

    names: list
    specs: list  # LayerInfo
    weight_scale: list  # np.ndarray (1 value per tensor, or 1 per output channel) | None
    act_scale: list  # float | None
    act_alpha: list  # float | None
    clip_ratio: list  # float | None
    student_pre: list  # np.ndarray sample | None
    teacher_pre: list  # np.ndarray sample | None
    n_probe: int = 0


def save_layer_stats(stats: LayerStats, out_dir) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, (ws, s, t) in enumerate(zip(stats.weight_scale, stats.student_pre, stats.teacher_pre)):
        for key, v in (("weight_scale", ws), ("student_pre", s), ("teacher_pre", t)):
            if v is not None:
                arrays[f"{key}/{i}"] = np.asarray(v)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (out_dir / NPZ_FILE).write_bytes(buf.getvalue())
    meta = {"names": stats.names, "specs": [dataclasses.asdict(s) for s in stats.specs],
            "act_scale": stats.act_scale, "act_alpha": stats.act_alpha, "clip_ratio": stats.clip_ratio,
            "n_probe": stats.n_probe}
    (out_dir / JSON_FILE).write_text(json.dumps(meta, indent=1))


def load_layer_stats(out_dir) -> Optional[LayerStats]:
    """The saved statistics, or None when the job wrote none (no final student)."""
    out_dir = Path(out_dir)
    if not (out_dir / JSON_FILE).exists():
        return None
    meta = json.loads((out_dir / JSON_FILE).read_text())
    n = len(meta["names"])
    with np.load(io.BytesIO((out_dir / NPZ_FILE).read_bytes()), allow_pickle=False) as z:
        get = lambda key: [z[f"{key}/{i}"] if f"{key}/{i}" in z.files else None for i in range(n)]
        weight_scale, student_pre, teacher_pre = get("weight_scale"), get("student_pre"), get("teacher_pre")
    return LayerStats(names=meta["names"], specs=[LayerInfo(**s) for s in meta["specs"]],
                      weight_scale=weight_scale, act_scale=meta["act_scale"], act_alpha=meta["act_alpha"],
                      clip_ratio=meta["clip_ratio"], student_pre=student_pre, teacher_pre=teacher_pre,
                      n_probe=int(meta["n_probe"]))
