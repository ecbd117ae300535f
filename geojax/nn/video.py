"""Video ViT pieces: tubelet patch embedding and a resizable space-time position table.

A video ``(B, T, H, W, C)`` is cut into ``kt x p x p`` tubelets (a stride-``(kt, p, p)``
``Conv3d``, computed as a reshape and one matmul): ``(B, T/kt, (H/p)(W/p), D)``, temporal slot
major, row-major tokens inside a slot. The learned position table is stored at one grid
``(slots, gh, gw, D)`` and resized trilinearly to the input's grid
(:func:`resize_space_time`), so a model trained at 48 frames x 256^2 runs on other clip lengths
and sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.nn import resize


class TubeletEmbed(nnx.Module):
  """Non-overlapping ``tubelet x patch x patch`` projection of a video.

  The kernel is stored ``(kt, p, p, C_in, D)`` (``torch.nn.Conv3d`` keeps ``(D, C_in, kt, p, p)``).
  """

  def __init__(self, tubelet: int, patch: int, dim: int, *, rngs: nnx.Rngs, in_chans: int = 3,
               dtype=None):
    self.tubelet, self.patch, self.dtype = tubelet, patch, dtype
    fan_in = tubelet * patch * patch * in_chans
    init = nnx.with_partitioning(nnx.initializers.normal(1.0 / np.sqrt(fan_in)),
                                 (None, None, None, "conv_in", "conv_out"))
    self.kernel = nnx.Param(init(rngs.params(), (tubelet, patch, patch, in_chans, dim)))
    self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",))(
        rngs.params(), (dim,)))

  def grid(self, t: int, h: int, w: int) -> tuple[int, int, int]:
    """Token grid ``(slots, gh, gw)`` of a ``t x h x w`` video."""
    return t // self.tubelet, h // self.patch, w // self.patch

  def __call__(self, video: jax.Array) -> jax.Array:
    """``(B, T, H, W, C)`` -> ``(B, T/kt, (H/p)(W/p), D)``."""
    b, t, h, w, c = video.shape
    kt, p = self.tubelet, self.patch
    if t % kt or h % p or w % p:
      raise ValueError(f"TubeletEmbed: a {t} x {h} x {w} video does not split into "
                       f"{kt} x {p} x {p} tubelets")
    x = video.reshape(b, t // kt, kt, h // p, p, w // p, p, c)
    kern, bias = self.kernel[...], self.bias[...]
    if self.dtype is not None:
      x, kern, bias = x.astype(self.dtype), kern.astype(self.dtype), bias.astype(self.dtype)
    y = jnp.einsum("bsahiwjc,aijco->bshwo", x, kern)
    return (y + bias).reshape(b, t // kt, (h // p) * (w // p), -1)


def resize_space_time(table: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
  """Trilinear (``align_corners=False``) resize of a ``(S, H, W, D)`` table to ``grid``;
  identity when the sizes match."""
  s, h, w, d = table.shape
  t_s, t_h, t_w = grid
  x = resize.resize_bilinear(table, (t_h, t_w))  # space, per slot
  if t_s != s:  # time: the slot axis as "rows", the flattened tokens as "columns"
    x = resize.resize_bilinear(x.reshape(s, t_h * t_w, d)[None], (t_s, t_h * t_w))[0]
    x = x.reshape(t_s, t_h, t_w, d)
  return x


def sinusoid_table(n: int, dim: int) -> np.ndarray:
  """``(n, dim)`` float32 1D sin-cos table over token index ``i``: channel ``2j`` is
  ``sin(i / 10000^(2j/dim))`` and ``2j+1`` the cosine (the fixed table of ViT-style video
  encoders that do not learn their positions, e.g. VideoMAE)."""
  pos = np.arange(n, dtype=np.float64)[:, None]
  j = np.arange(dim)[None]
  angle = pos / np.power(10000.0, 2 * (j // 2) / dim)
  table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
  return table.astype(np.float32)
