"""Per-device loss functions of the three stage kinds, over split trainable/frozen trees.

Trees: `params = {"S": {layer: …}, "T": {layer: …}}` holds only the trainable (and slow)
groups, `frozen` holds the rest plus the working copy's BN statistics (`"Tbs"`) and the
original teacher's variables (`"teacher"`). Teacher parameters arrive as arguments, so
they are never baked into the compiled step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bnfree_jax.distill.losses import relative_mse, task_losses
from bnfree_jax.distill.plan import ACT_ALPHA
from bnfree_jax.nn.network import STUDENT, TEACHER


def merged(params: dict, frozen: dict, role: str) -> dict:
    return {**frozen.get(role, {}), **params.get(role, {})}


def tandem_variables(specs, l: int, student: dict, tprime: dict, tprime_stats: dict) -> dict:
    """Variables of `[S_1..S_l, T'_{l+1}..T'_L]`."""
    names = [s.name for s in specs]
    p = {n: (student[n] if i < l else tprime[n]) for i, n in enumerate(names)}
    bs = {n: tprime_stats[n] for n in names[l:] if n in tprime_stats}
    return {"params": p, "batch_stats": bs}


def tandem_roles(num_layers: int, l: int) -> tuple[str, ...]:
    return tuple(STUDENT if i < l else TEACHER for i in range(num_layers))


def teacher_targets(teacher_net, teacher_vars, images):
    """The original teacher in inference mode: logits and per-layer (activation, pre-activation)."""
    logits, trace = teacher_net.apply(teacher_vars, images, train=False, capture=True)
    return jax.lax.stop_gradient(logits), jax.tree.map(jax.lax.stop_gradient, trace)


def stage_targets(teacher_net, frozen, batch, l: int):
    """(teacher logits, teacher's post-BN output at layer ℓ) for stage ℓ: read from the batch
    where `CachedBatches` put them; otherwise the teacher runs only as far as it must
    (layer ℓ when the logits are cached, the whole network when they are not)."""
    if "t_logits" in batch and "t_target" in batch:
        return batch["t_logits"], batch["t_target"]
    if "t_logits" in batch:
        _, trace = teacher_net.apply(frozen["teacher"], batch["image"], train=False, stop=l, capture=True)
        return batch["t_logits"], jax.lax.stop_gradient(trace[l - 1][1])
    t_logits, t_trace = teacher_targets(teacher_net, frozen["teacher"], batch["image"])
    return t_logits, t_trace[l - 1][1]


def layer_target(target_net, teacher_net, frozen, batch, l: int, h, mode: str, first: int = 0):
    """Stage ℓ's target: `"tandem"`, T'_ℓ (the working copy as earlier stages compensated it,
    BN in inference mode) on the student's input h — for a block converting first..ℓ, the
    path T'_first..T'_ℓ on the student's input to layer `first`; `"teacher"`, the original
    teacher's post-BN output at ℓ on its own path (read from the batch when cached).
    `target_net` has T' from layer `first` (or ℓ) on."""
    first = first or l
    if mode == "tandem":
        variables = tandem_variables(target_net.specs, first - 1, frozen.get("S", {}), frozen["T"], frozen["Tbs"])
        _, trace = target_net.apply(variables, h, start=first - 1, stop=l, capture=True)
        return jax.lax.stop_gradient(trace[-1][1])
    return stage_targets(teacher_net, frozen, batch, l)[1]


def _student_input(tandem_net, variables, images, l: int, prefix_frozen: bool):
    """S_ℓ's input: the converted prefix S_1..S_{ℓ-1}, outside autodiff when frozen."""
    if l == 1:
        return images
    h = tandem_net.apply(variables, images, stop=l - 1)
    return jax.lax.stop_gradient(h) if prefix_frozen else h


def own_activation_output(tandem_net, variables, h, l: int):
    """S_ℓ's output with everything before its activation quantizer held constant: the
    downstream loss then reaches that quantizer (its STE's gradient with respect to its
    clip `act_alpha`) and nothing else of S_ℓ or of the prefix, whose pre-activation
    parameters learn from the layer-wise MSE alone."""
    name = tandem_net.specs[l - 1].name
    held = {k: v if k == ACT_ALPHA else jax.lax.stop_gradient(v) for k, v in variables["params"][name].items()}
    return tandem_net.apply({**variables, "params": {**variables["params"], name: held}},
                            jax.lax.stop_gradient(h), start=l - 1, stop=l)


def make_tandem_loss(tandem_net, target_net, teacher_net, l: int, losses: dict, temperature: float,
                     prefix_frozen: bool, target: str = "tandem", own_activation: bool = False, first: int = 0):
    """Stage ℓ: S_ℓ is fitted by the layer-wise MSE of its output to its target (see
    `layer_target`); T'_{ℓ+1..L} compensate by CE + KD of the tandem logits, which do
    not reach S_ℓ (its output enters T' through stop_gradient), except at ℓ = L where S_L
    produces the logits itself, and, with `own_activation` (`ptl.train_own_activation`),
    S_ℓ's activation clip (see `own_activation_output`). With a frozen prefix,
    S_1..S_{ℓ-1} run outside autodiff. `target_net` is the tandem network of stage ℓ-1
    (T'_ℓ still in place). A block (`first` < ℓ): S_first..S_ℓ are fitted together, the
    MSE of S_ℓ's output to T'_first..T'_ℓ's on the same input (the prefix before `first`
    frozen), and `target_net` is the tandem network with T' from `first` on."""
    specs = tandem_net.specs
    start = first or l  # the first layer the stage trains on its layer-wise loss
    if own_activation and start != l:
        raise ValueError("own_activation trains one converted layer's clip: not with a block")

    def loss_fn(params, model_state, frozen, batch, rng):
        del model_state, rng
        student, tprime = merged(params, frozen, "S"), merged(params, frozen, "T")
        variables = tandem_variables(specs, l, student, tprime, frozen["Tbs"])
        images = batch["image"]
        t_logits = batch["t_logits"] if "t_logits" in batch else stage_targets(teacher_net, frozen, batch, l)[0]
        h = _student_input(tandem_net, variables, images, start, prefix_frozen)
        goal = layer_target(target_net, teacher_net, {**frozen, "S": student, "T": tprime}, batch, l,
                            jax.lax.stop_gradient(h), target, start)
        act, trace = tandem_net.apply(variables, h, start=start - 1, stop=l, capture=True)
        layer_mse = relative_mse(trace[-1][1], goal)
        if l < len(specs):  # S_ℓ learns from its target; T' compensates through the task loss
            out = own_activation_output(tandem_net, variables, h, l) if own_activation else jax.lax.stop_gradient(act)
            logits = tandem_net.apply(variables, out, start=l)
        else:
            logits = act
        task, parts = task_losses(logits, batch["label"], t_logits, losses, temperature)
        loss = losses.get("layer_mse", 0.0) * layer_mse + task
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, ({}, {"layer_mse": layer_mse, "accuracy": acc, **parts})

    return loss_fn


def own_layer_error(tandem_net, target_net, teacher_net, l: int, trees, images, target: str,
                    first: int = 0) -> float:
    """Relative MSE of S_ℓ to its stage target on `images` (the quantity stage ℓ minimises;
    a block's: S_first..S_ℓ against T'_first..T'_ℓ)."""
    start = first or l
    variables = tandem_variables(tandem_net.specs, l, trees.S, trees.T, trees.Tbs)
    h = _student_input(tandem_net, variables, images, start, True)
    frozen = {"S": trees.S, "T": trees.T, "Tbs": trees.Tbs, "teacher": trees.teacher}
    goal = layer_target(target_net, teacher_net, frozen, {"image": images}, l, h, target, start)
    _, trace = tandem_net.apply(variables, h, start=start - 1, stop=l, capture=True)
    return float(relative_mse(trace[-1][1], goal))


def make_local_init_loss(student_net, teacher_net):
    """Every student layer fitted at once, each on the teacher's input to that layer."""
    specs = student_net.specs

    def loss_fn(params, model_state, frozen, batch, rng):
        del model_state, rng
        student = merged(params, frozen, "S")
        images = batch["image"]
        _, t_trace = teacher_targets(teacher_net, frozen["teacher"], images)
        total, metrics = 0.0, {}
        for i, spec in enumerate(specs):
            x = images if i == 0 else t_trace[i - 1][0]
            _, trace = student_net.apply({"params": student}, x, start=i, stop=i + 1, capture=True)
            err = relative_mse(trace[0][1], t_trace[i][1])
            metrics[f"mse/{spec.name}"] = err
            total = total + err
        return total / len(specs), ({}, metrics)

    return loss_fn


def make_finetune_loss(student_net, teacher_net, losses: dict, temperature: float):
    """The whole student end to end on CE + KD (global fine-tune, and the QAT baselines)."""

    def loss_fn(params, model_state, frozen, batch, rng):
        del model_state, rng
        student = merged(params, frozen, "S")
        logits = student_net.apply({"params": student}, batch["image"])
        if "t_logits" in batch:
            t_logits = batch["t_logits"]
        elif losses.get("kd", 0.0):
            t_logits, _ = teacher_targets(teacher_net, frozen["teacher"], batch["image"])
        else:
            t_logits = logits
        loss, parts = task_losses(logits, batch["label"], t_logits, losses, temperature)
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, ({}, {"accuracy": acc, **parts})

    return loss_fn


def layer_errors(tandem_net, teacher_net, l: int, variables, teacher_vars, images) -> dict:
    """Relative MSE of every converted layer 1..ℓ of a tandem network vs the teacher path."""
    _, t_trace = teacher_targets(teacher_net, teacher_vars, images)
    _, trace = tandem_net.apply(variables, images, capture=True)
    return {tandem_net.specs[i].name: float(relative_mse(trace[i][1], t_trace[i][1])) for i in range(l)}
