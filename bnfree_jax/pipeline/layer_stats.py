"""The job's per-layer statistics phase: scales from the final student's parameters,
clipping ratios and pre-activation samples from one forward pass over evaluation
images, written to `report/layer_stats.*` for the report to read (it runs no network).
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from bnfree_jax.distill.ptl import final_student
from bnfree_jax.nn.network import STUDENT, TEACHER, record_quantizer_inputs
from bnfree_jax.nn.weights import along_input, student_weight
from bnfree_jax.nn.zoo import FLOAT_BITS, LayerSpec
from bnfree_jax.report.layer_stats import LayerInfo, LayerStats
from bnfree_jax.train.evaluate import batched_outputs
from bnfree_jax.train.variables import load_variables

MAX_HIST_VALUES = 100_000  # per layer; enough for a smooth histogram, small in memory


def has_act_quantizer(spec: LayerSpec) -> bool:
    """Whether the layer ends in a PACT quantiser (a learned clip act_alpha)."""
    return not spec.last and 1 < spec.a_bits < FLOAT_BITS


def weight_scales(specs, params: dict, inv_std, per_channel: bool) -> list:
    """The student's max-abs weight scale per layer (first layer: 1/std folded in first)."""
    out = []
    for i, s in enumerate(specs):
        p = params.get(s.name, {})
        if "kernel" not in p or not s.quantized:
            out.append(None)
            continue
        w = np.asarray(p["kernel"], np.float32)
        if i == 0:
            w = w * along_input(np.asarray(inv_std, np.float32), w.shape)
        scale = student_weight(w, s.w_bits, per_channel, s.weight_quantizer)[1]  # the layer's own quantizer's
        out.append(np.asarray(scale, np.float64).reshape(-1))
    return out


def act_alphas(specs, params: dict) -> list:
    return [float(np.asarray(params[s.name]["act_alpha"]))
            if has_act_quantizer(s) and "act_alpha" in params.get(s.name, {}) else None
            for s in specs]


def act_scales(specs, alphas) -> list:
    """PACT step size alpha / (2^A − 1); None where the layer has no PACT quantiser."""
    return [a / (2 ** s.a_bits - 1) if a is not None else None for s, a in zip(specs, alphas)]


def clip_ratio(x: Optional[np.ndarray], alpha: Optional[float]) -> Optional[float]:
    """Fraction of a quantizer's inputs (after pooling: what it sees) above the clip alpha,
    saturated at the top code; the training diagnostics' ``clip_hi`` also counts x == alpha."""
    if alpha is None or x is None:
        return None
    x = np.asarray(x)
    return float(np.count_nonzero(x > alpha) / max(x.size, 1))


def subsample(x: np.ndarray, n: int = MAX_HIST_VALUES, seed: int = 0) -> np.ndarray:
    x = np.asarray(x, np.float32).reshape(-1)
    if x.size <= n:
        return x
    return np.random.default_rng(seed).choice(x, n, replace=False)


def capture_pre(net, variables: dict, images: np.ndarray, batch: int = 128) -> list:
    """Pre-activations of every layer on `images`, as numpy arrays."""
    return batched_outputs(lambda v, x: [pre for _, pre in net.apply(v, x, capture=True)[1]],
                           variables, images, batch)


def quantizer_inputs(net, variables: dict, images: np.ndarray, batch: int = 128) -> list:
    """What each layer's activation quantizer sees on `images` (after pooling), as numpy
    arrays; None for a layer without one (float or logits)."""
    names = [s.name for s in net.specs]

    def run(v, x):
        with record_quantizer_inputs() as found:
            net.apply(v, x)
            return {n: found[n][0] for n in names if n in found}

    got = batched_outputs(run, variables, images, batch)
    return [got.get(n) for n in names]


def abstract_variables(nets, role: str) -> dict:
    """Shapes/dtypes of a network's variables, without running its (slow, eager) init."""
    import jax.numpy as jnp

    net = nets.network(role)
    tree = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, *nets.image_shape), jnp.uint8))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def load_teacher(nets, qat_dir) -> Optional[dict]:
    """The QAT teacher's variables (params + batch_stats), or None when it was not saved."""
    if not qat_dir.exists():
        return None
    return load_variables(qat_dir, abstract_variables(nets, TEACHER))


def _info(spec: LayerSpec) -> LayerInfo:
    return LayerInfo(name=spec.name, kind=spec.kind, last=spec.last,
                     w_bits=None if spec.w_bits >= FLOAT_BITS else spec.w_bits,
                     a_bits=None if spec.a_bits >= FLOAT_BITS else spec.a_bits)


def collect_layer_stats(nets, feed, student: Optional[dict], teacher: Optional[dict],
                        n_probe: int = 512, teacher_quantized: bool = True) -> Optional[LayerStats]:
    """Scales, clipping and histogram samples of the final student against `teacher` (the
    QAT teacher's variables, or with `teacher_quantized=False` the float teacher's); None
    without a student."""
    if student is None:
        return None
    specs = nets.specs(quantized=True)
    alphas = act_alphas(specs, student)
    images = feed.eval_arrays(n_probe)[0]
    s_pre = capture_pre(nets.network(STUDENT), {"params": student}, images) if len(images) else None
    s_in = quantizer_inputs(nets.network(STUDENT), {"params": student}, images) if len(images) else None
    t_pre = (capture_pre(nets.network(TEACHER, quantized=teacher_quantized), teacher, images)
             if len(images) and teacher else None)
    none = [None] * len(specs)
    return LayerStats(
        names=[s.name for s in specs], specs=[_info(s) for s in specs],
        weight_scale=weight_scales(specs, student, [1.0 / s for s in nets.std], nets.per_channel),
        act_scale=act_scales(specs, alphas), act_alpha=alphas,
        clip_ratio=[clip_ratio(x, a) for x, a in zip(s_in, alphas)] if s_in else none,
        student_pre=[subsample(p, seed=i) for i, p in enumerate(s_pre)] if s_pre else none,
        teacher_pre=[subsample(p, seed=i) for i, p in enumerate(t_pre)] if t_pre else none,
        n_probe=int(len(images)))


def job_layer_stats(ctx) -> Optional[LayerStats]:
    """The job's statistics of its final PTL student against its QAT teacher."""
    student = final_student(ctx.nets, ctx.env.ptl, ctx.workdir / "ptl")
    teacher = load_teacher(ctx.nets, ctx.workdir / "qat" / "variables") if student is not None else None
    return collect_layer_stats(ctx.nets, ctx.feed, student, teacher)
