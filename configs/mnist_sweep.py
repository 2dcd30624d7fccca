"""The results table: PTL and every baseline at W8A8/W4A4/W2A2/W1A1 × requant × 3 seeds.

Built on configs/mnist_alexnet.py (same keys) plus a `sweep` block. Arguments: `quick`
(small budgets, one seed, for a smoke run), `seeds=N`, `layer` or `channel` only.
"""

from pathlib import Path

import ml_collections

from bnfree_jax.config_io import config_of_file


def _base(arg: str):
    """configs/mnist_alexnet.py's config for `arg`."""
    return config_of_file(Path(__file__).with_name("mnist_alexnet.py"), arg)


def get_config(arg: str = ""):
    args = [a.strip() for a in (arg or "").split(",") if a.strip()]
    base_args = [a for a in args if a == "quick"]
    c = _base(",".join(base_args))
    c.sweep = ml_collections.ConfigDict(dict(
        bits=["w8a8", "w4a4", "w2a2", "w1a1"], requant=["layer", "channel"], seeds=[0, 1, 2],
        baselines=["fold", "fold_qat", "scratch", "no_local", "no_comp"],
        ptl="first",  # PTL's row before the baselines' ("last", or "skip" for baselines only)
        binary_qat_steps=1500, binary_qat_lr=3e-3))
    for a in args:
        if a == "quick":
            c.sweep.seeds = [0]
            c.sweep.binary_qat_steps = 120
        elif a.startswith("seeds="):
            c.sweep.seeds = list(range(int(a.split("=")[1])))
        elif a in ("layer", "channel"):
            c.sweep.requant = [a]
        else:
            raise ValueError(f"unknown sweep argument {a!r} (use quick, seeds=N, layer, channel)")
    return c
