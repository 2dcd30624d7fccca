"""What the chip runs, checked and measured on whatever JAX finds (CPU here, GPU or TPU unchanged).

Builds the job's networks from the config (configs/mnist_alexnet.py, or with --imagenet
configs/alexnet_imagenet.py: AlexNet at 224x224, 1000 classes) on synthetic uint8 batches,
and runs the project's own code paths: the teacher phase through `train.phase.train_phase`,
a middle PTL stage through `distill.stage_runner.run_stage` (frozen prefix, T'_l target, the
teacher's logits computed in the step), then times both steps through `train.loop.run_loop`.

Prints one final JSON line:
  platform, devices, device_kind, log_every, batch, compute_dtype, model, image_shape,
  teacher_step_images_per_s, ptl_stage_step_images_per_s (the loop's wall time over --steps
    steps after compiling; includes the loop's host work, batches placed by the loop);
  frozen_h2d_bytes_per_step, state_h2d_bytes_per_step: MEASURED on every step call of the
    stage and the teacher phase: bytes of the frozen tree / train state that are not arrays
    replicated on the mesh (each such leaf is copied host->device on every call); the
    phases' loops run under jax.transfer_guard_host_to_device("disallow") as well, and
    `h2d_guard_passed` says whether they got through it;
  bf16_conv_dot_fraction: share of the conv/dot ops (forward and backward, sub-jaxprs
    included) of the teacher, QAT and PTL-stage steps built with compute_dtype=bfloat16
    whose operands are all bfloat16;
  codes_equal_f32_bf16: every quantizer the networks use (and LSQ, uniform, DoReFa) gives
    the same codes and scales on bf16 inputs as on the same values in float32;
  host_syncs_per_100_steps: calls of the loop's one fetch function (`loop._fetch`) during the
    timed runs, per 100 steps;
  mfu_teacher: the teacher step's FLOPs per device (XLA's cost analysis of the compiled
    step, `train.telemetry.compiled_flops`) over its measured step time and the chip's peak
    (`mfu_peak_flops`): the table's dense bf16 figure on a TPU/GPU, on a CPU the measured
    rate of a large float32 matmul (`mfu_peak_source` says which);
  input_images_per_s: the host's input pipeline on a prepared ImageNet miniature with the
    `imagenet` augmentation, keyed by grain worker count "0", "1", "2"
    (bench/input_pipeline.py; `--input-images 0` skips it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit, machine  # noqa: E402
from bnfree_jax import quant  # noqa: E402
from bnfree_jax.config_io import load_config, setting  # noqa: E402
from bnfree_jax.data.info import dataset_info  # noqa: E402
from bnfree_jax.distill.plan import build_stage_plan  # noqa: E402
from bnfree_jax.distill.ptl import stage_loss  # noqa: E402
from bnfree_jax.distill.stage_runner import Trees, run_stage  # noqa: E402
from bnfree_jax.nn.factory import NetFactory  # noqa: E402
from bnfree_jax.nn.network import STUDENT, TEACHER  # noqa: E402
from bnfree_jax.nn.weights import student_codes  # noqa: E402
from bnfree_jax.nn.zoo import get_layer_specs  # noqa: E402
from bnfree_jax.pipeline.context import quant_specs  # noqa: E402
from bnfree_jax.train import loop, phase  # noqa: E402
from bnfree_jax.train.mesh import make_mesh, replicated, shard_batch  # noqa: E402
from bnfree_jax.train.optim import make_optimizer  # noqa: E402
from bnfree_jax.train.telemetry import chip_peak_flops, compiled_flops  # noqa: E402
from bnfree_jax.train.runtime import Runtime  # noqa: E402
from bnfree_jax.train.state import create_train_state  # noqa: E402
from bnfree_jax.train.step import conv_dot_operand_dtypes, make_train_step  # noqa: E402
from bnfree_jax.train.supervised import classification_loss, init_variables  # noqa: E402

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


class SyntheticBatches:
    """A checkpointable endless stream of host uint8 batches (`pool` distinct ones, cycled so
    that making them costs the loop nothing after the first)."""

    def __init__(self, batch: int, image_shape, classes: int, seed: int = 0, pool: int = 4):
        rng = np.random.default_rng(seed)
        self.pool = [{"image": rng.integers(0, 256, (batch, *image_shape), dtype=np.uint8),
                      "label": rng.integers(0, classes, (batch,), dtype=np.int32)} for _ in range(pool)]
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        b = self.pool[self.index % len(self.pool)]
        self.index += 1
        return b

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])

    def close(self):
        pass


def host_bytes(tree, mesh) -> int:
    """Bytes of `tree`'s leaves that a jitted step must copy to the devices on every call: all
    but arrays already replicated on `mesh`."""
    want = replicated(mesh)
    total = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(want, x.ndim):
            continue
        total += int(np.asarray(x).nbytes) if not isinstance(x, jax.Array) else int(x.nbytes)
    return total


class Probe:
    """Wraps the phase module's step builder and loop: records each phase's loss, optimizer,
    step, placed frozen tree and final state, tallies per step call the host bytes of the
    frozen tree and the state, and runs the loops under the disallow transfer guard."""

    def __init__(self, mesh):
        self.mesh, self.phases, self.guard_passed = mesh, [], True
        self._make, self._run = phase.make_train_step, phase.run_loop

    def __enter__(self):
        phase.make_train_step, phase.run_loop = self.make_train_step, self.run_loop
        return self

    def __exit__(self, *exc):
        phase.make_train_step, phase.run_loop = self._make, self._run

    def make_train_step(self, loss_fn, tx, mesh, **kw):
        real = self._make(loss_fn, tx, mesh, **kw)
        rec = {"loss_fn": loss_fn, "tx": tx, "step_fn": real, "calls": 0, "frozen_bytes": 0, "state_bytes": 0}
        self.phases.append(rec)

        def tallied(state, frozen, batch):
            rec["calls"] += 1
            rec["frozen_bytes"] += host_bytes(frozen, self.mesh)
            rec["state_bytes"] += host_bytes(state, self.mesh)
            return real(state, frozen, batch)

        return tallied

    def run_loop(self, **kw):
        rec = self.phases[-1]
        rec["frozen"] = kw["frozen"]
        try:
            with jax.transfer_guard_host_to_device("disallow"):
                rec["state"] = self._run(**kw)
        except jax.errors.JaxRuntimeError as e:
            if "Disallowed host-to-device transfer" not in str(e):
                raise
            self.guard_passed = False  # measure what crossed: run again without the guard
            rec["state"] = self._run(**kw)
        return rec["state"]


def timed_loop(rec, batches, mesh, steps: int, log_every: int) -> tuple[float, int]:
    """(seconds, host fetches) of `steps` more steps of a compiled phase through the loop."""
    fetches = []
    real_fetch = loop._fetch
    loop._fetch = lambda tree: (fetches.append(1), real_fetch(tree))[1]
    try:
        state = rec["state"]
        start = int(jax.device_get(state.step))
        t0 = time.perf_counter()
        rec["state"] = loop.run_loop(step_fn=rec["step_fn"], state=state, frozen=rec["frozen"], batches=batches,
                                     mesh=mesh, num_steps=start + steps, log_every=log_every, progress=False,
                                     phase="timed")
        seconds = time.perf_counter() - t0
    finally:
        loop._fetch = real_fetch
    return seconds, len(fetches)


def bf16_fraction(builds, mesh, batch) -> float:
    """Share of conv/dot ops whose operands are all bf16, over the steps built in bf16."""
    total = low = 0
    for loss_fn, tx, state, frozen in builds:
        step = make_train_step(loss_fn, tx, mesh, donate=False, compute_dtype=jnp.bfloat16)
        ops = conv_dot_operand_dtypes(jax.make_jaxpr(step)(state, frozen, batch))
        total += len(ops)
        low += sum(all(d == "bfloat16" for d in dtypes) for _, dtypes in ops)
    return round(low / max(total, 1), 4)


def codes_equal(model_cfg) -> bool:
    """The networks' quantizers (and the other built-ins) on bf16 inputs vs the same values in f32."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0, 0.05, (3, 3, 16, 32)), jnp.bfloat16)
    a = jnp.asarray(np.abs(rng.normal(0, 1.5, 8192)), jnp.bfloat16)
    x = jnp.asarray(rng.normal(0, 1.5, 8192), jnp.bfloat16)
    wb, ab = model_cfg.w_bits, model_cfg.a_bits
    cases = [
        (lambda v: quant.symmetric_weight(v, wb, as_qtensor=True), w),
        (lambda v: quant.symmetric_weight(v, wb, -1, as_qtensor=True), w),
        (lambda v: quant.pact_quantize(v, 3.1, max(ab, 2), as_qtensor=True), a),
        (lambda v: quant.lsq_quantize(v, 0.37, 4, True, as_qtensor=True), x),
        (lambda v: quant.uniform_quantize(v, 0.0113, 8, False, as_qtensor=True), a),
        (lambda v: quant.dorefa_weight(v, 3, as_qtensor=True), w),
        (lambda v: quant.dorefa_activation(v, 4, as_qtensor=True), a),
    ]
    same = all(np.array_equal(np.asarray(f(v).codes, np.float32), np.asarray(f(v.astype(jnp.float32)).codes))
               and np.array_equal(np.asarray(f(v).scale, np.float32), np.asarray(f(v.astype(jnp.float32)).scale))
               for f, v in cases)
    for per_channel in (False, True):
        c16, _ = student_codes(w, wb, per_channel)
        c32, _ = student_codes(w.astype(jnp.float32), wb, per_channel)
        same = same and np.array_equal(np.asarray(c16), np.asarray(c32))
    return bool(same)


def cpu_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 n×n matmul on the first device (best of `repeats`)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_seconds(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n ** 3 / best


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def input_rates(images: int) -> dict:
    """images/s of the input pipeline at 0, 1, 2 workers (bench/input_pipeline.py's setup)."""
    from input_pipeline import images_per_s, write_imagenet_source

    from bnfree_jax.data.imagenet import prepare_imagenet
    from bnfree_jax.data.sources import TfdsSource

    with tempfile.TemporaryDirectory() as tmp:
        src = write_imagenet_source(Path(tmp) / "ilsvrc", images)
        prepare_imagenet(src, os.path.join(tmp, "tfds"), resize=256, workers=os.cpu_count(), progress=False)
        source = TfdsSource("imagenet2012", "train", data_dir=os.path.join(tmp, "tfds"))
        return {str(w): images_per_s(source, batch=64, batches=6, workers=w, threads=2, augment="imagenet",
                                     image_size=224) for w in (0, 1, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--imagenet", action="store_true", help="AlexNet, 224x224x3, 1000 classes")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default 32; 256 with --imagenet)")
    ap.add_argument("--compute-dtype", choices=sorted(DTYPES), default=None,
                    help="of the timed steps (default: the config's mesh.compute_dtype)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per step kind")
    ap.add_argument("--log-every", type=int, default=None, help="default: the config's checkpoint.log_every")
    ap.add_argument("--stage", type=int, default=None, help="PTL stage (1-based layer); default the middle one")
    ap.add_argument("--input-images", type=int, default=192,
                    help="training images of the input-pipeline miniature (0: skip that measurement)")
    args = ap.parse_args(argv)
    config = load_config("configs/alexnet_imagenet.py" if args.imagenet else "configs/mnist_alexnet.py")
    batch = args.batch or (256 if args.imagenet else 32)
    log_every = args.log_every or setting(config, "checkpoint.log_every")
    dtype_name = args.compute_dtype or config.mesh.compute_dtype
    d, m = config.data, config.model
    info = dataset_info(d.name, image_size=d.image_size or None)
    nets = NetFactory(float_specs=tuple(get_layer_specs(m.name, m.num_classes)),
                      quant_specs=tuple(quant_specs(config)),
                      mean=tuple(info.mean), std=tuple(info.std), image_shape=tuple(info.image_shape),
                      requant=m.requant, act_init=m.act_init)
    mesh = make_mesh()
    shape, classes = tuple(info.image_shape), m.num_classes
    stream = lambda seed: SyntheticBatches(batch // jax.process_count(), shape, classes, seed)  # noqa: E731
    work = tempfile.mkdtemp(prefix="accel_check_")
    rt = Runtime(mesh, log=lambda msg: None, save_every=10 ** 9, keep=1, log_every=log_every,
                 compute_dtype=DTYPES[dtype_name])
    key = jax.random.key(0)

    with Probe(mesh) as probe:
        # The teacher phase as the job runs it (BN network, cross-entropy, its optimizer).
        teacher_net = nets.network(TEACHER, quantized=False, bn_axis_name="data")
        tv = init_variables(teacher_net, shape, key)
        tx = make_optimizer(config.teacher.optim, 1000)
        like = create_train_state(tv["params"], tx, model_state={"batch_stats": tv["batch_stats"]})
        phase.train_phase("teacher", os.path.join(work, "teacher"), like, {}, classification_loss(teacher_net),
                          tx, stream(1), 2, rt)
        teacher = probe.phases[-1]
        # A middle PTL stage through run_stage: split trees, staged optimizer, placement.
        qat_net = nets.network(TEACHER, bn_axis_name="data")
        qat = init_variables(nets.network(TEACHER), shape, jax.random.key(1))
        student = init_variables(nets.network(STUDENT), shape, jax.random.key(2))["params"]
        trees = Trees(S=student, T=dict(qat["params"]), Tbs=dict(qat["batch_stats"]), teacher=qat)
        ptl = config.ptl.copy_and_resolve_references()
        ptl.batch = batch
        plan = build_stage_plan(ptl, nets.layer_names)
        layer = args.stage or (len(nets.layer_names) + 1) // 2
        stage = dataclasses.replace(next(s for s in plan if s.kind == "tandem" and s.layer == layer), steps=2)
        env = types.SimpleNamespace(nets=nets, rt=rt, ptl=ptl, seed=0,
                                    feed=types.SimpleNamespace(train_batches=lambda b, seed, mesh: stream(seed % 1000)))
        loss = stage_loss(env, stage, nets.network(STUDENT), nets.network(TEACHER))
        run_stage(env, stage, trees, loss, ptl.optim, os.path.join(work, "stage"))
        stage_rec = probe.phases[-1]
    frozen_bytes = stage_rec["frozen_bytes"] / max(stage_rec["calls"], 1)  # the teacher phase has none
    state_bytes = (teacher["state_bytes"] + stage_rec["state_bytes"]) / max(teacher["calls"] + stage_rec["calls"], 1)

    t_teacher, f_teacher = timed_loop(teacher, stream(3), mesh, args.steps, log_every)
    t_stage, f_stage = timed_loop(stage_rec, stream(4), mesh, args.steps, log_every)
    placed = shard_batch(next(stream(5)), mesh)
    flops = compiled_flops(teacher["step_fn"], *jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (teacher["state"], teacher["frozen"], placed)))
    peak, peak_source = chip_peak_flops(jax.devices()[0].device_kind), "table (dense bf16)"
    if peak is None:
        peak, peak_source = cpu_matmul_peak(), "measured float32 matmul"
    qtx = make_optimizer(config.qat.optim, 1000)
    builds = [(teacher["loss_fn"], teacher["tx"], teacher["state"], teacher["frozen"]),
              (classification_loss(qat_net), qtx,
               phase.on_mesh(create_train_state(qat["params"], qtx, model_state={"batch_stats": qat["batch_stats"]}),
                             mesh), {}),
              (stage_rec["loss_fn"], stage_rec["tx"], stage_rec["state"], stage_rec["frozen"])]
    emit({
        "bench": "accel_check", "platform": jax.devices()[0].platform, "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind, "processes": jax.process_count(),
        "model": m.name, "image_shape": list(shape), "batch": batch, "compute_dtype": dtype_name,
        "ptl_stage": stage.name, "steps": args.steps, "log_every": log_every,
        "teacher_step_images_per_s": round(batch * args.steps / t_teacher, 2),
        "ptl_stage_step_images_per_s": round(batch * args.steps / t_stage, 2),
        "teacher_step_ms": round(1000 * t_teacher / args.steps, 2),
        "ptl_stage_step_ms": round(1000 * t_stage / args.steps, 2),
        "frozen_h2d_bytes_per_step": frozen_bytes, "state_h2d_bytes_per_step": state_bytes,
        "h2d_guard_passed": probe.guard_passed,
        "bf16_conv_dot_fraction": bf16_fraction(builds, mesh, placed),
        "codes_equal_f32_bf16": codes_equal(m),
        "host_syncs_per_100_steps": round(100 * (f_teacher + f_stage) / (2 * args.steps), 2),  # the end's included
        "teacher_step_flops_per_device": flops,
        "mfu_teacher": round(flops / (t_teacher / args.steps) / peak, 4) if flops else None,
        "mfu_peak_flops": peak, "mfu_peak_source": peak_source,
        "input_images_per_s": input_rates(args.input_images) if args.input_images else None,
        "jax": jax.__version__, "machine": machine(),
    })
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
