"""One Flax definition for the BN teacher, the BN-free student and every tandem mix of them.

`Network(roles=...)` holds one `Layer` per spec, named after it, so a parameter tree is
`{layer_name: {...}}` and the tandem network `[S_1..S_ℓ, T'_{ℓ+1}..T'_L]` is just the
union of the student's first ℓ subtrees and the teacher's remaining ones.
"""

from __future__ import annotations

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

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.spec
        if s.kind == "dense" and x.ndim > 2:
            x = x.reshape(x.shape[0], -1)
        in_ch = x.shape[-1]
        shape = (s.kernel, s.kernel, in_ch, s.features) if s.kind == "conv" else (in_ch, s.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        w = kernel
        if self.inv_std is not None:
            w = w * jnp.asarray(along_input(self.inv_std, w.shape), w.dtype)
        if s.quantized:
            if self.role == STUDENT:
                w, _ = student_weight(w, s.w_bits, self.per_channel)
            else:
                w = teacher_weight(w, s.w_bits, self.per_channel)
        w = w.astype(x.dtype)
        if s.kind == "conv":
            y = jax.lax.conv_general_dilated(
                x, w, (s.stride, s.stride), s.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            y = x @ w
        if self.role == STUDENT:
            alpha_shape = (s.features,) if self.per_channel else ()
            alpha = self.param("alpha", nn.initializers.ones, alpha_shape)
            beta = self.param("beta", nn.initializers.zeros, (s.features,))
            pre = y * alpha.astype(y.dtype) + beta.astype(y.dtype)
        elif s.last:
            pre = y + self.param("bias", nn.initializers.zeros, (s.features,)).astype(y.dtype)
        else:
            pre = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                               axis_name=self.bn_axis_name if train else None, name="bn")(y)
        if s.last:
            return pre, pre
        return self.activation(pre), pre

    def activation(self, pre):
        s = self.spec
        if s.a_bits == 1:  # binary: pool then sign (both monotone, order is free)
            a = max_pool(pre, s.pool) if s.pool else pre
            return quant.approx_sign(a)
        a = nn.relu(pre)
        if s.pool:
            a = max_pool(a, s.pool)
        if s.a_bits < FLOAT_BITS:
            alpha = self.param("act_alpha", nn.initializers.constant(self.act_init), ())
            a = quant.pact_quantize(a, alpha.astype(a.dtype), s.a_bits)
        return a


class Network(nn.Module):
    """A chain of layers with per-layer roles; `start`/`stop` run a slice of it."""

    specs: tuple[LayerSpec, ...]
    roles: tuple[str, ...]
    zero_point: tuple[int, ...]
    inv_std: tuple[float, ...]
    per_channel: bool = False
    bn_axis_name: Optional[str] = None
    act_init: float = 4.0

    def setup(self):
        self.layers = [
            Layer(spec=s, role=r, per_channel=self.per_channel,
                  inv_std=self.inv_std if i == 0 else None, bn_axis_name=self.bn_axis_name,
                  act_init=self.act_init, name=s.name)
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
        for layer in self.layers[start:stop]:
            x, pre = layer(x, train)
            if capture:
                trace.append((x, pre))
        return (x, trace) if capture else x


def make_network(specs: Sequence[LayerSpec], roles: Sequence[str] | str, mean, std, *,
                 requant: str = "layer", bn_axis_name: Optional[str] = None,
                 act_init: float = 4.0) -> Network:
    """Build a Network; `roles` is one role for all layers or one per layer."""
    if requant not in ("layer", "channel"):
        raise ValueError(f"requant must be 'layer' or 'channel', got {requant!r}")
    if isinstance(roles, str):
        roles = [roles] * len(specs)
    return Network(specs=tuple(specs), roles=tuple(roles),
                   zero_point=tuple(int(z) for z in input_zero_point(mean)),
                   inv_std=tuple(float(1.0 / s) for s in std), per_channel=requant == "channel",
                   bn_axis_name=bn_axis_name, act_init=act_init)
