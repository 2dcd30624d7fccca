"""Config validation: every bad value, key or file is refused with one ConfigError line that
names it, before a job writes anything; every shipped config (with each argument) passes."""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from bnfree_jax.config_io import ADDED, ConfigError, apply_override, changed_keys, flatten, load_config, to_dict, with_added
from bnfree_jax.pipeline.validate import SCHEMA, validate_config

ROOT = Path(__file__).resolve().parents[1]
MNIST, SWEEP, IMAGENET = (str(ROOT / "configs" / f) for f in ("mnist_alexnet.py", "mnist_sweep.py",
                                                                  "alexnet_imagenet.py"))
NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def base() -> dict:
    """The sweep config with the PTQ sweep's block too: every key of the schema."""
    c = to_dict(load_config(SWEEP))
    c["ptq_sweep"] = to_dict(load_config(str(ROOT / "configs" / "mnist_ptq_sweep.py")))["ptq_sweep"]
    return c


def _with(config: dict, key: str, value) -> dict:
    """A copy of `config` (nested dicts) with `key` set; dicts, unlike ConfigDicts, take any type."""
    c = copy.deepcopy(config)
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value
    return c


def _refusal(config) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


BAD = [
    ("mesh.platform", "cuda"), ("mesh.platform", None), ("mesh.cpu_devices", -1), ("mesh.cpu_devices", 2.5),
    ("model.layers", [("conv1",)]), ("model.layers", "conv1"), ("model.layer_table", [{"name": "conv1"}]),
    ("checkpoint.grad_diagnostics", "yes"), ("ptl.train_own_activation", 1), ("model.bias_grid", "yes"),
    ("ptq_sweep.methods", ["kl"]), ("ptq_sweep.methods", []), ("ptq_sweep.percentiles", [0.0]),
    ("ptq_sweep.percentiles", [100.5]), ("ptq_sweep.bits", ["w9a8"]), ("ptq_sweep.images", [0]),
    ("ptq_sweep.requant", ["rows"]), ("ptq_sweep.samples", [-1]), ("ptq_sweep.weight_calib", "lsq"),
    ("ptq_sweep.verify", "some"),
    # budgets: steps >= 1 where a phase must train, >= 0 where 0 skips
    ("teacher.steps", 0), ("teacher.steps", -5), ("qat.steps", 0), ("ptl.stage_steps", -5),
    ("ptl.stage_steps", 0), ("ptl.local_init_steps", -1), ("ptl.finetune_steps", -1),
    ("teacher.steps", 1.5), ("teacher.steps", True), ("teacher.steps", "many"),
    # optimizers
    ("teacher.optim.lr", -0.1), ("teacher.optim.lr", 0.0), ("qat.optim.lr", NAN), ("ptl.optim.lr", INF),
    ("ptl.finetune_optim.lr", "0.1"), ("teacher.optim.weight_decay", -1e-4), ("teacher.optim.momentum", 1.0),
    ("teacher.optim.momentum", -0.5), ("qat.optim.b1", -0.1), ("qat.optim.b2", 1.0), ("ptl.optim.b2", NAN),
    ("teacher.optim.warmup_steps", -1), ("teacher.optim.warmup_steps", 1.5),
    ("teacher.optim.warmup_steps", -0.1), ("teacher.optim.warmup_steps", INF),
    ("teacher.optim.grad_clip", -1.0), ("ptl.optim.agc", -0.5), ("ptl.optim.agc", NAN),
    ("ptl.optim.slow_lr_factor", 0.0), ("teacher.optim.name", "adam"), ("ptl.optim.schedule", "linear"),
    ("teacher.optim.nesterov", "yes"),
    # batches
    ("teacher.batch", 0), ("qat.batch", -8), ("ptl.batch", 0), ("data.eval_batch", 0),
    # distillation
    ("ptl.kd_temperature", 0.0), ("ptl.kd_temperature", -2.0), ("ptl.kd_temperature", INF),
    ("ptl.ce_weight", -1.0), ("ptl.kd_weight", NAN), ("ptl.layer_loss_weight", INF),
    ("ptl.prefix", "thawed"), ("ptl.layer_target", "student"), ("ptl.own_layer_rate", "frozen"),
    ("ptl.head_layers", 0), ("ptl.head_layers", 9), ("ptl.block_layers", 0), ("ptl.block_layers", 9), ("ptl.target_cache_mb", -1), ("ptl.local_init", 1),
    ("ptl.compensation", "no"), ("ptl.cache_teacher", None), ("ptl.stage_budget", "by_loss"),
    # model
    ("model.w_bits", 0), ("model.a_bits", 9), ("model.first_last_w_bits", 32), ("model.w_bits", 4.0),
    ("model.w_bits", True), ("model.requant", "rows"), ("model.name", "resnet50"), ("model.num_classes", 5),
    ("model.num_classes", 1), ("model.act_init", 0.0), ("model.act_init", NAN), ("model.act_init", -4.0), ("model.act_init", "kl"),
    ("model.weight_quantizer", "nope"), ("model.weight_quantizer", 3), ("model.act_quantizer", "maxabs"),
    ("model.act_quantizer", None), ("model.plugins", "mymod"), ("model.plugins", ["my mod"]),
    ("model.plugins", [3]), ("model.plugin_sha256", ["abc"]), ("model.plugin_sha256", "0" * 64),
    # data
    ("data.name", "mnist"), ("data.augment", "randaugment"), ("data.max_train_examples", -1),
    ("data.max_test_examples", -1), ("data.holdout", -1), ("data.holdout", 60000), ("data.image_size", -1),
    ("checkpoint.log_every", 0), ("data.workers", -1), ("data.read_threads", -1), ("data.prefetch", 0), ("data.workers", 1.5),
    ("data.image_size", 64), ("data.data_dir", None),
    # the rest
    ("checkpoint.save_every", 0), ("checkpoint.keep", 0), ("seed", -1), ("seed", 1.5),
    ("mesh.compute_dtype", "float16"), ("mesh.compute_dtype", ""),
    # the sweep block
    ("sweep.bits", ["w9a4"]), ("sweep.bits", ["w4"]), ("sweep.bits", ["w0a4"]), ("sweep.bits", []),
    ("sweep.bits", "w4a4"), ("sweep.requant", ["rows"]), ("sweep.seeds", [0, -1]), ("sweep.seeds", [0.5]),
    ("sweep.baselines", ["magic"]), ("sweep.ptl", "middle"), ("sweep.binary_qat_steps", 0), ("sweep.binary_qat_lr", -1.0),
]


@pytest.mark.parametrize("key,value", BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_bad_value_is_refused_naming_key_and_value(base, key, value):
    msg = _refusal(_with(base, key, value))
    assert f"{key}={value!r}" in msg, msg


def test_every_numeric_and_enum_key_has_a_bad_case():
    """The table covers the schema: a key added without a bad case fails here."""
    covered = {k for k, _ in BAD}
    optim_fields = {k.split(".")[-1] for k in covered if ".optim." in k or ".finetune_optim." in k}
    missing = [k for k in SCHEMA if k not in covered and not (
        (".optim." in k or ".finetune_optim." in k) and k.split(".")[-1] in optim_fields)]
    assert missing == [], missing


def test_error_messages_name_the_domain(base):
    assert "is outside 1..8" in _refusal(_with(base, "model.w_bits", 9))
    assert "is outside 1..8 (the layers of alexnet_mini)" in _refusal(_with(base, "ptl.head_layers", 9))
    assert "ptl.block_layers=6 is outside 1..5 (the layers of alexnet_mini before its ptl.head_layers=3 head)" in \
        _refusal(_with(_with(base, "ptl.head_layers", 3), "ptl.block_layers", 6))
    assert "ptl.train_own_activation needs ptl.block_layers=1" in \
        _refusal(_with(_with(base, "ptl.block_layers", 2), "ptl.train_own_activation", True))
    assert "must be an int >= 1" in _refusal(_with(base, "teacher.steps", 0))
    assert "must be a finite number > 0" in _refusal(_with(base, "teacher.optim.lr", -0.1))
    assert "must be one of 'sgd', 'adamw'" in _refusal(_with(base, "teacher.optim.name", "adam"))
    assert "must be 10" in _refusal(_with(base, "model.num_classes", 5))
    assert "'none', 'crop_flip', 'imagenet'" in _refusal(_with(base, "data.augment", "x"))


def test_all_errors_reported_in_one_line(base):
    c = _with(_with(base, "teacher.steps", 0), "ptl.optim.lr", -1.0)
    msg = _refusal(c)
    assert "teacher.steps=0" in msg and "ptl.optim.lr=-1.0" in msg and msg.count(";") == 1


def test_loss_weights_that_train_nothing(base):
    zero = {"ptl.layer_loss_weight": 0.0, "ptl.ce_weight": 0.0, "ptl.kd_weight": 0.0}
    c = base
    for k, v in zero.items():
        c = _with(c, k, v)
    assert "all 0" in _refusal(c)
    no_task = _with(_with(base, "ptl.ce_weight", 0.0), "ptl.kd_weight", 0.0)
    assert "fine-tune" in _refusal(no_task)
    no_finetune = _with(no_task, "ptl.finetune_steps", 0)
    assert "fold_qat" in _refusal(no_finetune)  # the sweep's end-to-end baselines train on CE + KD only
    validate_config(_with(no_finetune, "sweep.baselines", ["fold", "no_local"]))
    validate_config(_with(base, "ptl.ce_weight", 0.0))  # KD alone is a task


def test_imagenet_augment_needs_an_image_size():
    c = to_dict(load_config(IMAGENET, ["data.data_dir=gs://b/tfds"]))
    assert "data.augment='imagenet' needs data.image_size" in _refusal(_with(c, "data.image_size", 0))


@pytest.mark.parametrize("value", [0, 0.0, 0.05, 0.999, 100, 100.0])
def test_warmup_steps_counts_or_fractions_pass(base, value):
    validate_config(_with(base, "teacher.optim.warmup_steps", value))


@pytest.mark.parametrize("key,value", [("ptl.local_init_steps", 0), ("ptl.finetune_steps", 0),
                                       ("ptl.head_layers", 8), ("data.holdout", 59999), ("data.image_size", 28),
                                       ("teacher.optim.lr", 1e30), ("teacher.optim.momentum", 0.0),
                                       ("sweep.baselines", []), ("model.first_last_w_bits", 1)])
def test_edge_values_pass(base, key, value):
    validate_config(_with(base, key, value))


# --- structure --------------------------------------------------------------------------

def test_unknown_missing_and_section_keys(base):
    c = copy.deepcopy(base)
    c["ptl"]["stage_step"] = 5  # a typo would otherwise be ignored
    assert "unknown config key 'ptl.stage_step'" in _refusal(c)
    c = copy.deepcopy(base)
    del c["ptl"]["stage_steps"]
    assert "missing config key ptl.stage_steps" in _refusal(c)
    c = copy.deepcopy(base)
    c["model"] = 3
    msg = _refusal(c)
    assert "model=3 is a value where a section" in msg and "missing" not in msg  # said once
    c = copy.deepcopy(base)
    del c["mesh"]
    assert "missing config key mesh.compute_dtype" in _refusal(c)


def test_not_a_config_is_refused():
    assert "is a NoneType" in _refusal(None)


def test_optional_keys_and_retired_keys_pass(base):
    """A workdir pinned by an older version (no holdout, fewer optimizer fields, the retired
    export/distributed blocks) still validates and still matches its config."""
    old = copy.deepcopy(base)
    del old["data"]["holdout"], old["ptl"]["head_layers"], old["teacher"]["optim"]["momentum"], old["sweep"]
    old["export"] = {"logit_bits": 16}
    old["distributed"] = {"coordinator": "", "num_processes": 0, "process_id": -1, "local_device_ids": ""}
    validate_config(old)
    pinned = copy.deepcopy(base)
    pinned["export"], pinned["distributed"] = old["export"], old["distributed"]
    assert changed_keys(pinned, base) == []
    assert changed_keys(_with(pinned, "seed", 3), base) == ["seed"]


def test_no_config_carries_the_dead_keys():
    for spec in (MNIST, SWEEP, IMAGENET):
        c = to_dict(load_config(spec))
        assert "export" not in c and "distributed" not in c


# --- the shipped configs -------------------------------------------------------------------

@pytest.mark.parametrize("spec", [MNIST] + [f"{MNIST}:{a}" for a in
                                            ("quick", "w1a1", "w2a2", "w4a4", "w8a8", "channel",
                                             "quick,w1a1,channel")]
                         + [SWEEP] + [f"{SWEEP}:{a}" for a in ("quick", "seeds=2", "layer", "channel",
                                                               "quick,channel")]
                         + [IMAGENET] + [f"{IMAGENET}:{a}" for a in ("tiny", "w1a1", "w2a2", "w4a4", "w8a8",
                                                                      "channel", "tiny,w1a1,channel")])
def test_shipped_configs_pass(spec):
    config = load_config(spec)
    validate_config(config)
    validate_config(to_dict(config))  # the pinned config.json form too


# --- overrides ------------------------------------------------------------------------------

@pytest.mark.parametrize("item,words", [
    ("teacher.steps=0", "teacher.steps=0 must be an int >= 1"),
    ("teacher.steps=-5", "teacher.steps=-5"),
    ("teacher.optim.lr=-0.1", "teacher.optim.lr=-0.1"),
    ("teacher.optim.lr=1e999", "teacher.optim.lr=inf"),
    ("ptl.stage_steps=-5", "ptl.stage_steps=-5"),
    ("model=3", "'model' is a section"),
    ("model={'name': 'x'}", "'model' is a section"),
    ("ptl.stage_step=3", "unknown config key 'ptl.stage_step'"),
    ("model.name.x=3", "unknown config key 'model.name.x'"),
    ("teacher.steps=1.5", "expected int, got float"),
    ("ptl.local_init=1", "expected bool, got int"),
    ("teacher.steps", "not of the form key=value"),
])
def test_bad_override_is_one_line(item, words):
    from bnfree_jax.pipeline.validate import load_valid_config

    with pytest.raises(ConfigError) as e:
        load_valid_config(MNIST, [item])
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_good_overrides_apply():
    c = load_config(MNIST, ["teacher.optim.warmup_steps=100", "model.requant=channel"])
    assert c.teacher.optim.warmup_steps == 100.0 and c.model.requant == "channel"
    apply_override(c, "ptl.head_layers=3")
    assert c.ptl.head_layers == 3


# --- config files ------------------------------------------------------------------------------

GOOD_BODY = ("import ml_collections, importlib.util\n"
             f"spec = importlib.util.spec_from_file_location('m', {MNIST!r})\n"
             "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n")

BAD_FILES = [
    ("syntax.py", "def get_config(:\n", "SyntaxError"),
    ("name.py", "x = undefined_name\n", "NameError"),
    ("imports.py", "import no_such_module_xyz\n", "ModuleNotFoundError"),
    ("raises.py", "def get_config(arg=''):\n    raise RuntimeError('boom\\nsecond line')\n", "RuntimeError: boom"),
    ("none.py", "def get_config(arg=''):\n    return None\n", "returned NoneType"),
    ("dict.py", "def get_config(arg=''):\n    return {'seed': 0}\n", "returned dict"),
    ("nofunc.py", "x = 1\n", "defines no get_config()"),
    ("notcallable.py", "get_config = 3\n", "defines no get_config()"),
    ("noarg.py:quick", "def get_config():\n    return None\n", "TypeError"),
    ("config.txt", "def get_config():\n    return None\n", "not a Python config file"),
]


@pytest.mark.parametrize("name,body,words", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_config_file_is_one_line_naming_it(tmp_path, name, body, words):
    fname, _, arg = name.partition(":")
    path = tmp_path / fname
    path.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_config(f"{path}:{arg}" if arg else str(path))
    msg = str(e.value)
    assert str(path) in msg and words in msg and "\n" not in msg, msg


def test_bad_value_in_a_config_file_is_refused_at_load(tmp_path):
    path = tmp_path / "steps.py"
    path.write_text(GOOD_BODY + "def get_config(arg=''):\n    c = m.get_config(arg)\n"
                    "    c.teacher.steps = -5\n    return c\n")
    from bnfree_jax.pipeline.validate import load_valid_config

    load_valid_config(str(path), ["teacher.steps=3"])  # the same file, mended by an override
    with pytest.raises(ConfigError, match=r"^teacher.steps=-5 must be an int >= 1$"):
        load_valid_config(str(path))


def test_unknown_config_argument_names_the_file():
    with pytest.raises(ConfigError, match=r"mnist_alexnet.py:bogus: unknown config argument 'bogus'"):
        load_config(f"{MNIST}:bogus")


def test_cli_refuses_before_writing_anything(tmp_path):
    """The whole path a user takes: one line, exit 2, no workdir created."""
    wd = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "bnfree_jax.cli", "train-teacher", "--config", MNIST,
                        "--workdir", str(wd), "teacher.steps=0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "error: teacher.steps=0 must be an int >= 1", p.stderr
    assert not wd.exists()


def _read_names(source: str) -> set[str]:
    """Attribute names and string subscripts/keys the package's code reads."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


def test_every_config_leaf_is_read_by_the_package():
    """A key nothing reads is a key a user sets in vain (as `export.logit_bits` was)."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    read = set()
    for path in (root / "bnfree_jax").rglob("*.py"):
        read |= _read_names(path.read_text())
    leaves = set()
    for spec in (MNIST, SWEEP, IMAGENET):
        leaves |= set(flatten(to_dict(load_config(spec))))
    unread = sorted(k for k in leaves if k.split(".")[-1] not in read)
    assert not unread, f"config keys nothing in bnfree_jax reads: {unread}"
    assert "logit_bits" not in read  # the check can fail: that retired key is read nowhere


def test_a_section_handed_on_carries_the_added_keys_an_older_config_lacks():
    """Context.env's `ptl` comes from with_added: a config pinned before a key reads as its
    default there, and a key the config sets keeps its value (the defaults live only in ADDED)."""
    old = load_config("configs/mnist_alexnet.py", ["ptl.block_layers=2"]).to_dict()
    del old["ptl"]["stage_budget"], old["ptl"]["train_own_activation"]
    config = ml_collections.ConfigDict(old)
    ptl = with_added(config, "ptl")
    assert ptl.stage_budget == ADDED["ptl.stage_budget"] and ptl.train_own_activation is ADDED["ptl.train_own_activation"]
    assert ptl.block_layers == 2 and ptl.stage_steps == config.ptl.stage_steps
    ptl.stage_steps += 1  # a copy: the job's config is not touched
    assert "stage_budget" not in config.ptl and ptl.stage_steps == config.ptl.stage_steps + 1
    assert "ptl.stage_budget" not in changed_keys(old, to_dict(load_config("configs/mnist_alexnet.py")))
