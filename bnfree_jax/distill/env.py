"""What distillation uses of its job, passed down explicitly by the job (which alone
knows the workdir): the networks, the training runtime, the data, the `ptl` config
section and the job's root seed."""

from __future__ import annotations

import dataclasses
from typing import Any

from bnfree_jax.nn.factory import NetFactory
from bnfree_jax.train.feed import Feed
from bnfree_jax.train.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class Env:
    nets: NetFactory
    rt: Runtime
    feed: Feed
    ptl: Any  # the config's `ptl` section
    seed: int  # the job's root seed; every stream derives from it by name

    def log(self, msg: str) -> None:
        self.rt.log(msg)
