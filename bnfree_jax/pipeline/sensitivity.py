"""`bnfree sensitivity`: how much each layer of a finished job cares about its bit width,
and the per-layer widths that fit an artifact-size budget at the least loss.

A layer's sensitivity at b bits is the increase of the fake-quant student's validation
loss when that layer alone drops to b bits (its weights and its output activation; the
logits layer's weights only), every other layer as the job trained it. The proposal
picks one width per layer, minimising the sum of those increases (assumed additive, as
in mixed-precision search by per-layer sensitivity) under the budget: an exact
multiple-choice knapsack over each layer's options, kept as a Pareto front of
(bytes, loss) so deep networks cost no more than a few thousand comparisons. The result
is a `model.layers` rule list to paste into a config; the job it describes is the
measurement, so nothing here claims an accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Sequence

import numpy as np

from bnfree_jax.config_io import ConfigError
from bnfree_jax.data import get_source
from bnfree_jax.data.storage import Path, as_path, write_text_atomic
from bnfree_jax.distill.ptl import final_student
from bnfree_jax.export.packing import packed_nbytes
from bnfree_jax.nn.network import STUDENT
from bnfree_jax.nn.zoo import LayerSpec
from bnfree_jax.train.evaluate import batched_outputs

CANDIDATE_BITS = (1, 2, 4, 8)  # the widths a proposal may give a layer
PROBE_BITS = (1, 2, 4)  # the widths measured; one at or above the job's own counts as no loss


def at_bits(spec: LayerSpec, bits: int) -> LayerSpec:
    """`spec` dropped to at most `bits` in its weights and its output activation (never
    raised: a width the job did not train has no parameters to measure it with, e.g. no
    clip for an activation it trained binary; logits stay unquantised)."""
    a = spec.a_bits if spec.last else min(bits, spec.a_bits)
    return dataclasses.replace(spec, w_bits=min(bits, spec.w_bits), a_bits=a)


def weight_shapes(params: dict, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Each layer's kernel shape in the student's parameter tree."""
    return {n: tuple(np.shape(params[n]["kernel"])) for n in names}


def layer_bytes(shape: Sequence[int], bits: int, per_channel: bool) -> int:
    """Artifact tensor bytes of one layer at `bits`: packed weight codes, an int32 bias
    per output channel, and an int32 multiplier and shift per requantisation scale."""
    cout = int(shape[-1])
    scales = cout if per_channel else 1
    return packed_nbytes(math.prod(shape), bits) + 4 * cout + 8 * scales


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy, in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(labels)), labels]))


def evaluate_specs(nets, specs, params, images, labels) -> tuple[float, float]:
    """(loss, top-1) of the fake-quant student built from `specs` on the given images."""
    net = dataclasses.replace(nets, quant_specs=tuple(specs)).network(STUDENT)
    logits = batched_outputs(lambda p, x: net.apply({"params": p}, x), params, images)
    return cross_entropy(logits, labels), float(np.mean(logits.argmax(-1) == labels))


def measure(nets, params, images, labels, bits: Sequence[int] = PROBE_BITS, log=print) -> dict:
    """The job's own loss and, per layer and width, the loss and top-1 with that layer alone
    at that width."""
    specs = list(nets.specs(True))
    base_loss, base_top1 = evaluate_specs(nets, specs, params, images, labels)
    layers = {}
    for i, s in enumerate(specs):
        rows = {}
        for b in bits:
            if at_bits(s, b) == s:
                continue  # not a drop: counted as no loss
            trial = specs[:i] + [at_bits(s, b)] + specs[i + 1:]
            loss, top1 = evaluate_specs(nets, trial, params, images, labels)
            rows[str(b)] = {"loss": loss, "delta_loss": loss - base_loss, "top1": top1}
            log(f"[sensitivity] {s.name} at {b} bit{'s' if b > 1 else ''}: loss {loss:.4f} "
                f"({loss - base_loss:+.4f}), top-1 {100 * top1:.2f} %")
        layers[s.name] = {"w_bits": s.w_bits, "a_bits": s.a_bits, "at": rows}
    return {"loss": base_loss, "top1": base_top1, "layers": layers}


def cost(entry: dict, bits: int) -> float:
    """A layer's measured loss increase at `bits`, floored at 0 (a width not measured, at or
    above the job's own, counts as no loss)."""
    probe = entry["at"].get(str(bits))
    return max(0.0, probe["delta_loss"]) if probe else 0.0


def _options(entry: dict, shape, per_channel: bool) -> list[tuple[int, float, int]]:
    """(bytes, loss increase, bits) of each candidate width of one layer."""
    return [(layer_bytes(shape, b, per_channel), cost(entry, b), b) for b in CANDIDATE_BITS]


def allocate(table: dict, shapes: dict, per_channel: bool, budget: int) -> dict[str, int] | None:
    """Per-layer widths minimising the summed loss increase with total bytes <= `budget`
    (None if even every layer at 1 bit is over it). Exact: a Pareto front of partial
    choices, layer by layer."""
    front = [(0, 0.0, ())]  # (bytes, summed delta, widths so far)
    for name, entry in table["layers"].items():
        grown = [(nb + ob, d + od, bits + (ob_bits,)) for nb, d, bits in front
                 for ob, od, ob_bits in _options(entry, shapes[name], per_channel)
                 if nb + ob <= budget]
        grown.sort(key=lambda t: (t[0], t[1]))
        front, best = [], math.inf
        for t in grown:  # keep a choice only if it loses less than every cheaper one
            if t[1] < best:
                front.append(t)
                best = t[1]
        if not front:
            return None
    nbytes, delta, bits = min(front, key=lambda t: (t[1], t[0]))
    return dict(zip(table["layers"], bits))


def as_rules(widths: dict[str, int], last: str) -> list[tuple[str, dict]]:
    """`model.layers` rules for `widths`: one rule per set of layers sharing a width."""
    groups: dict[int, list[str]] = {}
    for name, b in widths.items():
        groups.setdefault(b, []).append(name)
    rules = []
    for b, names in sorted(groups.items(), reverse=True):
        over = {"w_bits": b}
        if any(n != last for n in names):
            over["a_bits"] = b
        hidden = [n for n in names if n != last]
        if hidden:
            rules.append(("|".join(hidden), dict(over)))
        if last in names:
            rules.append((last, {"w_bits": b}))
    return rules


def validation_arrays(ctx, examples: int):
    """Images the job never evaluated on for its figures: its held-out split when it has
    one (`data.holdout`), else the last `examples` training examples (which it trained on:
    a measure of sensitivity, not of accuracy)."""
    d = ctx.config.data
    if d.holdout:
        return ctx.feed.eval_arrays(examples), "holdout"
    train = get_source(d.name, "train", d.data_dir or None)
    n = min(int(examples), len(train))
    source = train.window(len(train) - n, n)  # the same open reader, not a second one
    return dataclasses.replace(ctx.feed, eval_source=source).eval_arrays(), "train"


def run_sensitivity(ctx, budget_bytes: int | None, examples: int, out_dir: Path, log=print) -> dict:
    """Measure, propose, write `out_dir`/sensitivity.json; returns what it wrote."""
    if examples < 1:
        raise ConfigError(f"--examples must be at least 1, got {examples}")
    params = final_student(ctx.nets, ctx.env.ptl, ctx.workdir / "ptl")
    if params is None:
        raise ConfigError(f"{ctx.workdir}: distillation has not finished; run `bnfree run` first")
    names = ctx.nets.layer_names
    shapes = weight_shapes(params, names)
    per_channel = ctx.nets.per_channel
    total = lambda widths: sum(layer_bytes(shapes[n], widths[n], per_channel) for n in names)
    sizes = {"job": total({s.name: s.w_bits for s in ctx.nets.specs(True)}),
             **{f"w{b}": total(dict.fromkeys(names, b)) for b in CANDIDATE_BITS}}
    if budget_bytes is not None and budget_bytes < sizes["w1"]:
        raise ConfigError(f"--budget-bytes {budget_bytes} is below the smallest artifact of this "
                          f"network ({sizes['w1']} B with every layer at 1 bit)")
    (images, labels), split = validation_arrays(ctx, examples)
    table = measure(ctx.nets, params, images, labels, log=log)
    out = {"split": split, "n_images": int(len(labels)), **table, "bytes": sizes}
    if budget_bytes is not None:
        widths = allocate(table, shapes, per_channel, int(budget_bytes))
        out["proposal"] = {
            "budget_bytes": int(budget_bytes), "widths": widths, "bytes": total(widths),
            "sum_delta_loss": sum(cost(table["layers"][n], b) for n, b in widths.items()),
            "rules": as_rules(widths, names[-1])}
    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "sensitivity.json", json.dumps(out, indent=2) + "\n")
    return out
