"""DINOv2-style Vision Transformer: patch embedding, tokens, position embedding and blocks.

Covers DINOv2 with or without register tokens (the two position-embedding resize schemes),
LayerScale, plain-MLP or SwiGLU FFN, per-layer QK-norm and 2D RoPE. Blocks are grouped in
:class:`~geojax.nn.stack.LayerStack` s with identical parameter structure (e.g. DA3: layers
without QK-norm, then layers with it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from geojax.nn import layers, resize
from geojax.nn.attention import Attention
from geojax.nn.stack import LayerStack


class Mlp(nnx.Module):
  """Linear -> exact GELU -> Linear."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, out_dim: int | None = None,
               bias: bool = True, dtype=None):
    self.fc1 = layers.linear(dim, hidden, bias=bias, rngs=rngs, dtype=dtype)
    self.fc2 = layers.linear(hidden, out_dim or dim, bias=bias, rngs=rngs, dtype=dtype,
                             axes=("mlp", "embed"))

  def __call__(self, x):
    return self.fc2(layers.gelu(self.fc1(x)))


class SwiGLU(nnx.Module):
  """Fused SwiGLU FFN of DINOv2 ViT-g: ``w3(silu(a) * b)`` with ``[a | b] = w12(x)``."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, bias: bool = True, dtype=None):
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # DINOv2 SwiGLUFFNFused rounding
    self.w12 = layers.linear(dim, 2 * hidden, bias=bias, rngs=rngs, dtype=dtype)
    self.w3 = layers.linear(hidden, dim, bias=bias, rngs=rngs, dtype=dtype, axes=("mlp", "embed"))

  def __call__(self, x):
    a, b = jnp.split(self.w12(x), 2, axis=-1)
    return self.w3(jax.nn.silu(a) * b)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  ffn: str = "mlp"  # "mlp" | "swiglu"
  qk_norm: bool = False
  ln_eps: float = 1e-6
  layerscale: float | None = 1.0  # None: no LayerScale
  attn_impl: str = "xla"  # "xla" | "cudnn" | "chunked" (see geojax.nn.attention.attend)
  dtype: jnp.dtype | None = None


class Block(nnx.Module):
  """Pre-norm transformer block ``x += ls1 * attn(norm1(x)); x += ls2 * ffn(norm2(x))``."""

  def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.norm1 = layers.layer_norm(d, cfg.ln_eps, rngs=rngs, dtype=cfg.dtype)
    self.attn = Attention(d, cfg.num_heads, qk_norm=cfg.qk_norm, attn_impl=cfg.attn_impl,
                          rngs=rngs, dtype=cfg.dtype)
    self.norm2 = layers.layer_norm(d, cfg.ln_eps, rngs=rngs, dtype=cfg.dtype)
    hidden = int(d * cfg.mlp_ratio)
    if cfg.ffn == "mlp":
      self.mlp = Mlp(d, hidden, rngs=rngs, dtype=cfg.dtype)
    elif cfg.ffn == "swiglu":
      self.mlp = SwiGLU(d, hidden, rngs=rngs, dtype=cfg.dtype)
    else:
      raise ValueError(f"ffn must be 'mlp' or 'swiglu'; got {cfg.ffn!r}")
    if cfg.layerscale is None:
      self.ls1 = self.ls2 = None
    else:
      self.ls1 = layers.LayerScale(d, cfg.layerscale)
      self.ls2 = layers.LayerScale(d, cfg.layerscale)

  def __call__(self, x: jax.Array, pos: jax.Array | None = None, *,
               cross_view: bool = False) -> jax.Array:
    """``cross_view=True``: ``x`` holds the tokens of all views (view-parallel attention)."""
    y = self.attn(self.norm1(x), pos, cross_view=cross_view)
    x = x + (self.ls1(y) if self.ls1 is not None else y)
    y = self.mlp(self.norm2(x))
    return x + (self.ls2(y) if self.ls2 is not None else y)


class PatchEmbed(nnx.Module):
  """Non-overlapping ``p x p`` patch projection (a stride-p conv) as reshape + matmul."""

  def __init__(self, patch: int, dim: int, *, rngs: nnx.Rngs, in_chans: int = 3, dtype=None):
    self.patch = patch
    self.dtype = dtype
    self.proj = layers.conv(in_chans, dim, patch, stride=patch, padding=0, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """``(N, H, W, 3)`` -> ``(N, H/p * W/p, dim)`` row-major."""
    n, h, w, c = images.shape
    p = self.patch
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    kern, bias = self.proj.kernel[...], self.proj.bias[...]
    if self.dtype is not None:
      x, kern, bias = x.astype(self.dtype), kern.astype(self.dtype), bias.astype(self.dtype)
    y = jnp.einsum("nhwijc,ijco->nhwo", x, kern) + bias
    return y.reshape(n, (h // p) * (w // p), -1)


class DinoV2(nnx.Module):
  """DINOv2 ViT trunk: tokens, learned position embedding, grouped block stacks, final norm.

  ``groups`` lists ``(num_layers, qk_norm)`` for consecutive layer stacks. The caller runs the
  blocks (plain, alternating, with taps) through :meth:`stack_of`.
  """

  def __init__(self, *, dim: int, depth: int, num_heads: int, rngs: nnx.Rngs, patch: int = 14,
               img_size: int = 518, ffn: str = "mlp", num_registers: int = 0,
               pos_resize: str = "scale_factor", block_eps: float = 1e-6,
               final_norm_eps: float = 1e-6, groups: tuple[tuple[int, bool], ...] | None = None,
               attn_impl: str = "xla", scan: bool = True, remat: str | None = None,
               mask_token: bool = False, dtype=None):
    if pos_resize not in ("scale_factor", "antialias"):
      raise ValueError(f"pos_resize must be 'scale_factor' or 'antialias'; got {pos_resize!r}")
    groups = groups or ((depth, False),)
    if sum(g[0] for g in groups) != depth:
      raise ValueError(f"layer groups {groups} do not add up to depth {depth}")
    self.dim, self.depth, self.patch = dim, depth, patch
    self.grid = img_size // patch
    self.num_registers = num_registers
    self.pos_resize = pos_resize
    self.dtype = dtype
    self.patch_embed = PatchEmbed(patch, dim, rngs=rngs, dtype=dtype)
    normal = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(normal(rngs.params(), (1, 1, dim)))
    self.pos_embed = nnx.Param(normal(rngs.params(), (1, 1 + self.grid * self.grid, dim)))
    self.register_tokens = (nnx.Param(normal(rngs.params(), (1, num_registers, dim)))
                            if num_registers else None)
    # DINOv2's masked-image-modelling token: never used at inference, kept (when the official
    # checkpoint has it) so that parameter counts and round trips match.
    self.mask_token = nnx.Param(jnp.zeros((1, dim), jnp.float32)) if mask_token else None
    stacks, starts, s = [], [], 0
    for n, qk in groups:
      cfg = BlockConfig(dim=dim, num_heads=num_heads, ffn=ffn, qk_norm=qk, ln_eps=block_eps,
                        attn_impl=attn_impl, dtype=dtype)
      stacks.append(LayerStack(lambda r, cfg=cfg: Block(cfg, rngs=r), n, rngs=rngs, scan=scan,
                               remat=remat))
      starts.append(s)
      s += n
    self.stacks = nnx.List(stacks)
    self.stack_starts = tuple(starts)
    self.norm = layers.layer_norm(dim, final_norm_eps, rngs=rngs)

  def stack_of(self, i: int) -> tuple[LayerStack, int]:
    """The stack holding global layer ``i`` and the index of ``i`` inside it."""
    for stack, start in zip(reversed(self.stacks), reversed(self.stack_starts)):
      if i >= start:
        return stack, i - start
    raise IndexError(i)

  def run_layers(self, x: jax.Array, start: int, stop: int) -> jax.Array:
    """Apply blocks ``start .. stop-1`` (across layer groups) to tokens ``x``."""
    for stack, s0 in zip(self.stacks, self.stack_starts):
      a, b = max(start, s0), min(stop, s0 + stack.depth)
      if a < b:
        x = stack.run(x, lambda h, blk: blk(h), a - s0, b - s0)
    return x

  def intermediate_layers(self, images: jax.Array, taps) -> list[jax.Array]:
    """Tokens after each block in ``taps`` (sorted), each through the final norm:
    ``[(N, 1 + R + h*w, C)]`` (DINOv2 ``get_intermediate_layers(norm=True)``)."""
    x, prev, out = self.tokens(images), 0, []
    for t in taps:
      x = self.run_layers(x, prev, t + 1)
      prev = t + 1
      out.append(self.norm(x))
    return out

  def interpolated_pos_embed(self, h: int, w: int) -> jax.Array:
    """``(1, 1 + h*w, C)`` position embedding for an ``h x w`` patch grid (cls row first)."""
    pe = self.pos_embed[...].astype(jnp.float32)
    if (h, w) == (self.grid, self.grid):
      return pe
    grid = pe[0, 1:].reshape(self.grid, self.grid, -1)
    if self.pos_resize == "scale_factor":
      grid = resize.resize_pos_embed_scale_factor(grid, (h, w))
    else:
      grid = resize.resize_pos_embed_antialias(grid, (h, w))
    return jnp.concatenate([pe[:, :1], grid.reshape(1, h * w, -1)], axis=1)

  def tokens(self, images: jax.Array, extra: jax.Array | None = None) -> jax.Array:
    """``(N, H, W, 3)`` -> ``(N, 1 + R + h*w, C)``: cls, registers (no pos-embed), patches.

    ``extra``: ``(N, h*w, C)`` added to the patch embedding before the cls token and the
    position embedding (URGT's depth / normal prior embeddings)."""
    n, hh, ww, _ = images.shape
    h, w = hh // self.patch, ww // self.patch
    x = self.patch_embed(images).astype(jnp.float32)
    if extra is not None:
      x = x + extra.astype(jnp.float32)
    cls = jnp.broadcast_to(self.cls_token[...], (n, 1, self.dim))
    x = jnp.concatenate([cls, x], axis=1) + self.interpolated_pos_embed(h, w)
    if self.register_tokens is not None:
      reg = jnp.broadcast_to(self.register_tokens[...], (n, self.num_registers, self.dim))
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
    return x.astype(self.dtype or jnp.float32)
