"""Calibrators: choose the clipping threshold ``amax`` of a quantizer from data.

Numpy, off the training graph. Methods follow NVIDIA's TensorRT /
pytorch-quantization histogram calibrators: ``minmax``, ``percentile``,
``entropy`` (KL divergence search) and ``mse``. Thresholds are taken on the
magnitude that the quantizer sees: ``|x|`` when signed (symmetric, zero-point 0),
``max(x, 0)`` when unsigned (negative values clip to 0 whatever amax is).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bnfree_jax.quant.qtensor import qrange

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULTS = dict(percentile=99.99, num_bins=2048, start_bin=128, stride=1,
                num_candidates=256)


def magnitude(x, signed: bool) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  return np.abs(x) if signed else np.maximum(x, 0.0)


def channel_rows(x, axis):
  """(rows, keepdims_shape): one row per channel (or a single row), float64."""
  x = np.asarray(x)
  if axis is None:
    return x.reshape(1, -1), ()
  ax = axis % x.ndim
  shape = [1] * x.ndim
  shape[ax] = x.shape[ax]
  return np.moveaxis(x, ax, 0).reshape(x.shape[ax], -1), tuple(shape)


def bin_rows(m_rows, ranges, num_bins):
  """Histogram counts (C, num_bins) of each row over [0, range_c]; vectorised."""
  c = m_rows.shape[0]
  width = np.where(ranges > 0, ranges / num_bins, 1.0)[:, None]
  idx = np.minimum(np.floor(m_rows / width), num_bins - 1).astype(np.int64)
  key = (np.arange(c)[:, None] * num_bins + idx).ravel()
  return np.bincount(key, minlength=c * num_bins).reshape(c, num_bins).astype(np.float64)


def percentile_from_hist(hist, width, pct):
  """``np.percentile``'s estimate (linear between order statistics, rank
  ``p (N-1)``) read off a histogram, each bin's samples spread evenly over it."""
  cdf = np.cumsum(hist)
  total = cdf[-1]
  if total == 0:
    return 0.0

  def order_stat(k):  # k-th smallest (0-based), at its slot's centre within the bin
    b = min(int(np.searchsorted(cdf, k, side="right")), len(hist) - 1)
    below = cdf[b - 1] if b > 0 else 0.0
    return (b + (k - below + 0.5) / max(hist[b], 1.0)) * width

  rank = pct / 100.0 * (total - 1)
  lo = np.floor(rank)
  value = order_stat(lo)
  if rank > lo:
    value += (rank - lo) * (order_stat(lo + 1) - value)
  return float(value)


def entropy_from_hist(hist, width, bits, signed, start_bin=128, stride=1):
  """TensorRT's KL threshold search on a histogram of magnitudes.

  For each candidate i (>= start_bin bins): P = bins[:i] with the clipped mass
  added to its last bin; Q = bins[:i] merged into the quantizer's qmax+1
  levels and spread back uniformly over the non-empty bins of each level. The
  threshold is the right edge of bin i minimising KL(P || Q) (the last one on
  ties, as pytorch-quantization). Bin 0 is set to bin 1 first, as there, so
  the spike of exact zeros after a ReLU does not drive the choice.
  """
  hist = np.asarray(hist, np.float64).copy()
  nb = len(hist)
  if nb > 1:
    hist[0] = hist[1]
  total = hist.sum()
  if total == 0:
    return 0.0
  levels = qrange(bits, signed)[1] + 1
  cands = np.arange(min(start_bin, nb), nb + 1, stride)
  cands = cands[cands > 0]
  csum = np.cumsum(hist)
  j = np.arange(nb)
  kls = []
  for lo in range(0, len(cands), 256):
    i = cands[lo:lo + 256][:, None]
    r = i.shape[0]
    valid = j[None, :] < i
    nz = valid & (hist[None, :] > 0)
    level = (j[None, :] * levels) // i
    key = np.arange(r)[:, None] * levels + np.minimum(level, levels - 1)
    lsum = np.bincount(key[nz], weights=np.broadcast_to(hist, nz.shape)[nz],
                       minlength=r * levels)
    lcnt = np.bincount(key[nz], minlength=r * levels)
    q = np.where(nz, (lsum / np.maximum(lcnt, 1))[key], 0.0)
    p = np.where(valid, hist[None, :], 0.0)
    p[np.arange(r), i[:, 0] - 1] += total - csum[i[:, 0] - 1]
    p /= p.sum(1, keepdims=True)
    qs = q.sum(1, keepdims=True)
    q = q / np.where(qs > 0, qs, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
      terms = np.where(p > 0, p * np.log(p / q), 0.0)
    kls.append(terms.sum(1))
  kls = np.concatenate(kls)
  best = len(kls) - 1 - int(np.argmin(kls[::-1]))
  return float(cands[best] * width)


def quant_sq_error(values, weights, candidates, bits, signed):
  """Sum over values of weight * (m - Q_amax(m))^2, for each candidate amax."""
  qmin, qmax = qrange(bits, signed)
  binary = signed and bits == 1
  cand = np.asarray(candidates, np.float64)[:, None]
  out = np.zeros(cand.shape[0])
  step = max(1, 4_000_000 // max(1, cand.shape[0]))
  for lo in range(0, len(values), step):
    v = values[None, lo:lo + step]
    s = np.where(cand > 0, cand / qmax, 1.0)
    if binary:
      q = np.broadcast_to(s, (cand.shape[0], v.shape[1]))
    else:
      t = v / s
      q = np.minimum(np.trunc(t) + (t - np.trunc(t) >= 0.5), qmax) * s
    out += ((v - q) ** 2 * weights[None, lo:lo + step]).sum(1)
  return out


def mse_candidates(vmax, num_candidates):
  return vmax * np.arange(1, num_candidates + 1) / num_candidates


def mse_from_values(values, weights, vmax, bits, signed, num_candidates):
  if vmax <= 0:
    return 0.0
  cands = mse_candidates(vmax, num_candidates)
  err = quant_sq_error(values, weights, cands, bits, signed)
  return float(cands[int(np.argmin(err))])


def _one_row(m, method, bits, signed, opt):
  vmax = float(m.max()) if m.size else 0.0
  if method == "minmax":
    return vmax
  if method == "percentile":
    return float(np.percentile(m, opt["percentile"])) if m.size else 0.0
  if method == "mse":
    return mse_from_values(m, np.ones_like(m), vmax, bits, signed,
                           opt["num_candidates"])
  nb = opt["num_bins"]
  hist = bin_rows(m[None, :], np.array([vmax]), nb)[0]
  return entropy_from_hist(hist, vmax / nb, bits, signed, opt["start_bin"],
                           opt["stride"])


def check_options(method, options):
  if method not in METHODS:
    raise ValueError(f"unknown calibration method {method!r}; use one of {METHODS}")
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise TypeError(f"unknown calibration options {sorted(unknown)}")
  return {**DEFAULTS, **options}


def calibrate(x, method: str, bits: int, signed: bool, axis=None, **options):
  """amax of ``x`` by ``method``; per channel along ``axis`` (keepdims shape).

  Options: ``percentile`` (99.99), ``num_bins`` (2048), ``start_bin`` (128),
  ``stride`` (1) for entropy; ``num_candidates`` (256) for mse, whose grid is
  ``max * k / num_candidates``, k = 1..num_candidates. Returns float32.
  """
  opt = check_options(method, options)
  rows, shape = channel_rows(magnitude(x, signed), axis)
  amax = [_one_row(r, method, bits, signed, opt) for r in rows]
  return np.asarray(amax, np.float32).reshape(shape)


def scale_from_amax(amax, bits: int, signed: bool):
  """Scale ``amax / qmax`` (DESIGN conventions); a zero amax gives the tiniest scale."""
  qmax = qrange(bits, signed)[1]
  if isinstance(amax, np.ndarray) or np.isscalar(amax):
    amax = np.asarray(amax, np.float32)
    return np.maximum(amax, np.finfo(np.float32).tiny) / np.float32(qmax)
  return jnp.maximum(amax, jnp.finfo(jnp.result_type(amax)).tiny) / qmax
