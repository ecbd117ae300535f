"""2D rotary position embedding ("rope100") over explicit, possibly fractional, positions.

Layouts differ between systems only in the position arrays they pass:

* :func:`grid_positions` - row-major ``(row, col)`` of an ``h x w`` patch grid, with an optional
  offset (VGGT / Pi3 / DA3 local layers use ``+1`` so that special tokens sit at ``(0, 0)``);
* :func:`with_special_tokens` - prepend ``n`` tokens at ``(0, 0)`` (identity rotation);
* DA3 global layers use ``jnp.ones`` for every patch; DAGE passes snapped or interpolated grids;
  URGT passes positions on the stitched global grid.

Convention (VGGT family): the first half of ``head_dim`` rotates with y (row), the second with x
(col); within a half of size D, ``inv_freq_k = base ** (-2k / D)``, angles duplicated
``[theta, theta]`` and rotate-half (not interleaved pairs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from geojax.nn import resize


def grid_positions(h: int, w: int, offset: float = 0.0) -> np.ndarray:
  """``(h * w, 2)`` float32 positions ``(row, col) + offset`` in row-major order."""
  yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                       indexing="ij")
  return np.stack([yy.reshape(-1), xx.reshape(-1)], -1) + np.float32(offset)


def with_special_tokens(pos: np.ndarray, n: int) -> np.ndarray:
  """Prepend ``n`` special tokens at position ``(0, 0)``."""
  return np.concatenate([np.zeros((n, 2), np.float32), pos.astype(np.float32)], 0)


def _inv_freq(d: int, base: float) -> np.ndarray:
  exponents = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
  return (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)


def _rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def _rope_1d(t, pos, inv_freq):
  # t: (..., T, H, D); pos: (..., T) float32
  ang = pos[..., None].astype(jnp.float32) * inv_freq  # (..., T, D/2)
  ang = jnp.concatenate([ang, ang], -1)[..., None, :]  # (..., T, 1, D)
  cos, sin = jnp.cos(ang).astype(t.dtype), jnp.sin(ang).astype(t.dtype)
  return t * cos + _rotate_half(t) * sin


def apply_rope_2d(x: jax.Array, pos: jax.Array, base: float = 100.0) -> jax.Array:
  """Rotate ``x`` of shape ``(B, T, heads, head_dim)`` by 2D positions ``pos`` ``(B|1, T, 2)``.

  ``head_dim`` must be a multiple of 4. Positions may be fractional.
  """
  hd = x.shape[-1]
  if hd % 4:
    raise ValueError(f"2D RoPE needs head_dim divisible by 4; got {hd}")
  inv_freq = jnp.asarray(_inv_freq(hd // 2, base))
  xy, xx = jnp.split(x, 2, axis=-1)
  pos = jnp.asarray(pos, jnp.float32)
  return jnp.concatenate([_rope_1d(xy, pos[..., 0], inv_freq),
                          _rope_1d(xx, pos[..., 1], inv_freq)], -1)


def snapped_positions(src_hw: tuple[int, int], dst_hw: tuple[int, int],
                      offset: float = 1.0) -> np.ndarray:
  """``(H*W, 2)`` positions of a ``dst_hw`` grid snapped onto a coarser ``src_hw`` grid.

  Each destination cell takes the ``(row, col)`` of the source cell it falls in (legacy
  nearest, :func:`legacy_nearest_index`) plus ``offset``: DAGE's cross-attention queries (HR
  tokens) get the positions of the LR tokens they lie in, so that RoPE compares like with like.
  """
  rows = resize.legacy_nearest_index(src_hw[0], dst_hw[0]).astype(np.float32)
  cols = resize.legacy_nearest_index(src_hw[1], dst_hw[1]).astype(np.float32)
  yy, xx = np.meshgrid(rows, cols, indexing="ij")
  return np.stack([yy.reshape(-1), xx.reshape(-1)], -1) + np.float32(offset)


def interpolation_scales(pos: np.ndarray, original_max: tuple[int, int] = (32, 32)
                         ) -> np.ndarray:
  """Per-axis position-interpolation factors of DAGE's ``RoPE2DInterpolated``.

  For an axis whose largest position ``p`` has ``p + 1 > original_max``, positions are scaled
  by ``original_max / (p + 1)`` (float32) so that they stay inside the trained range; other
  axes keep scale 1.
  """
  pos = np.asarray(pos)
  out = []
  for axis, limit in enumerate(original_max):
    n = int(pos[..., axis].max()) + 1
    out.append(np.float32(limit / n) if n > limit else np.float32(1.0))
  return np.array(out, np.float32)


def interpolated_positions(pos: np.ndarray, original_max: tuple[int, int] = (32, 32)
                           ) -> np.ndarray:
  """Positions multiplied by :func:`interpolation_scales` in float32 (fractional)."""
  pos = np.asarray(pos, np.float32)
  return (pos * interpolation_scales(pos, original_max)).astype(np.float32)
