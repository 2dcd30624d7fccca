"""Export the distilled student, then verify the artifact with the independent interpreter:
bit-exact int-sim agreement, fake-quant agreement, zero float ops, no BN, bounds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bnfree_jax.distill.plan import build_stage_plan
from bnfree_jax.export.artifact import write_artifact
from bnfree_jax.export.int_sim import int_sim_batched
from bnfree_jax.export.integerize import integerize
from bnfree_jax.nn.network import STUDENT
from bnfree_jax.pipeline.context import config_json
from bnfree_jax.pipeline.variables import load_variables


def load_split(source) -> tuple[np.ndarray, np.ndarray]:
    ids = list(range(len(source)))
    recs = source.__getitems__(ids) if hasattr(source, "__getitems__") else [source[i] for i in ids]
    return (np.stack([r["image"] for r in recs]).astype(np.uint8),
            np.asarray([r["label"] for r in recs], np.int32))


def final_student(ctx, variant: str = "ptl") -> dict:
    names = [s.name for s in ctx.specs(quantized=True)]
    last = build_stage_plan(ctx.config.ptl, names)[-1].name
    x = jnp.zeros((1, *ctx.info.image_shape), jnp.uint8)
    shapes = lambda net: jax.eval_shape(net.init, jax.random.PRNGKey(0), x)["params"]
    zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)
    like, qat_like = zeros(shapes(ctx.network(STUDENT))), zeros(shapes(ctx.network("teacher")))
    return load_variables(ctx.workdir / variant / last, {"S": like, "T": qat_like})["S"]


def fake_quant_logits(net, params, images, batch: int = 1000) -> np.ndarray:
    fn = jax.jit(lambda p, x: net.apply({"params": p}, x))
    return np.concatenate([np.asarray(fn(params, jnp.asarray(images[i:i + batch])))
                           for i in range(0, len(images), batch)])


def count_bn_ops(manifest: dict) -> int:
    """Ops or tensors in the artifact that look like batch normalisation (must be 0)."""
    words = ("batchnorm", "batch_norm", "bn")
    ops = [str(l.get("kind", "")).lower() for l in manifest["layers"]] + \
          [str(l.get("output", "")).lower() for l in manifest["layers"]]
    names = [n.lower() for n in manifest.get("tensors", {})]
    return sum(1 for t in ops + names if any(t == w or t.startswith(w + "_") or w in t.split(".") for w in words))


def export_student(ctx, ledger, params=None, out_dir: Path | None = None, key: str = "export") -> dict:
    """Write the artifact (default WORKDIR/export) and its verification; returns the manifest.

    `key` names the ledger entry, so baselines export beside the main student."""
    from bnfree_jax import intsim

    out_dir = Path(out_dir or ctx.workdir / "export")
    if ledger.done(key) and (out_dir / "manifest.json").exists():
        return json.loads((out_dir / "manifest.json").read_text())
    t0 = time.time()
    specs = ctx.specs(quantized=True)
    params = params if params is not None else final_student(ctx)
    net = ctx.network(STUDENT)
    layers, input_spec = integerize(specs, params, ctx.info.mean, ctx.info.std, ctx.info.image_shape,
                                    net.per_channel)
    images, labels = load_split(ctx.test_source)
    fq = fake_quant_logits(net, params, images)
    sim = int_sim_batched(layers, input_spec, images)
    manifest = write_artifact(out_dir, layers=layers, input_spec=input_spec, config=config_json(ctx.config),
                              metrics={})
    art = intsim.load_artifact(out_dir)
    logits, acc_max = intsim.run_int_with_stats(art, images, batch_size=1000)  # one interpreter pass
    logits = np.asarray(logits)
    audit = intsim.audit_float_ops(lambda x: intsim.run_int(art, x), images[:2])
    fq_pred, int_pred = fq.argmax(-1), logits.argmax(-1)
    metrics = {
        "n_images": int(len(labels)),
        "student_fakequant_top1": float(np.mean(fq_pred == labels)),
        "student_int_top1": float(np.mean(int_pred == labels)),
        "int_argmax_agreement": float(np.mean(fq_pred == int_pred)),
        "int_sim_bit_exact": bool(np.array_equal(sim, logits)),
        "interpreter_float_ops": int(audit["count"]),
        "bn_ops_in_artifact": count_bn_ops(manifest),
        "max_abs_acc": {layer.name: int(v) for layer, v in zip(art.layers, np.asarray(acc_max))},
        "min_accumulator_headroom_bits": min(b["headroom_bits"] for b in intsim.overflow_bounds(art)),
    }
    manifest = write_artifact(out_dir, layers=layers, input_spec=input_spec,
                              config=config_json(ctx.config), metrics=metrics)
    ledger.mark_done(key, seconds=round(time.time() - t0, 2), **metrics)
    ctx.log(f"[export] int top-1 {metrics['student_int_top1']:.4f}  fake-quant {metrics['student_fakequant_top1']:.4f}  "
            f"agreement {metrics['int_argmax_agreement']:.4f}  bit-exact {metrics['int_sim_bit_exact']}  "
            f"float ops {metrics['interpreter_float_ops']}")
    return manifest
