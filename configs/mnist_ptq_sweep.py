"""The calibration table (`bnfree ptq-sweep`): PTQ integer top-1 of the float teacher for
calibrator × bits {W8A8, W6A6, W4A4} × calibration images {64, 256, 1024, 4096} × requant
× 3 calibration samples, all on one float teacher.

Built on configs/mnist_alexnet.py (same keys) plus a `ptq_sweep` block. Arguments:
`quick` (the quick job's teacher and data, one sample), `samples=N`, `layer` or `channel` only.
"""

from pathlib import Path

import ml_collections

from bnfree_jax.config_io import config_of_file


def _base(arg: str):
    """configs/mnist_alexnet.py's config for `arg`."""
    return config_of_file(Path(__file__).with_name("mnist_alexnet.py"), arg)


def get_config(arg: str = ""):
    args = [a.strip() for a in (arg or "").split(",") if a.strip()]
    c = _base(",".join(a for a in args if a == "quick"))
    c.ptq_sweep = ml_collections.ConfigDict(dict(
        methods=["minmax", "percentile", "entropy", "mse"], percentiles=[99.9, 99.99, 99.999],
        bits=["w8a8", "w6a6", "w4a4"], images=[64, 256, 1024, 4096], requant=["layer", "channel"],
        samples=[0, 1, 2], weight_calib="minmax", verify="first"))
    for a in args:
        if a == "quick":
            c.ptq_sweep.samples = [0]
        elif a.startswith("samples="):
            c.ptq_sweep.samples = list(range(int(a.split("=")[1])))
        elif a in ("layer", "channel"):
            c.ptq_sweep.requant = [a]
        else:
            raise ValueError(f"unknown ptq sweep argument {a!r} (use quick, samples=N, layer, channel)")
    return c
