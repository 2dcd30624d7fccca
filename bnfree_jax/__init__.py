"""bnfree_jax: BatchNorm-free, integer-only low-bit CNNs by progressive tandem distillation."""
