"""A job's config checked whole, before anything is written: its key structure, every
value's type and domain, then the rules that tie two keys together (the model's layer
count, the dataset's classes and sizes, loss weights that leave something to train).

`validate_config` reports every error it finds, in one line, each naming the key, the
value and the allowed domain: ``teacher.steps=0 must be an int >= 1; ...``.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Optional

import ml_collections

from bnfree_jax import quant
from bnfree_jax.config_io import (ADDED, ConfigError, _first_line, flatten, import_plugins, is_retired, load_config,
                                 setting)
from bnfree_jax.data.augment import AUGMENTS
from bnfree_jax.data.info import SPLITS, dataset_info
from bnfree_jax.distill.baselines import BASELINES
from bnfree_jax.distill.plan import FROZEN, SLOW, STAGE_BUDGETS, TRAINABLE
from bnfree_jax.nn.weights import channel_axis
from bnfree_jax.nn.zoo import MAX_BITS, MODELS, get_layer_specs, parse_layer_rules
from bnfree_jax.train.mesh import PLATFORMS, use_cpu_devices

Check = Callable[[Any], Optional[str]]  # None when the value is allowed, else what is wrong with it

OPTIMIZERS = ("sgd", "adamw")          # train/optim.py _base
SCHEDULES = ("cosine", "constant")     # train/optim.py make_schedule
REQUANTS = ("layer", "channel")        # nn/network.py make_network
COMPUTE_DTYPES = ("float32", "bfloat16")
LAYER_TARGETS = ("tandem", "teacher")  # distill/plan.py build_stage_plan


# --- checks of one value ------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(lo: int, hi: Optional[int] = None) -> Check:
    """An int (never a bool) >= lo, and <= hi when given."""
    def check(v):
        if hi is None:
            return None if _is_int(v) and v >= lo else f"must be an int >= {lo}"
        if not _is_int(v):
            return f"must be an int in {lo}..{hi}"
        return None if lo <= v <= hi else f"is outside {lo}..{hi}"
    return check


def real(lo: float, strict: bool = False, below: Optional[float] = None) -> Check:
    """A finite number >= lo (> lo when `strict`), and < `below` when given."""
    domain = f"a finite number {'>' if strict else '>='} {lo:g}" if below is None else \
        f"a number in [{lo:g}, {below:g})"

    def check(v):
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and (v > lo if strict else v >= lo) and (below is None or v < below))
        return None if ok else f"must be {domain}"
    return check


def clip_init(v: Any) -> Optional[str]:
    """`model.act_init`: a constant clip > 0, or a calibrator that sets the clips
    (train/clip_calibration.py)."""
    if isinstance(v, str):
        return None if v in quant.METHODS else f"must be a number > 0 or a calibrator ({', '.join(quant.METHODS)})"
    return real(0, strict=True)(v) and f"must be a number > 0 or a calibrator ({', '.join(quant.METHODS)})"


def one_of(choices) -> Check:
    choices = tuple(choices)

    def check(v):
        return None if isinstance(v, str) and v in choices else \
            "must be one of " + ", ".join(repr(c) for c in choices)
    return check


def boolean(v: Any) -> Optional[str]:
    return None if isinstance(v, bool) else "must be True or False"


def string(v: Any) -> Optional[str]:
    return None if isinstance(v, str) else "must be a string"


def warmup(v: Any) -> Optional[str]:
    """train/optim.py warmup_steps_of: a step count, or a float fraction < 1 of the phase's
    steps (a whole float such as 100.0, which an int override of a float key becomes, counts steps)."""
    if _is_int(v) and v >= 0:
        return None
    if isinstance(v, float) and math.isfinite(v) and (0 <= v < 1 or (v >= 1 and v.is_integer())):
        return None
    return "must be a step count >= 0 or a fraction in [0, 1) of the phase's steps"


def percent(v: Any) -> Optional[str]:
    """A percentile in (0, 100] (`ptq_sweep.percentiles`)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 100
    return None if ok else "must be a number in (0, 100]"


def bits_name(v: Any) -> Optional[str]:
    """A sweep entry 'wXaY' with X and Y in 1..8."""
    m = re.fullmatch(r"w(\d+)a(\d+)", v) if isinstance(v, str) else None
    if m and all(1 <= int(b) <= MAX_BITS for b in m.groups()):
        return None
    return f"must be 'wXaY' with X, Y in 1..{MAX_BITS}"


def registered(kind: str) -> Check:
    """The name of a registered quantizer of `kind`, looked up when checked (so after the
    job's plug-ins registered theirs)."""
    def check(v):
        names = quant.weight_quantizers() if kind == "weight" else quant.activation_quantizers()
        return None if isinstance(v, str) and v in names else \
            f"is not a registered {kind} quantizer (known: {', '.join(names)}; a module in model.plugins can register one)"
    return check


def module_name(v: Any) -> Optional[str]:
    """An importable module's dotted name (`model.plugins`)."""
    ok = isinstance(v, str) and all(p.isidentifier() for p in v.split("."))
    return None if ok else "must be a module name (dotted identifiers)"


def sha256_hex(v: Any) -> Optional[str]:
    return None if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) else "must be a sha256 hex digest"


def layer_rules(v: Any) -> Optional[str]:
    """`model.layers`: [(regex, {w_bits|a_bits|weight_quantizer|act_quantizer: value})]
    (nn.zoo.parse_layer_rules; whether each regex matches a layer is a rule across keys)."""
    try:
        parse_layer_rules(v)
    except ValueError as e:
        return f"is malformed: {e}"
    return None


TABLE_KEYS = ("name", "w_bits", "a_bits", "weight_quantizer", "act_quantizer")


def layer_table(v: Any) -> Optional[str]:
    """`model.layer_table` (derived, see pipeline.context.record_layer_table): one record per layer."""
    ok = isinstance(v, (list, tuple)) and all(hasattr(r, "keys") and sorted(r.keys()) == sorted(TABLE_KEYS)
                                              for r in v)
    return None if ok else f"must be a list of per-layer records with keys {', '.join(TABLE_KEYS)}"


def each(check: Check, nonempty: bool = True) -> Check:
    """A list (or tuple) whose every element passes `check`."""
    def list_check(v):
        if not isinstance(v, (list, tuple)):
            return "must be a list"
        if nonempty and not v:
            return "must not be empty"
        for x in v:
            why = check(x)
            if why:
                return f"has {x!r}, which {why}"
        return None
    return list_check


# --- the schema -----------------------------------------------------------------------

STEPS, COUNT, BATCH = integer(1), integer(0), integer(1)
WEIGHT, POSITIVE, FRACTION = real(0), real(0, strict=True), real(0, below=1)
BITS = integer(1, MAX_BITS)

OPTIM = {"name": one_of(OPTIMIZERS), "lr": POSITIVE, "momentum": FRACTION, "nesterov": boolean,
         "b1": FRACTION, "b2": FRACTION, "weight_decay": WEIGHT, "warmup_steps": warmup,
         "schedule": one_of(SCHEDULES), "grad_clip": WEIGHT, "agc": WEIGHT,
         "slow_lr_factor": POSITIVE}
OPTIM_REQUIRED = ("name", "lr")  # train/optim.py reads the others with defaults

_SECTIONS = {
    "seed": COUNT,
    "data": {"name": one_of(sorted(SPLITS)), "data_dir": string, "augment": one_of(AUGMENTS),
             "image_size": COUNT, "max_train_examples": COUNT, "max_test_examples": COUNT,
             "eval_batch": BATCH, "holdout": COUNT, "workers": COUNT, "read_threads": COUNT,
             "prefetch": integer(1)},
    "model": {"name": one_of(sorted(MODELS)), "num_classes": integer(2), "w_bits": BITS,
              "a_bits": BITS, "first_last_w_bits": BITS, "requant": one_of(REQUANTS),
              "act_init": clip_init, "weight_quantizer": registered("weight"),
              "act_quantizer": registered("activation"), "plugins": each(module_name, nonempty=False),
              "plugin_sha256": each(sha256_hex, nonempty=False),  # derived: see record_plugins
              "layers": layer_rules, "layer_table": layer_table, "bias_grid": boolean},  # derived: context.record_layer_table
    "teacher": {"steps": STEPS, "batch": BATCH, "optim": OPTIM},
    "qat": {"steps": STEPS, "batch": BATCH, "optim": OPTIM},
    "ptl": {"batch": BATCH, "local_init_steps": COUNT, "stage_steps": STEPS, "finetune_steps": COUNT,
            "layer_loss_weight": WEIGHT, "ce_weight": WEIGHT, "kd_weight": WEIGHT,
            "kd_temperature": POSITIVE, "prefix": one_of((FROZEN, SLOW)), "local_init": boolean,
            "compensation": boolean, "layer_target": one_of(LAYER_TARGETS),
            "own_layer_rate": one_of((TRAINABLE, SLOW)), "head_layers": integer(1),
            "block_layers": integer(1), "train_own_activation": boolean,
            "stage_budget": one_of(STAGE_BUDGETS),
            "cache_teacher": boolean, "target_cache_mb": COUNT, "optim": OPTIM, "finetune_optim": OPTIM},
    "checkpoint": {"save_every": STEPS, "keep": integer(1), "log_every": STEPS, "grad_diagnostics": boolean},
    "mesh": {"compute_dtype": one_of(COMPUTE_DTYPES), "platform": one_of(PLATFORMS), "cpu_devices": COUNT},
    "sweep": {"bits": each(bits_name), "requant": each(one_of(REQUANTS)), "seeds": each(COUNT),
              "baselines": each(one_of(BASELINES), nonempty=False), "ptl": one_of(("first", "last", "skip")),
              "binary_qat_steps": STEPS,
              "binary_qat_lr": POSITIVE},
    "ptq_sweep": {"methods": each(one_of(quant.METHODS)), "percentiles": each(percent),
                  "bits": each(bits_name), "images": each(integer(1)), "requant": each(one_of(REQUANTS)),
                  "samples": each(COUNT), "weight_calib": one_of(("minmax", "mse")),
                  "verify": one_of(("all", "first"))},
}
SCHEMA: dict[str, Check] = flatten(_SECTIONS)

# Keys the code reads with a default (an older pinned config.json may lack them).
_OPTIM_BLOCKS = ("teacher.optim", "qat.optim", "ptl.optim", "ptl.finetune_optim")
OPTIONAL = {"data.holdout", "ptl.own_layer_rate", "ptl.head_layers", "mesh.platform",
            "checkpoint.log_every", "data.workers", "data.read_threads", "data.prefetch",
            "model.weight_quantizer", "model.act_quantizer", "model.plugins", "model.plugin_sha256",
            "model.layers", "model.layer_table", "ptl.train_own_activation", "checkpoint.grad_diagnostics",
            "ptl.block_layers", "ptl.stage_budget", "mesh.cpu_devices", "sweep.ptl", "model.bias_grid"} | {
    f"{block}.{k}" for block in _OPTIM_BLOCKS for k in OPTIM if k not in OPTIM_REQUIRED}
OPTIONAL_SECTIONS = ("sweep", "ptq_sweep")  # only `bnfree sweep` / `bnfree ptq-sweep` read them


# --- validation -------------------------------------------------------------------------

def validate_config(config) -> None:
    """Raise one ConfigError listing every bad key of `config` (a ConfigDict or nested dict).

    Batch divisibility by the device count is not checked here: it needs the mesh."""
    errors = config_errors(config)
    if errors:
        raise ConfigError("; ".join(errors))


def config_errors(config) -> list[str]:
    """Every problem of `config`, one short phrase each: its structure, then each value,
    then the rules across keys (those run on the keys whose own value passed)."""
    if not isinstance(config, (dict, ml_collections.ConfigDict)):
        return [f"the config is a {type(config).__name__}, not an ml_collections.ConfigDict"]
    flat = {k: v for k, v in flatten(config).items() if not is_retired(k)}
    errors = _structure_errors(flat) + _plugin_errors(flat)
    good = {}
    for key, value in flat.items():
        check = SCHEMA.get(key)
        if check is None:
            continue
        why = check(value)
        if why:
            errors.append(f"{key}={value!r} {why}")
        else:
            good[key] = value
    for rule in (_model_rules, _layer_rule_errors, _data_rules, _loss_rules):
        errors += rule(good)
    return errors


def _structure_errors(flat: dict) -> list[str]:
    """Unknown keys, values where a section belongs, and missing required keys."""
    errors, scalars = [], set()
    for key in flat:
        if key in SCHEMA:
            continue
        if any(k.startswith(key + ".") for k in SCHEMA):
            scalars.add(key)
            errors.append(f"{key}={flat[key]!r} is a value where a section of keys belongs")
        else:
            errors.append(f"unknown config key {key!r}")
    present = {k.split(".", 1)[0] for k in flat}

    def required(key: str) -> bool:
        top = key.split(".", 1)[0]
        return (key not in OPTIONAL and not (top in OPTIONAL_SECTIONS and top not in present)
                and not any(key.startswith(s + ".") for s in scalars))  # `model=3`: said once

    missing = [k for k in SCHEMA if k not in flat and required(k)]
    if missing:
        errors.append(f"missing config key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return errors


def _plugin_errors(flat: dict) -> list[str]:
    """Import the plug-ins (before the quantizer names are checked); a pinned config's
    recorded file sha256s must still be the files' own."""
    names = flat.get("model.plugins", [])
    if SCHEMA["model.plugins"](names):
        return []  # the value check reports it
    try:
        hashes = import_plugins(names)
    except ConfigError as e:
        return [str(e)]
    pinned = flat.get("model.plugin_sha256")
    if pinned is None or SCHEMA["model.plugin_sha256"](pinned):
        return []
    if len(pinned) != len(names):
        return [f"model.plugin_sha256 has {len(pinned)} entries for {len(names)} model.plugins"]
    return [f"model.plugins: the file of {name!r} changed since the job was pinned (sha256 {old[:12]}…, "
            f"now {new[:12]}…): restore it or start the job over"
            for name, old, new in zip(names, pinned, hashes) if old != new]


def record_plugins(config: ml_collections.ConfigDict) -> None:
    """Import `model.plugins` and set `model.plugin_sha256` to their files' sha256s, so the
    pinned config.json and the artifact's manifest say what the job trained with."""
    names = config.model.get("plugins", []) if "model" in config else []
    if not names or SCHEMA["model.plugins"](names):
        return  # nothing to record, or validation reports the bad value
    config.model.plugin_sha256 = import_plugins(names)


def _model_rules(good: dict) -> list[str]:
    """ptl.head_layers and ptl.block_layers count the model's layers; a block converts
    several layers in one stage, so it has no single layer whose clip to train."""
    name, classes = good.get("model.name"), good.get("model.num_classes")
    head, block = good.get("ptl.head_layers"), good.get("ptl.block_layers", ADDED["ptl.block_layers"])
    errors = []
    if block > 1 and good.get("ptl.train_own_activation"):
        errors.append(f"ptl.block_layers={block} converts several layers per stage; ptl.train_own_activation "
                      "needs ptl.block_layers=1")
    if name is None or classes is None or head is None:
        return errors
    n = len(MODELS[name](classes))
    if head > n:
        return errors + [f"ptl.head_layers={head} is outside 1..{n} (the layers of {name})"]
    body = n if head == 1 else n - head  # the layers converted before the head stage
    if block > max(body, 1):
        errors.append(f"ptl.block_layers={block} is outside 1..{body} (the layers of {name} before its "
                      f"ptl.head_layers={head} head)" if head > 1 else
                      f"ptl.block_layers={block} is outside 1..{n} (the layers of {name})")
    return errors


def _layer_rule_errors(good: dict) -> list[str]:
    """`model.layers` resolved over the model's layers (a rule matching none, an output
    override on the logits layer), then every layer's quantizers: registered, and able to
    run at the layer's widths (a binary-only quantizer on an 8-bit layer fails here, in one
    line, not while the network is traced)."""
    keys = ("name", "num_classes", "w_bits", "a_bits", "first_last_w_bits", "requant")
    m = {k: good.get(f"model.{k}") for k in keys}
    for k in ("weight_quantizer", "act_quantizer", "layers"):
        m[k] = good.get(f"model.{k}", ADDED[f"model.{k}"])
    if any(v is None for v in m.values()):
        return []  # a bad value is reported by its own check (a bad quantizer key reads as its default)
    try:
        specs = get_layer_specs(m["name"], m["num_classes"], m["w_bits"], m["a_bits"], m["first_last_w_bits"],
                                m["weight_quantizer"], m["act_quantizer"], rules=m["layers"])
    except ValueError as e:
        return [str(e)]
    axis = channel_axis(m["requant"] == "channel")
    uses = [("weight", s.weight_quantizer, s.w_bits, s.name) for s in specs] + \
        [("activation", s.act_quantizer, s.a_bits, s.name) for s in specs if not s.last]
    errors, failing = [], {}
    for kind, name, bits, layer in uses:
        known = quant.weight_quantizers() if kind == "weight" else quant.activation_quantizers()
        if name not in known:
            errors.append(f"layer {layer!r}: {'weight' if kind == 'weight' else 'act'}_quantizer={name!r} is not a "
                          f"registered {kind} quantizer (known: {', '.join(known)}; a module in model.plugins "
                          "can register one)")
        else:
            fn = (quant.weight_quantizer if kind == "weight" else quant.activation_quantizer)(name)
            why = _probe(kind, fn, bits, axis)
            if why:
                failing.setdefault((kind, name, bits, why), []).append(layer)
    for (kind, name, bits, why), layers in failing.items():
        errors.append(f"{kind} quantizer {name!r} cannot run at {bits} bits, the width of layer"
                      f"{'s' if len(layers) > 1 else ''} {', '.join(layers)}: {why} "
                      "(a model.layers rule can choose another quantizer for them)")
    return errors


@functools.lru_cache(maxsize=None)
def _probe(kind: str, fn, bits: int, axis) -> Optional[str]:
    """None when quantizer `fn` runs forward at `bits` on a tiny probe, else its error
    (cached per function and width: validation runs once per command, on few widths)."""
    import jax.numpy as jnp
    import numpy as np

    try:
        if kind == "weight":
            fn(jnp.asarray(np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4)), bits, axis)
        else:
            fn(jnp.asarray(np.linspace(-1, 3, 16, dtype=np.float32)[None]), jnp.ones((), jnp.float32), bits)
    except Exception as e:  # noqa: BLE001 - whatever a plug-in raises is one line
        return _first_line(e)
    return None


def _data_rules(good: dict) -> list[str]:
    """The dataset decides the image size, the class count and how much can be held out."""
    name = good.get("data.name")
    size = good.get("data.image_size")
    if name is None or size is None:
        return []
    try:
        info = dataset_info(name, size or None)
    except ValueError as e:
        return [f"data.image_size={size!r}: {e}"]
    errors = []
    classes = good.get("model.num_classes")
    if classes is not None and classes != info.num_classes:
        errors.append(f"model.num_classes={classes!r} must be {info.num_classes} "
                      f"(the classes of data.name={name!r})")
    holdout = good.get("data.holdout", 0)
    if holdout >= info.num_train:
        errors.append(f"data.holdout={holdout!r} must be < {info.num_train} "
                      f"(the training examples of {name}), or 0")
    if good.get("data.augment") == "imagenet" and not size:
        errors.append("data.augment='imagenet' needs data.image_size > 0 (its crop size)")
    return errors


def _loss_rules(good: dict) -> list[str]:
    """Loss weights that are all zero would train a stage on nothing."""
    w = {k: good.get(f"ptl.{k}") for k in ("layer_loss_weight", "ce_weight", "kd_weight")}
    if any(v is None for v in w.values()):
        return []
    if not any(w.values()):
        return ["ptl.layer_loss_weight, ptl.ce_weight and ptl.kd_weight are all 0: "
                "the progressive stages would train on nothing"]
    end_to_end = set(good.get("sweep.baselines", ())) & {"fold_qat", "scratch"}  # CE + KD only
    if not (w["ce_weight"] or w["kd_weight"]) and (good.get("ptl.finetune_steps", 0) > 0 or end_to_end):
        return ["ptl.ce_weight=0 and ptl.kd_weight=0: the fine-tune "
                f"{'and the baselines ' + ', '.join(sorted(end_to_end)) + ' ' if end_to_end else ''}"
                "would train on nothing (set one > 0)"]
    return []


def load_valid_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
    """`config_io.load_config`, then every value checked: nothing is run or written for a
    config that would be refused.  A valid `mesh.cpu_devices` is applied first: JAX fixes
    the device count at its first operation, and the quantizer probes are JAX operations."""
    config = load_config(spec, overrides)
    n = setting(config, "mesh.cpu_devices")
    if not SCHEMA["mesh.cpu_devices"](n):  # a bad value is reported with every other below
        try:
            use_cpu_devices(n)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    record_plugins(config)
    validate_config(config)
    return config
