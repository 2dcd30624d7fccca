"""The shard_map train/eval steps: multi-device equals single-device equals plain jax."""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _multidevice_step import TinyNet, init_model, make_loss_fn, synthetic_batch  # noqa: E402

from bnfree_jax.train import (check_batch_divisible, create_train_state, make_mesh,  # noqa: E402
                              make_train_step, put_replicated, shard_batch)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def multidevice(tmp_path_factory):
    out = tmp_path_factory.mktemp("md") / "result.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_multidevice_step.py"),
                           str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


def test_eight_devices_match_one_device_and_plain_jax(multidevice):
    d = multidevice
    keys = [k[3:] for k in d if k.startswith("d8/") and not k.startswith("d8/init")]
    assert any("batch_stats" in k and "var" in k for k in keys)
    assert any("Conv_0" in k and "kernel" in k for k in keys)
    for k in keys:
        np.testing.assert_allclose(d["d8/" + k], d["d1/" + k], atol=1e-5, rtol=0, err_msg=k)
        if "ref/" + k in d:
            np.testing.assert_allclose(d["d8/" + k], d["ref/" + k], atol=1e-5, rtol=0, err_msg=k)
    assert int(d["d8/step"]) == 2
    # The steps did something: kernels and BN scales moved (a conv bias before BN
    # gets no gradient), running statistics left their init.
    moved = [np.abs(d["d8/params" + k[len("d8/init"):]] - d[k]).max()
             for k in d if k.startswith("d8/init") and ("kernel" in k or "scale" in k)]
    assert len(moved) == 3 and min(moved) > 1e-4
    assert np.abs(d["d8/ms['batch_stats']['BatchNorm_0']['var']"] - 1.0).max() > 1e-3


def test_batch_not_divisible_by_devices_is_a_clear_error(multidevice):
    assert str(multidevice["divisible_error"]).startswith(
        "global batch 30 is not divisible by 8 devices")
    with pytest.raises(ValueError, match="global batch 12 is not divisible by 8 devices"):
        check_batch_divisible(12, types.SimpleNamespace(size=8))
    check_batch_divisible(16, types.SimpleNamespace(size=8))


def test_masked_eval_sums_over_devices(multidevice):
    assert int(multidevice["eval/count"]) == 19
    assert int(multidevice["eval/correct"]) == int(multidevice["eval/ref_correct"])


def _setup(tx=None, compute_dtype=None, loss_fn=None):
    mesh = make_mesh()
    model = TinyNet()
    params, model_state = init_model(model)
    tx = tx or optax.sgd(0.1)
    state = put_replicated(create_train_state(params, tx, model_state=model_state, rng=3), mesh)
    step = make_train_step(loss_fn or make_loss_fn(model), tx, mesh, donate=False,
                           compute_dtype=compute_dtype)
    return mesh, model, state, step


def test_frozen_is_an_argument_not_a_compiled_constant():
    mesh, model, state, step = _setup()
    batch = shard_batch(synthetic_batch(4, 0), mesh)
    _, m1 = step(state, {"temp": jnp.float32(1.0)}, batch)
    _, m2 = step(state, {"temp": jnp.float32(2.0)}, batch)
    assert step._cache_size() == 1  # a new frozen value reuses the compiled program
    params, ms = init_model(model)
    ref = make_loss_fn(TinyNet(axis_name=None))
    b = {k: jnp.asarray(v) for k, v in synthetic_batch(4, 0).items()}
    for temp, m in ((1.0, m1), (2.0, m2)):
        expected = ref(params, ms, {"temp": jnp.float32(temp)}, b, None)[0]
        np.testing.assert_allclose(m["loss"], expected, rtol=1e-6)


def test_rng_is_folded_per_device_and_advanced():
    def loss_fn(params, model_state, frozen, batch, rng):
        noise = jax.random.uniform(rng, ())
        return jnp.sum(params["w"] ** 2) * 0 + noise, (model_state, {"noise": noise})

    mesh = make_mesh()
    tx = optax.sgd(0.1)
    state = put_replicated(create_train_state({"w": jnp.ones(3)}, tx, rng=7), mesh)
    step = make_train_step(loss_fn, tx, mesh, donate=False)
    new, m = step(state, {}, shard_batch({"x": np.zeros((2, 1))}, mesh))
    step_key, next_key = jax.random.split(jax.random.key(7))
    expected = jax.random.uniform(jax.random.fold_in(step_key, 0), ())
    np.testing.assert_array_equal(np.asarray(m["noise"]), np.asarray(expected))
    np.testing.assert_array_equal(jax.random.key_data(new.rng), jax.random.key_data(next_key))
    assert int(new.step) == 1


def test_bf16_forward_keeps_f32_master_params():
    seen = []
    model = TinyNet()
    base = make_loss_fn(model)

    def loss_fn(params, model_state, frozen, batch, rng):
        seen.append((params["Conv_0"]["kernel"].dtype, batch["image"].dtype,
                     batch["label"].dtype))
        return base(params, model_state, frozen, batch, rng)

    mesh, _, state, step16 = _setup(compute_dtype=jnp.bfloat16, loss_fn=loss_fn)
    _, _, _, step32 = _setup()
    batch = shard_batch(synthetic_batch(8, 1), mesh)
    frozen = {"temp": jnp.float32(1.0)}
    s16, m16 = step16(state, frozen, batch)
    s32, m32 = step32(state, frozen, batch)
    assert seen[0] == (jnp.float32, jnp.float32, jnp.int32)  # master params; convs/dots cast inside
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
    assert m16["loss"].dtype == jnp.float32
    np.testing.assert_allclose(m16["loss"], m32["loss"], atol=3e-2)
    for a, b in zip(jax.tree.leaves(s16.params), jax.tree.leaves(s32.params)):
        np.testing.assert_allclose(a, b, atol=2e-2)


def test_donated_state_is_consumed():
    mesh = make_mesh()
    model = TinyNet()
    params, model_state = init_model(model)
    tx = optax.sgd(0.1)
    state = put_replicated(create_train_state(params, tx, model_state=model_state), mesh)
    step = make_train_step(make_loss_fn(model), tx, mesh, donate=True)
    old_kernel = state.params["Conv_0"]["kernel"]
    new, _ = step(state, {"temp": jnp.float32(1.0)}, shard_batch(synthetic_batch(4, 0), mesh))
    assert old_kernel.is_deleted()
    assert int(new.step) == 1
