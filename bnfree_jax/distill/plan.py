"""The PTL stage plan: which layer groups each stage trains, freezes or slows, its losses, its budget.

A *group* is one layer of one network: `S:<layer>` (student) or `T:<layer>` (the working
teacher copy T'). Every stage assigns every group exactly one label, so the plan covers
every parameter exactly once per stage.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

TRAINABLE, SLOW, FROZEN, UNUSED = "trainable", "slow", "frozen", "unused"
ACT_ALPHA = "act_alpha"  # a student layer's learnable activation clip (nn/network.py: Layer.activation)
STAGE_BUDGETS = ("equal", "residual")  # ptl.stage_budget
BUDGET_FLOOR = 0.25  # the share of its equal budget a tandem stage keeps whatever its residual


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # "local_init" | "tandem" | "finetune"
    layer: int  # ℓ (1-based) for tandem stages; 0 otherwise
    labels: dict  # group -> TRAINABLE | SLOW | FROZEN | UNUSED
    steps: int
    losses: dict  # loss name -> weight
    first: int = 0  # a tandem stage converts layers first..layer (0: layer alone)
    own_activation: bool = False  # the downstream loss trains S_ℓ's activation quantizer (its α, full rate)
    block: bool = False  # layers first..layer fitted together to the target path's output at `layer`

    @property
    def block_first(self) -> int:
        """Where the stage's layer-wise target path starts: `first` for a block, else ℓ (a
        head's layer MSE is on S_L alone; its layers learn end to end from the task loss)."""
        return self.first if self.block else self.layer

    @property
    def layer_name(self) -> str:
        """The layer a tandem stage converts (groups are labelled in layer order)."""
        return [g for g in self.labels if g.startswith("S:")][self.layer - 1][2:]

    @property
    def converts(self) -> range:
        """The layers (1-based) this tandem stage turns from T' into student layers."""
        return range(self.first or self.layer, self.layer + 1) if self.kind == "tandem" else range(0)

    def groups(self, label: str) -> list[str]:
        return [g for g, lab in self.labels.items() if lab == label]

    def param_label(self, group: str, param: str) -> str:
        """The label of one parameter of a group: the group's, except S_ℓ's activation clip,
        which trains at the full rate when the downstream loss reaches it (it is not part of
        the closed-form fit that `own_layer_rate="slow"` protects)."""
        if self.own_activation and param == ACT_ALPHA and group == f"S:{self.layer_name}":
            return TRAINABLE
        return self.labels[group]


def _group(role: str, name: str) -> str:
    return f"{role}:{name}"


def build_stage_plan(ptl_cfg, layer_names: Sequence[str]) -> list[Stage]:
    """Local initialisation, stages ℓ = 1..L, global fine-tune (config `ptl`)."""
    L = len(layer_names)
    s_groups = [_group("S", n) for n in layer_names]
    t_groups = [_group("T", n) for n in layer_names]
    plan = []
    if ptl_cfg.local_init and ptl_cfg.local_init_steps >= 0:
        labels = {g: TRAINABLE for g in s_groups} | {g: UNUSED for g in t_groups}
        plan.append(Stage("local_init", "local_init", 0, labels, ptl_cfg.local_init_steps,
                          {"layer_mse": 1.0}))
    prefix = SLOW if ptl_cfg.prefix == "slow" else FROZEN
    if ptl_cfg.prefix not in ("slow", "frozen"):
        raise ValueError(f"ptl.prefix must be 'frozen' or 'slow', got {ptl_cfg.prefix!r}")
    downstream = TRAINABLE if ptl_cfg.compensation else FROZEN
    target = ptl_cfg.layer_target
    if target not in ("tandem", "teacher"):
        raise ValueError(f"ptl.layer_target must be 'tandem' or 'teacher', got {target!r}")
    replaced = FROZEN if target == "tandem" else UNUSED  # T'_ℓ gives S_ℓ its target
    own = ptl_cfg.own_layer_rate
    if own not in (TRAINABLE, SLOW):
        raise ValueError(f"ptl.own_layer_rate must be 'trainable' or 'slow', got {own!r}")
    head = int(ptl_cfg.head_layers)
    if not 1 <= head <= L:
        raise ValueError(f"ptl.head_layers must be in 1..{L} (this network's layers), got {head}")
    losses = {"layer_mse": ptl_cfg.layer_loss_weight, "ce": ptl_cfg.ce_weight, "kd": ptl_cfg.kd_weight}
    own_act, block = bool(ptl_cfg.train_own_activation), int(ptl_cfg.block_layers)
    if block < 1:
        raise ValueError(f"ptl.block_layers must be at least 1, got {block}")
    if ptl_cfg.stage_budget not in STAGE_BUDGETS:
        raise ValueError(f"ptl.stage_budget must be one of {', '.join(STAGE_BUDGETS)}, got {ptl_cfg.stage_budget!r}")
    if block > 1 and own_act:
        raise ValueError("ptl.train_own_activation needs ptl.block_layers=1 (one converted layer per stage)")
    body = L if head == 1 else L - head  # layers converted before the head stage
    for first in range(1, body + 1, block):
        l = min(first + block - 1, body)
        labels = {}
        for i in range(L):
            if i < first - 1:
                labels[s_groups[i]], labels[t_groups[i]] = prefix, UNUSED
            elif i < l:
                labels[s_groups[i]], labels[t_groups[i]] = own, replaced
            else:
                labels[s_groups[i]], labels[t_groups[i]] = UNUSED, downstream
        is_block = l > first  # a block: its layers' budgets together, one stage
        name = f"stage{first}_{layer_names[first - 1]}" + (f"-{layer_names[l - 1]}" if is_block else "")
        plan.append(Stage(name, "tandem", l, labels, (l - first + 1) * ptl_cfg.stage_steps, losses,
                          first=first if is_block else 0, block=is_block,
                          own_activation=own_act and l < L))  # S_L makes the logits: nothing downstream
    if head > 1:  # the last `head` layers converted together, trained end to end, same budget
        first = L - head + 1
        labels = {}
        for i in range(L):
            labels[s_groups[i]] = prefix if i < first - 1 else TRAINABLE
            labels[t_groups[i]] = replaced if i == L - 1 else UNUSED
        name = f"stage{first}_{layer_names[first - 1]}-{layer_names[-1]}"
        plan.append(Stage(name, "tandem", L, labels, head * ptl_cfg.stage_steps, losses, first=first))
    if ptl_cfg.finetune_steps > 0:
        labels = {g: TRAINABLE for g in s_groups} | {g: UNUSED for g in t_groups}
        plan.append(Stage("finetune", "finetune", 0, labels, ptl_cfg.finetune_steps,
                          {"ce": ptl_cfg.ce_weight, "kd": ptl_cfg.kd_weight}))
    return plan


def allocate_by_residual(plan: Sequence[Stage], residuals: dict, floor: float = BUDGET_FLOOR) -> list[Stage]:
    """The plan with its tandem stages' steps shared by residual (`ptl.stage_budget="residual"`).

    A stage's weight is the sum of `residuals[layer]` over the layers it converts; each
    keeps `floor` of its equal budget, and the rest of the tandem budget goes to the stages
    in proportion to their weights (largest remainders round it), so the plan's total, and
    with it the baselines' equal budgets, stays what it was. Other stages are untouched."""
    tandem = [k for k, s in enumerate(plan) if s.kind == "tandem"]
    if not tandem:
        return list(plan)
    names = [g[2:] for g in plan[tandem[0]].labels if g.startswith("S:")]
    missing = sorted({names[l - 1] for k in tandem for l in plan[k].converts} - set(residuals))
    if missing:
        raise ValueError(f"no residual for layer(s) {', '.join(missing)}")
    weights = [sum(max(float(residuals[names[l - 1]]), 0.0) for l in plan[k].converts) for k in tandem]
    total = sum(plan[k].steps for k in tandem)
    steps = [int(floor * plan[k].steps) for k in tandem]
    rest = total - sum(steps)
    shares = [rest * w / sum(weights) for w in weights] if sum(weights) > 0 else \
        [rest * plan[k].steps / total for k in tandem]
    steps = [s + int(share) for s, share in zip(steps, shares)]
    by_remainder = sorted(range(len(tandem)), key=lambda i: (-(shares[i] - int(shares[i])), i))
    for i in by_remainder[: total - sum(steps)]:
        steps[i] += 1
    out = list(plan)
    for k, n in zip(tandem, steps):
        out[k] = dataclasses.replace(plan[k], steps=n)
    return out


def total_steps(plan: Sequence[Stage]) -> int:
    return sum(s.steps for s in plan)


def plan_table(plan: Sequence[Stage]):
    """A rich Table of the plan (one row per stage)."""
    from rich.table import Table

    t = Table(title="PTL stage plan")
    t.add_column("stage", no_wrap=True, min_width=max([len(s.name) for s in plan] + [5]))  # never cut a name
    for col in ("steps", "trainable", "slow", "frozen", "losses"):
        t.add_column(col)
    short = lambda gs: ", ".join(gs) if gs else "-"
    for s in plan:
        own_act = [f"S:{s.layer_name}.{ACT_ALPHA}"] if s.own_activation else []
        t.add_row(s.name, str(s.steps), short(s.groups(TRAINABLE) + own_act), short(s.groups(SLOW)),
                  short(s.groups(FROZEN)), ", ".join(f"{k}×{v:g}" for k, v in s.losses.items()))
    return t
