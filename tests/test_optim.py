"""Optimizers from configs, the staged optimizer's isolation of frozen leaves, carry_moments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from bnfree_jax.train import (carry_moments, make_optimizer, make_schedule,
                              make_staged_optimizer, path_labels)


def cfg(**kw):
    base = dict(name="sgd", lr=1.0, momentum=0.0, nesterov=False, b1=0.9, b2=0.999,
                weight_decay=0.0, warmup_steps=0, schedule="constant", grad_clip=0.0,
                agc=0.0, slow_lr_factor=0.1)
    base.update(kw)
    return ConfigDict(base)


def params3():
    rs = np.random.RandomState(0)
    return {
        "s1": {"kernel": jnp.asarray(rs.randn(3, 4), jnp.float32), "bias": jnp.ones(4)},
        "s2": {"kernel": jnp.asarray(rs.randn(4, 4), jnp.float32), "scale": jnp.ones(4)},
        "t3": {"kernel": jnp.asarray(rs.randn(4, 2), jnp.float32), "bias": jnp.ones(2)},
    }


LABELS = {"s1": {"kernel": "frozen", "bias": "frozen"},
          "s2": {"kernel": "slow", "scale": "slow"},
          "t3": {"kernel": "trainable", "bias": "trainable"}}


def test_schedule_warmup_fraction_then_cosine():
    s = make_schedule(cfg(lr=2.0, warmup_steps=0.1, schedule="cosine"), 100)
    for t, want in ((0, 0.0), (5, 1.0), (10, 2.0), (55, 1.0), (100, 0.0)):
        assert float(s(t)) == pytest.approx(want, abs=1e-6), t
    c = make_schedule(cfg(lr=0.5, warmup_steps=4, schedule="constant"), 100)
    assert [float(c(t)) for t in (0, 2, 4, 80)] == pytest.approx([0.0, 0.25, 0.5, 0.5])


def test_sgd_nesterov_matches_hand_formula():
    tx = make_optimizer(cfg(lr=0.1, momentum=0.9, nesterov=True), 10)
    p = {"w": jnp.array([1.0, -2.0])}
    st = tx.init(p)
    trace = np.zeros(2)
    w = np.array([1.0, -2.0])
    for g in (np.array([0.5, 1.0]), np.array([-1.0, 0.25])):
        u, st = tx.update({"w": jnp.asarray(g, jnp.float32)}, st, p)
        trace = g + 0.9 * trace
        np.testing.assert_allclose(u["w"], -0.1 * (g + 0.9 * trace), rtol=1e-6)
        p = optax.apply_updates(p, u)
        w = w - 0.1 * (g + 0.9 * trace)
    np.testing.assert_allclose(p["w"], w, rtol=1e-6)


def test_weight_decay_only_on_non_frozen_kernels():
    p = params3()
    tx = make_staged_optimizer(cfg(lr=0.1, weight_decay=0.5), 10, LABELS)
    zeros = jax.tree.map(jnp.zeros_like, p)
    u, _ = tx.update(zeros, tx.init(p), p)
    np.testing.assert_allclose(u["t3"]["kernel"], -0.1 * 0.5 * p["t3"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(u["s2"]["kernel"], -0.01 * 0.5 * p["s2"]["kernel"], rtol=1e-6)
    for leaf in (u["t3"]["bias"], u["s2"]["scale"], u["s1"]["kernel"], u["s1"]["bias"]):
        np.testing.assert_array_equal(leaf, 0.0)


def test_global_norm_clip_ignores_frozen_gradients():
    p = params3()
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), p)
    grads["s1"] = jax.tree.map(lambda x: jnp.full_like(x, 1e6), p["s1"])  # frozen, huge
    tx = make_staged_optimizer(cfg(lr=1.0, grad_clip=1.0), 10, LABELS)
    u, _ = tx.update(grads, tx.init(p), p)
    # Trainable norm is far below 1: no clipping at all.
    np.testing.assert_allclose(u["t3"]["kernel"], -0.01, rtol=1e-6)
    np.testing.assert_allclose(u["s2"]["kernel"], -0.001, rtol=1e-6)
    np.testing.assert_array_equal(u["s1"]["kernel"], 0.0)
    # Above the threshold the scale is clip / norm over the non-frozen leaves only.
    big = jax.tree.map(lambda x: jnp.full_like(x, 2.0), grads)
    big["s1"] = grads["s1"]
    u, _ = tx.update(big, tx.init(p), p)
    n_nonfrozen = sum(x.size for k, sub in p.items() if k != "s1" for x in sub.values())
    scale = 1.0 / np.sqrt(n_nonfrozen * 4.0)
    np.testing.assert_allclose(u["t3"]["kernel"], -2.0 * scale, rtol=1e-5)


def test_agc_clips_unitwise_relative_to_param_norm():
    p = {"k": jnp.ones((4, 3))}
    tx = make_optimizer(cfg(lr=1.0, agc=0.01), 10)
    g = {"k": jnp.full((4, 3), 100.0)}
    u, _ = tx.update(g, tx.init(p), p)
    # Unit norms of p: sqrt(4) per output column; the update is capped to 0.01 * 2.
    col = np.linalg.norm(np.asarray(u["k"]), axis=0)
    np.testing.assert_allclose(col, 0.02, rtol=1e-4)


def test_frozen_params_bitwise_unchanged_and_without_moments():
    p = params3()
    tx = make_staged_optimizer(cfg(name="adamw", lr=0.05, weight_decay=0.1, grad_clip=1.0), 10,
                               LABELS)
    st = tx.init(p)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(st)[0]]
    assert not any("'s1'" in s for s in paths)
    assert sum(".mu" in s for s in paths) == 4  # s2.kernel, s2.scale, t3.kernel, t3.bias

    def loss(q):
        h = jnp.tanh(jnp.ones((2, 3)) @ q["s1"]["kernel"] + q["s1"]["bias"])
        h = (h @ q["s2"]["kernel"]) * q["s2"]["scale"]
        return jnp.sum((h @ q["t3"]["kernel"] + q["t3"]["bias"]) ** 2)

    q = p
    update = jax.jit(tx.update)
    for _ in range(3):
        u, st = update(jax.grad(loss)(q), st, q)
        q = optax.apply_updates(q, u)
    for k in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(q["s1"][k]), np.asarray(p["s1"][k]))
        assert np.abs(q["t3"][k] - p["t3"][k]).max() > 1e-3
    assert np.abs(q["s2"]["kernel"] - p["s2"]["kernel"]).max() > 1e-5


def test_trainable_subtree_only_has_moments_for_it_alone():
    p = params3()
    trainable = {"t3": p["t3"], "s2": p["s2"]}
    labels = {"t3": {"kernel": "trainable", "bias": "trainable"},
              "s2": {"kernel": "slow", "scale": "slow"}}
    tx = make_optimizer(cfg(name="adamw"), 10, labels=labels)
    st = tx.init(trainable)
    mu = [x for k, x in jax.tree_util.tree_flatten_with_path(st)[0]
          if ".mu" in jax.tree_util.keystr(k)]
    assert sorted(x.size for x in mu) == sorted(x.size for x in jax.tree.leaves(trainable))


def test_path_labels():
    labels = path_labels(params3(), lambda path: "frozen" if path[0] == "s1" else "trainable")
    assert labels["s1"]["bias"] == "frozen" and labels["t3"]["kernel"] == "trainable"
    with pytest.raises(ValueError, match="not one of"):
        path_labels(params3(), lambda path: "oops")


def test_carry_moments_adamw_across_a_stage_boundary():
    p = params3()
    c = cfg(name="adamw", lr=0.01, grad_clip=1.0)
    old_params = {"s2": p["s2"], "t3": p["t3"]}
    old_tx = make_optimizer(c, 10, labels={"s2": {"kernel": "trainable", "scale": "trainable"},
                                           "t3": {"kernel": "trainable", "bias": "trainable"}})
    old_state = old_tx.init(old_params)
    for i in range(3):
        g = jax.tree.map(lambda x: jnp.full_like(x, 0.1 * (i + 1)) + x, old_params)
        u, old_state = old_tx.update(g, old_state, old_params)
        old_params = optax.apply_updates(old_params, u)
    # Next stage: s2 now 'slow' (moments must follow it), t3 kept, a new layer
    # t4 appears, and t3.bias changes shape (must start fresh).
    new_params = {"s2": old_params["s2"],
                  "t3": {"kernel": old_params["t3"]["kernel"], "bias": jnp.ones(5)},
                  "t4": {"kernel": jnp.ones((2, 2))}}
    new_tx = make_optimizer(c, 10, labels={"s2": {"kernel": "slow", "scale": "slow"},
                                           "t3": {"kernel": "trainable", "bias": "trainable"},
                                           "t4": {"kernel": "trainable"}})
    fresh = new_tx.init(new_params)
    carried = carry_moments(old_state, old_params, fresh, new_params)
    assert jax.tree.structure(carried) == jax.tree.structure(fresh)

    def moments(state, group, which):
        return state[1].inner_states[group].inner_state[0]._asdict()[which]

    for which in ("mu", "nu"):
        old_m = moments(old_state, "trainable", which)
        slow_m = moments(carried, "slow", which)
        new_m = moments(carried, "trainable", which)
        for k in ("kernel", "scale"):
            np.testing.assert_array_equal(slow_m["s2"][k], old_m["s2"][k])
            assert np.abs(np.asarray(old_m["s2"][k])).max() > 0
        np.testing.assert_array_equal(new_m["t3"]["kernel"], old_m["t3"]["kernel"])
        np.testing.assert_array_equal(new_m["t3"]["bias"], np.zeros(5))
        np.testing.assert_array_equal(new_m["t4"]["kernel"], np.zeros((2, 2)))
    # Counts are not moments: they keep the new state's values.
    assert int(carried[1].inner_states["slow"].inner_state[0].count) == 0
    # The carried state is usable.
    new_tx.update(jax.tree.map(jnp.ones_like, new_params), carried, new_params)
