"""The paper's setting: BN-AlexNet teacher on ImageNet (224×224), W4A4 student with
8-bit first and last layers, budgets written for a v4-32 pod (global batch 1024).

Arguments (after the colon, comma-separated): bit widths `w1a1`, `w2a2`, `w4a4`,
`w8a8`; `channel` for per-channel requantisation; `tiny` for a reduced-resolution
smoke run (64×64, a handful of steps) on a small local copy of imagenet2012, e.g.
`--config configs/alexnet_imagenet.py:tiny data.data_dir=/tmp/tiny_imagenet`.
The data dir is a gs:// placeholder: pass `data.data_dir=gs://YOUR_BUCKET/tfds`.
The key structure is exactly that of configs/mnist_alexnet.py.
"""

import ml_collections

TRAIN_IMAGES = 1_281_167
GLOBAL_BATCH = 1024                              # 64 per chip on a v4-32 (16 chips)
STEPS_PER_EPOCH = TRAIN_IMAGES // GLOBAL_BATCH   # 1251


def _optim(name="sgd", lr=0.04, warmup=0.05, weight_decay=5e-4, grad_clip=0.0):
    return ml_collections.ConfigDict(dict(
        name=name, lr=lr, momentum=0.9, nesterov=True, b1=0.9, b2=0.999,
        weight_decay=weight_decay, warmup_steps=warmup, schedule="cosine",
        grad_clip=grad_clip, agc=0.0, slow_lr_factor=0.1))


def get_config(arg: str = ""):
    args = {a.strip() for a in (arg or "").split(",") if a.strip()}
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="imagenet2012", data_dir="gs://YOUR_BUCKET/tensorflow_datasets",
                  augment="imagenet", image_size=224,
                  max_train_examples=0, max_test_examples=0, eval_batch=1024,
                  holdout=0,  # N > 0: evaluate on the last N training examples, never on validation
                  # input per host: JPEG decoding and augmentation in 16 grain worker processes
                  # (a TPU v4 host has 240 vCPUs; docs/scale-out.md has the measured rates)
                  workers=16, read_threads=4, prefetch=4)
    c.model = dict(name="alexnet", num_classes=1000, w_bits=4, a_bits=4,
                   first_last_w_bits=8, requant="layer",
                   act_init=4.0,  # every activation clip's start, or a calibrator (minmax|percentile|entropy|mse) of 256 training images
                   # registered quantizers (bnfree_jax.quant), and modules imported first
                   # that may register more (docs/quantizers.md)
                   weight_quantizer="maxabs", act_quantizer="pact", plugins=[], bias_grid=False)
    c.model.layers = []  # per-layer rules [(regex, {w_bits|a_bits|..: v})], first match wins (docs/quantizers.md)
    # Teacher: SGD + Nesterov momentum, lr 0.01 per 256 images scaled linearly, ~90 epochs.
    c.teacher = dict(steps=90 * STEPS_PER_EPOCH, batch=GLOBAL_BATCH, optim=_optim(lr=0.04))
    c.qat = dict(steps=30 * STEPS_PER_EPOCH, batch=GLOBAL_BATCH,
                 optim=_optim(name="adamw", lr=1e-4, weight_decay=1e-5))
    c.ptl = dict(
        batch=GLOBAL_BATCH,
        local_init_steps=500,                  # gradient refinement after the least-squares fit
        stage_steps=2 * STEPS_PER_EPOCH,       # per progressive stage ℓ = 1..8
        finetune_steps=10 * STEPS_PER_EPOCH,   # global fine-tune of the whole student
        layer_loss_weight=1.0,
        ce_weight=1.0, kd_weight=1.0, kd_temperature=2.0,
        prefix="frozen",
        local_init=True,
        compensation=True,
        layer_target="tandem",
        own_layer_rate="slow",
        head_layers=1,
        block_layers=1,
        train_own_activation=False,
        stage_budget="equal",
        cache_teacher=False, target_cache_mb=0,  # augmented inputs: teacher outputs cannot be cached
        optim=_optim(name="adamw", lr=1e-4, weight_decay=1e-5, grad_clip=1.0),
        finetune_optim=_optim(name="adamw", lr=2e-5, weight_decay=1e-5, grad_clip=1.0),
    )
    c.checkpoint = dict(save_every=2000, keep=3, log_every=100,  # log_every: metrics fetched and written
                         grad_diagnostics=True)  # gradient norms, clip fractions, STE cosine per log step
    c.mesh = dict(compute_dtype="bfloat16", platform="auto",  # "tpu"/"gpu": refuse a CPU-only JAX
                  cpu_devices=0)  # N > 0: split a CPU host into N devices (docs/scale-out.md)

    for a in args:
        if a.startswith("w") and "a" in a:
            w, a_ = a[1:].split("a")
            c.model.w_bits, c.model.a_bits = int(w), int(a_)
        elif a == "channel":
            c.model.requant = "channel"
        elif a == "tiny":
            pass
        else:
            raise ValueError(f"unknown config argument {a!r} (use tiny, wXaY, channel)")
    if c.model.w_bits == 1 or c.model.a_bits == 1:
        # A binary QAT teacher needs a longer budget and a higher learning rate (DESIGN.md).
        c.qat.steps = 45 * STEPS_PER_EPOCH
        c.qat.optim.lr = 3e-4
    if "tiny" in args:
        # Smoke run of every phase on a handful of local images (the tests' miniature
        # imagenet2012), sized for a test on two CPU cores: the full 1000-class AlexNet at
        # 64×64; PTL is the least-squares local init and one stage converting all 8 layers
        # (each PTL stage costs this network several seconds of compilation).
        c.data.data_dir = ""
        c.data.image_size = 64
        c.data.eval_batch = 8
        c.teacher = dict(steps=3, batch=8, optim=_optim(lr=0.01))
        c.qat = dict(steps=2, batch=8, optim=_optim(name="adamw", lr=1e-4, weight_decay=1e-5))
        c.ptl.batch = 8
        c.ptl.local_init_steps, c.ptl.stage_steps, c.ptl.finetune_steps = 0, 1, 0
        c.ptl.head_layers = 8
        c.checkpoint.save_every = 2
        c.mesh.compute_dtype = "float32"
        c.data.workers = 0  # a handful of images: no worker processes
    return c
