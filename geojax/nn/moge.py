"""MoGe-2 building blocks: the tapped DINOv2 encoder, ``ConvStack`` necks/heads and the MLP.

These reproduce ``moge/model/modules.py`` (MoGe v2) channels-last:

* :class:`DinoV2Encoder` - a DINOv2 without registers run at a token grid chosen by the
  caller; the tokens after each tapped block go through the final LayerNorm, a per-layer 1x1
  projection, and are summed. Also returns the normalised cls token of the last tap.
* :class:`ConvStack` - a pyramid of levels, each ``x = x + Conv1x1(input_l)``, residual
  blocks (ReLU -> 3x3 conv -> ReLU -> 3x3 conv, **replicate** padding, no norms), an optional
  1x1 output conv, then a x2 resampler (stride-2 transposed conv + 3x3 conv, or bilinear x2
  + 3x3 conv) to the next level.

The image-plane coordinates MoGe appends to every level are
:func:`geojax.geometry.alignment.normalized_view_plane_uv`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.nn import layers, resize
from geojax.nn.vit import DinoV2


class DinoV2Encoder(nnx.Module):
  """MoGe's ``DINOv2Encoder``: DINOv2 (no registers) + summed 1x1 projections of tapped layers.

  ``__call__(images, rows, cols)`` takes RGB in [0, 1] ``(N, H, W, 3)``; if ``H x W`` is not
  ``14*rows x 14*cols`` the images are resized (bilinear, antialiased, no clamp), then
  ImageNet-normalised. Returns ``(tokens (N, rows*cols, dim_out), cls (N, C))``.
  """

  def __init__(self, *, dim: int, depth: int, num_heads: int, taps: Sequence[int], dim_out: int,
               rngs: nnx.Rngs, attn_impl: str = "xla", scan: bool = True,
               remat: str | None = None, dtype=None):
    self.taps = tuple(int(t) for t in taps)
    if list(self.taps) != sorted(set(self.taps)) or self.taps[-1] >= depth:
      raise ValueError(f"taps must be increasing block indices < {depth}; got {self.taps}")
    self.backbone = DinoV2(dim=dim, depth=depth, num_heads=num_heads, rngs=rngs,
                           pos_resize="scale_factor", mask_token=True, attn_impl=attn_impl,
                           scan=scan, remat=remat, dtype=dtype)
    self.output_projections = nnx.List([
        layers.conv(dim, dim_out, 1, padding=0, rngs=rngs) for _ in self.taps])

  def __call__(self, images: jax.Array, rows: int, cols: int) -> tuple[jax.Array, jax.Array]:
    p = self.backbone.patch
    x = resize.resize_bilinear(images.astype(jnp.float32), (rows * p, cols * p), antialias=True)
    x = (x - layers.IMAGENET_MEAN) / layers.IMAGENET_STD
    feats = self.backbone.intermediate_layers(x, self.taps)
    n = x.shape[0]
    out = 0.0
    for proj, f in zip(self.output_projections, feats):
      out = out + proj(f[:, 1:].reshape(n, rows, cols, -1).astype(jnp.float32))
    return out.reshape(n, rows * cols, -1), feats[-1][:, 0]


class ReplicateConv(nnx.Module):
  """``Conv2d(k, padding=k // 2, padding_mode="replicate")``."""

  def __init__(self, cin: int, cout: int, k: int = 3, *, rngs: nnx.Rngs):
    self.pad = k // 2
    self.conv = layers.conv(cin, cout, k, padding=0, rngs=rngs)

  def __call__(self, x):
    p = self.pad
    return self.conv(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge"))


class ResidualConvBlock(nnx.Module):
  """``x + conv2(relu(conv1(relu(x))))`` with replicate-padded 3x3 convs (MoGe-2: no norms)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.conv1 = ReplicateConv(dim, dim, 3, rngs=rngs)
    self.conv2 = ReplicateConv(dim, dim, 3, rngs=rngs)

  def __call__(self, x):
    return x + self.conv2(jax.nn.relu(self.conv1(jax.nn.relu(x))))


class Resampler(nnx.Module):
  """x2 upsampler: ``"conv_transpose"`` (2x2 stride-2 transposed conv, then a 3x3 conv) or
  ``"bilinear"`` (x2 bilinear, ``align_corners=False``, then a 3x3 conv)."""

  def __init__(self, cin: int, cout: int, kind: str, *, rngs: nnx.Rngs):
    if kind not in ("conv_transpose", "bilinear"):
      raise ValueError(f"resampler must be 'conv_transpose' or 'bilinear'; got {kind!r}")
    self.kind = kind
    if kind == "conv_transpose":
      self.up = layers.ConvTransposeStrided(cin, cout, 2, rngs=rngs)
      self.conv = ReplicateConv(cout, cout, 3, rngs=rngs)
    else:
      self.up = None
      self.conv = ReplicateConv(cin, cout, 3, rngs=rngs)

  def __call__(self, x):
    if self.up is not None:
      return self.conv(self.up(x))
    h, w = x.shape[1:3]
    return self.conv(resize.resize_bilinear(x, (2 * h, 2 * w)))


class ConvStack(nnx.Module):
  """MoGe ``ConvStack`` (channels-last). ``dim_in[l]`` / ``dim_out[l]`` may be ``None`` (no
  input at that level / the level's features are output as they are)."""

  def __init__(self, *, dim_in: Sequence[int | None], dim_res_blocks: Sequence[int],
               dim_out: Sequence[int | None], resamplers: Sequence[str],
               num_res_blocks: Sequence[int], rngs: nnx.Rngs):
    n = len(dim_res_blocks)
    if not (len(dim_in) == len(dim_out) == len(num_res_blocks) == n
            and len(resamplers) == n - 1):
      raise ValueError("ConvStack: dim_in, dim_out, num_res_blocks need one entry per level "
                       f"({n}) and resamplers one fewer; got {len(dim_in)}, {len(dim_out)}, "
                       f"{len(num_res_blocks)}, {len(resamplers)}")
    self.input_blocks = nnx.List([
        layers.conv(i, d, 1, padding=0, rngs=rngs) if i is not None else None
        for i, d in zip(dim_in, dim_res_blocks)])
    self.res_blocks = nnx.List([
        nnx.List([ResidualConvBlock(d, rngs=rngs) for _ in range(k)])
        for d, k in zip(dim_res_blocks, num_res_blocks)])
    self.output_blocks = nnx.List([
        layers.conv(d, o, 1, padding=0, rngs=rngs) if o is not None else None
        for d, o in zip(dim_res_blocks, dim_out)])
    self.resamplers = nnx.List([
        Resampler(a, b, kind, rngs=rngs)
        for a, b, kind in zip(dim_res_blocks[:-1], dim_res_blocks[1:], resamplers)])

  def __call__(self, features: Sequence[jax.Array | None]) -> list[jax.Array]:
    """``features[l]``: ``(N, h*2^l, w*2^l, dim_in[l])`` or ``None``; returns every level."""
    outs, x = [], None
    for lvl, (inp, blocks, out) in enumerate(zip(self.input_blocks, self.res_blocks,
                                                 self.output_blocks)):
      f = features[lvl]
      if inp is not None and f is not None:
        f = inp(f)
      x = f if lvl == 0 else (x if f is None else x + f)
      for blk in blocks:
        x = blk(x)
      outs.append(out(x) if out is not None else x)
      if lvl < len(self.resamplers):
        x = self.resamplers[lvl](x)
    return outs


class MLP(nnx.Module):
  """MoGe ``MLP(dims)``: Linear-ReLU ... Linear (official keys ``0``, ``2``, ``4``, ...)."""

  def __init__(self, dims: Sequence[int], *, rngs: nnx.Rngs):
    self.linears = nnx.List([layers.linear(a, b, rngs=rngs)
                            for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    for i, lin in enumerate(self.linears):
      x = lin(x)
      if i < len(self.linears) - 1:
        x = jax.nn.relu(x)
    return x
