"""The report's figures, drawn with matplotlib's object API on the Agg canvas.

Pure functions from plain data to one PNG each; no pyplot, so no global figure state
and no display backend. Each returns the path it wrote, or None when there is nothing
to draw.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from etils.epath import Path


DPI = 110
NA_COLOR = "0.55"


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    return _write(fig, path)


def _write(fig: Figure, path) -> Path:
    path = Path(path)
    with path.open("wb") as fh:  # a file object, so a bucket path works too
        fig.savefig(fh, format="png", dpi=DPI)
    return path


def layer_label(spec) -> str:
    w = "f" if spec.w_bits is None else str(spec.w_bits)
    a = "logits" if spec.last else ("f" if spec.a_bits is None else str(spec.a_bits))
    return f"{spec.name}\nW{w} A{a}" if not spec.last else f"{spec.name}\nW{w} {a}"


def _na(ax, x: float, text: str = "n/a") -> None:
    ax.text(x, 0.02, text, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
            color=NA_COLOR, fontsize=8, rotation=90)


def _layer_axis(ax, labels: Sequence[str]) -> None:
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.grid(axis="y", alpha=0.3)


def plot_scales(stats, path: Path, per_channel: bool) -> Optional[Path]:
    """Left: student weight scale per layer (per-channel: min–max bar, median dot). Right: PACT step."""
    if stats is None:
        return None
    labels = [layer_label(s) for s in stats.specs]
    fig = _figure(12, 4.2)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, ws in enumerate(stats.weight_scale):
        if ws is None or ws.size == 0:
            _na(ax, i)
        elif ws.size == 1:
            ax.plot(i, ws[0], "o", color="C0", ms=7)
        else:
            med = float(np.median(ws))
            ax.errorbar(i, med, yerr=[[med - ws.min()], [ws.max() - med]], fmt="o", color="C0",
                        ecolor="C0", elinewidth=6, alpha=0.8, capsize=0)
    ax.set_yscale("log")
    ax.set_title("student weight scale max|w|/(2^(W-1)-1)" + (" — per channel (min–max, median)"
                                                             if per_channel else " — per tensor"), fontsize=10)
    ax.set_ylabel("scale (float per integer step)")
    _layer_axis(ax, labels)
    vals = [(i, v) for i, v in enumerate(stats.act_scale) if v is not None]
    for i, v in vals:
        bx.bar(i, v, color="C1", width=0.6)
        bx.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    for i, v in enumerate(stats.act_scale):
        if v is None:
            _na(bx, i, "n/a (no PACT)")
    bx.set_title("student activation step act_alpha/(2^A-1)", fontsize=10)
    bx.set_ylabel("activation scale")
    if not vals:
        bx.set_ylim(0, 1)
    _layer_axis(bx, labels)
    return _save(fig, path)


def plot_clipping_headroom(stats, manifest_layers: list, path: Path) -> Optional[Path]:
    """Left: % of student pre-activations above act_alpha. Right: accumulator headroom bits."""
    if stats is None and not manifest_layers:
        return None
    fig = _figure(12, 4.2)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if stats is not None:
        labels = [layer_label(s) for s in stats.specs]
        top = 0.0
        for i, r in enumerate(stats.clip_ratio):
            if r is None:
                _na(ax, i)
                continue
            ax.bar(i, 100 * r, color="C3", width=0.6)
            ax.text(i, 100 * r, f"{100 * r:.2f}%", ha="center", va="bottom", fontsize=8)
            top = max(top, 100 * r)
        ax.set_ylim(0, max(1.0, top * 1.2))
        _layer_axis(ax, labels)
        if all(r is None for r in stats.clip_ratio):
            ax.text(0.5, 0.5, "no PACT clip in this network\n(binary, float or logit outputs)", ha="center",
                    va="center", transform=ax.transAxes, color=NA_COLOR)
        ax.set_title(f"clipping: pre-activations > act_alpha ({stats.n_probe} test images)", fontsize=10)
    else:
        ax.text(0.5, 0.5, "no student available", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("clipping", fontsize=10)
    ax.set_ylabel("clipped fraction (%)")
    if manifest_layers:
        hb = [l.get("headroom_bits") for l in manifest_layers]
        for i, h in enumerate(hb):
            if h is None:
                _na(bx, i)
                continue
            bx.bar(i, h, color="C2" if h > 0 else "C3", width=0.6)
            bx.text(i, h, str(h), ha="center", va="bottom" if h >= 0 else "top", fontsize=8)
        bx.axhline(0, color="k", lw=0.8)
        names = [f"{l.get('name', i)}\nacc≤{_short(l.get('acc_bound'))}" for i, l in enumerate(manifest_layers)]
        _layer_axis(bx, names)
    else:
        bx.text(0.5, 0.5, "no exported artifact", ha="center", va="center", transform=bx.transAxes)
        bx.set_xticks([])
        bx.set_yticks([])
    bx.set_title("int32 accumulator headroom: 31 − bitlength(bound)", fontsize=10)
    bx.set_ylabel("headroom (bits)")
    return _save(fig, path)


def _short(v) -> str:
    if v is None:
        return "?"
    v = float(v)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def plot_histograms(stats, path: Path, ncols: int = 4) -> Optional[Path]:
    """One subplot per layer: teacher (post-BN) vs student (post-IntScale) pre-activations."""
    if stats is None or all(p is None for p in stats.student_pre):
        return None
    n = len(stats.names)
    rows = math.ceil(n / ncols)
    fig = _figure(3.2 * ncols, 2.6 * rows)
    for i, (spec, s, t, alpha) in enumerate(zip(stats.specs, stats.student_pre, stats.teacher_pre,
                                                 stats.act_alpha)):
        ax = fig.add_subplot(rows, ncols, i + 1)
        both = np.concatenate([x for x in (s, t) if x is not None])
        lo, hi = np.percentile(both, [0.1, 99.9]) if both.size else (0.0, 1.0)
        if alpha is not None:
            hi = max(hi, alpha * 1.05)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 61)
        if t is not None:
            ax.hist(t, bins=bins, density=True, alpha=0.45, color="C0", label="teacher (QAT, BN)")
        if s is not None:
            ax.hist(s, bins=bins, density=True, histtype="step", lw=1.5, color="C3",
                    label="student")
        if alpha is not None:
            ax.axvline(alpha, color="k", ls="--", lw=1, label="student act_alpha")
        ax.set_title(layer_label(spec).replace("\n", "  "), fontsize=9)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
        ax.set_yticks([], minor=True)
        ax.set_yticks([])
        if i % ncols == 0:
            ax.set_ylabel("density (log)", fontsize=8)
        if i >= n - ncols:
            ax.set_xlabel("pre-activation", fontsize=8)
        if i == 0:
            fig.legend(*ax.get_legend_handles_labels(), loc="upper right", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"pre-activation distributions on {stats.n_probe} test images (central 99.8 %)",
                 fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _write(fig, path)


def plot_layer_loss(stages: list, path: Path) -> Optional[Path]:
    """One line per layer: relative MSE vs the teacher after each PTL stage (log y)."""
    stages = [s for s in stages if (s.get("metrics") or {}).get("layer_mse")]
    if not stages:
        return None
    layers = list(dict.fromkeys(k for s in stages for k in s["metrics"]["layer_mse"]))
    fig = _figure(max(7.0, 0.9 * len(stages) + 4), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for j, layer in enumerate(layers):
        ys = [s["metrics"]["layer_mse"].get(layer) for s in stages]
        ys = [y if y is not None and y > 0 else np.nan for y in ys]
        ax.plot(range(len(stages)), ys, marker="o", color=f"C{j % 10}", label=layer, ms=4,
                ls="-" if j < 10 else "--")
        conv = [k for k, s in enumerate(stages) if s["name"].endswith(f"_{layer}")
                and re.match(r"stage\d+_", s["name"])]
        for k in conv:  # the stage that converts this layer
            if not np.isnan(ys[k]):
                ax.plot(k, ys[k], "o", ms=11, mfc="none", mec=f"C{j % 10}", mew=1.5)
    ax.set_yscale("log")
    _layer_axis(ax, [s["name"] for s in stages])
    for lab in ax.get_xticklabels():
        lab.set_rotation(30)
        lab.set_ha("right")
    ax.set_xlabel("PTL stage (in order)")
    ax.set_ylabel("layer target loss (relative MSE)")
    ax.set_title("layer-wise target loss across stages (ring: the stage converting that layer)", fontsize=11)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="layer", title_fontsize=8)
    return _save(fig, path)


PANELS = (("teacher", "float BN teacher"), ("qat", "QAT BN teacher"), ("local_init", "PTL: local init"),
          ("tandem", "PTL: tandem stages ℓ = 1..L"), ("finetune", "PTL: global fine-tune"), ("other", "other phases"))


def phase_kind(phase: str) -> str:
    if phase in ("teacher", "qat", "local_init", "finetune"):
        return phase
    if re.match(r"stage\d+_", phase):
        return "tandem"
    return "other"


def plot_training(curves: dict, path: Path) -> Optional[Path]:
    """Loss vs step, one subplot per phase kind; tandem stages are laid end to end."""
    groups: dict = {}
    for phase, (steps, losses) in curves.items():
        if steps:
            groups.setdefault(phase_kind(phase), []).append((phase, steps, losses))
    panels = [(k, t) for k, t in PANELS if k in groups]
    if not panels:
        return None
    ncols = min(3, len(panels))
    rows = math.ceil(len(panels) / ncols)
    fig = _figure(4.6 * ncols, 3.4 * rows)
    for p, (kind, title) in enumerate(panels):
        ax = fig.add_subplot(rows, ncols, p + 1)
        offset = 0
        series = groups[kind]
        for j, (phase, steps, losses) in enumerate(series):
            x = np.asarray(steps) + (offset if kind == "tandem" else 0)
            tandem = kind == "tandem"
            ax.plot(x, losses, "-", marker="." if len(steps) < 30 else None, color=f"C{j % 10}",
                    label=phase if len(series) > 1 and not tandem else None, lw=1.2)
            if tandem:
                if j:
                    ax.axvline(offset, color="0.75", lw=0.8)
                ax.text(offset + 0.5 * (x.max() - offset), 1.01, phase.split("_", 1)[-1],
                        transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7,
                        color=f"C{j % 10}", rotation=90 if len(series) > 8 else 0)
                offset = int(x.max())
        all_losses = np.concatenate([np.asarray(l) for _, _, l in series])
        if np.all(all_losses > 0) and all_losses.max() / max(all_losses.min(), 1e-12) > 20:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10, pad=14 if kind == "tandem" else 6)
        ax.set_xlabel("cumulative step" if kind == "tandem" else "step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if len(series) > 1 and kind != "tandem":
            ax.legend(fontsize=7, ncol=2 if len(series) > 5 else 1)
    return _save(fig, path)


def plot_accuracy_vs_bits(series: dict, path: Path) -> Optional[Path]:
    """Test top-1 (mean ± std over seeds) per bit-width configuration, one line per method."""
    if not series:
        return None
    configs = sorted({(w, a) for pts in series.values() for w, a, *_ in pts})
    index = {c: i for i, c in enumerate(configs)}
    fig = _figure(max(6.5, 1.1 * len(configs) + 3), 4.3)
    ax = fig.add_subplot(1, 1, 1)
    n = len(series)
    for j, (label, pts) in enumerate(sorted(series.items())):
        dx = (j - (n - 1) / 2) * 0.06  # small dodge so error bars do not overlap
        x = [index[(w, a)] + dx for w, a, *_ in pts]
        seeds = max(p[4] for p in pts)
        ax.errorbar(x, [p[2] for p in pts], yerr=[p[3] for p in pts], fmt="o-", capsize=3, ms=5,
                    color=f"C{j % 10}", label=f"{label} (≤{seeds} seed{'s' if seeds > 1 else ''})")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"W{w}A{a}" for w, a in configs])
    ax.set_xlabel("weight / activation bits")
    ax.set_ylabel("test top-1")
    ax.set_title("accuracy vs bit width (mean ± std over seeds)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


GRADIENT_PANELS = (("grad_norm/", "gradient norm per layer", True),
                   ("clip_hi/", "fraction clipped at alpha (quantizer input, after pooling)", False),
                   ("ste_cos/", "STE mismatch: cos(STE grad, float grad)", False))


def plot_gradients(diagnostics: dict, path: Path) -> Optional[Path]:
    """The gradient diagnostics per phase (x: the phases in order, each at its last logged
    step), one panel per quantity, one line per layer; `readers.read_diagnostics`' output."""
    phases = list(diagnostics)
    panels = [(p, t, log) for p, t, log in GRADIENT_PANELS
              if any(k.startswith(p) for d in diagnostics.values() for k in d)]
    if not panels:
        return None
    fig = _figure(max(7.0, 0.9 * len(phases) + 4), 3.2 * len(panels))
    for i, (prefix, title, log) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        layers = list(dict.fromkeys(k[len(prefix):] for d in diagnostics.values() for k in d if k.startswith(prefix)))
        for j, layer in enumerate(layers):
            ys = [diagnostics[ph].get(prefix + layer, np.nan) for ph in phases]
            if log:
                ys = [y if y > 0 else np.nan for y in ys]
            ax.plot(range(len(phases)), ys, marker="o", ms=4, color=f"C{j % 10}", label=layer,
                    ls="-" if j < 10 else "--")
        if log and any(v > 0 for d in diagnostics.values() for k, v in d.items() if k.startswith(prefix)):
            ax.set_yscale("log")
        _layer_axis(ax, phases)
        for lab in ax.get_xticklabels():
            lab.set_rotation(30)
            lab.set_ha("right")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_calibration(curves: dict, references: dict, path: Path) -> Optional[Path]:
    """PTQ integer top-1 vs calibration images, one panel per (bits, requant), one line
    per method: `curves` {(bits, requant): {method: [(images, mean, std, n)]}};
    `references` {(bits, requant): {label: top-1}} drawn as horizontal lines."""
    if not curves:
        return None
    panels = sorted(curves, key=lambda k: (-int(re.findall(r"\d+", k[0])[0]), k[1]))
    bits = sorted({b for b, _ in panels}, key=lambda b: -int(re.findall(r"\d+", b)[0]))
    requants = sorted({r for _, r in panels}, key=lambda r: r != "layer")
    fig = _figure(4.6 * len(requants), 3.4 * len(bits))
    for (b, r) in panels:
        ax = fig.add_subplot(len(bits), len(requants), bits.index(b) * len(requants) + requants.index(r) + 1)
        for j, (method, pts) in enumerate(sorted(curves[(b, r)].items())):
            pts = sorted(pts)
            ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                        fmt="o-", ms=4, capsize=2, color=f"C{j % 10}",
                        label=f"{method} (n≤{max(p[3] for p in pts)})")
        for k, (label, top1) in enumerate(sorted(references.get((b, r), {}).items())):
            ax.axhline(100 * top1, color="k", ls=("--", ":", "-.")[k % 3], lw=1, label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{b.upper()}, requant={r}", fontsize=10)
        ax.set_xlabel("calibration images")
        ax.set_ylabel("integer top-1 %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    return _save(fig, path)
