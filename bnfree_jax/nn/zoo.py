"""Model zoo as data: each network is a list of `LayerSpec`, so distillation stages,
export and the interpreter can all address layer ℓ by name without touching Flax code."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

FLOAT_BITS = 32  # a bit width of 32 means "not quantised" (the float teacher)
# The registered quantizers (bnfree_jax.quant) that reproduce the project's own rules.
DEFAULT_WEIGHT_QUANTIZER = "maxabs"  # the student's symmetric max-abs weights
DEFAULT_ACT_QUANTIZER = "pact"       # PACT at 2+ bits, Bi-Real's approx-sign at 1 bit


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One conv or dense layer: op → (BN | IntScale) → activation → [max-pool]."""

    name: str
    kind: str  # "conv" | "dense"
    features: int
    kernel: int = 3
    stride: int = 1
    padding: str = "SAME"
    pool: int = 0  # max-pool window (= stride); 0 for none
    w_bits: int = FLOAT_BITS
    a_bits: int = FLOAT_BITS  # bits of this layer's output activation
    last: bool = False  # the logits layer: no activation, no BN in the teacher
    weight_quantizer: str = DEFAULT_WEIGHT_QUANTIZER  # the student's, by registered name
    act_quantizer: str = DEFAULT_ACT_QUANTIZER  # the output activation's (teacher and student)

    @property
    def quantized(self) -> bool:
        return self.w_bits < FLOAT_BITS


def _conv(name, features, kernel, pool=0, stride=1):
    return LayerSpec(name=name, kind="conv", features=features, kernel=kernel, stride=stride, pool=pool)


def _dense(name, features, last=False):
    return LayerSpec(name=name, kind="dense", features=features, kernel=1, last=last)


def alexnet_mini(num_classes: int = 10) -> list[LayerSpec]:
    """The MNIST network: 5 convs, 3 dense layers."""
    return [
        _conv("conv1", 32, 5, pool=2),
        _conv("conv2", 64, 3, pool=2),
        _conv("conv3", 96, 3),
        _conv("conv4", 96, 3),
        _conv("conv5", 64, 3, pool=2),
        _dense("fc6", 256),
        _dense("fc7", 256),
        _dense("fc8", num_classes, last=True),
    ]


def alexnet_cifar(num_classes: int = 10) -> list[LayerSpec]:
    """The 32×32 network used for CIFAR-10 and the benchmarks."""
    return [
        _conv("conv1", 64, 3, pool=2),
        _conv("conv2", 128, 3, pool=2),
        _conv("conv3", 256, 3),
        _conv("conv4", 256, 3, pool=2),
        _dense("fc5", 512),
        _dense("fc6", num_classes, last=True),
    ]


def alexnet(num_classes: int = 1000) -> list[LayerSpec]:
    """BN-AlexNet as used by quantised-network papers (conv 96-256-384-384-256, fc 4096-4096)."""
    return [
        _conv("conv1", 96, 11, pool=2, stride=4),
        _conv("conv2", 256, 5, pool=2),
        _conv("conv3", 384, 3),
        _conv("conv4", 384, 3),
        _conv("conv5", 256, 3, pool=2),
        _dense("fc6", 4096),
        _dense("fc7", 4096),
        _dense("fc8", num_classes, last=True),
    ]


def tiny_cnn(num_classes: int = 10) -> list[LayerSpec]:
    """A three-layer network for fast tests of every code path (conv, pool, dense, logits)."""
    return [
        _conv("conv1", 8, 3, pool=2),
        _conv("conv2", 16, 3, pool=2),
        _dense("fc3", num_classes, last=True),
    ]


def vgg_plain(num_classes: int = 10, blocks: Sequence[int] = (32, 64, 128), depth: int = 4) -> list[LayerSpec]:
    """A deep plain network for 28×28 inputs, where BN-free end-to-end training loses BN's
    stability: `depth` 3×3 convs per block of `blocks` channels (28→14→7→3 by 2×2
    pooling after each block), then two dense layers; no residuals. 12 convs by default."""
    layers, i = [], 0
    for width in blocks:
        for j in range(depth):
            i += 1
            layers.append(_conv(f"conv{i}", width, 3, pool=2 if j == depth - 1 else 0))
    return layers + [_dense(f"fc{i + 1}", 256), _dense(f"fc{i + 2}", num_classes, last=True)]


MODELS = {"alexnet_mini": alexnet_mini, "vgg_plain": vgg_plain, "alexnet_cifar": alexnet_cifar, "alexnet": alexnet,
          "tiny_cnn": tiny_cnn}


def with_bits(specs: Sequence[LayerSpec], w_bits: int, a_bits: int, first_last_w_bits: int = 8,
              weight_quantizer: str = DEFAULT_WEIGHT_QUANTIZER,
              act_quantizer: str = DEFAULT_ACT_QUANTIZER) -> list[LayerSpec]:
    """Assign bit widths: W/A everywhere, first and last layer weights at `first_last_w_bits`,
    and the registered quantizer names every layer uses.

    `w_bits == a_bits == 32` gives the float network. Every hidden layer outputs A-bit
    activations; the last layer outputs logits.
    """
    for b in (w_bits, a_bits, first_last_w_bits):
        if not (1 <= b <= 8 or b == FLOAT_BITS):
            raise ValueError(f"bit width {b} is outside 1..8 (or 32 for float)")
    out = []
    for i, s in enumerate(specs):
        edge = i == 0 or s.last
        wb = w_bits if w_bits == FLOAT_BITS else (first_last_w_bits if edge else w_bits)
        out.append(dataclasses.replace(s, w_bits=wb, a_bits=FLOAT_BITS if s.last else a_bits,
                                       weight_quantizer=weight_quantizer, act_quantizer=act_quantizer))
    return out


# `model.layers` rules: the LayerSpec fields a rule may override, and what each takes.
RULE_KEYS = ("w_bits", "a_bits", "weight_quantizer", "act_quantizer")
OUTPUT_KEYS = ("a_bits", "act_quantizer")  # the output activation's: the last layer has none
MAX_BITS = 8


def _check_override(pattern: str, key: str, value: Any) -> None:
    """One override of a rule: a known key, bits in 1..MAX_BITS, a quantizer name a string."""
    if key not in RULE_KEYS:
        raise ValueError(f"model.layers rule {pattern!r}: override key {key!r} is not one of "
                         f"{', '.join(RULE_KEYS)}")
    if key.endswith("_bits"):
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_BITS):
            raise ValueError(f"model.layers rule {pattern!r}: {key}={value!r} is outside 1..{MAX_BITS}")
    elif not (isinstance(value, str) and value):
        raise ValueError(f"model.layers rule {pattern!r}: {key}={value!r} must be a quantizer name")


def parse_layer_rules(rules: Any) -> list[tuple[str, dict]]:
    """`model.layers` as [(regex, overrides)], each checked: a list of 2-item pairs (tuples,
    or lists as config.json writes them) of a compilable regex and a dict of RULE_KEYS."""
    if not isinstance(rules, (list, tuple)):
        raise ValueError(f"model.layers={rules!r} must be a list of (regex, overrides) pairs")
    out = []
    for rule in rules:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
                and hasattr(rule[1], "items")):
            raise ValueError(f"model.layers rule {rule!r} must be a (regex, {{key: value}}) pair")
        pattern, overrides = rule[0], dict(rule[1].items())
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"model.layers rule {pattern!r} is not a regular expression: {e}") from None
        if not overrides:
            raise ValueError(f"model.layers rule {pattern!r} overrides nothing")
        for key, value in overrides.items():
            _check_override(pattern, key, value)
        out.append((pattern, overrides))
    return out


def apply_layer_rules(specs: Sequence[LayerSpec], rules: Any) -> list[LayerSpec]:
    """The specs with `model.layers` rules applied: for each layer the first rule whose regex
    fullmatches its name overrides its fields; a layer no rule matches keeps its defaults.

    Refused (ValueError, one line): a malformed rule, a rule matching no layer (it would be
    silently dead), and an output-activation override (a_bits, act_quantizer) reaching the
    last layer, whose output is float logits. Quantizer names are checked by the caller
    against the registry (nn/ does not know which plug-ins were imported)."""
    rules = parse_layer_rules(rules)
    names = [s.name for s in specs]
    for pattern, _ in rules:
        if not any(re.fullmatch(pattern, n) for n in names):
            raise ValueError(f"model.layers rule {pattern!r} matches no layer (layers: {', '.join(names)})")
    out = []
    for s in specs:
        hit = next((o for p, o in rules if re.fullmatch(p, s.name)), None)
        if hit is None:
            out.append(s)
            continue
        if s.last and any(k in hit for k in OUTPUT_KEYS):
            raise ValueError(f"model.layers rule for {s.name!r} sets {', '.join(k for k in OUTPUT_KEYS if k in hit)} "
                             f"but {s.name} is the last layer: its output is float logits")
        out.append(dataclasses.replace(s, **hit))
    return out


def layer_table(specs: Sequence[LayerSpec]) -> list[dict]:
    """The resolved per-layer table a job records (config.json, manifest, ledger, report):
    name, bits and quantizer names; the last layer's output (float logits) has a_bits 32 and
    no act_quantizer."""
    return [{"name": s.name, "w_bits": s.w_bits, "a_bits": s.a_bits, "weight_quantizer": s.weight_quantizer,
             "act_quantizer": None if s.last else s.act_quantizer} for s in specs]


def get_layer_specs(model: str, num_classes: int, w_bits: int = FLOAT_BITS, a_bits: int = FLOAT_BITS,
                    first_last_w_bits: int = 8, weight_quantizer: str = DEFAULT_WEIGHT_QUANTIZER,
                    act_quantizer: str = DEFAULT_ACT_QUANTIZER, rules: Any = ()) -> list[LayerSpec]:
    """The model's specs at the default widths and quantizers, then the `model.layers` rules."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODELS)}")
    specs = with_bits(MODELS[model](num_classes), w_bits, a_bits, first_last_w_bits,
                      weight_quantizer, act_quantizer)
    return apply_layer_rules(specs, rules) if rules else specs
