"""Generic data-parallel training machinery: mesh, steps, optimizers, checkpoints, loop."""

from bnfree_jax.train.checkpoint import (Checkpointer, PreemptionGuard, abstract_like,
                                         preemption_guard)
from bnfree_jax.train.loop import NonFiniteLoss, Preempted, run_loop
from bnfree_jax.train.mesh import (DATA_AXIS, check_batch_divisible, data_sharded, make_mesh,
                                   put_replicated, replicated, shard_batch)
from bnfree_jax.train.optim import (carry_moments, make_optimizer, make_schedule,
                                    make_staged_optimizer, path_labels)
from bnfree_jax.train.state import TrainState, create_train_state
from bnfree_jax.train.step import make_eval_step, make_train_step

__all__ = [
    "Checkpointer", "PreemptionGuard", "abstract_like", "preemption_guard",
    "NonFiniteLoss", "Preempted", "run_loop",
    "DATA_AXIS", "check_batch_divisible", "data_sharded", "make_mesh", "put_replicated",
    "replicated", "shard_batch",
    "carry_moments", "make_optimizer", "make_schedule", "make_staged_optimizer", "path_labels",
    "TrainState", "create_train_state", "make_eval_step", "make_train_step",
]
