"""Quantizers as plug-ins: a user's module, named in `model.plugins`, registers a weight and
an activation quantizer that the tiny job trains, pins (config.json and the manifest carry
the module file's sha256) and exports bit-exact, with no edit of the package; a changed
plug-in file, an unknown quantizer name and a forward that leaves the grid are refused in
one line that names them."""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap

import jax
import numpy as np
import pytest

from bnfree_jax import quant
from bnfree_jax.config_io import ConfigError, changed_keys, load_config, to_dict
from bnfree_jax.export.integerize import integerize
from bnfree_jax.nn.network import STUDENT, make_network
from bnfree_jax.nn.zoo import get_layer_specs
from bnfree_jax.pipeline.validate import load_valid_config, validate_config
from bnfree_jax.quant import registry
from job_helpers import CONFIG, ROOT, artifact_sha, bnfree, last_line, run_args

PLUGIN = "mymod_qpath"
PLUGIN_SRC = textwrap.dedent('''
    """A user's quantizers: max-abs weights with a damped STE, PACT with another alpha rule."""
    import jax
    import jax.numpy as jnp
    from bnfree_jax import quant


    @jax.custom_jvp
    def damped(w, q):
        """Forward q (on the grid); derivative half the identity in w, none in q."""
        return q


    @damped.defjvp
    def _damped_jvp(primals, tangents):
        return damped(*primals), 0.5 * tangents[0]


    @quant.register_weight_quantizer("damped_maxabs")
    def damped_maxabs(w, bits, axis):
        q, scale = quant.maxabs_weight(jax.lax.stop_gradient(w), bits, axis)
        return damped(w, q), scale


    @quant.register_activation_quantizer("pact_codes_alpha")
    def pact_codes_alpha(x, alpha, bits):
        """PACT's forward; alpha's gradient codes/n (y/alpha with the codes held fixed)."""
        if bits == 1:
            return quant.approx_sign(x)
        frozen = jax.lax.stop_gradient(alpha)
        y = quant.pact_quantize(x, frozen, bits)
        return y + (alpha - frozen) * jax.lax.stop_gradient(y / frozen)
''')
# The plug-in's quantizers on the convolutions, by a per-layer rule; the logits layer keeps the built-ins.
RULES = [("conv.*", {"weight_quantizer": "damped_maxabs", "act_quantizer": "pact_codes_alpha"})]
USE = [f"model.plugins=['{PLUGIN}']", f"model.layers={RULES!r}", "checkpoint.grad_diagnostics=True",
       "checkpoint.log_every=5"]


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugins")
    (d / f"{PLUGIN}.py").write_text(PLUGIN_SRC)
    return d


def _env(plugin_dir) -> dict:
    return {"PYTHONPATH": f"{plugin_dir}:{ROOT}"}


@pytest.fixture(scope="module")
def plugin_job(plugin_dir):
    """The tiny job trained with the plug-in's quantizers (one run shared by the tests)."""
    wd = plugin_dir / "wd"
    p = bnfree(*run_args(wd), *USE, env_extra=_env(plugin_dir))
    assert p.returncode == 0, p.stderr[-3000:]
    return wd


@pytest.fixture
def scratch_registry(monkeypatch, plugin_dir):
    """This process's registry and imports restored afterwards (the plug-in stays out of
    the other tests' registry)."""
    monkeypatch.setattr(registry, "_REGISTRY", {k: dict(v) for k, v in registry._REGISTRY.items()})
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield
    sys.modules.pop(PLUGIN, None)


def test_plugin_job_is_pinned_and_exports_bit_exact(plugin_job, plugin_dir, tiny_job):
    sha = hashlib.sha256((plugin_dir / f"{PLUGIN}.py").read_bytes()).hexdigest()
    pinned = json.loads((plugin_job / "config.json").read_text())["model"]
    manifest = json.loads((plugin_job / "export" / "manifest.json").read_text())
    for model in (pinned, manifest["config"]["model"]):
        assert model["plugins"] == [PLUGIN] and model["plugin_sha256"] == [sha]
        assert [(t["name"], t["weight_quantizer"], t["act_quantizer"]) for t in model["layer_table"]] == [
            ("conv1", "damped_maxabs", "pact_codes_alpha"), ("conv2", "damped_maxabs", "pact_codes_alpha"),
            ("fc3", "maxabs", None)]
    assert manifest["metrics"]["int_sim_bit_exact"] is True
    assert artifact_sha(plugin_job) != artifact_sha(tiny_job)  # the plug-in's gradients trained it
    # ... from the first stage on, not only in the fine-tune
    stage = lambda wd: json.loads((wd / "phases.json").read_text())["ptl/stage1_conv1"]["metrics"]
    assert stage(plugin_job)["layer_mse_end"] != stage(tiny_job)["layer_mse_end"]


def test_plugin_job_logs_gradient_diagnostics_and_draws_them(plugin_job, tiny_job):
    """The diagnostics of a real job: on log steps only, STE cosines in the student phases
    only; the report's figure; none in a job that turned them off."""
    recs = [json.loads(line) for line in (plugin_job / "metrics.jsonl").read_text().splitlines()]
    diag = [r for r in recs if "grad_norm/S/conv1" in r or "grad_norm/conv1" in r]
    phases = {r["phase"] for r in diag}
    assert {"teacher", "qat", "local_init", "stage1_conv1", "finetune"} <= phases
    for phase in phases:  # every 5th step and the phase's last, nothing else
        last = max(r["step"] for r in recs if r.get("phase") == phase)
        want = {s for s in range(1, last + 1) if s % 5 == 0} | {last}
        assert sorted(r["step"] for r in diag if r["phase"] == phase) == sorted(want), phase
    assert all(("ste_cos/conv1" in r) == (r["phase"] not in ("teacher", "qat")) for r in diag)
    assert all(("clip_hi/conv1" in r) == (r["phase"] != "teacher") for r in diag)  # the float teacher has no clip
    assert all(0.0 <= r["clip_hi/conv1"] <= 1.0 for r in diag if r["phase"] != "teacher")
    assert (plugin_job / "report" / "gradients.png").stat().st_size > 5_000
    plain = (tiny_job / "metrics.jsonl").read_text()
    assert "grad_norm/" not in plain and not (tiny_job / "report" / "gradients.png").exists()


def test_changed_plugin_file_refuses_the_rerun_naming_it(plugin_job, plugin_dir):
    path = plugin_dir / f"{PLUGIN}.py"
    try:
        path.write_text(PLUGIN_SRC + "\n# edited\n")
        p = bnfree(*run_args(plugin_job), *USE, env_extra=_env(plugin_dir))
    finally:
        path.write_text(PLUGIN_SRC)
    assert p.returncode != 0
    line = last_line(p)
    assert "model.plugin_sha256" in line and repr(PLUGIN) in line, p.stderr[-2000:]


def test_quantizer_names_are_checked_after_the_plugins_are_imported(scratch_registry):
    names = ["model.weight_quantizer='damped_maxabs'", "model.act_quantizer='pact_codes_alpha'"]
    with pytest.raises(ConfigError) as e:
        load_valid_config(CONFIG.split(":")[0], names)  # its module not listed
    msg = str(e.value)
    assert "\n" not in msg and "model.weight_quantizer='damped_maxabs' is not a registered weight" in msg
    assert "model.act_quantizer='pact_codes_alpha' is not a registered activation" in msg
    with pytest.raises(ConfigError, match="damped_maxabs"):
        load_valid_config(CONFIG.split(":")[0], USE[1:])  # the same names in a per-layer rule
    config = load_valid_config(CONFIG.split(":")[0], [USE[0], *names])
    assert config.model.plugin_sha256 == [hashlib.sha256(PLUGIN_SRC.encode()).hexdigest()]


def test_unimportable_plugin_is_one_line():
    with pytest.raises(ConfigError, match=r"^model.plugins: cannot import 'no_such_plugin_q': "
                                          r"ModuleNotFoundError[^\n]*$"):
        load_valid_config(CONFIG.split(":")[0], ["model.plugins=['no_such_plugin_q']"])


def _student(weight_quantizer="maxabs", act_quantizer="pact", w_bits=4, a_bits=4):
    """Tiny specs with the given quantizers and freshly initialised student params."""
    specs = get_layer_specs("tiny_cnn", 10, w_bits, a_bits, 8, weight_quantizer, act_quantizer)
    net = make_network(specs, STUDENT, [0.5], [0.25])
    params = net.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.uint8))["params"]
    return specs, jax.device_get(params)


@pytest.mark.parametrize("kind,a_bits", [("weight", 4), ("activation", 4), ("activation", 1)])
def test_export_refuses_an_off_grid_quantizer_naming_it_and_the_layer(scratch_registry, kind, a_bits):
    if kind == "weight":
        quant.register_weight_quantizer("leaky")(lambda w, bits, axis: (w, quant.maxabs_scale(w, bits, axis)))
        specs, params = _student(weight_quantizer="leaky", a_bits=a_bits)
    else:
        quant.register_activation_quantizer("leaky")(lambda x, alpha, bits: x * 1.0001)
        specs, params = _student(act_quantizer="leaky", a_bits=a_bits)
    with pytest.raises(quant.OffGridError) as e:
        integerize(specs, params, [0.5], [0.25], (28, 28, 1), per_channel=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{kind} quantizer 'leaky' at layer 'conv1' leaves")


def test_export_of_the_builtin_quantizers_passes_the_grid_check():
    layers, _ = integerize(*_student(), [0.5], [0.25], (28, 28, 1), per_channel=False)
    assert [layer["output"] for layer in layers] == ["requant_relu", "requant_relu", "requant_out"]


def test_a_pinned_config_whose_plugin_file_changed_is_refused(scratch_registry):
    """`bnfree export W` validates the pinned config.json: its recorded sha256 must still be
    the plug-in file's."""
    config = load_valid_config(CONFIG.split(":")[0], USE)
    config.model.plugin_sha256 = ["0" * 64]
    with pytest.raises(ConfigError, match=rf"^model.plugins: the file of '{PLUGIN}' changed since the "
                                          r"job was pinned [^\n]*$"):
        validate_config(config)


def test_a_workdir_pinned_before_the_quantizer_keys_still_resumes():
    new = to_dict(load_config(CONFIG.split(":")[0]))
    old = {**new, "model": {k: v for k, v in new["model"].items()
                            if k not in ("weight_quantizer", "act_quantizer", "plugins")}}
    assert changed_keys(old, new) == []
    older = {**old, "checkpoint": {k: v for k, v in new["checkpoint"].items() if k != "log_every"},
             "data": {k: v for k, v in new["data"].items() if k not in ("workers", "read_threads", "prefetch")}}
    assert changed_keys(older, new) == []  # the MNIST config's values are the old behaviour
    assert changed_keys(older, {**new, "data": {**new["data"], "workers": 2}}) == ["data.workers"]
    assert changed_keys(old, {**new, "model": {**new["model"], "act_quantizer": "lsq"}}) == ["model.act_quantizer"]
