"""Pi3 building blocks (``yyfz/Pi3``), shared by Pi3 and DAGE's low-resolution stream.

* :class:`AlternatingDecoder` - ``depth`` QK-norm + LayerScale blocks with 2D RoPE; even
  blocks attend within each frame, odd blocks across all frames, both with the frames' real
  ``(y, x)`` positions (registers at ``(0, 0)``). Returns the concatenation of the last two
  blocks' outputs (``[frame || global]``) and, on request, the output of an earlier block.
  Permutation-equivariant over frames (no reference-frame tokens).
* :class:`TransformerDecoder` - ``Linear -> blocks (RoPE, no QK-norm/LayerScale) -> Linear``
  (Pi3's point/confidence/camera decoders).
* :class:`CameraHead` - residual MLPs, mean over patch tokens, translation and a 9-D rotation
  projected onto SO(3) (:func:`geojax.geometry.rotation.svd_orthogonalize`, fp32); returns
  camera-to-world ``(N, 4, 4)``.
* :class:`LinearPts3d` - per-token linear head unfolded to pixels with torch's pixel-shuffle
  channel order.
* :class:`TokenSplitter` - DAGE's distillation projector: patch tokens -> 2x finer grid.
* :func:`encode_patches`, :func:`decoder_positions`, :func:`decode_frames` - the trunk shared
  by Pi3 and DAGE's LR stream: DINOv2-reg patch tokens, shared registers, alternating decoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.geometry.rotation import svd_orthogonalize
from geojax.nn import layers, rope
from geojax.nn.alternating import GLOBAL, LOCAL, run_schedule
from geojax.nn.stack import LayerStack
from geojax.nn.vit import Block, BlockConfig


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
  """``torch.nn.functional.pixel_shuffle`` for channels-last ``(N, h, w, C*r*r)`` ->
  ``(N, h*r, w*r, C)``; torch's channel order is ``c*r*r + i*r + j``."""
  n, h, w, crr = x.shape
  c = crr // (r * r)
  x = x.reshape(n, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(n, h * r, w * r, c)


def encode_patches(encoder, images: jax.Array) -> jax.Array:
  """``(M, h*14, w*14, 3)`` RGB in [0, 1] -> the DINOv2 encoder's normalised patch tokens
  ``(M, h*w, C)`` (ImageNet normalisation here; cls and registers dropped)."""
  x = (images.astype(jnp.float32) - layers.IMAGENET_MEAN) / layers.IMAGENET_STD
  t = encoder.norm(encoder.run_layers(encoder.tokens(x), 0, encoder.depth))
  return t[:, 1 + encoder.num_registers:]


def decoder_positions(grid: tuple[int, int], num_registers: int) -> np.ndarray:
  """``(R + h*w, 2)`` decoder RoPE positions: registers at (0, 0), patch (r, c) at
  (r+1, c+1); the same per-frame positions serve frame and global blocks."""
  return rope.with_special_tokens(rope.grid_positions(*grid, offset=1.0), num_registers)


def decode_frames(decoder: "AlternatingDecoder", register_token: jax.Array, tokens: jax.Array,
                  batch: int, grid: tuple[int, int], *, tap: int | None = None,
                  collect: list | None = None):
  """Patch tokens ``(B*N, h*w, C)`` -> ``(hidden (B*N, R + h*w, 2C), tapped)``: the ``R``
  shared ``register_token`` ``(1, 1, R, C)`` prepended to every frame, then ``decoder``.
  ``tapped``: block ``tap``'s output ``(B, N, R + h*w, C)`` (or ``None``)."""
  bn, _, c = tokens.shape
  n = bn // batch
  r = register_token.shape[2]
  reg = jnp.broadcast_to(register_token.astype(tokens.dtype), (batch, n, r, c))
  x = jnp.concatenate([reg, tokens.reshape(batch, n, -1, c)], axis=2)
  out, tapped = decoder(x, jnp.asarray(decoder_positions(grid, r)), tap=tap, collect=collect)
  return out.reshape(bn, out.shape[2], -1), tapped


class AlternatingDecoder(nnx.Module):
  """Pi3's decoder over ``(B, N, T, C)`` tokens (``T`` = registers + patches per frame)."""

  def __init__(self, *, dim: int, depth: int, num_heads: int, rngs: nnx.Rngs,
               mlp_ratio: float = 4.0, attn_impl: str = "xla", scan: bool = True,
               remat: str | None = None, dtype=None):
    if depth < 2 or depth % 2:
      raise ValueError(f"the alternating decoder needs an even depth >= 2; got {depth}")
    cfg = BlockConfig(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qk_norm=True,
                      layerscale=0.01, attn_impl=attn_impl, dtype=dtype)
    self.depth = depth
    self.blocks = LayerStack(lambda r: Block(cfg, rngs=r), depth, rngs=rngs, scan=scan,
                             remat=remat)

  def kinds(self, start: int, stop: int):
    return [LOCAL if i % 2 == 0 else GLOBAL for i in range(start, stop)]

  def __call__(self, x: jax.Array, pos: jax.Array, *, tap: int | None = None,
               collect: list | None = None):
    """``x`` ``(B, N, T, C)``, ``pos`` ``(T, 2)`` per-frame positions. Returns
    ``(out (B, N, T, 2C), tapped)`` where ``tapped`` is block ``tap``'s output (or ``None``).
    ``collect`` (a list) receives every block's output, unrolled (parity tests)."""
    b, n, t, _ = x.shape
    pos_local = pos[None]
    pos_global = jnp.tile(pos, (n, 1))[None]
    if collect is not None:
      from geojax.nn.alternating import global_attention, local_attention
      for i in range(self.depth):
        blk = self.blocks.layer(i)
        x = (local_attention(blk, x, pos_local) if i % 2 == 0
             else global_attention(blk, x, pos_global))
        collect.append(x)
      return jnp.concatenate([collect[-2], collect[-1]], -1), (
          collect[tap] if tap is not None else None)
    bounds = sorted({0, self.depth - 2, self.depth} | ({tap + 1} if tap is not None else set()))
    local_x, tapped = x, None
    for a, z in zip(bounds[:-1], bounds[1:]):
      x, local_x = run_schedule(self.blocks, x, local_x, start=a, stop=z,
                                kinds=self.kinds(a, z), pos_local=pos_local,
                                pos_global=pos_global)
      if tap is not None and z == tap + 1:
        tapped = x
    # the last two blocks are (frame, global): local_x is block depth-2's output
    return jnp.concatenate([local_x, x], -1), tapped


class TransformerDecoder(nnx.Module):
  """``linear_out(blocks(projects(x)))`` with RoPE positions, plain pre-norm blocks."""

  def __init__(self, *, in_dim: int, dim: int, out_dim: int, depth: int, num_heads: int,
               rngs: nnx.Rngs, mlp_ratio: float = 4.0, attn_impl: str = "xla",
               scan: bool = True, remat: str | None = None, dtype=None):
    cfg = BlockConfig(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qk_norm=False,
                      layerscale=None, attn_impl=attn_impl, dtype=dtype)
    self.projects = layers.linear(in_dim, dim, rngs=rngs, dtype=dtype)
    self.blocks = LayerStack(lambda r: Block(cfg, rngs=r), depth, rngs=rngs, scan=scan,
                             remat=remat)
    self.linear_out = layers.linear(dim, out_dim, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, pos: jax.Array | None = None) -> jax.Array:
    x = self.projects(x)
    x = self.blocks.run(x, lambda h, blk: blk(h, pos))
    return self.linear_out(x)


class _ResLinearBlock(nnx.Module):
  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.res_conv1 = layers.linear(dim, dim, rngs=rngs)
    self.res_conv2 = layers.linear(dim, dim, rngs=rngs)
    self.res_conv3 = layers.linear(dim, dim, rngs=rngs)

  def __call__(self, x):
    y = jax.nn.relu(self.res_conv1(x))
    y = jax.nn.relu(self.res_conv2(y))
    return x + jax.nn.relu(self.res_conv3(y))


class CameraHead(nnx.Module):
  """Pi3 ``CameraHead(dim)``: ``(N, h*w, dim)`` patch tokens -> ``(N, 4, 4)`` camera-to-world,
  plus the raw ``(t (N, 3), rot (N, 9))`` for inspection. Runs in float32."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.res_conv = nnx.List([_ResLinearBlock(dim, rngs=rngs) for _ in range(2)])
    self.more_mlps = nnx.List([layers.linear(dim, dim, rngs=rngs) for _ in range(2)])
    self.fc_t = layers.linear(dim, 3, rngs=rngs)
    self.fc_rot = layers.linear(dim, 9, rngs=rngs)

  def __call__(self, feat: jax.Array):
    x = feat.astype(jnp.float32)
    for blk in self.res_conv:
      x = blk(x)
    x = jnp.mean(x, axis=1)
    for lin in self.more_mlps:
      x = jax.nn.relu(lin(x))
    t, rot = self.fc_t(x), self.fc_rot(x)
    r = svd_orthogonalize(rot)
    n = x.shape[0]
    pose = jnp.zeros((n, 4, 4), jnp.float32).at[:, :3, :3].set(r).at[:, :3, 3].set(t)
    return pose.at[:, 3, 3].set(1.0), (t, rot)


class LinearPts3d(nnx.Module):
  """Pi3 ``LinearPts3d``: ``(N, h*w, C)`` -> ``(N, h*p, w*p, out)`` by a linear layer to
  ``out * p * p`` channels and a pixel shuffle."""

  def __init__(self, patch: int, dim: int, out_dim: int, *, rngs: nnx.Rngs):
    self.patch = patch
    self.proj = layers.linear(dim, out_dim * patch * patch, rngs=rngs)

  def __call__(self, tokens: jax.Array, hw: tuple[int, int]) -> jax.Array:
    n = tokens.shape[0]
    h, w = hw[0] // self.patch, hw[1] // self.patch
    return pixel_shuffle(self.proj(tokens).reshape(n, h, w, -1), self.patch)


class TokenSplitter(nnx.Module):
  """DAGE's ``TokenSplitter``: registers pass through; patch tokens ``LayerNorm(eps 1e-5) ->
  Linear(C, 4C) -> SiLU -> Linear(4C, 4C) -> pixel shuffle x2``. ``(B*N, R + h*w, C)`` ->
  ``(B, N * (R + 4*h*w), C)`` (the teacher's layout)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, factor: int = 2):
    self.factor = factor
    f2 = factor * factor
    self.norm = layers.layer_norm(dim, 1e-5, rngs=rngs)
    self.proj = nnx.List([layers.linear(dim, dim * f2, rngs=rngs),
                          layers.linear(dim * f2, dim * f2, rngs=rngs)])

  def __call__(self, x: jax.Array, *, num_registers: int, hw: tuple[int, int],
               batch: int) -> jax.Array:
    bn, _, c = x.shape
    reg, tok = x[:, :num_registers], x[:, num_registers:]
    tok = self.proj[1](jax.nn.silu(self.proj[0](self.norm(tok))))
    tok = pixel_shuffle(tok.reshape(bn, hw[0], hw[1], -1), self.factor).reshape(bn, -1, c)
    out = jnp.concatenate([reg, tok], 1)
    return out.reshape(batch, -1, c)
