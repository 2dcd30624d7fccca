"""Phase 0 of the job: the float BN teacher, then its W/A-bit QAT fine-tune (BN kept),
each skipped when the ledger says it is done; their variables live in the workdir."""

from __future__ import annotations

from bnfree_jax.nn.network import TEACHER
from bnfree_jax.pipeline.ledger import Ledger
from bnfree_jax.train.clip_calibration import calibrated_clips, clips_text
from bnfree_jax.train.streams import stream_key, stream_seed
from bnfree_jax.train.supervised import graft, init_variables, train_bn_network
from bnfree_jax.train.variables import load_variables, save_variables


def _phase(ctx, ledger: Ledger, phase: str, net, variables, cfg, label: str, record: dict | None = None):
    """Train `phase` (or load it when done); returns its variables. `record`: more of the
    phase's ledger entry."""
    path = ctx.workdir / phase / "variables"
    if ledger.done(phase):
        return load_variables(path, variables)
    with ledger.clock(phase) as elapsed:
        variables, top1 = train_bn_network(phase, net, variables, cfg.steps, cfg.batch, cfg.optim, rt=ctx.rt,
                                           feed=ctx.feed, ckpt_dir=ctx.workdir / "checkpoints" / phase,
                                           seed=ctx.config.seed)
        save_variables(path, variables)
        ledger.mark_done(phase, top1=top1, seconds=elapsed(), **(record or {}))
    ctx.log(f"[{phase}] {label} {ctx.eval_split} top-1 {top1:.4f}")
    return variables


def run_teacher_phases(ctx, ledger: Ledger, qat: bool = True):
    """(float teacher variables, QAT teacher variables or None)."""
    c = ctx.config
    float_net = ctx.nets.network(TEACHER, quantized=False, bn_axis_name="data")
    init = init_variables(float_net, ctx.nets.image_shape, stream_key(c.seed, "teacher/init"))
    float_vars = _phase(ctx, ledger, "teacher", float_net, init, c.teacher, "float BN teacher")
    if not qat:
        return float_vars, None
    qat_net = ctx.nets.network(TEACHER, quantized=True, bn_axis_name="data")
    init = init_variables(qat_net, ctx.nets.image_shape, stream_key(c.seed, "qat/init"))
    record = None
    if not ledger.done("qat"):
        init = graft(init, float_vars)
        init, record = calibrated_start(ctx, ctx.nets.network(TEACHER, quantized=True), init, "qat")  # BN local to the host
    qat_vars = _phase(ctx, ledger, "qat", qat_net, init, c.qat,
                      f"W{c.model.w_bits}A{c.model.a_bits} QAT BN teacher", record)
    return float_vars, qat_vars


def calibrated_start(ctx, net, variables, phase: str):
    """(variables, ledger record): with model.act_init a calibrator name, the clips of
    `net` set by calibration on training images (a seeded stream of the phase)."""
    method = ctx.nets.act_calibration
    if not method:
        return variables, None
    variables, record = calibrated_clips(net, variables, ctx.feed, method,
                                         stream_seed(ctx.config.seed, f"{phase}/act_init"))
    ctx.log(f"[{phase}] activation clips by {method} calibration: {clips_text(record['act_alpha'])}")
    return variables, {"act_init": record}
