"""Diffusion-transformer (DiT) blocks: timestep embedding, adaLN-Zero blocks, the final layer,
unpatchify, the 2 x 2 cascade split and fixed 2D sin-cos position tables.

Conventions follow the DiT of Peebles & Xie as Pixel-Perfect Depth uses it (reference ``ppd.md``
sections 1 and 5):

* :func:`timestep_embedding` - ``[cos(t f_i), sin(t f_i)]`` (**cos first**), ``f_i =
  exp(-ln(10000) i / (dim / 2))``, ``t`` the raw (integer) timestep, not divided by ``T``;
* :class:`DiTBlock` - adaLN-Zero: ``Linear(SiLU(c))`` gives six chunks in the order shift_msa,
  scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; LayerNorms without affine parameters
  (eps 1e-6); attention with per-head q/k LayerNorm (eps 1e-5, affine) then optional 2D RoPE;
  an MLP with the **tanh** GELU;
* :class:`FinalLayer` - adaLN (shift, scale), LayerNorm, ``Linear(D -> p*p*C)``, and
  :func:`unpatchify` (pixel ``(p i + a, p j + b)`` = channel ``(a p + b) C + c`` of token
  ``(i, j)``);
* :func:`cascade_split` - each token of an ``h x w`` grid carrying ``4 D`` channels becomes the
  ``2 x 2`` tokens ``(2i + a, 2j + b)`` of a ``2h x 2w`` grid, taking channels
  ``[(2a + b) D, (2a + b + 1) D)`` (sub-position major, not ``pixel_shuffle``'s order);
* :func:`sincos_2d_table` - the fixed table of MAE/DiT with the **x** (column) coordinate in the
  first half of the channels.

The conditioning vector ``c`` is ``(B, D)`` or ``(1, D)`` (one timestep for the whole batch).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.nn import layers
from geojax.nn.attention import Attention

FREQ_DIM = 256  # sinusoid width of the timestep embedding


def timestep_embedding(t: jax.Array, dim: int = FREQ_DIM, max_period: float = 10000.0
                       ) -> jax.Array:
  """``(N,)`` timesteps (any real values) -> ``(N, dim)`` ``[cos, sin]`` features."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], -1)
  return emb


class TimestepEmbedder(nnx.Module):
  """``t`` ``(N,)`` -> ``Linear(256 -> D) -> SiLU -> Linear(D -> D)``."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, freq_dim: int = FREQ_DIM, dtype=None):
    self.freq_dim = freq_dim
    self.mlp_0 = layers.linear(freq_dim, dim, rngs=rngs, dtype=dtype, axes=(None, "embed"))
    self.mlp_2 = layers.linear(dim, dim, rngs=rngs, dtype=dtype, axes=("mlp", "embed"))

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_embedding(t, self.freq_dim))))


def layer_norm_plain(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters (two-pass variance, float32 statistics)."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, -1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """``x * (1 + scale) + shift`` with per-sample ``(B|1, D)`` shift / scale over ``(B, T, D)``."""
  return x * (1 + scale[:, None]) + shift[:, None]


class TanhMlp(nnx.Module):
  """``Linear -> tanh-approximate GELU -> Linear`` (timm ``Mlp``, ``GELU(approximate="tanh")``)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=None):
    self.fc1 = layers.linear(dim, hidden, rngs=rngs, dtype=dtype)
    self.fc2 = layers.linear(hidden, dim, rngs=rngs, dtype=dtype, axes=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
  """One adaLN-Zero DiT block (module docstring). ``pos`` ``(B|1, T, 2)`` applies 2D RoPE."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, mlp_ratio: float = 4.0,
               attn_impl: str = "xla", rope_base: float = 100.0, dtype=None):
    self.attn = Attention(dim, num_heads, rngs=rngs, qkv_bias=True, qk_norm=True,
                          qk_norm_eps=1e-5, attn_impl=attn_impl, rope_base=rope_base,
                          dtype=dtype)
    self.mlp = TanhMlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)
    self.adaLN_modulation_1 = layers.linear(dim, 6 * dim, rngs=rngs, dtype=dtype,
                                            axes=("embed", "mlp"))

  def __call__(self, x: jax.Array, c: jax.Array, pos: jax.Array | None = None) -> jax.Array:
    mod = self.adaLN_modulation_1(jax.nn.silu(c)).astype(x.dtype)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
    h = modulate(layer_norm_plain(x), shift_msa, scale_msa)
    x = x + gate_msa[:, None] * self.attn(h, pos)
    h = modulate(layer_norm_plain(x), shift_mlp, scale_mlp)
    return x + gate_mlp[:, None] * self.mlp(h)


class FinalLayer(nnx.Module):
  """adaLN (shift, scale) -> LayerNorm -> ``Linear(D -> patch * patch * out)``."""

  def __init__(self, dim: int, patch: int, out_channels: int, *, rngs: nnx.Rngs, dtype=None):
    self.linear = layers.linear(dim, patch * patch * out_channels, rngs=rngs, dtype=dtype,
                                axes=("embed", None))
    self.adaLN_modulation_1 = layers.linear(dim, 2 * dim, rngs=rngs, dtype=dtype,
                                            axes=("embed", "mlp"))

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaLN_modulation_1(jax.nn.silu(c)).astype(x.dtype), 2, -1)
    return self.linear(modulate(layer_norm_plain(x), shift, scale))


def unpatchify(x: jax.Array, h: int, w: int, patch: int) -> jax.Array:
  """Tokens ``(B, h*w, p*p*C)`` of an ``h x w`` grid -> pixels ``(B, h*p, w*p, C)``."""
  b = x.shape[0]
  c = x.shape[-1] // (patch * patch)
  x = x.reshape(b, h, w, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * patch, w * patch, c)


def cascade_split(x: jax.Array, h: int, w: int) -> jax.Array:
  """``(B, h*w, 4D)`` -> ``(B, 2h*2w, D)`` in raster order of the finer grid (module
  docstring: sub-position-major channels)."""
  b, _, c4 = x.shape
  d = c4 // 4
  x = x.reshape(b, h, w, 2, 2, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 4 * h * w, d)


def sincos_2d_table(dim: int, grid: int) -> np.ndarray:
  """The fixed ``(grid*grid, dim)`` float32 table of a square token grid (raster order): the
  first ``dim/2`` channels encode the column (x), the rest the row (y); each half is
  ``[sin(pos w_k), cos(pos w_k)]`` with ``w_k = 10000 ** (-k / (dim / 4))``."""
  if dim % 4:
    raise ValueError(f"a 2D sin-cos table needs dim divisible by 4; got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

  def one(pos):
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], 1)

  col, row = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  return np.concatenate([one(col), one(row)], 1).astype(np.float32)
