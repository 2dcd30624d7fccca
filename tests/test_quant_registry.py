"""The quantizer registry: names, errors, built-ins under the contract, the grid check."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnfree_jax import quant
from bnfree_jax.nn import weights as nn_weights
from bnfree_jax.quant import registry

F32 = np.float32
W = np.random.default_rng(0).normal(0, 0.3, (3, 3, 4, 6)).astype(F32)
X = np.random.default_rng(1).uniform(-0.5, 3.0, (2, 5, 5, 6)).astype(F32)


@pytest.fixture
def clean_registry():
  """Registrations made by a test are dropped after it."""
  saved = {k: dict(v) for k, v in registry._REGISTRY.items()}
  yield
  for k, v in saved.items():
    registry._REGISTRY[k].clear()
    registry._REGISTRY[k].update(v)


def weight_bits(name):
  return (1,) if "sign" in name else (1, 2, 4, 8)


def test_builtins_are_registered():
  assert quant.weight_quantizers() == ("approx_sign", "dorefa_tanh", "lsq", "maxabs", "sign")
  assert quant.activation_quantizers() == ("dorefa", "lsq", "pact")
  assert quant.weight_quantizer("maxabs") is quant.maxabs_weight


def test_unknown_name_is_a_one_line_error_naming_it_and_the_known_ones():
  with pytest.raises(ValueError) as e:
    quant.weight_quantizer("ewgs")
  msg = str(e.value)
  assert "\n" not in msg and "'ewgs'" in msg and "dorefa_tanh, lsq, maxabs" in msg
  with pytest.raises(ValueError, match="unknown activation quantizer 'relu6'; known: dorefa, lsq, pact"):
    quant.activation_quantizer("relu6")
  with pytest.raises(ValueError, match="unknown quantizer kind 'bias'"):
    quant.check_on_grid("bias", "maxabs", W, 4, None)


def test_register_twice_is_an_error_unless_same_function(clean_registry):
  @quant.register_weight_quantizer("mine")
  def mine(w, bits, axis):
    return quant.maxabs_weight(w, bits, axis)

  assert quant.register_weight_quantizer("mine")(mine) is mine  # same function: fine
  with pytest.raises(ValueError, match="weight quantizer 'mine' is already registered .*mine"):
    quant.register_weight_quantizer("mine")(lambda w, b, a: mine(w, b, a))
  with pytest.raises(ValueError, match="already registered"):
    quant.register_activation_quantizer("pact")(lambda x, a, b: x)
  with pytest.raises(ValueError, match="non-empty string"):
    quant.register_activation_quantizer("")
  assert "mine" in quant.weight_quantizers() and quant.weight_quantizer("mine") is mine


def test_a_users_plugin_is_found_and_checked(clean_registry):
  @quant.register_activation_quantizer("ewgs_like")
  def act(x, alpha, bits):
    return quant.pact_quantize(x, alpha, bits) * 1.0

  qt = quant.check_on_grid("activation", "ewgs_like", X, F32(2.0), 3)
  assert qt.bits == 3 and not qt.signed and qt.codes.max() == 7 and qt.codes.min() == 0


@pytest.mark.parametrize("name", ["approx_sign", "dorefa_tanh", "lsq", "maxabs", "sign"])
def test_builtin_weight_quantizers_land_on_the_grid(name):
  fn = quant.weight_quantizer(name)
  for bits in weight_bits(name):
    for axis in (None, -1):
      w_q, scale = fn(jnp.asarray(W), bits, axis)
      qt = quant.check_on_grid("weight", name, W, bits, axis)
      assert np.size(qt.scale) == (1 if axis is None else W.shape[-1])
      np.testing.assert_allclose(qt.codes * qt.scale, w_q, rtol=1e-6, atol=1e-7)
      lo, hi = quant.qrange(bits, True)
      assert qt.codes.min() >= lo and qt.codes.max() <= hi
      if bits == 1:
        assert set(np.unique(qt.codes)) == {-1, 1}
      else:
        assert len(np.unique(qt.codes)) > 2  # not a degenerate grid


@pytest.mark.parametrize("name", ["dorefa", "lsq", "pact"])
def test_builtin_activation_quantizers_land_on_the_grid(name):
  for bits in (1, 2, 4, 8):
    qt = quant.check_on_grid("activation", name, X, F32(2.0), bits)
    y = quant.activation_quantizer(name)(jnp.asarray(X), F32(2.0), bits)
    np.testing.assert_allclose(qt.codes * qt.scale, y, rtol=1e-6, atol=1e-7)
    if bits == 1:
      np.testing.assert_array_equal(y, np.where(X >= 0, 1, -1))
    else:
      assert qt.codes.max() == 2 ** bits - 1 and qt.codes.min() == 0  # X spans past both ends


def test_adapters_do_not_change_the_quantizers_they_wrap():
  x, w = jnp.asarray(X), jnp.asarray(W)
  np.testing.assert_array_equal(quant.activation_quantizer("pact")(x, F32(2.0), 4),
                                quant.pact_quantize(x, F32(2.0), 4))
  np.testing.assert_array_equal(quant.activation_quantizer("dorefa")(x, F32(1.0), 3),
                                quant.dorefa_activation(x, 3))
  for axis in (None, -1):
    np.testing.assert_array_equal(quant.weight_quantizer("dorefa_tanh")(w, 4, axis)[0],
                                  quant.symmetric_weight(w, 4, channel_axis=axis))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_maxabs_is_the_students_weight_quantizer_bit_for_bit(bits):
  # So nn/weights.py can take it from the registry without changing a trained result.
  w = jnp.asarray(W)
  for per_channel in (False, True):
    axis = -1 if per_channel else None
    got, want = quant.maxabs_weight(w, bits, axis), nn_weights.student_weight(w, bits, per_channel)
    for a, b in zip(got, want):
      assert a.shape == b.shape
      np.testing.assert_array_equal(a, b)
    g = jax.grad(lambda w: jnp.sum(quant.maxabs_weight(w, bits, axis)[0] * w))(w)
    h = jax.grad(lambda w: jnp.sum(nn_weights.student_weight(w, bits, per_channel)[0] * w))(w)
    np.testing.assert_array_equal(g, h)


def test_sign_weight_quantizers_refuse_multibit():
  with pytest.raises(ValueError, match="binary: bits must be 1, got 4"):
    quant.weight_quantizer("sign")(jnp.asarray(W), 4, None)


def test_lsq_weight_learned_step_is_used_and_gets_a_gradient():
  w = jnp.asarray(W)
  step = jnp.full((1, 1, 1, 6), 0.05, jnp.float32)
  w_q, scale = quant.weight_quantizer("lsq")(w, 4, -1, step=step)
  np.testing.assert_array_equal(scale, step)
  g = jax.grad(lambda s: jnp.sum(quant.weight_quantizer("lsq")(w, 4, -1, step=s)[0] ** 2))(step)
  assert g.shape == step.shape and np.all(g != 0)


def off_grid_message(kind, fn, *args, layer=None):
  with pytest.raises(quant.OffGridError) as e:
    quant.check_on_grid(kind, "bad_q", *args, fn=fn, layer=layer)
  msg = str(e.value)
  assert "\n" not in msg and "'bad_q'" in msg
  return msg


def test_check_on_grid_refuses_by_name_each_way_of_leaving_the_grid():
  s = F32(0.1)
  msg = off_grid_message("weight", lambda w, b, a: (w, s), W, 4, None, layer="conv2")
  assert "at layer 'conv2'" in msg and "not an integer" in msg
  msg = off_grid_message("weight", lambda w, b, a: (jnp.full_like(w, 9 * s), s), W, 4, None)
  assert "code 9" in msg and "[-7, 7]" in msg
  msg = off_grid_message("weight", lambda w, b, a: (jnp.zeros_like(w), s), W, 1, None)
  assert "{-1, +1}" in msg  # a binary weight is never 0
  msg = off_grid_message("weight", lambda w, b, a: quant.maxabs_weight(w, b, None), W, 4, -1)
  assert "axis=-1 needs 6" in msg  # one scale for a per-channel request
  msg = off_grid_message("weight", lambda w, b, a: (w * jnp.nan, s), W, 4, None)
  assert "not finite" in msg
  msg = off_grid_message("weight", lambda w, b, a: (w * 0, F32(0)), W, 4, None)
  assert "scale is not positive" in msg
  msg = off_grid_message("activation", lambda x, a, b: jnp.clip(x, 0, a), X, F32(2.0), 4)
  assert "4-bit grid" in msg and "not an integer" in msg
  msg = off_grid_message("activation", lambda x, a, b: quant.pact_quantize(x, a, b), X, F32(2.0), 1)
  assert "outside {-1, +1}" in msg  # at 1 bit the contract is a sign
  msg = off_grid_message("weight", lambda w, b, a: w, W, 4, None)
  assert "must return (w_q, scale)" in msg
