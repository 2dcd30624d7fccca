"""bfloat16 that computes in bfloat16: with compute_dtype=bfloat16 every conv and matmul of the
teacher, QAT and PTL steps (forward and backward) takes bf16 operands, float32 otherwise; the
quantizers' codes never depend on the compute dtype; params, BN statistics, optimizer state
and losses stay float32."""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnfree_jax import quant
from bnfree_jax.distill.plan import FROZEN, build_stage_plan
from bnfree_jax.distill.stage_runner import Trees, split
from bnfree_jax.distill.tandem import make_finetune_loss, make_tandem_loss, tandem_roles
from bnfree_jax.nn.network import STUDENT, TEACHER, compute_dtype_scope, make_network
from bnfree_jax.nn.weights import student_codes
from bnfree_jax.nn.zoo import tiny_cnn, with_bits
from bnfree_jax.train.mesh import make_mesh, put_replicated, shard_batch
from bnfree_jax.train.state import create_train_state
from bnfree_jax.train.step import conv_dot_operand_dtypes, make_train_step
from bnfree_jax.train.supervised import classification_loss

MEAN, STD = (0.13,), (0.31,)
SPECS = tuple(with_bits(tiny_cnn(10), 4, 4, 8))
FLOAT_SPECS = tuple(with_bits(tiny_cnn(10), 32, 32))
PTL = dict(layer_target="tandem", local_init=False, local_init_steps=0, prefix="frozen", compensation=True,
           layer_loss_weight=1.0, ce_weight=1.0, kd_weight=1.0, stage_steps=1, finetune_steps=1,
           own_layer_rate="slow", head_layers=1, train_own_activation=False, block_layers=1, stage_budget="equal")


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(jax.devices()[:1])


def _batch(mesh, n=8):
    rng = np.random.default_rng(0)
    return shard_batch({"image": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                        "label": rng.integers(0, 10, (n,), dtype=np.int32)}, mesh)


def _init(net, seed):
    return jax.device_get(net.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1), jnp.uint8)))


def _bn_step(mesh, specs, compute_dtype):
    """(step, state, frozen) of the teacher (float specs) or QAT (quantised specs) phase."""
    net = make_network(specs, TEACHER, MEAN, STD, bn_axis_name="data")
    v = _init(net, 0)
    tx = optax.adam(1e-3)
    state = put_replicated(create_train_state(v["params"], tx, model_state={"batch_stats": v["batch_stats"]}), mesh)
    return make_train_step(classification_loss(net), tx, mesh, donate=False, compute_dtype=compute_dtype), state, {}


def _trees():
    tv, sv = _init(make_network(SPECS, TEACHER, MEAN, STD), 1), _init(make_network(SPECS, STUDENT, MEAN, STD), 2)
    return Trees(S=sv["params"], T=dict(tv["params"]), Tbs=dict(tv["batch_stats"]), teacher=tv)


def _ptl_step(mesh, compute_dtype, layer=2, kind="tandem"):
    """(step, state, frozen) of PTL stage `layer` (frozen prefix, T'_ℓ target, the teacher's
    logits computed in the step) or of the fine-tune."""
    names = [s.name for s in SPECS]
    plan = build_stage_plan(types.SimpleNamespace(**PTL), names)
    stage = plan[layer - 1] if kind == "tandem" else plan[-1]
    params, frozen, _ = split(stage, _trees())
    teacher = make_network(SPECS, TEACHER, MEAN, STD)
    if kind == "tandem":
        L = len(SPECS)
        prefix_frozen = all(stage.labels[f"S:{n}"] == FROZEN for n in names[:layer - 1])
        loss = make_tandem_loss(make_network(SPECS, tandem_roles(L, layer), MEAN, STD),
                                make_network(SPECS, tandem_roles(L, layer - 1), MEAN, STD),
                                teacher, layer, stage.losses, 2.0, prefix_frozen)
    else:
        loss = make_finetune_loss(make_network(SPECS, STUDENT, MEAN, STD), teacher, stage.losses, 2.0)
    tx = optax.adam(1e-3)
    step = make_train_step(loss, tx, mesh, donate=False, compute_dtype=compute_dtype)
    return step, put_replicated(create_train_state(params, tx), mesh), put_replicated(frozen, mesh)


STEPS = {"teacher": lambda m, d: _bn_step(m, FLOAT_SPECS, d), "qat": lambda m, d: _bn_step(m, SPECS, d),
         "ptl_stage2": lambda m, d: _ptl_step(m, d, 2), "ptl_stage1": lambda m, d: _ptl_step(m, d, 1),
         "ptl_finetune": lambda m, d: _ptl_step(m, d, kind="finetune")}


@pytest.mark.parametrize("kind", sorted(STEPS))
def test_every_conv_and_matmul_of_a_step_takes_the_compute_dtype(mesh, kind):
    batch = _batch(mesh)
    for compute_dtype, want in ((jnp.bfloat16, "bfloat16"), (None, "float32")):
        step, state, frozen = STEPS[kind](mesh, compute_dtype)
        ops = conv_dot_operand_dtypes(jax.make_jaxpr(step)(state, frozen, batch))
        kinds = collections.Counter(name for name, _ in ops)
        assert kinds["conv_general_dilated"] >= 2 and kinds["dot_general"] >= 1, kinds  # forward and backward
        assert {d for _, dtypes in ops for d in dtypes} == {want}, (kind, compute_dtype, ops)


def test_bf16_step_keeps_params_statistics_moments_and_loss_in_float32(mesh):
    """The loss function (and so every quantizer) sees float32 params and batch: casting them
    to bf16 would move weight codes."""
    seen = []
    net = make_network(SPECS, TEACHER, MEAN, STD, bn_axis_name="data")
    base = classification_loss(net)

    def loss_fn(params, model_state, frozen, batch, rng):
        seen.append({jnp.dtype(x.dtype) for x in jax.tree.leaves(params)})
        return base(params, model_state, frozen, batch, rng)

    v = _init(net, 0)
    tx = optax.adam(1e-3)
    state = put_replicated(create_train_state(v["params"], tx, model_state={"batch_stats": v["batch_stats"]}), mesh)
    new, metrics = make_train_step(loss_fn, tx, mesh, donate=False, compute_dtype=jnp.bfloat16)(
        state, {}, _batch(mesh))
    assert seen == [{jnp.dtype(jnp.float32)}]
    floats = jax.tree.leaves((new.params, new.model_state, new.opt_state, metrics))
    assert floats and {jnp.dtype(x.dtype) for x in floats if jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), new.model_state["batch_stats"],
                         v["batch_stats"])
    assert max(jax.tree.leaves(moved)) > 0  # the BN statistics were updated, in float32


def test_bf16_network_output_is_close_to_float32_and_f32_scope_is_exact():
    net = make_network(SPECS, TEACHER, MEAN, STD)
    v = _init(net, 0)
    x = np.random.default_rng(1).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    ref = net.apply(v, x)
    with compute_dtype_scope(jnp.float32):
        np.testing.assert_array_equal(net.apply(v, x), ref)  # float32 "compute" is the network as written
    with compute_dtype_scope(jnp.bfloat16):
        low = net.apply(v, x)
    assert low.dtype == jnp.float32
    scale = float(jnp.abs(ref).max())
    assert 0 < float(jnp.abs(low - ref).max()) < 0.1 * scale


def _codes(out):
    return np.asarray(out.codes, np.float32)


# (name, quantizer(x) -> QTensor): every quantizer that computes x/s, rounds or clips
QUANTIZERS = [
    ("uniform_w4", lambda x: quant.uniform_quantize(x, 0.37, 4, True, as_qtensor=True)),
    ("uniform_a8", lambda x: quant.uniform_quantize(x, 0.0113, 8, False, as_qtensor=True)),
    ("lsq_w2", lambda x: quant.lsq_quantize(x, 0.61, 2, True, as_qtensor=True)),
    ("pact_a4", lambda x: quant.pact_quantize(x, 3.1, 4, as_qtensor=True)),
    ("pact_a8", lambda x: quant.pact_quantize(x, 2.7, 8, as_qtensor=True)),
    ("symmetric_w4", lambda x: quant.symmetric_weight(x, 4, as_qtensor=True)),
    ("symmetric_w8_channel", lambda x: quant.symmetric_weight(x.reshape(-1, 16), 8, -1, as_qtensor=True)),
    ("dorefa_w3", lambda x: quant.dorefa_weight(x, 3, as_qtensor=True)),
    ("dorefa_a4", lambda x: quant.dorefa_activation(x, 4, as_qtensor=True)),
]


@pytest.mark.parametrize("name,fn", QUANTIZERS, ids=[q[0] for q in QUANTIZERS])
def test_quantizer_codes_do_not_depend_on_the_compute_dtype(name, fn):
    """The same inputs (bf16 values), given as bf16 or as float32: the same codes and scale;
    the bf16 call returns bf16 values (cast back), equal to the float32 values rounded."""
    x16 = jnp.asarray(np.random.default_rng(2).normal(0, 1.5, 4096), jnp.bfloat16)
    x32 = x16.astype(jnp.float32)
    q16, q32 = jax.jit(fn)(x16), jax.jit(fn)(x32)
    np.testing.assert_array_equal(_codes(q16), _codes(q32))
    np.testing.assert_array_equal(np.asarray(q16.scale, np.float32), np.asarray(q32.scale, np.float32))
    assert len(np.unique(_codes(q32))) > 2  # the inputs span the grid
    as_value = jax.jit(lambda x: fn(x).dequantize())
    value16 = jax.jit(lambda x: quant.in_float32(lambda y: fn(y).dequantize())(x))(x16)
    assert value16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(value16), np.asarray(as_value(x32).astype(jnp.bfloat16)))


def test_quantizer_gradients_run_in_float32():
    """LSQ's step gradient and PACT's alpha gradient of bf16 inputs equal those of the same
    values in float32 (to bf16 rounding of the result)."""
    x16 = jnp.asarray(np.random.default_rng(3).normal(0, 1.5, 4096), jnp.bfloat16)
    x32 = x16.astype(jnp.float32)
    for f in (lambda x, s: quant.lsq_quantize(x, s, 3, True).astype(jnp.float32).sum(),
              lambda x, a: (quant.pact_quantize(x, a, 4).astype(jnp.float32) * x.astype(jnp.float32)).sum()):
        g16 = jax.grad(f, argnums=1)(x16, jnp.float32(0.9))
        g32 = jax.grad(f, argnums=1)(x32, jnp.float32(0.9))
        np.testing.assert_allclose(float(g16), float(g32), rtol=1e-6)


def test_student_weight_codes_do_not_depend_on_the_compute_dtype():
    w16 = jnp.asarray(np.random.default_rng(4).normal(0, 0.05, (3, 3, 8, 16)), jnp.bfloat16)
    for per_channel in (False, True):
        c16, s16 = student_codes(w16, 4, per_channel)
        c32, s32 = student_codes(w16.astype(jnp.float32), 4, per_channel)
        np.testing.assert_array_equal(np.asarray(c16), np.asarray(c32))
        assert c16.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(s16, np.float32),
                                      np.asarray(s32.astype(jnp.bfloat16), np.float32))
