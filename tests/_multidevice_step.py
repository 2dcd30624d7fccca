"""A tiny conv + BatchNorm + dense model, and a script that runs train steps on a mesh.

Imported by the tests for the model; run as a script (in a subprocess whose
environment sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8``) it
trains the same steps on 8 devices, on 1 device and with plain jax (no mesh,
no collectives), and writes the results to the ``.npz`` named by ``argv[1]``.
"""

from __future__ import annotations

import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class TinyNet(nn.Module):
    """conv → BatchNorm → relu → global mean → dense: enough to exercise BN statistics."""

    axis_name: str | None = "data"
    classes: int = 5

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         axis_name=self.axis_name if train else None)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(self.classes)(x)


@functools.lru_cache(maxsize=None)
def _init_variables(seed: int, classes: int):
    # Initialisation does not depend on axis_name; compile it once per process.
    variables = TinyNet(classes=classes).init(jax.random.key(seed), jnp.zeros((1, 6, 6, 2)),
                                              train=False)
    return jax.tree.map(np.asarray, variables)


def init_model(model: TinyNet, seed: int = 0):
    """Fresh host copies of the variables (safe to donate)."""
    variables = jax.tree.map(np.array, _init_variables(seed, model.classes))
    return variables["params"], {"batch_stats": variables["batch_stats"]}


def make_loss_fn(model: TinyNet):
    """Per-device loss: cross-entropy of ``logits * frozen['temp']`` (frozen is an argument)."""

    def loss_fn(params, model_state, frozen, batch, rng):
        del rng
        logits, updates = model.apply({"params": params, **model_state}, batch["image"],
                                      train=True, mutable=["batch_stats"])
        logits = logits.astype(jnp.float32) * frozen["temp"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        acc = (jnp.argmax(logits, -1) == batch["label"]).mean()
        return loss, (dict(updates), {"acc": acc})

    return loss_fn


def synthetic_batch(n: int, seed: int, classes: int = 5) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    return {"image": rs.randn(n, 6, 6, 2).astype(np.float32),
            "label": rs.randint(0, classes, size=(n,)).astype(np.int32)}


class Batches:
    """A deterministic, checkpointable batch iterator: batch ``i`` depends on ``i`` only
    (and ``seed_base``); a NaN image at ``poison_at``; ``on_index(i)`` before batch ``i``."""

    def __init__(self, poison_at=None, on_index=None, seed_base: int = 100):
        self.index, self.poison_at, self.on_index, self.seed_base = 0, poison_at, on_index, seed_base

    def __iter__(self):
        return self

    def __next__(self):
        b = synthetic_batch(4, self.seed_base + self.index)
        if self.index == self.poison_at:
            b["image"][0, 0, 0, 0] = np.nan
        if self.on_index is not None:
            self.on_index(self.index)
        self.index += 1
        return b

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def flat(tree, prefix: str) -> dict[str, np.ndarray]:
    return {prefix + jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _main(out_path: str) -> None:
    from bnfree_jax.train import (create_train_state, make_eval_step, make_mesh,
                                  make_train_step, put_replicated, shard_batch)

    assert jax.device_count() == 8, jax.devices()
    tx = optax.sgd(0.1, momentum=0.9)
    frozen = {"temp": jnp.float32(1.5)}
    batches = [synthetic_batch(16, seed) for seed in (1, 2)]
    out: dict[str, np.ndarray] = {}

    for name, devices in (("d8", jax.devices()), ("d1", jax.devices()[:1])):
        mesh = make_mesh(devices)
        model = TinyNet(axis_name="data")
        params, model_state = init_model(model)
        state = put_replicated(create_train_state(params, tx, model_state=model_state), mesh)
        out.update(flat(params, f"{name}/init"))
        step = make_train_step(make_loss_fn(model), tx, mesh)
        for i, b in enumerate(batches):
            state, metrics = step(state, put_replicated(frozen, mesh), shard_batch(b, mesh))
            out[f"{name}/loss{i}"] = np.asarray(metrics["loss"])
        out.update(flat(state.params, f"{name}/params"))
        out.update(flat(state.model_state, f"{name}/ms"))
        out[f"{name}/step"] = np.asarray(state.step)

    # Independent reference: no mesh, no shard_map, BN over the whole batch.
    model = TinyNet(axis_name=None)
    params, model_state = init_model(model)
    opt_state = tx.init(params)
    loss_fn = make_loss_fn(model)
    for i, b in enumerate(batches):
        (loss, (model_state, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, model_state, frozen, {k: jnp.asarray(v) for k, v in b.items()}, None)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        out[f"ref/loss{i}"] = np.asarray(loss)
    out.update(flat(params, "ref/params"))
    out.update(flat(model_state, "ref/ms"))

    # A batch of 30 cannot be split over 8 devices.
    mesh8 = make_mesh()
    try:
        shard_batch(synthetic_batch(30, 3), mesh8)
        out["divisible_error"] = np.asarray("")
    except ValueError as err:
        out["divisible_error"] = np.asarray(str(err))

    # Masked evaluation summed over 8 devices.
    eval_model = TinyNet(axis_name="data")
    params, model_state = init_model(eval_model, seed=4)
    eb = synthetic_batch(24, 5)
    eb["mask"] = (np.arange(24) < 19).astype(np.int32)

    def apply_fn(p, ms, fr, images):
        return eval_model.apply({"params": p, **ms}, images, train=False) * fr["temp"]

    ev = make_eval_step(apply_fn, mesh8)(put_replicated(params, mesh8),
                                         put_replicated(model_state, mesh8),
                                         put_replicated(frozen, mesh8), shard_batch(eb, mesh8))
    logits = np.asarray(apply_fn(params, model_state, frozen, jnp.asarray(eb["image"])))
    out["eval/correct"] = np.asarray(ev["correct"])
    out["eval/count"] = np.asarray(ev["count"])
    out["eval/ref_correct"] = np.asarray(
        ((logits.argmax(-1) == eb["label"]) & (eb["mask"] == 1)).sum())
    np.savez(out_path, **out)


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    _main(sys.argv[1])
