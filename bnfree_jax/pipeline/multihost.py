"""Joining and leaving a multi-process job, for the command line."""

from bnfree_jax.train.distributed import initialize, leave_now

__all__ = ["initialize", "leave_now"]
