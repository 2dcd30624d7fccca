"""Does the deep plain network need BatchNorm? Float `vgg_plain` trained from scratch with
BN (the teacher) and without it (each BN replaced by a learnable per-channel scale and
bias, the BN-free student's layer), same optimizer, budget and data order, over seeds and
depths (convs per block: 4 is the zoo's 12-conv network). Project venv; resumable (a
finished run is read back from its workdir's `result.json`).

    python bench/bn_free_scratch.py --workdir runs/bn_free --steps 400 --seeds 0,1,2 \
        --runs 4:bn,4:free,2:free,1:free --out docs/results/bn_free_scratch.json \
        --plot docs/results/bn_free_scratch.png

A run *diverged* when its loss became non-finite; it *failed* when its held-out top-1
stayed under --fail-below (default 0.5: it never left the neighbourhood of chance).
Choices read the held-out split (`:holdout` config), never test. Prints one line per
run, then the JSON result as the last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, machine  # noqa: E402


def parse_runs(text: str) -> list[tuple[int, bool]]:
    """'4:bn,4:free' -> [(4, True), (4, False)]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        depth, _, kind = item.partition(":")
        if kind not in ("bn", "free") or not depth.isdigit() or int(depth) < 1:
            raise SystemExit(f"--runs {item!r}: expected DEPTH:bn or DEPTH:free, DEPTH >= 1")
        out.append((int(depth), kind == "bn"))
    return out


def train_one(config, workdir: str, depth: int, bn: bool, seed: int, log) -> dict:
    """One float training from scratch; its record (top-1, loss curve, seconds)."""
    from bnfree_jax.nn.network import STUDENT, TEACHER
    from bnfree_jax.nn.zoo import vgg_plain
    from bnfree_jax.pipeline.context import make_context
    from bnfree_jax.report.readers import read_metrics
    from bnfree_jax.train.loop import NonFiniteLoss
    from bnfree_jax.train.streams import stream_key
    from bnfree_jax.train.supervised import init_variables, train_bn_network

    config = config.copy_and_resolve_references()
    config.seed = seed
    ctx = make_context(config, workdir, log=log)
    nets = dataclasses.replace(ctx.nets, float_specs=tuple(vgg_plain(config.model.num_classes, depth=depth)))
    net = nets.network(TEACHER if bn else STUDENT, quantized=False, bn_axis_name="data" if bn else None)
    init = init_variables(net, nets.image_shape, stream_key(seed, "teacher/init"))
    t = config.teacher
    t0 = time.time()
    try:
        _, top1 = train_bn_network("teacher", net, init, t.steps, t.batch, t.optim, rt=ctx.rt, feed=ctx.feed,
                                   ckpt_dir=os.path.join(workdir, "checkpoints"), seed=seed)
        diverged_at = None
    except NonFiniteLoss as e:
        top1, diverged_at = None, e.step
    steps, losses = read_metrics(ctx.workdir / "metrics.jsonl").get("teacher", ((), ()))
    curve = [[s, round(v, 5)] for s, v in zip(steps, losses)]
    return dict(depth=depth, convs=3 * depth, bn=bn, seed=seed, steps=t.steps, lr=t.optim.lr, top1=top1,
                diverged_at=diverged_at, loss=curve, seconds=round(time.time() - t0, 1))


def summarise(rows: list[dict], fail_below: float) -> list[dict]:
    """Per (depth, bn): seeds, mean ± sample std of top-1 over the seeds that finished,
    how many diverged and how many failed."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["depth"], r["bn"]), []).append(r)
    out = []
    for (depth, bn), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        tops = [r["top1"] for r in rs if r["top1"] is not None]
        out.append(dict(depth=depth, convs=3 * depth, bn=bn, n=len(rs),
                        diverged=sum(r["diverged_at"] is not None for r in rs),
                        failed=sum(r["top1"] is None or r["top1"] < fail_below for r in rs),
                        top1_mean=round(statistics.mean(tops), 4) if tops else None,
                        top1_std=round(statistics.stdev(tops), 4) if len(tops) > 1 else None,
                        top1=[r["top1"] for r in rs]))
    return out


def plot(rows: list[dict], path: str) -> None:
    """Training loss per step, one colour per (depth, BN), one line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({(r["depth"], r["bn"]) for r in rows}, key=lambda k: (-k[0], not k[1]))
    for i, key in enumerate(keys):
        for j, r in enumerate(r for r in rows if (r["depth"], r["bn"]) == key):
            steps, loss = zip(*r["loss"]) if r["loss"] else ((), ())
            ax.plot(steps, loss, color=f"C{i}", alpha=0.8,
                    label=f"{3 * key[0]} convs, {'BN' if key[1] else 'BN-free'}" if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("vgg_plain from scratch, float: with and without BatchNorm")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/mnist_deep.py:holdout")
    p.add_argument("--workdir", required=True, help="one sub-directory per run (resumable)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--runs", default="4:bn,4:free,2:free,1:free", help="DEPTH:bn|free, comma-separated")
    p.add_argument("--fail-below", type=float, default=0.5)
    p.add_argument("--out", help="write the JSON result here too")
    p.add_argument("--plot", help="write the loss curves here (PNG)")
    p.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE")
    a = p.parse_args(argv)

    from bnfree_jax.pipeline.validate import load_valid_config

    config = load_valid_config(a.config, [*a.overrides, f"teacher.steps={a.steps}"])
    log = lambda m: print(m, file=sys.stderr, flush=True)
    rows = []
    for depth, bn in parse_runs(a.runs):
        for seed in (int(s) for s in a.seeds.split(",")):
            sub = os.path.join(a.workdir, f"d{depth}_{'bn' if bn else 'free'}_s{seed}")
            done = os.path.join(sub, "result.json")
            if os.path.exists(done):
                row = json.load(open(done))
            else:
                row = train_one(config, sub, depth, bn, seed, log)
                with open(done + ".tmp", "w") as fh:
                    json.dump(row, fh)
                os.replace(done + ".tmp", done)
            rows.append(row)
            print(f"{row['convs']:>2} convs {'BN     ' if bn else 'BN-free'} seed {seed}: top-1 {row['top1']} "
                  f"diverged at {row['diverged_at']} ({row['seconds']} s)", flush=True)
    result = dict(bench="bn_free_scratch", config=a.config, steps=a.steps, fail_below=a.fail_below,
                  machine=machine(), summary=summarise(rows, a.fail_below), runs=rows)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)
    if a.plot:
        plot(rows, a.plot)
    emit({k: v for k, v in result.items() if k != "runs"})


if __name__ == "__main__":
    main()
