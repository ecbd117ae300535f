"""Resampling that reproduces PyTorch's ``F.interpolate`` exactly where parity needs it.

* :func:`resize_pos_embed_scale_factor` - bicubic (A = -0.75), ``align_corners=False``, no
  antialias, called with DINOv2's scale factors ``(n + 0.1) / M``; ``jax.image.resize`` cannot
  express it (it uses A = -0.5 and size-based coordinates).
* :func:`resize_pos_embed_antialias` - the size-based antialiased bicubic of register models
  (Pi3/VGGT/DAGE/URGT), which ``jax.image.resize(..., antialias=True)`` matches.
* :func:`resize_bicubic` - size-based bicubic, ``align_corners=False``, no antialias.
* :func:`resize_bilinear_align_corners` - the DPT upsampler.
* :func:`resize_bilinear` - bilinear with ``align_corners=False``, with or without antialias.
* :func:`legacy_nearest_index` - the source indices of torch's legacy ``"nearest"`` mode.

Coordinates are computed on the host in float32 from static shapes, like torch does.
"""

from __future__ import annotations

import functools
import math

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


def _bicubic_rows(src: np.ndarray, n_in: int, a: float) -> np.ndarray:
  """(n_out, n_in) bicubic weights for float32 source coordinates ``src`` (taps clamped)."""
  i0 = np.floor(src).astype(np.int64)
  t = (src - i0.astype(np.float32)).astype(np.float32)
  w = _cubic_weights(t, a)
  m = np.zeros((len(src), n_in), np.float64)
  for k in range(4):
    idx = np.clip(i0 - 1 + k, 0, n_in - 1)  # torch clamps out-of-range taps to the border
    np.add.at(m, (np.arange(len(src)), idx), w[:, k])
  return m.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) matrix of torch's size-based bicubic resize (``align_corners=False``)."""
  inv = np.float32(n_in) / np.float32(n_out)  # torch: area_pixel_compute_scale in float32
  dst = np.arange(n_out, dtype=np.float32)
  return _bicubic_rows(inv * (dst + np.float32(0.5)) - np.float32(0.5), n_in, a)


def resize_bicubic(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """``F.interpolate(x, out_hw, mode="bicubic", align_corners=False)`` (no antialias, A =
  -0.75, no clamp of the result) for channels-last ``(..., H, W, C)``; the Depth Anything V2
  semantic encoder's input resize. ``jax.image.resize`` differs (A = -0.5)."""
  h, w = x.shape[-3], x.shape[-2]
  hp = jax.lax.Precision.HIGHEST
  ry = jnp.asarray(_bicubic_matrix(h, int(out_hw[0])), x.dtype)
  rx = jnp.asarray(_bicubic_matrix(w, int(out_hw[1])), x.dtype)
  x = jnp.einsum("yi,...ixc->...yxc", ry, x, precision=hp)
  return jnp.einsum("xj,...yjc->...yxc", rx, x, precision=hp)


@functools.lru_cache(maxsize=64)
def _bicubic_matrix_scale_factor(n_in: int, n_out: int, scale_factor: float,
                                 a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) matrix of torch's bicubic resize along one axis with a given scale factor."""
  inv = np.float32(1.0 / scale_factor)  # torch: compute_scales_value -> 1 / scale
  dst = np.arange(n_out, dtype=np.float32)
  return _bicubic_rows(inv * (dst + np.float32(0.5)) - np.float32(0.5), n_in, a)


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


@functools.lru_cache(maxsize=256)
def _bilinear_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
  """(n_out, n_in) weights of torch's bilinear ``F.interpolate`` (``align_corners=False``)."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  rows = np.arange(n_out)
  if antialias and scale > 1.0:
    # torch's separable antialiased filter (as Pillow): a triangle stretched by the downscale
    # factor, sampled at input pixel centres, weights renormalised per output pixel; computed
    # in float32 as torch does (float64 differs by up to 3e-6).
    f32 = np.float32
    s32 = f32(n_in) / f32(n_out)
    inv = f32(1) / s32
    for i in range(n_out):
      center = s32 * (f32(i) + f32(0.5))
      lo = max(int(center - s32 + f32(0.5)), 0)
      hi = min(int(center + s32 + f32(0.5)), n_in)
      j = np.arange(lo, hi).astype(f32)
      w = np.maximum(f32(0), f32(1) - np.abs((j - center + f32(0.5)) * inv)).astype(f32)
      m[i, lo:hi] = w / w.sum()
    return m.astype(np.float32)
  scale32 = np.float32(n_in) / np.float32(n_out)  # torch computes the coordinates in float32
  dst = np.arange(n_out, dtype=np.float32)
  src = np.maximum(scale32 * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = (src - i0).astype(np.float32)
  np.add.at(m, (rows, i0), 1.0 - lam)
  np.add.at(m, (rows, i1), lam)
  return m.astype(np.float32)


def resize_bilinear(x: jax.Array, out_hw: tuple[int, int], *, antialias: bool = False
                    ) -> jax.Array:
  """``F.interpolate(x, out_hw, mode="bilinear", align_corners=False, antialias=...)`` for
  channels-last ``(..., H, W, C)``; identity when the size already matches.

  Separable: one small matrix per axis built on the host from static shapes, applied at
  ``HIGHEST`` precision. ``antialias`` only changes downscaling (as in torch).
  """
  h, w = x.shape[-3], x.shape[-2]
  if (h, w) == tuple(out_hw):
    return x
  hp = jax.lax.Precision.HIGHEST
  ry = jnp.asarray(_bilinear_matrix(h, out_hw[0], antialias), x.dtype)
  rx = jnp.asarray(_bilinear_matrix(w, out_hw[1], antialias), x.dtype)
  x = jnp.einsum("yi,...ixc->...yxc", ry, x, precision=hp)
  return jnp.einsum("xj,...yjc->...yxc", rx, x, precision=hp)


def legacy_nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Source index of each output cell of PyTorch's legacy ``F.interpolate(mode="nearest")``.

  ``src = floor(dst * (n_in / n_out))`` with the scale and the product in float32, clamped to
  ``n_in - 1``, exactly as torch computes it (an exact 2x upscale is ``dst >> 1``). float32
  rounding matters: 12 -> 74 maps 37 to 5, where exact arithmetic gives 6. (``jax.image.resize``
  with ``"nearest"`` is the half-pixel "nearest-exact" rule and differs.)
  """
  if n_in <= 0 or n_out <= 0:
    raise ValueError(f"sizes must be positive; got {n_in} -> {n_out}")
  if n_out == 2 * n_in:
    return np.arange(n_out, dtype=np.int64) >> 1
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, n_in - 1)


def _roi_align_axis(start: float, end: float, size: int, out: int,
                    sampling_ratio: int) -> np.ndarray:
  """(out, size) weights of torchvision's ``roi_align`` along one axis (already shifted by the
  ``aligned`` half pixel): ``grid`` bilinear samples per bin, averaged; samples outside
  ``[-1, size]`` contribute 0, coordinates <= 0 clamp to 0, the upper neighbour clamps at the
  last index."""
  length = end - start
  bin_size = length / out
  grid = sampling_ratio if sampling_ratio > 0 else max(int(math.ceil(length / out)), 1)
  m = np.zeros((out, size), np.float64)
  for p in range(out):
    for i in range(grid):
      y = start + p * bin_size + (i + 0.5) * bin_size / grid
      if y < -1.0 or y > size:
        continue
      y = max(y, 0.0)
      lo = int(y)
      if lo >= size - 1:
        lo = hi = size - 1
        y = float(lo)
      else:
        hi = lo + 1
      ly = y - lo
      m[p, lo] += (1.0 - ly) / grid
      m[p, hi] += ly / grid
  return m


def roi_align_matrices(box, in_hw: tuple[int, int], out_hw: tuple[int, int], *,
                       aligned: bool = True, sampling_ratio: int = -1
                       ) -> tuple[np.ndarray, np.ndarray]:
  """``torchvision.ops.roi_align`` (``spatial_scale`` 1) of one box ``(x0, y0, x1, y1)`` as two
  matrices ``(Wy (out_h, H), Wx (out_w, W))``: ``out = Wy @ x @ Wx^T`` per channel. The op is
  separable because its bilinear samples lie on a product grid and the bin average divides by
  the full sample count."""
  off = 0.5 if aligned else 0.0
  x0, y0, x1, y1 = (float(v) for v in box)
  wy = _roi_align_axis(y0 - off, y1 - off if aligned else max(y1 - y0, 1.0) + y0 - off,
                       in_hw[0], out_hw[0], sampling_ratio)
  wx = _roi_align_axis(x0 - off, x1 - off if aligned else max(x1 - x0, 1.0) + x0 - off,
                       in_hw[1], out_hw[1], sampling_ratio)
  return wy, wx


def roi_align(x: jax.Array, boxes, out_hw: tuple[int, int], *, aligned: bool = True,
              sampling_ratio: int = -1) -> jax.Array:
  """Crops of a channels-last map ``x`` ``(H, W, C)`` for static ``boxes`` ``(S, 4)`` (pixels,
  ``x0, y0, x1, y1``) resampled to ``out_hw`` as ``torchvision.ops.roi_align`` does (CPU kernel
  semantics, ``spatial_scale`` 1; :func:`roi_align_matrices`). Returns ``(S, oh, ow, C)``."""
  h, w = x.shape[:2]
  x = x.astype(jnp.float32)
  out = []
  for b in np.asarray(boxes, np.float64):
    wy, wx = roi_align_matrices(b, (h, w), out_hw, aligned=aligned,
                                sampling_ratio=sampling_ratio)
    # Only the rows and columns a crop's samples touch: a window a little larger than the box,
    # so the cost is per crop, not per crop times the whole map.
    ys, xs = np.flatnonzero(wy.any(0)), np.flatnonzero(wx.any(0))
    if len(ys) == 0 or len(xs) == 0:  # every sample outside the map: all zero
      out.append(jnp.zeros((*out_hw, x.shape[-1]), jnp.float32))
      continue
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    out.append(jnp.einsum("ph,hwc,qw->pqc", jnp.asarray(wy[:, y0:y1], jnp.float32),
                          x[y0:y1, x0:x1], jnp.asarray(wx[:, x0:x1], jnp.float32),
                          precision=jax.lax.Precision.HIGHEST))
  return jnp.stack(out)
