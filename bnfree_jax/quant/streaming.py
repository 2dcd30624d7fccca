"""Streaming calibration: amax from data that never fits in one array.

Keeps, per channel, the running maximum of the magnitude (exact, so ``minmax``
streams exactly) and, for the histogram methods, a ``num_bins`` histogram over
``[0, range]``. When a batch exceeds the range, the range doubles (as often as
needed) and adjacent bins merge pairwise: the re-binned histogram is exactly
the one the earlier data would have given on the wider range.
"""
from __future__ import annotations

import numpy as np

from bnfree_jax.quant import calib


class StreamingCalibrator:
  """Accumulate ``update(batch)`` calls; ``compute_amax()`` returns what
  ``calibrate`` would give on their concatenation (exactly for minmax,
  closely for percentile, entropy and mse, which work on the histogram)."""

  def __init__(self, method: str, bits: int, signed: bool, axis=None,
               num_bins: int = 2048, **options):
    self.options = calib.check_options(method, dict(options, num_bins=num_bins))
    self.method, self.bits, self.signed, self.axis = method, bits, signed, axis
    self.num_bins = num_bins
    self._shape = None      # keepdims shape of the result
    self._max = None        # (C,) running max of the magnitude
    self._range = None      # (C,) histogram range, 0 until data is non-zero
    self._hist = None       # (C, num_bins) counts

  def update(self, batch):
    """Fold one batch into the statistics; returns self."""
    rows, shape = calib.channel_rows(calib.magnitude(batch, self.signed), self.axis)
    if self._shape is None:
      self._shape = shape
      self._max = np.zeros(rows.shape[0])
      self._range = np.zeros(rows.shape[0])
      self._hist = np.zeros((rows.shape[0], self.num_bins))
    elif rows.shape[0] != self._max.shape[0]:
      raise ValueError(f"batch has {rows.shape[0]} channels, expected {self._max.shape[0]}")
    if rows.shape[1] == 0:
      return self
    bmax = rows.max(axis=1)
    self._max = np.maximum(self._max, bmax)
    if self.method != "minmax":
      self._grow(bmax)
      self._hist += calib.bin_rows(rows, self._range, self.num_bins)
    return self

  def _grow(self, bmax):
    fresh = (self._range == 0) & (bmax > 0)
    # A margin keeps every value strictly below the range, so no value lands in
    # the last bin by clipping and pairwise merging stays exact. Zeros seen
    # before the first non-zero batch sit in bin 0 either way.
    self._range[fresh] = bmax[fresh] * (1 + 2.0 ** -10)
    for c in np.nonzero((bmax >= self._range) & (self._range > 0))[0]:
      k = 0
      while self._range[c] * 2 ** k <= bmax[c]:
        k += 1
      j = np.arange(self.num_bins) >> k
      self._hist[c] = np.bincount(j, weights=self._hist[c], minlength=self.num_bins)
      self._range[c] *= 2 ** k

  @property
  def histogram(self):
    """(counts (C, num_bins), ranges (C,)): bins of width range/num_bins from 0."""
    return self._hist.copy(), self._range.copy()

  def compute_amax(self):
    """The calibrated amax, float32, keepdims shape as ``calibrate``."""
    if self._shape is None:
      raise ValueError("compute_amax() before any update()")
    out = [self._one(c) for c in range(self._max.shape[0])]
    return np.asarray(out, np.float32).reshape(self._shape)

  def _one(self, c):
    vmax = float(self._max[c])
    if self.method == "minmax" or vmax == 0:
      return vmax
    hist, width = self._hist[c], self._range[c] / self.num_bins
    opt = self.options
    if self.method == "percentile":
      return min(vmax, calib.percentile_from_hist(hist, width, opt["percentile"]))
    if self.method == "entropy":
      return calib.entropy_from_hist(hist, width, self.bits, self.signed,
                                     opt["start_bin"], opt["stride"])
    centers = (np.arange(self.num_bins) + 0.5) * width
    return calib.mse_from_values(centers, hist, vmax, self.bits, self.signed,
                                 opt["num_candidates"])
