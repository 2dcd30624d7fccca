"""One Flax definition for the BN teacher, the BN-free student and every tandem mix of them.

`Network(roles=...)` holds one `Layer` per spec, named after it, so a parameter tree is
`{layer_name: {...}}` and the tandem network `[S_1..S_ℓ, T'_{ℓ+1}..T'_L]` is just the
union of the student's first ℓ subtrees and the teacher's remaining ones.

Inside `compute_dtype_scope(jnp.bfloat16)` (what a training step with
`mesh.compute_dtype=bfloat16` traces its loss in) every convolution and matmul takes
bfloat16 operands with float32 accumulation and output; parameters, BN, the
quantizers and everything elementwise stay float32. Outside it (evaluation, export,
the teacher cache, float32 jobs) the network computes in float32 exactly as written.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnfree_jax import quant
from bnfree_jax.nn.weights import along_input, student_weight, teacher_weight
from bnfree_jax.nn.zoo import FLOAT_BITS, LayerSpec

TEACHER, STUDENT = "teacher", "student"


def input_zero_point(mean: Sequence[float]) -> np.ndarray:
    """Per-channel integer pixel value that normalises to 0 (the folded mean)."""
    return np.round(255.0 * np.asarray(mean, np.float64)).astype(np.int32)


def normalize_input(images: jnp.ndarray, zero_point: Sequence[int]) -> jnp.ndarray:
    """uint8 pixels → (p − z)/255: an exact integer grid at scale 1/255, padded with 0 = pixel z."""
    return (images.astype(jnp.float32) - jnp.asarray(zero_point, jnp.float32)) / 255.0


_COMPUTE_DTYPE: contextvars.ContextVar = contextvars.ContextVar("bnfree_compute_dtype", default=None)


@contextlib.contextmanager
def compute_dtype_scope(dtype):
    """Networks traced inside take `dtype` operands in their convs and matmuls (None or
    float32: float32 as written). A scope, not a network field, so that only the training
    steps compute in bfloat16, never the evaluation and export paths of the same nets."""
    if dtype is not None and jnp.dtype(dtype) == jnp.float32:
        dtype = None
    token = _COMPUTE_DTYPE.set(None if dtype is None else jnp.dtype(dtype))
    try:
        yield
    finally:
        _COMPUTE_DTYPE.reset(token)


_FLOAT_ROLES: contextvars.ContextVar = contextvars.ContextVar("bnfree_float_roles", default=())
_QUANT_INPUTS: contextvars.ContextVar = contextvars.ContextVar("bnfree_quant_inputs", default=None)


@contextlib.contextmanager
def quantizers_bypassed(roles: Sequence[str] = (STUDENT,)):
    """Layers of `roles` traced inside run as the float network (`float_spec`: no weight or
    activation quantizer) over the same parameter tree (an unused `act_alpha` is ignored):
    the reference of the STE-mismatch diagnostic, without rebuilding the loss function."""
    token = _FLOAT_ROLES.set(tuple(roles))
    try:
        yield
    finally:
        _FLOAT_ROLES.reset(token)


@contextlib.contextmanager
def record_quantizer_inputs():
    """Yields a dict that every activation quantizer traced inside fills with
    `{layer name: (x, alpha, bits)}`, x being what the quantizer sees (after pooling); the
    last run of a layer wins. The values are of the current trace: use them inside it."""
    found: dict = {}
    token = _QUANT_INPUTS.set(found)
    try:
        yield found
    finally:
        _QUANT_INPUTS.reset(token)


def float_spec(spec: LayerSpec) -> LayerSpec:
    """The layer as the float network has it: float weights and activation (ReLU)."""
    return dataclasses.replace(spec, w_bits=FLOAT_BITS, a_bits=FLOAT_BITS)


def mixed_precision(op, x, w, dtype):
    """`op(x, w, preferred_element_type)` on `dtype` operands, float32 accumulation and
    output. The backward takes `dtype` operands too (the cotangent cast to `dtype`, through
    JAX's own transpose of `op`, accumulating as the backend does for `dtype`: in float32
    on GPU and TPU): left to autodiff, it would upcast the saved operands to the float32
    cotangent and run both backward products in float32."""

    @jax.custom_vjp
    def f(x, w):
        return op(x.astype(dtype), w.astype(dtype), jnp.float32)

    def fwd(x, w):
        xc, wc = x.astype(dtype), w.astype(dtype)
        return op(xc, wc, jnp.float32), (xc, wc)

    def bwd(res, g):
        xc, wc = res
        g = g.astype(dtype)
        (dx,) = jax.linear_transpose(lambda a: op(a, wc, None), xc)(g)
        (dw,) = jax.linear_transpose(lambda b: op(xc, b, None), wc)(g)
        return dx.astype(x.dtype), dw.astype(w.dtype)

    f.defvjp(fwd, bwd)
    return f(x, w)


def linear_op(spec: LayerSpec, x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """The layer's convolution or matmul, in the compute dtype of the current scope."""
    def op(a, b, preferred):
        if spec.kind == "conv":
            return jax.lax.conv_general_dilated(a, b, (spec.stride, spec.stride), spec.padding,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                preferred_element_type=preferred)
        return jnp.matmul(a, b, preferred_element_type=preferred)

    dtype = _COMPUTE_DTYPE.get()
    if dtype is None:
        return op(x, w.astype(x.dtype), None)
    return mixed_precision(op, x, w, dtype)


def on_accumulator_grid(beta, alpha, in_step, w_scale):
    """β as the integer artifact adds it: a whole number of accumulator units
    r = |α|·s_x·s_w (export's round(β/r)), straight through in the backward pass. At 2
    bits r is a tenth to a quarter of an output step, so a float β moves codes the
    artifact does not (`model.bias_grid`)."""
    r = jax.lax.stop_gradient(jnp.abs(alpha) * in_step * jnp.reshape(w_scale, (-1,)))
    live = r > 0  # a zero α (a dead channel) has no grid, and no artifact either: β stays finite
    on_grid = jnp.where(live, r * jnp.round(beta / jnp.where(live, r, 1.0)), beta)
    return beta + jax.lax.stop_gradient(on_grid - beta)


def max_pool(x: jnp.ndarray, window: int) -> jnp.ndarray:
    return nn.max_pool(x, (window, window), strides=(window, window), padding="VALID")


class Layer(nn.Module):
    """op → (BN | IntScale) → activation → [pool]; returns (activation, pre-activation).

    The pre-activation (post-BN for the teacher, post-IntScale for the student) is what
    the layer-wise distillation targets compare.
    """

    spec: LayerSpec
    role: str = TEACHER
    per_channel: bool = False  # requant == "channel"
    inv_std: Optional[tuple[float, ...]] = None  # first layer: 1/std folded into the weights
    bn_axis_name: Optional[str] = None
    act_init: float = 4.0
    bias_grid: bool = False  # the student's β on the artifact's accumulator grid

    @nn.compact
    def __call__(self, x, train: bool = False, in_step=None):
        """`in_step`: the grid step s_x of `x` (the previous layer's `out_step`), which
        `bias_grid` needs; None leaves β as it is."""
        s = self._spec()
        if s.kind == "dense" and x.ndim > 2:
            x = x.reshape(x.shape[0], -1)
        in_ch = x.shape[-1]
        shape = (s.kernel, s.kernel, in_ch, s.features) if s.kind == "conv" else (in_ch, s.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        w = kernel
        if self.inv_std is not None:
            w = w * jnp.asarray(along_input(self.inv_std, w.shape), w.dtype)
        w_scale = None
        if s.quantized:
            if self.role == STUDENT:
                w, w_scale = student_weight(w, s.w_bits, self.per_channel, s.weight_quantizer)
            else:
                w = teacher_weight(w, s.w_bits, self.per_channel)
        y = linear_op(s, x, w)
        if self.role == STUDENT:
            alpha_shape = (s.features,) if self.per_channel else ()
            alpha = self.param("alpha", nn.initializers.ones, alpha_shape)
            beta = self.param("beta", nn.initializers.zeros, (s.features,))
            if self.bias_grid and in_step is not None and w_scale is not None and (s.last or s.a_bits > 1):
                beta = on_accumulator_grid(beta, alpha, in_step, w_scale)  # a sign layer's floor is exact
            pre = y * alpha.astype(y.dtype) + beta.astype(y.dtype)
        elif s.last:
            pre = y + self.param("bias", nn.initializers.zeros, (s.features,)).astype(y.dtype)
        else:
            pre = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                               axis_name=self.bn_axis_name if train else None, name="bn")(y)
        if s.last:
            return pre, pre
        return self.activation(pre), pre

    def out_step(self):
        """The grid step of this layer's activations, the next layer's s_x: act_alpha/(2^b − 1),
        1 for a sign; None when they are not on a grid (float activations)."""
        s = self._spec()
        if s.a_bits == 1:
            return jnp.ones((), jnp.float32)
        if s.a_bits >= FLOAT_BITS or not self.has_variable("params", "act_alpha"):
            return None
        return self.get_variable("params", "act_alpha") / (2 ** s.a_bits - 1)

    def _spec(self) -> LayerSpec:
        """The spec this trace runs: the float one inside `quantizers_bypassed(role)`."""
        return float_spec(self.spec) if self.role in _FLOAT_ROLES.get() else self.spec

    def activation(self, pre):
        """The layer's registered activation quantizer (`spec.act_quantizer`): at 1 bit a
        sign of the pooled pre-activation (alpha unused: a constant 1, no parameter), at
        2+ bits on the pooled ReLU with the learnable clip `act_alpha`."""
        s = self._spec()
        fn = quant.activation_quantizer(s.act_quantizer)
        if s.a_bits == 1:  # binary: pool then sign (both monotone, order is free)
            a = max_pool(pre, s.pool) if s.pool else pre
            return self._quantize(fn, a, jnp.ones((), a.dtype), 1)
        a = nn.relu(pre)
        if s.pool:
            a = max_pool(a, s.pool)
        if s.a_bits < FLOAT_BITS:
            alpha = self.param("act_alpha", nn.initializers.constant(self.act_init), ())
            a = self._quantize(fn, a, alpha.astype(a.dtype), s.a_bits)
        return a

    def _quantize(self, fn, a, alpha, bits: int):
        """`fn(a, alpha, bits)`, its input recorded inside `record_quantizer_inputs`."""
        found = _QUANT_INPUTS.get()
        if found is not None:
            found[self.spec.name] = (a, alpha, bits)
        return fn(a, alpha, bits)


class Network(nn.Module):
    """A chain of layers with per-layer roles; `start`/`stop` run a slice of it."""

    specs: tuple[LayerSpec, ...]
    roles: tuple[str, ...]
    zero_point: tuple[int, ...]
    inv_std: tuple[float, ...]
    per_channel: bool = False
    bn_axis_name: Optional[str] = None
    act_init: float = 4.0
    bias_grid: bool = False

    def setup(self):
        self.layers = [
            Layer(spec=s, role=r, per_channel=self.per_channel,
                  inv_std=self.inv_std if i == 0 else None, bn_axis_name=self.bn_axis_name,
                  act_init=self.act_init, bias_grid=self.bias_grid, name=s.name)
            for i, (s, r) in enumerate(zip(self.specs, self.roles))
        ]

    def __call__(self, x, train: bool = False, start: int = 0, stop: Optional[int] = None,
                 capture: bool = False):
        """Run layers [start, stop). At start == 0, `x` is uint8 images.

        Returns the output (logits when stop is the end) and, with `capture`, the list of
        (activation, pre-activation) per layer run.
        """
        stop = len(self.specs) if stop is None else stop
        if start == 0:
            x = normalize_input(x, self.zero_point)
        trace = []
        step = None  # the input's grid step, for bias_grid: pixels at 1/255, then each layer's
        if self.bias_grid:
            step = jnp.asarray(1.0 / 255.0, jnp.float32) if start == 0 else self.layers[start - 1].out_step()
        for layer in self.layers[start:stop]:
            x, pre = layer(x, train, in_step=step)
            if self.bias_grid:
                step = layer.out_step()
            if capture:
                trace.append((x, pre))
        return (x, trace) if capture else x


def make_network(specs: Sequence[LayerSpec], roles: Sequence[str] | str, mean, std, *,
                 requant: str = "layer", bn_axis_name: Optional[str] = None,
                 act_init: float = 4.0, bias_grid: bool = False) -> Network:
    """Build a Network; `roles` is one role for all layers or one per layer."""
    if requant not in ("layer", "channel"):
        raise ValueError(f"requant must be 'layer' or 'channel', got {requant!r}")
    if isinstance(roles, str):
        roles = [roles] * len(specs)
    return Network(specs=tuple(specs), roles=tuple(roles),
                   zero_point=tuple(int(z) for z in input_zero_point(mean)),
                   inv_std=tuple(float(1.0 / s) for s in std), per_channel=requant == "channel",
                   bn_axis_name=bn_axis_name, act_init=act_init, bias_grid=bias_grid)
