"""Point-query features: Fourier features of normalised image coordinates and local RGB
patches sampled around them (the query tokens of a cross-attention point decoder, D4RT).

Coordinates are normalised ``(u, v)`` in ``[0, 1]``, ``u`` along the width: pixel ``(x, y)``'s
centre is ``((x + 0.5) / W, (y + 0.5) / H)``, the convention of
:func:`geojax.data.transforms.sample_d4rt_queries`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def fourier_features(uv: jax.Array, octaves: int) -> jax.Array:
  """``(..., 2)`` -> ``(..., 2 + 4 * octaves)``: ``[u, v, sin(f u), sin(f v), ..., cos(f u),
  cos(f v), ...]`` with ``f = 2^k pi``, ``k = 0 .. octaves - 1`` (sines for every octave, then
  cosines; within an octave ``u`` before ``v``)."""
  uv = uv.astype(jnp.float32)
  freqs = jnp.asarray((2.0 ** np.arange(octaves)) * np.pi, jnp.float32)
  ang = (uv[..., None, :] * freqs[:, None]).reshape(*uv.shape[:-1], 2 * octaves)
  return jnp.concatenate([uv, jnp.sin(ang), jnp.cos(ang)], axis=-1)


def feature_dim(octaves: int) -> int:
  return 2 + 4 * octaves


def sample_patches(frames: jax.Array, t: jax.Array, uv: jax.Array, size: int) -> jax.Array:
  """``size x size`` patches of ``frames`` ``(B, T, H, W, C)`` centred at ``uv`` ``(B, N, 2)``
  in frames ``t`` ``(B, N)`` (integers), bilinearly interpolated with one-pixel spacing and the
  border pixels repeated outside the frame: ``(B, N, size * size * C)``, row-major (rows of the
  patch first, then columns, then channels).

  The patch is centred on the query's continuous position, so a query at a pixel centre reads
  that pixel and its neighbours exactly (no interpolation)."""
  b, _, h, w, c = frames.shape
  n = uv.shape[1]
  off = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
  x = uv[..., 0].astype(jnp.float32) * w - 0.5  # (B, N) continuous pixel coordinates
  y = uv[..., 1].astype(jnp.float32) * h - 0.5
  xs = jnp.clip(x[..., None] + off, 0.0, w - 1.0)  # (B, N, size)
  ys = jnp.clip(y[..., None] + off, 0.0, h - 1.0)
  x0 = jnp.floor(xs)
  y0 = jnp.floor(ys)
  fx, fy = xs - x0, ys - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  x1 = jnp.minimum(x0 + 1, w - 1)
  y1 = jnp.minimum(y0 + 1, h - 1)
  bi = jnp.arange(b)[:, None, None, None]
  ti = t.astype(jnp.int32)[:, :, None, None]

  def at(yy, xx):  # (B, N, size, size, C)
    return frames[bi, ti, yy[:, :, :, None], xx[:, :, None, :]].astype(jnp.float32)

  wy = fy[:, :, :, None, None]
  wx = fx[:, :, None, :, None]
  top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
  bot = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
  out = top * (1 - wy) + bot * wy
  return out.reshape(b, n, size * size * c)
