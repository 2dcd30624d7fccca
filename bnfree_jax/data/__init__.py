"""Input data: the embedded MNIST TFDS builder, TFDS ArrayRecord sources, grain pipelines."""

from bnfree_jax.data.info import DatasetInfo, dataset_info, default_data_dir
from bnfree_jax.data.batches import (TrainIterator, eval_batches, example_batches, shard_ids,
                                      train_iterator)
from bnfree_jax.data.imagenet import prepare_imagenet
from bnfree_jax.data.sample import Subset, sample_batches, sample_indices
from bnfree_jax.data.sources import TfdsSource, ensure_dataset, get_source, job_sources

__all__ = [
    "DatasetInfo", "TfdsSource", "TrainIterator", "dataset_info", "default_data_dir",
    "ensure_dataset", "eval_batches", "example_batches", "get_source", "job_sources",
    "Subset", "prepare_imagenet", "sample_batches", "sample_indices", "shard_ids",
    "train_iterator",
]
