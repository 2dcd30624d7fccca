"""Per-layer statistics of the final student (and the QAT teacher) for the report's plots.

Weight and activation scales come straight from the parameters; clipping ratios and
pre-activation histograms from one forward pass over a probe of test images, so the
plots show what the exported integer network will actually see.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from bnfree_jax.nn.zoo import FLOAT_BITS, LayerSpec

MAX_HIST_VALUES = 100_000  # per layer; enough for a smooth histogram, small in memory


@dataclasses.dataclass
class LayerStats:
    """Everything the per-layer plots need, one entry per layer (None = not applicable)."""

    names: list
    specs: list
    weight_scale: list  # np.ndarray (1 value per tensor, or 1 per output channel) | None
    act_scale: list  # float | None
    act_alpha: list  # float | None
    clip_ratio: list  # float | None
    student_pre: list  # np.ndarray sample | None
    teacher_pre: list  # np.ndarray sample | None
    n_probe: int = 0


def has_act_quantizer(spec: LayerSpec) -> bool:
    """Whether the layer ends in a PACT quantiser (a learned clip act_alpha)."""
    return not spec.last and 1 < spec.a_bits < FLOAT_BITS


def weight_scales(specs, params: dict, inv_std, per_channel: bool) -> list:
    """The student's max-abs weight scale per layer (first layer: 1/std folded in first)."""
    from bnfree_jax.nn.weights import maxabs_scale

    out = []
    for i, s in enumerate(specs):
        p = params.get(s.name, {})
        if "kernel" not in p or not s.quantized:
            out.append(None)
            continue
        w = np.asarray(p["kernel"], np.float32)
        if i == 0:
            w = w * np.asarray(inv_std, np.float32)[:, None]
        out.append(np.asarray(maxabs_scale(w, s.w_bits, per_channel), np.float64).reshape(-1))
    return out


def act_alphas(specs, params: dict) -> list:
    return [float(np.asarray(params[s.name]["act_alpha"]))
            if has_act_quantizer(s) and "act_alpha" in params.get(s.name, {}) else None
            for s in specs]


def act_scales(specs, alphas) -> list:
    """PACT step size alpha / (2^A − 1); None where the layer has no PACT quantiser."""
    return [a / (2 ** s.a_bits - 1) if a is not None else None for s, a in zip(specs, alphas)]


def clip_ratio(pre: np.ndarray, alpha: Optional[float]) -> Optional[float]:
    """Fraction of pre-activations above the clip alpha (saturated at the top code)."""
    if alpha is None:
        return None
    pre = np.asarray(pre)
    return float(np.count_nonzero(pre > alpha) / max(pre.size, 1))


def subsample(x: np.ndarray, n: int = MAX_HIST_VALUES, seed: int = 0) -> np.ndarray:
    x = np.asarray(x, np.float32).reshape(-1)
    if x.size <= n:
        return x
    return np.random.default_rng(seed).choice(x, n, replace=False)


def probe_images(ctx, n: int) -> np.ndarray:
    """The first `n` test images, preprocessed as at evaluation (uint8 NHWC)."""
    from bnfree_jax import data as data_lib

    batches, got = [], 0
    for b in data_lib.eval_batches(ctx.test_source, batch_size=min(128, n), process_index=0, process_count=1,
                                   image_size=ctx.config.data.image_size or None):
        imgs = np.asarray(b["image"])[np.asarray(b["mask"]) > 0]
        batches.append(imgs)
        got += len(imgs)
        if got >= n:
            break
    return np.concatenate(batches)[:n] if batches else np.zeros((0, *ctx.info.image_shape), np.uint8)


def capture_pre(net, variables: dict, images: np.ndarray, batch: int = 128) -> list:
    """Pre-activations of every layer on `images`, as numpy arrays (concatenated over batches).

    The last batch is padded to full size so the forward pass compiles once.
    """
    import jax

    fn = jax.jit(lambda v, x: [pre for _, pre in net.apply(v, x, capture=True)[1]])
    parts = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        n = len(x)
        if n < batch and len(images) > batch:
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
        parts.append([np.asarray(p)[:n] for p in fn(variables, x)])
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def abstract_variables(ctx, role: str) -> dict:
    """Shapes/dtypes of a network's variables, without running its (slow, eager) init."""
    import jax
    import jax.numpy as jnp

    net = ctx.network(role)
    tree = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, *ctx.info.image_shape), jnp.uint8))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def load_teacher(ctx) -> Optional[dict]:
    """The QAT teacher's variables (params + batch_stats), or None when it was not saved."""
    from bnfree_jax.pipeline.variables import load_variables

    path = ctx.workdir / "qat" / "variables"
    if not path.exists():
        return None
    return load_variables(path, abstract_variables(ctx, "teacher"))


def load_student(ctx, variant: str = "ptl") -> Optional[dict]:
    """The student after the last stage of the plan (params only), or None when absent."""
    from bnfree_jax.distill.plan import build_stage_plan
    from bnfree_jax.pipeline.variables import load_variables

    plan = build_stage_plan(ctx.config.ptl, [s.name for s in ctx.specs(quantized=True)])
    path = ctx.workdir / variant / plan[-1].name
    if not path.exists():
        return None
    like = {"S": abstract_variables(ctx, "student")["params"], "T": abstract_variables(ctx, "teacher")["params"]}
    return load_variables(path, like)["S"]


def collect_layer_stats(ctx, n_probe: int = 512, student=None, teacher=None) -> Optional[LayerStats]:
    """Scales, clipping and histogram samples of the final student; None without a student."""
    specs = ctx.specs(quantized=True)
    student = student if student is not None else load_student(ctx)
    if student is None:
        return None
    teacher = teacher if teacher is not None else load_teacher(ctx)
    per_channel = ctx.config.model.requant == "channel"
    alphas = act_alphas(specs, student)
    images = probe_images(ctx, n_probe)
    s_pre = capture_pre(ctx.network("student"), {"params": student}, images) if len(images) else None
    t_pre = capture_pre(ctx.network("teacher"), teacher, images) if len(images) and teacher else None
    none = [None] * len(specs)
    return LayerStats(
        names=[s.name for s in specs], specs=specs,
        weight_scale=weight_scales(specs, student, [1.0 / s for s in ctx.info.std], per_channel),
        act_scale=act_scales(specs, alphas), act_alpha=alphas,
        clip_ratio=[clip_ratio(p, a) for p, a in zip(s_pre, alphas)] if s_pre else none,
        student_pre=[subsample(p, seed=i) for i, p in enumerate(s_pre)] if s_pre else none,
        teacher_pre=[subsample(p, seed=i) for i, p in enumerate(t_pre)] if t_pre else none,
        n_probe=int(len(images)))
