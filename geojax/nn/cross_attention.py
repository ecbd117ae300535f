"""Cross-attention with 2D RoPE on both sides, and the decoders built from it.

* :class:`CrossAttention` - separate q/k/v projections; queries and keys are rotated with
  their *own* positions (``q_pos``, ``k_pos``), so a fine grid can attend to a coarse one in a
  shared coordinate frame (DAGE snaps HR queries onto the LR grid).
* :class:`CrossBlock` - pre-norm block with cross-attention, self-attention and an MLP;
  ``cross_first`` orders the first two (DAGE's adapter: cross first). The context is
  normalised once per block (``norm_y``).
* :class:`CrossOnlyBlock` - cross-attention + MLP (no self-attention).
* :class:`ContextDecoder` - DAGE's adapter (``ContextTransformerDecoder``): project queries
  and context, run :class:`CrossBlock` s, project out.
* :class:`ClsDecoder` - DAGE's metric-scale decoder (``ClsTransformerDecoder``): one query
  token per frame cross-attends to that frame's tokens, then the frames' tokens of one batch
  element attend to each other.

Every attention call goes through :func:`geojax.nn.attention.attend`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from geojax.nn import layers
from geojax.nn.attention import Attention, attend
from geojax.nn.rope import apply_rope_2d
from geojax.nn.stack import LayerStack
from geojax.nn.vit import Block, BlockConfig, Mlp


class CrossAttention(nnx.Module):
  """Multi-head attention of ``x`` ``(B, Tq, C)`` over ``context`` ``(B, Tk, C)``."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, attn_impl: str = "xla",
               rope_base: float = 100.0, context_dim: int | None = None, dtype=None):
    if dim % num_heads:
      raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.attn_impl, self.rope_base = attn_impl, rope_base
    cd = context_dim or dim
    mk = lambda i, a: layers.linear(i, dim, rngs=rngs, dtype=dtype, axes=a)
    self.q_proj = mk(dim, ("embed", "heads"))
    self.k_proj, self.v_proj = mk(cd, ("embed", "heads")), mk(cd, ("embed", "heads"))
    self.proj = mk(dim, ("heads", "embed"))

  def project_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values ``(B, Tk, heads, head_dim)`` of a context, to reuse across calls."""
    b, tk, _ = context.shape
    k = self.k_proj(context).reshape(b, tk, self.num_heads, self.head_dim)
    v = self.v_proj(context).reshape(b, tk, self.num_heads, self.head_dim)
    return k, v

  def __call__(self, x: jax.Array, context: jax.Array | None, q_pos: jax.Array | None = None,
               k_pos: jax.Array | None = None, *, kv: tuple[jax.Array, jax.Array] | None = None
               ) -> jax.Array:
    """``kv``: keys and values from :meth:`project_kv` instead of ``context`` (no RoPE)."""
    b, tq, c = x.shape
    q = self.q_proj(x).reshape(b, tq, self.num_heads, self.head_dim)
    k, v = kv if kv is not None else self.project_kv(context)
    if (q_pos is None) != (k_pos is None):
      raise ValueError("CrossAttention: give both q_pos and k_pos or neither")
    if q_pos is not None:
      q = apply_rope_2d(q, q_pos, self.rope_base)
      k = apply_rope_2d(k, k_pos, self.rope_base)
    o = attend(q, k, v, impl=self.attn_impl)
    return self.proj(o.reshape(b, tq, c))


class CrossBlock(nnx.Module):
  """``y = norm_y(ctx)``; ``x += cross(norm2(x), y)``; ``x += attn(norm1(x))`` (order set by
  ``cross_first``); ``x += mlp(norm3(x))``. No LayerScale, no QK-norm (DAGE ``CrossBlockRope``).
  """

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, mlp_ratio: float = 4.0,
               cross_first: bool = True, ln_eps: float = 1e-6, attn_impl: str = "xla",
               dtype=None):
    self.cross_first = cross_first
    self.norm1 = layers.layer_norm(dim, ln_eps, rngs=rngs, dtype=dtype)
    self.attn = Attention(dim, num_heads, rngs=rngs, attn_impl=attn_impl, dtype=dtype)
    self.norm2 = layers.layer_norm(dim, ln_eps, rngs=rngs, dtype=dtype)
    self.norm_y = layers.layer_norm(dim, ln_eps, rngs=rngs, dtype=dtype)
    self.cross_attn = CrossAttention(dim, num_heads, rngs=rngs, attn_impl=attn_impl,
                                     dtype=dtype)
    self.norm3 = layers.layer_norm(dim, ln_eps, rngs=rngs, dtype=dtype)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)

  def __call__(self, x, context, *, pos=None, q_pos=None, k_pos=None):
    """``pos``: self-attention positions of ``x``; ``q_pos``/``k_pos``: cross-attention ones."""
    y = self.norm_y(context)
    if self.cross_first:
      x = x + self.cross_attn(self.norm2(x), y, q_pos, k_pos)
      x = x + self.attn(self.norm1(x), pos)
    else:
      x = x + self.attn(self.norm1(x), pos)
      x = x + self.cross_attn(self.norm2(x), y, q_pos, k_pos)
    return x + self.mlp(self.norm3(x))


class CrossOnlyBlock(nnx.Module):
  """``x += cross(norm2(x), norm_y(ctx)); x += mlp(norm3(x))`` (DAGE ``CrossOnlyBlockRope``).

  ``context_dim``: the context's width when it differs from ``dim`` (keys and values are
  projected from it). :meth:`context_kv` computes a context's keys and values once, so that
  many query batches can attend to it (``block(x, kv=...)``)."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, mlp_ratio: float = 4.0,
               ln_eps: float = 1e-6, attn_impl: str = "xla", context_dim: int | None = None,
               dtype=None):
    self.norm2 = layers.layer_norm(dim, ln_eps, rngs=rngs, dtype=dtype)
    self.norm_y = layers.layer_norm(context_dim or dim, ln_eps, rngs=rngs, dtype=dtype)
    self.cross_attn = CrossAttention(dim, num_heads, rngs=rngs, attn_impl=attn_impl,
                                     context_dim=context_dim, dtype=dtype)
    self.norm3 = layers.layer_norm(dim, ln_eps, rngs=rngs, dtype=dtype)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)

  def context_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.cross_attn.project_kv(self.norm_y(context))

  def __call__(self, x, context=None, *, kv=None):
    kv = self.context_kv(context) if kv is None else kv
    x = x + self.cross_attn(self.norm2(x), None, kv=kv)
    return x + self.mlp(self.norm3(x))


class ContextDecoder(nnx.Module):
  """DAGE's adapter: ``linear_out(CrossBlocks(projects_x(x), projects_y(context)))``.

  Positions are the caller's (static): ``pos`` for self-attention among ``x`` (DAGE:
  interpolated HR positions), ``q_pos``/``k_pos`` for cross-attention (snapped HR positions,
  LR positions with registers at 0). All ``None`` disables RoPE.
  """

  def __init__(self, *, in_dim: int, out_dim: int, dim: int, depth: int, num_heads: int,
               context_dim: int, rngs: nnx.Rngs, cross_first: bool = True,
               attn_impl: str = "xla", scan: bool = True, remat: str | None = None, dtype=None):
    self.projects_x = layers.linear(in_dim, dim, rngs=rngs, dtype=dtype)
    self.projects_y = layers.linear(context_dim, dim, rngs=rngs, dtype=dtype)
    self.blocks = LayerStack(
        lambda r: CrossBlock(dim, num_heads, rngs=r, cross_first=cross_first,
                             attn_impl=attn_impl, dtype=dtype), depth, rngs=rngs, scan=scan,
        remat=remat)
    self.linear_out = layers.linear(dim, out_dim, rngs=rngs, dtype=dtype)

  def __call__(self, x, context, *, pos=None, q_pos=None, k_pos=None, collect=None):
    """``collect``: optional list that receives every block's output (for parity tests)."""
    x, y = self.projects_x(x), self.projects_y(context)
    if collect is not None:  # unrolled, to expose the intermediates
      for i in range(self.blocks.depth):
        x = self.blocks.layer(i)(x, y, pos=pos, q_pos=q_pos, k_pos=k_pos)
        collect.append(x)
    else:
      x = self.blocks.run(x, lambda h, blk: blk(h, y, pos=pos, q_pos=q_pos, k_pos=k_pos))
    return self.linear_out(x)


class ClsDecoder(nnx.Module):
  """DAGE's metric-scale decoder. ``query`` ``(B*N, 1, in_dim)``, ``context`` ``(B*N, T,
  context_dim)`` -> ``(B*N, 1, out_dim)``. Per depth step: a :class:`CrossOnlyBlock` (no
  RoPE), then a QK-norm + LayerScale self-attention block over the ``N`` frame tokens of each
  batch element."""

  def __init__(self, *, in_dim: int, out_dim: int, dim: int, depth: int, num_heads: int,
               context_dim: int, rngs: nnx.Rngs, attn_impl: str = "xla", dtype=None):
    self.depth = depth
    self.projects_x = layers.linear(in_dim, dim, rngs=rngs, dtype=dtype)
    self.projects_y = layers.linear(context_dim, dim, rngs=rngs, dtype=dtype)
    self.cross_blocks = nnx.List([
        CrossOnlyBlock(dim, num_heads, rngs=rngs, attn_impl=attn_impl, dtype=dtype)
        for _ in range(depth)])
    cfg = BlockConfig(dim=dim, num_heads=num_heads, qk_norm=True, layerscale=0.01,
                      attn_impl=attn_impl, dtype=dtype)
    self.self_blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(depth)])
    self.linear_out = layers.linear(dim, out_dim, rngs=rngs, dtype=dtype)

  def __call__(self, query: jax.Array, context: jax.Array, num_frames: int) -> jax.Array:
    bn = query.shape[0]
    if bn % num_frames:
      raise ValueError(f"ClsDecoder: {bn} query tokens do not split into {num_frames} frames")
    x, y = self.projects_x(query), self.projects_y(context)
    for cross, self_blk in zip(self.cross_blocks, self.self_blocks):
      x = cross(x, y)
      x = self_blk(x.reshape(bn // num_frames, num_frames, -1)).reshape(bn, 1, -1)
    return self.linear_out(x)
