"""The job's export phase: integerise the distilled student, write the artifact, then
verify it with the independent interpreter (bit-exact int-sim agreement, fake-quant
agreement, zero float ops, no BN, bounds). A rerun re-checks what it would skip: an
artifact whose files changed since export is exported again."""

from __future__ import annotations

import json
import time

import numpy as np

from bnfree_jax.config_io import to_dict
from bnfree_jax.distill.ptl import final_student
from bnfree_jax.export.artifact import MANIFEST_FILE, TENSORS_FILE, write_artifact, write_manifest
from bnfree_jax.export.simulate import int_sim_batched
from bnfree_jax.export.integerize import integerize
from bnfree_jax.nn.network import STUDENT
from bnfree_jax.data.storage import Path, as_path, file_sha256
from bnfree_jax.train.evaluate import batched_outputs


def artifact_hashes(out_dir: Path) -> dict:
    """sha256 of the artifact's two files (None for a missing one)."""
    return {name: file_sha256(out_dir / name) if (out_dir / name).exists() else None
            for name in (TENSORS_FILE, MANIFEST_FILE)}


def _still_exported(ctx, ledger, key: str, out_dir: Path) -> bool:
    """The ledger's export is done and its files are byte for byte the ones it verified."""
    if not ledger.done(key):
        return False
    recorded = ledger.get(key).get("sha256")
    now = artifact_hashes(out_dir)
    if recorded and now == recorded:
        return True
    changed = [n for n in now if not recorded or now[n] != recorded.get(n)]
    ctx.log(f"[export] {out_dir}: {', '.join(changed)} changed or missing since it was verified; exporting again")
    return False


def integer_layers(ctx, params) -> tuple[list, dict]:
    """`integerize` of the job's student params: (integer layers, input spec)."""
    return integerize(ctx.nets.specs(quantized=True), params, ctx.info.mean, ctx.info.std, ctx.info.image_shape,
                      ctx.nets.per_channel)


def export_student(ctx, ledger, params=None, out_dir: Path | None = None, key: str = "export") -> dict:
    """Write the artifact (default WORKDIR/export) and its verification; returns the manifest.

    `key` names the ledger entry, so baselines export beside the main student."""
    from bnfree_jax import intsim

    out_dir = as_path(out_dir or ctx.workdir / "export")
    if _still_exported(ctx, ledger, key, out_dir):
        return json.loads((out_dir / MANIFEST_FILE).read_text())
    t0 = time.time()
    if params is None:
        params = final_student(ctx.nets, ctx.env.ptl, ctx.workdir / "ptl")
        if params is None:
            raise ValueError(f"{ctx.workdir}: distillation has not finished; run `bnfree distill` first")
    net = ctx.nets.network(STUDENT)
    layers, input_spec = integer_layers(ctx, params)
    images, labels = ctx.feed.eval_arrays()
    fq = batched_outputs(lambda p, x: net.apply({"params": p}, x), params, images)
    sim = int_sim_batched(layers, input_spec, images)
    config = to_dict(ctx.config)
    unverified = write_artifact(out_dir, layers=layers, input_spec=input_spec, config=config, metrics={})
    art = intsim.load_artifact(out_dir)
    logits, acc_max = intsim.run_int_with_stats(art, images, batch_size=1000)  # one interpreter pass
    logits = np.asarray(logits)
    audit = intsim.audit_float_ops(lambda x: intsim.run_int(art, x), images[:2])
    files = intsim.audit_artifact(out_dir)  # the raw files: dtypes, ops, names, unused tensors
    fq_pred, int_pred = fq.argmax(-1), logits.argmax(-1)
    metrics = {
        "n_images": int(len(labels)),
        "student_fakequant_top1": float(np.mean(fq_pred == labels)),
        "student_int_top1": float(np.mean(int_pred == labels)),
        "int_argmax_agreement": float(np.mean(fq_pred == int_pred)),
        "int_sim_bit_exact": bool(np.array_equal(sim, logits)),
        "interpreter_float_ops": int(audit["count"]),
        "bn_ops_in_artifact": int(files["normalisation"]),
        "float_tensors_in_artifact": int(files["float_tensors"]),
        "max_abs_acc": {layer.name: int(v) for layer, v in zip(art.layers, np.asarray(acc_max))},
        "min_accumulator_headroom_bits": min(b["headroom_bits"] for b in intsim.overflow_bounds(art)),
    }
    manifest = write_manifest(out_dir, {**unverified, "metrics": metrics})  # the tensors stay as written
    ledger.mark_done(key, seconds=round(time.time() - t0, 2), sha256=artifact_hashes(out_dir), **metrics)
    ctx.log(f"[export] int top-1 {metrics['student_int_top1']:.4f}  fake-quant {metrics['student_fakequant_top1']:.4f}  "
            f"agreement {metrics['int_argmax_agreement']:.4f}  bit-exact {metrics['int_sim_bit_exact']}  "
            f"float ops {metrics['interpreter_float_ops']}")
    return manifest
