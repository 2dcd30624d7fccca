"""`bnfree ptq`: post-training quantization of the float BN teacher, no training of the student.

The float teacher (trained as `bnfree run` would, when the workdir has none) has its BN
folded into the BN-free student of nn/network.py exactly as distill/fold.py folds the QAT
teacher (per-channel k into `alpha` under requant="channel", into the kernel under
"layer"); the weights are then the student's own max-abs quantizer's (optionally clipped
first to the MSE-optimal range), and each layer's `act_alpha` is calibrated by a
streaming calibrator on N training images.

Calibration runs in layer order on the partially quantized student: layer ℓ's range is
measured on what the deployed layer ℓ will see, the output of layers < ℓ already
quantized with their calibrated clips (ONNX Runtime calibrates every tensor on the float
graph in one pass; here one pass per layer costs little and accounts for the error the
quantized prefix adds).

Every calibration of one workdir shares its float teacher: it is written to
WORKDIR/ptq/<tag>/ (tag: method, N, weight calibration, sample seed), a directory laid
out like a job's (config.json with a `ptq` block, phases.json, export/, report/), so the
calibration table runs many calibrations on one teacher and a rerun of a finished one
only re-checks its artifact.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import numpy as np

from bnfree_jax import quant
from bnfree_jax.config_io import to_dict
from bnfree_jax.data.storage import as_path
from bnfree_jax.distill.fold import fold_layer
from bnfree_jax.nn.network import STUDENT
from bnfree_jax.nn.weights import along_input, channel_axis
from bnfree_jax.pipeline.context import is_primary
from bnfree_jax.pipeline.export_phase import export_student
from bnfree_jax.pipeline.jsonfile import write_json
from bnfree_jax.pipeline.layer_stats import collect_layer_stats, has_act_quantizer
from bnfree_jax.pipeline.ledger import Ledger
from bnfree_jax.pipeline.report_phase import write_report
from bnfree_jax.pipeline.teacher import run_teacher_phases
from bnfree_jax.train.clip_calibration import calibrate_clips, clips_text, make_calibrator

WEIGHT_CALIBS = ("minmax", "mse")
CALIB_BATCH = 256  # images per calibration step: the calibrators see one batch at a time


@dataclasses.dataclass(frozen=True)
class PtqOptions:
    """One calibration: activation method, N images, weight calibration, percentile, sample seed."""

    method: str = "entropy"
    images: int = 256
    weight_calib: str = "minmax"
    percentile: float = 99.99
    seed: int = 0

    def check(self) -> "PtqOptions":
        """Refuse bad options in one line, before anything is read or written."""
        if self.method not in quant.METHODS:
            raise ValueError(f"--calib {self.method!r} is not a calibrator; use one of {', '.join(quant.METHODS)}")
        if self.weight_calib not in WEIGHT_CALIBS:
            raise ValueError(f"--weight-calib {self.weight_calib!r}: use one of {', '.join(WEIGHT_CALIBS)}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"--percentile {self.percentile} is outside (0, 100]")
        if self.images < 1:
            raise ValueError(f"--calib-images {self.images}: calibration needs at least 1 image")
        if self.seed < 0:
            raise ValueError(f"--calib-seed {self.seed} must be >= 0")
        return self

    @property
    def tag(self) -> str:
        """The calibration's directory name under WORKDIR/ptq/."""
        method = f"percentile{self.percentile:g}" if self.method == "percentile" else self.method
        return f"{method}_n{self.images}_w{self.weight_calib}_s{self.seed}"

    def record(self) -> dict:
        out = dataclasses.asdict(self)
        if self.method != "percentile":
            del out["percentile"]
        return out

    def calibrator(self):
        """bits -> a fresh streaming calibrator of this method (train/clip_calibration.py)."""
        return make_calibrator(self.method, self.percentile)


ARG_NAMES = {"method": "calib", "images": "calib_images", "weight_calib": "weight_calib",
             "percentile": "percentile", "seed": "calib_seed"}


def options_from_args(args) -> PtqOptions:
    """The command line's options (an unset one keeps its default), checked."""
    given = {k: getattr(args, a) for k, a in ARG_NAMES.items() if getattr(args, a, None) is not None}
    return PtqOptions(**given).check()


def check_calibration_images(ctx, opts: PtqOptions) -> None:
    """N must not exceed the job's training images (with data.holdout, the part before the
    held-out tail: calibration never reads the images a job's evaluation reads)."""
    available = len(ctx.feed.train_source)
    if opts.images > available:
        raise ValueError(f"--calib-images {opts.images} exceeds the {available} training images of this job")


def fold_float_teacher(nets, float_vars: dict) -> dict:
    """Student params {layer: {kernel, alpha, beta}} folded from the float BN teacher: the
    same arithmetic as distill/fold.py, on the float teacher's unquantized weights."""
    inv_std = nets.network(STUDENT).inv_std
    return {spec.name: fold_layer(spec, float_vars["params"][spec.name],
                                  float_vars.get("batch_stats", {}).get(spec.name),
                                  inv_std if i == 0 else None, nets.per_channel)
            for i, spec in enumerate(nets.specs(quantized=False))}


def clip_weights_mse(nets, params: dict) -> dict:
    """Kernels clipped to their MSE-optimal range (per tensor or per output channel as
    model.requant), so the student's max-abs quantizer takes that range as its scale."""
    inv_std = np.asarray(nets.network(STUDENT).inv_std, np.float32)
    out = copy.deepcopy(params)
    for i, spec in enumerate(nets.specs(quantized=True)):
        if not spec.quantized:
            continue
        w = np.asarray(params[spec.name]["kernel"], np.float32)
        col = along_input(inv_std, w.shape) if i == 0 else np.float32(1.0)
        w_eff = w * col  # what the quantizer sees (first layer: 1/std folded in)
        amax = quant.calibrate(w_eff, "mse", spec.w_bits, signed=True, axis=channel_axis(nets.per_channel))
        out[spec.name]["kernel"] = (np.clip(w_eff, -amax, amax) / col).astype(np.float32)
    return out


def calibrate_activations(nets, params: dict, batches, opts: PtqOptions) -> tuple[dict, dict]:
    """(params with every act_alpha set, {layer: act_alpha}), in layer order on the
    partially quantized student (train/clip_calibration.py)."""
    params = copy.deepcopy(params)
    for s in nets.specs(quantized=True):  # a placeholder until the layer's turn (later layers are not run)
        if has_act_quantizer(s):
            params[s.name]["act_alpha"] = np.float32(nets.act_init)
    variables, alphas = calibrate_clips(nets.network(STUDENT), {"params": params}, batches, opts.calibrator())
    return variables["params"], alphas


def ptq_student(ctx, float_vars: dict, opts: PtqOptions) -> tuple[dict, dict]:
    """(student params, calibration record) of one calibration of the float teacher."""
    check_calibration_images(ctx, opts)
    params = fold_float_teacher(ctx.nets, float_vars)
    if opts.weight_calib == "mse":
        params = clip_weights_mse(ctx.nets, params)
    t0 = time.time()
    batches = ctx.feed.sample_batches(opts.images, opts.seed, CALIB_BATCH)
    params, alphas = calibrate_activations(ctx.nets, params, batches, opts)
    record = {**opts.record(), "split": "train", "order": "sequential (layers < l quantized)",
              "act_alpha": alphas, "seconds": round(time.time() - t0, 2)}
    return params, record


def calibration_context(ctx, opts: PtqOptions):
    """The job's context moved to WORKDIR/ptq/<tag>, its config carrying the `ptq` block
    (recorded in that directory's config.json and the artifact's manifest)."""
    import ml_collections

    config = ml_collections.ConfigDict(to_dict(ctx.config))
    config.ptq = opts.record()
    return dataclasses.replace(ctx, workdir=as_path(ctx.workdir) / "ptq" / opts.tag, config=config)


def run_ptq(ctx, ledger: Ledger, opts: PtqOptions, t0: float | None = None) -> dict:
    """Teacher (if not done), calibration, export and verification, report; the summary."""
    t0 = time.time() if t0 is None else t0
    float_vars, _ = run_teacher_phases(ctx, ledger, qat=False)
    if not is_primary():  # calibration, export and verification are single-host work, as in `run`
        return None
    sub = calibration_context(ctx, opts)
    sub.workdir.mkdir(parents=True, exist_ok=True)
    write_json(sub.workdir / "config.json", to_dict(sub.config), indent=1, sort_keys=True)
    sub_ledger = Ledger(sub.workdir)
    if not sub_ledger.done("teacher"):
        sub_ledger.mark_done("teacher", **{k: v for k, v in ledger.get("teacher").items() if k != "done"})
    params, calibration = ptq_student(sub, float_vars, opts)  # deterministic: a rerun finds the same
    sub.log(f"[ptq] {opts.tag}: act_alpha {clips_text(calibration['act_alpha'])}")
    export_student(sub, sub_ledger, params=params)
    stats = lambda c: collect_layer_stats(c.nets, c.feed, params, float_vars, teacher_quantized=False)  # noqa: E731
    return write_report(sub, sub_ledger, wall_seconds=time.time() - t0, measure=stats,
                        extra={"calibration": calibration})
