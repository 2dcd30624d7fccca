"""The baselines PTL is judged against, each with PTL's total step budget.

(a) fold        BN folded into the QAT teacher's weights, quantised, no training
(b) fold_qat    fold, then end-to-end QAT of the whole student (CE + KD)
(c) scratch     BN-free QAT of a randomly initialised student (CE + KD)
(d) no_local    PTL without the local-initialisation stage
(e) no_comp     PTL without downstream compensation (T' frozen during stages)
"""

from __future__ import annotations

import copy

from bnfree_jax.distill.plan import TRAINABLE, UNUSED, Stage, build_stage_plan, total_steps
from bnfree_jax.distill.ptl import initial_trees, run_plan

BASELINES = ("fold", "fold_qat", "scratch", "no_local", "no_comp")


def _finetune_only(ptl_cfg, names, steps: int) -> list[Stage]:
    labels = {f"S:{n}": TRAINABLE for n in names} | {f"T:{n}": UNUSED for n in names}
    return [Stage("finetune", "finetune", 0, labels, steps, {"ce": ptl_cfg.ce_weight, "kd": ptl_cfg.kd_weight})]


def baseline_plan(name: str, ptl_cfg, names) -> tuple[list[Stage], str]:
    """(plan, student init) of a baseline, at the PTL plan's total step budget."""
    budget = total_steps(build_stage_plan(ptl_cfg, names))
    cfg = copy.deepcopy(ptl_cfg)
    if name == "fold":
        return [], "fold"
    if name == "fold_qat":
        return _finetune_only(cfg, names, budget), "fold"
    if name == "scratch":
        return _finetune_only(cfg, names, budget), "scratch"
    if name == "no_local":
        cfg.local_init = False
        plan = build_stage_plan(cfg, names)
        cfg.finetune_steps += budget - total_steps(plan)  # same total budget
        return build_stage_plan(cfg, names), "fold"
    if name == "no_comp":
        cfg.compensation = False
        return build_stage_plan(cfg, names), "fold"
    raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")


def run_baseline(env, qat_vars, name: str, *, records, out_dir, ckpt_dir, cache=lambda: None):
    """Train (or just fold) a baseline student; returns its params. Its stages are
    recorded as `baselines/<name>/<stage>`, saved in `out_dir`, checkpointed in `ckpt_dir`."""
    plan, init = baseline_plan(name, env.ptl, env.nets.layer_names)
    if not plan:
        return initial_trees(env, qat_vars, init).S
    student, _ = run_plan(env, qat_vars, plan, records=records, out_dir=out_dir, ckpt_dir=ckpt_dir,
                          variant=f"baselines/{name}", init=init, cache=cache)
    return student
