"""Integer interpreter of an exported artifact: load and validate, run on uint8 images,
audit for floating point, check int32 bounds. Imports nothing else from bnfree_jax:
it reads only the artifact and is the independent check of training and export."""

from bnfree_jax.intsim.audit import audit_artifact, audit_float_ops
from bnfree_jax.intsim.bounds import overflow_bounds
from bnfree_jax.intsim.interpreter import (check_batch_size, check_images, check_labels, evaluate, run_int,
                                          run_int_with_stats)
from bnfree_jax.intsim.loader import Artifact, ArtifactError, Layer, load_artifact

__all__ = ["Artifact", "ArtifactError", "Layer", "audit_artifact", "audit_float_ops", "check_batch_size",
           "check_images", "check_labels", "evaluate", "load_artifact", "overflow_bounds", "run_int",
           "run_int_with_stats"]
