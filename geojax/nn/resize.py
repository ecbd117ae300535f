"""Resampling that reproduces PyTorch's ``F.interpolate`` exactly where parity needs it.

* :func:`resize_pos_embed_scale_factor` - bicubic (A = -0.75), ``align_corners=False``, no
  antialias, called with DINOv2's scale factors ``(n + 0.1) / M``; ``jax.image.resize`` cannot
  express it (it uses A = -0.5 and size-based coordinates).
* :func:`resize_pos_embed_antialias` - the size-based antialiased bicubic of register models
  (Pi3/VGGT/DAGE/URGT), which ``jax.image.resize(..., antialias=True)`` matches.
* :func:`resize_bilinear_align_corners` - the DPT upsampler.

Coordinates are computed on the host in float32 from static shapes, like torch does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (torch formula)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  t = t.astype(np.float32)
  one = np.float32(1)
  return np.stack([far(t + one), near(t), near(one - t), far(2 - t)], -1).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _bicubic_matrix_scale_factor(n_in: int, n_out: int, scale_factor: float,
                                 a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) matrix of torch's bicubic resize along one axis with a given scale factor."""
  inv = np.float32(1.0 / scale_factor)  # torch: compute_scales_value -> 1 / scale
  dst = np.arange(n_out, dtype=np.float32)
  src = inv * (dst + np.float32(0.5)) - np.float32(0.5)
  i0 = np.floor(src).astype(np.int64)
  t = (src - i0.astype(np.float32)).astype(np.float32)
  w = _cubic_weights(t, a)
  m = np.zeros((n_out, n_in), np.float64)
  for k in range(4):
    idx = np.clip(i0 - 1 + k, 0, n_in - 1)  # torch clamps out-of-range taps to the border
    np.add.at(m, (np.arange(n_out), idx), w[:, k])
  return m.astype(np.float32)


def resize_pos_embed_scale_factor(grid: jax.Array, out_hw: tuple[int, int],
                                  offset: float = 0.1) -> jax.Array:
  """Resize a square ``(M, M, C)`` position-embedding grid to ``out_hw`` the DINOv2 way.

  Equivalent to ``F.interpolate(g, scale_factor=((h + offset) / M, (w + offset) / M),
  mode="bicubic", align_corners=False)`` (no antialias), i.e. DINOv2 models without registers
  (DA3, MoGe-2, Depth Anything V2).
  """
  m_h, m_w = grid.shape[0], grid.shape[1]
  h, w = out_hw
  ry = jnp.asarray(_bicubic_matrix_scale_factor(m_h, h, (h + offset) / m_h))
  rx = jnp.asarray(_bicubic_matrix_scale_factor(m_w, w, (w + offset) / m_w))
  hp = jax.lax.Precision.HIGHEST
  out = jnp.einsum("yi,ijc->yjc", ry, grid.astype(jnp.float32), precision=hp)
  return jnp.einsum("xj,yjc->yxc", rx, out, precision=hp)


def resize_pos_embed_antialias(grid: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Size-based antialiased bicubic resize (``antialias=True``) used by register models."""
  c = grid.shape[-1]
  return jax.image.resize(grid.astype(jnp.float32), (*out_hw, c), "bicubic", antialias=True)


@functools.lru_cache(maxsize=256)
def _linear_align_corners_taps(n_in: int, n_out: int):
  if n_out > 1:
    scale = np.float32((n_in - 1) / (n_out - 1))
  else:
    scale = np.float32(0)
  src = scale * np.arange(n_out, dtype=np.float32)
  i0 = np.floor(src).astype(np.int32)
  i0 = np.minimum(i0, n_in - 1)
  lam = (src - i0.astype(np.float32)).astype(np.float32)
  i1 = np.where(i0 < n_in - 1, i0 + 1, i0).astype(np.int32)
  return i0, i1, lam


def _lerp_axis(x: jax.Array, axis: int, n_out: int) -> jax.Array:
  n_in = x.shape[axis]
  if n_in == n_out:
    return x
  i0, i1, lam = _linear_align_corners_taps(n_in, n_out)
  shape = [1] * x.ndim
  shape[axis] = n_out
  lam = jnp.asarray(lam, x.dtype).reshape(shape)
  x0 = jnp.take(x, jnp.asarray(i0), axis=axis)
  x1 = jnp.take(x, jnp.asarray(i1), axis=axis)
  return x0 * (1 - lam) + x1 * lam


def resize_bilinear_align_corners(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """``F.interpolate(x, size, mode="bilinear", align_corners=True)`` for NHWC ``x``."""
  x = _lerp_axis(x, x.ndim - 2, out_hw[1])
  return _lerp_axis(x, x.ndim - 3, out_hw[0])
