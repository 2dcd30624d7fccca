"""train_bn_network trains a BN-free float network too (the from-scratch reference of
bench/bn_free_scratch.py): no batch statistics to carry, parameters trained, top-1 measured."""

import jax
import numpy as np

from bnfree_jax.config_io import load_config
from bnfree_jax.nn.network import STUDENT
from bnfree_jax.pipeline.context import make_context
from bnfree_jax.train.streams import stream_key
from bnfree_jax.train.supervised import init_variables, train_bn_network

TINY = ["model.name='tiny_cnn'", "data.max_train_examples=256", "data.max_test_examples=128",
        "teacher.batch=32", "data.eval_batch=128", "checkpoint.grad_diagnostics=False"]


def test_a_bn_free_float_network_trains(tmp_path):
    ctx = make_context(load_config("configs/mnist_alexnet.py:quick", TINY), tmp_path, log=lambda m: None)
    net = ctx.nets.network(STUDENT, quantized=False)
    init = init_variables(net, ctx.nets.image_shape, stream_key(0, "teacher/init"))
    assert set(init) == {"params"}  # BN-free: nothing but parameters
    t = ctx.config.teacher
    out, top1 = train_bn_network("teacher", net, init, 4, t.batch, t.optim, rt=ctx.rt, feed=ctx.feed,
                                 ckpt_dir=tmp_path / "ckpt", seed=0)
    assert set(out) == {"params"} and 0.0 <= top1 <= 1.0
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init["params"]), jax.tree.leaves(out["params"]))]
    assert all(moved)
    images, labels = ctx.feed.eval_arrays()
    logits = net.apply({"params": out["params"]}, images)
    assert top1 == float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
