"""Calibrators: known data, independent references, streaming vs one-shot."""
import jax.numpy as jnp
import numpy as np
import pytest

from bnfree_jax.quant import (METHODS, StreamingCalibrator, calibrate, qrange,
                              scale_from_amax, uniform_quantize)
from bnfree_jax.quant.calib import bin_rows, entropy_from_hist

F32 = np.float32


def laplace_with_outliers(n=100_000, seed=0):
  """Laplace(0, 1) with 5 outliers of magnitude 60 (fewer than 0.01%), arriving late."""
  rng = np.random.default_rng(seed)
  x = rng.laplace(0, 1, n).astype(F32)
  x[rng.choice(np.arange(n // 2, n), 5, replace=False)] = rng.choice([-60, 60], 5)
  return x


def mse_4bit(x, amax):
  """Mean squared 4-bit quantization error, through the project's fake-quant."""
  q = uniform_quantize(jnp.asarray(x), scale_from_amax(amax, 4, True), 4, True)
  return float(jnp.mean((jnp.asarray(x) - q) ** 2))


def test_minmax_exact_on_uniform_sample():
  x = np.random.default_rng(1).uniform(-3, 2, (500, 7)).astype(F32)
  a = calibrate(x, "minmax", 8, True)
  assert a.dtype == np.float32 and a.shape == () and a == np.abs(x).max()
  assert calibrate(x, "minmax", 8, False) == x.max()
  np.testing.assert_array_equal(calibrate(x, "minmax", 8, True, axis=1),
                                np.abs(x).max(0, keepdims=True))


@pytest.mark.parametrize("pct", [99.99, 90.0])
def test_percentile_is_numpy_percentile_of_magnitude(pct):
  x = laplace_with_outliers(20_000)
  opts = {} if pct == 99.99 else {"percentile": pct}
  np.testing.assert_allclose(calibrate(x, "percentile", 8, True, **opts),
                             np.percentile(np.abs(x.astype(np.float64)), pct), rtol=1e-6)


def test_robust_methods_clip_outliers_and_beat_minmax_at_4_bits():
  x = laplace_with_outliers()
  a_mm = calibrate(x, "minmax", 4, True)
  assert a_mm == 60
  err_mm = mse_4bit(x, a_mm)
  for method in ("percentile", "entropy", "mse"):
    a = calibrate(x, method, 4, True)
    assert 2 < a < 30, method
    assert mse_4bit(x, a) < 0.5 * err_mm, method


def test_mse_is_argmin_of_brute_force_error_on_its_grid():
  x = np.random.default_rng(2).standard_t(3, 4000).astype(F32)
  k = 64
  cands = np.abs(x).max() * np.arange(1, k + 1) / k
  errs = [mse_4bit(x, F32(c)) for c in cands]
  a = calibrate(x, "mse", 4, True, num_candidates=k)
  np.testing.assert_allclose(a, cands[int(np.argmin(errs))], rtol=1e-6)


def naive_entropy(hist, width, levels, start_bin):
  """Loop transcription of the TensorRT KL search, for comparison."""
  hist = hist.astype(np.float64).copy()
  hist[0] = hist[1]
  best, best_i = np.inf, None
  for i in range(start_bin, len(hist) + 1):
    p = hist[:i].copy()
    p[-1] += hist[i:].sum()
    q = np.zeros(i)
    for lev in range(levels):
      members = [j for j in range(i) if (j * levels) // i == lev and hist[j] > 0]
      for j in members:
        q[j] = sum(hist[m] for m in members) / len(members)
    p, q = p / p.sum(), q / q.sum()
    with np.errstate(divide="ignore"):
      kl = sum(pj * np.log(pj / qj) if qj > 0 else np.inf for pj, qj in zip(p, q) if pj > 0)
    if kl <= best:
      best, best_i = kl, i
  return best_i * width


def test_entropy_matches_loop_transcription_of_tensorrt_search():
  x = np.abs(laplace_with_outliers(5000, seed=3)).astype(np.float64)
  hist = bin_rows(x[None], np.array([x.max()]), 160)[0]
  width = x.max() / 160
  for bits in (3, 4):
    levels = qrange(bits, True)[1] + 1
    ref = naive_entropy(hist, width, levels, start_bin=16)
    np.testing.assert_allclose(entropy_from_hist(hist, width, bits, True, start_bin=16),
                               ref, rtol=1e-12)


def test_entropy_keeps_the_range_of_outlier_free_uniform_data():
  u = np.random.default_rng(4).uniform(0, 1, 50_000).astype(F32)
  assert calibrate(u, "entropy", 8, False) > 0.99 * u.max()


@pytest.mark.parametrize("method", METHODS)
def test_per_channel_equals_per_tensor_channel_by_channel(method):
  x = np.random.default_rng(5).laplace(0, 1, (30, 4, 4, 3)).astype(F32)
  x[..., 1] *= 5
  for axis, shape in ((-1, (1, 1, 1, 3)), (1, (1, 4, 1, 1))):
    a = calibrate(x, method, 4, True, axis=axis)
    assert a.shape == shape
    per = [calibrate(np.take(x, c, axis=axis), method, 4, True) for c in range(x.shape[axis])]
    np.testing.assert_array_equal(a.ravel(), per)


def test_scale_from_amax_conventions():
  assert scale_from_amax(F32(12.7), 8, True) == F32(12.7) / F32(127)
  assert scale_from_amax(F32(25.5), 8, False) == F32(25.5) / F32(255)
  assert scale_from_amax(F32(3.0), 1, True) == 3.0
  assert scale_from_amax(F32(7.0), 4, True) == 1.0
  assert scale_from_amax(np.zeros(3, F32), 4, True).min() > 0
  np.testing.assert_allclose(scale_from_amax(jnp.array([3.0, 6.0]), 2, False), [1.0, 2.0])


def test_unknown_method_and_option_are_rejected():
  with pytest.raises(ValueError):
    calibrate(np.ones(4), "max", 8, True)
  with pytest.raises(TypeError):
    calibrate(np.ones(4), "percentile", 8, True, pct=99)


# ---------------------------------------------------------------- streaming

def stream(x, method, chunks=9, axis=None, **kw):
  sc = StreamingCalibrator(method, 4, True, axis=axis, **kw)
  for part in np.array_split(x, chunks):
    sc.update(part)
  return sc


@pytest.mark.parametrize("axis", [None, 1])
def test_streaming_minmax_is_exact(axis):
  x = laplace_with_outliers(20_000).reshape(-1, 4)
  np.testing.assert_array_equal(stream(x, "minmax", axis=axis).compute_amax(),
                                calibrate(x, "minmax", 4, True, axis=axis))


def test_streaming_rebinning_is_exact():
  # Small values first, outliers last: the range doubles many times.
  x = laplace_with_outliers(20_000)
  x = np.concatenate([x[np.abs(x) < 0.01], x])
  sc = stream(x, "entropy", chunks=7)
  hist, rng = sc.histogram
  assert rng[0] > 60 and hist.sum() == x.size
  direct = bin_rows(np.abs(x.astype(np.float64))[None], rng, 2048)
  np.testing.assert_array_equal(hist, direct)


@pytest.mark.parametrize("method,rtol", [("percentile", 0.005), ("entropy", 0.03), ("mse", 0.01)])
def test_streaming_close_to_one_shot(method, rtol):
  x = laplace_with_outliers()
  x = np.concatenate([x[np.abs(x) < 0.5], x])
  one = calibrate(x, method, 4, True)
  st = stream(x, method).compute_amax()
  np.testing.assert_allclose(st, one, rtol=rtol)
  assert mse_4bit(x, st) < 0.5 * mse_4bit(x, calibrate(x, "minmax", 4, True))


def test_streaming_per_channel_close_and_validated():
  x = np.random.default_rng(6).laplace(0, 1, (4000, 3)).astype(F32) * F32([1, 4, 0.2])
  sc = stream(x, "percentile", axis=-1)
  a = sc.compute_amax()
  assert a.shape == (1, 3)
  np.testing.assert_allclose(a, calibrate(x, "percentile", 4, True, axis=-1), rtol=0.005)
  with pytest.raises(ValueError):
    sc.update(np.ones((5, 2), F32))
  with pytest.raises(ValueError):
    StreamingCalibrator("mse", 4, True).compute_amax()


def test_streaming_zeros_before_data_counted_in_first_bin():
  sc = StreamingCalibrator("percentile", 8, False, num_bins=64)
  sc.update(np.zeros(900, F32))
  sc.update(np.linspace(0.01, 1, 100, dtype=F32))
  hist, _ = sc.histogram
  assert hist[0, 0] >= 900 and hist.sum() == 1000
  ref = np.percentile(np.concatenate([np.zeros(900), np.linspace(0.01, 1, 100)]), 99.99)
  np.testing.assert_allclose(sc.compute_amax(), ref, atol=2 / 64)
  sc90 = StreamingCalibrator("percentile", 8, False, num_bins=64, percentile=90.0)
  sc90.update(np.zeros(900, F32)).update(np.linspace(0.01, 1, 100, dtype=F32))
  assert sc90.compute_amax() < 0.02  # the 90th percentile is still a zero
