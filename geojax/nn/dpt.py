"""DPT dense-prediction heads (reassemble + RefineNet fusion), channels-last.

Shared by DA3 (DualDPT, DPT with sky, GS-DPT) and VGGT-style heads (URGT). Parity details:

* fusion upsampling is bilinear with ``align_corners=True``;
* the x4/x2 reassemble upsamplers are stride = kernel transposed convs, the x1/2 one a 3x3
  stride-2 conv with symmetric padding 1;
* ``relu_inplace=True`` reproduces VGGT's ``nn.ReLU(inplace=True)`` residual units, whose skip
  connection sees the rectified input (DA3 builds them with in-place off);
* the UV sin-cos position embedding is computed on the host from static shapes.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.nn import layers
from geojax.nn.resize import resize_bilinear_align_corners


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  start, end = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start], np.float32)
  step = (end - start) / np.float32(steps - 1)
  i = np.arange(steps, dtype=np.float32)
  lo = start + step * i
  hi = end - step * (np.float32(steps - 1) - i)
  return np.where(np.arange(steps) < steps / 2, lo, hi).astype(np.float32)


@functools.lru_cache(maxsize=128)
def uv_pos_embed(h: int, w: int, channels: int, aspect: float, omega0: float = 100.0) -> np.ndarray:
  """``(h, w, channels)`` sin-cos embedding of a diagonal-normalised UV grid (VGGT / DA3).

  x spans ``+-aspect / sqrt(aspect^2 + 1) * (w - 1) / w`` and y ``+-1 / sqrt(aspect^2 + 1) *
  (h - 1) / h``; channels are ``[sin x, cos x, sin y, cos y]`` blocks of ``channels / 4``.
  """
  diag = (aspect ** 2 + 1.0) ** 0.5
  sx, sy = aspect / diag, 1.0 / diag
  xs = _torch_linspace_f32(-sx * (w - 1) / w, sx * (w - 1) / w, w)
  ys = _torch_linspace_f32(-sy * (h - 1) / h, sy * (h - 1) / h, h)
  q = channels // 4
  omega = np.arange(q, dtype=np.float32) / np.float32(channels // 2 / 2.0)
  omega = (np.float32(1.0) / np.power(np.float32(omega0), omega)).astype(np.float32)

  def emb(p):
    out = (p[:, None] * omega[None]).astype(np.float32)
    return np.concatenate([np.sin(out), np.cos(out)], -1)

  ex = np.broadcast_to(emb(xs)[None], (h, w, 2 * q))
  ey = np.broadcast_to(emb(ys)[:, None], (h, w, 2 * q))
  return np.concatenate([ex, ey], -1).astype(np.float32)


def add_uv_pos_embed(x: jax.Array, image_hw: tuple[int, int], ratio: float = 0.1) -> jax.Array:
  """Add ``ratio * uv_pos_embed`` to an NHWC feature map (aspect ratio of the *image*)."""
  h, w, c = x.shape[-3:]
  pe = uv_pos_embed(h, w, c, image_hw[1] / image_hw[0]) * np.float32(ratio)
  return x + jnp.asarray(pe, x.dtype)


class ResidualConvUnit(nnx.Module):
  def __init__(self, features: int, *, rngs: nnx.Rngs, relu_inplace: bool = False):
    self.relu_inplace = relu_inplace
    self.conv1 = layers.conv(features, features, 3, rngs=rngs)
    self.conv2 = layers.conv(features, features, 3, rngs=rngs)

  def __call__(self, x):
    r = jax.nn.relu(x)
    out = self.conv2(jax.nn.relu(self.conv1(r)))
    return out + (r if self.relu_inplace else x)


class FusionBlock(nnx.Module):
  """RefineNet fusion: ``y = top (+ RCU1(lateral)); y = RCU2(y); resize; 1x1 out_conv``."""

  def __init__(self, features: int, *, rngs: nnx.Rngs, has_residual: bool = True,
               relu_inplace: bool = False):
    self.resConfUnit1 = (ResidualConvUnit(features, rngs=rngs, relu_inplace=relu_inplace)
                         if has_residual else None)
    self.resConfUnit2 = ResidualConvUnit(features, rngs=rngs, relu_inplace=relu_inplace)
    self.out_conv = layers.conv(features, features, 1, rngs=rngs)

  def __call__(self, top, lateral=None, size: tuple[int, int] | None = None):
    y = top
    if lateral is not None and self.resConfUnit1 is not None:
      y = y + self.resConfUnit1(lateral)
    y = self.resConfUnit2(y)
    if size is None:
      size = (y.shape[-3] * 2, y.shape[-2] * 2)
    return self.out_conv(resize_bilinear_align_corners(y, size))


class FusionChain(nnx.Module):
  """``refinenet4 -> 3 -> 2 -> 1``; returns every level's output, finest (2x level 1) last."""

  def __init__(self, features: int, *, rngs: nnx.Rngs, relu_inplace: bool = False):
    mk = functools.partial(FusionBlock, features, rngs=rngs, relu_inplace=relu_inplace)
    self.refinenet1, self.refinenet2, self.refinenet3 = mk(), mk(), mk()
    self.refinenet4 = mk(has_residual=False)

  def __call__(self, l1, l2, l3, l4) -> list[jax.Array]:
    hw = lambda t: (t.shape[-3], t.shape[-2])
    r4 = self.refinenet4(l4, size=hw(l3))
    r3 = self.refinenet3(r4, l3, size=hw(l2))
    r2 = self.refinenet2(r3, l2, size=hw(l1))
    r1 = self.refinenet1(r2, l1)
    return [r4, r3, r2, r1]


class Reassemble(nnx.Module):
  """Token maps -> four feature maps at x4, x2, x1, x1/2 of the patch grid, ``features`` wide."""

  def __init__(self, dim_in: int, out_channels: Sequence[int], features: int, *,
               rngs: nnx.Rngs, norm: bool = True, pos_embed: bool = True):
    oc = list(out_channels)
    self.pos_embed = pos_embed
    self.norm = layers.layer_norm(dim_in, 1e-5, rngs=rngs) if norm else None
    self.projects = nnx.List([layers.conv(dim_in, c, 1, rngs=rngs) for c in oc])
    self.resize0 = layers.ConvTransposeStrided(oc[0], oc[0], 4, rngs=rngs)
    self.resize1 = layers.ConvTransposeStrided(oc[1], oc[1], 2, rngs=rngs)
    self.resize3 = layers.conv(oc[3], oc[3], 3, stride=2, padding=1, rngs=rngs)
    self.layer_rn = nnx.List([layers.conv(c, features, 3, bias=False, rngs=rngs) for c in oc])

  def __call__(self, feats: Sequence[jax.Array], grid_hw: tuple[int, int],
               image_hw: tuple[int, int]) -> list[jax.Array]:
    """``feats``: four ``(N, h*w, dim_in)`` patch-token maps."""
    h, w = grid_hw
    resize = (self.resize0, self.resize1, None, self.resize3)
    out = []
    for s, f in enumerate(feats):
      if self.norm is not None:
        f = self.norm(f)
      x = self.projects[s](f.reshape(f.shape[0], h, w, f.shape[-1]))
      if self.pos_embed:
        x = add_uv_pos_embed(x, image_hw)
      if resize[s] is not None:
        x = resize[s](x)
      out.append(self.layer_rn[s](x))
    return out


def activate(x, kind: str):
  """DPT output activations: ``exp``, ``expp1`` (1 + exp), ``relu``, ``sigmoid``, ``linear``."""
  if kind == "exp":
    return jnp.exp(x)
  if kind == "expp1":
    return jnp.exp(x) + 1
  if kind == "relu":
    return jax.nn.relu(x)
  if kind == "sigmoid":
    return jax.nn.sigmoid(x)
  if kind == "linear":
    return x
  raise ValueError(f"unknown activation {kind!r}")


class OutputConv2(nnx.Module):
  """``3x3 conv -> [LayerNorm] -> ReLU -> 1x1 conv`` (``output_conv2`` of DPT heads)."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, hidden: int = 32):
    self.conv0 = layers.conv(cin, hidden, 3, rngs=rngs)
    self.conv2 = layers.conv(hidden, cout, 1, rngs=rngs)

  def __call__(self, x, norm: nnx.Module | None = None):
    """``norm`` is passed in (not owned) because DualDPT ties one LayerNorm across levels."""
    x = self.conv0(x)
    if norm is not None:
      x = norm(x)
    return self.conv2(jax.nn.relu(x))


class DPTHead(nnx.Module):
  """Single-chain DPT: prediction (+ confidence) and optional sky map at full resolution.

  DA3 mono/metric: ``norm=False, pos_embed=False, output_dim=1, sky=True``;
  DA3 GS-DPT: ``pos_embed=True, output_dim=38, image_merger=True``;
  VGGT / URGT: ``norm=True, pos_embed=True, relu_inplace=True`` (``activation="linear"`` for
  URGT's offsets).
  """

  def __init__(self, dim_in: int, *, rngs: nnx.Rngs, out_channels=(256, 512, 1024, 1024),
               features: int = 256, output_dim: int = 1, norm: bool = False,
               pos_embed: bool = False, sky: bool = False, image_merger: bool = False,
               activation: str = "exp", conf_activation: str = "expp1",
               sky_activation: str = "relu", patch: int = 14, relu_inplace: bool = False):
    self.patch, self.pos_embed = patch, pos_embed
    self.output_dim = output_dim
    self.activation, self.conf_activation = activation, conf_activation
    self.sky_activation = sky_activation
    self.reassemble = Reassemble(dim_in, out_channels, features, rngs=rngs, norm=norm,
                                 pos_embed=pos_embed)
    self.fusion = FusionChain(features, rngs=rngs, relu_inplace=relu_inplace)
    self.output_conv1 = layers.conv(features, features // 2, 3, rngs=rngs)
    self.output_conv2 = OutputConv2(features // 2, output_dim, rngs=rngs)
    self.sky_output_conv2 = OutputConv2(features // 2, 1, rngs=rngs) if sky else None
    if image_merger:
      m = features // 2
      self.images_merger = nnx.List([layers.conv(3, m // 4, 3, rngs=rngs),
                                     layers.conv(m // 4, m // 2, 3, rngs=rngs),
                                     layers.conv(m // 2, m, 3, rngs=rngs)])
    else:
      self.images_merger = None

  def __call__(self, feats, image_hw: tuple[int, int], images=None) -> dict[str, jax.Array]:
    hh, ww = image_hw
    lv = self.reassemble(feats, (hh // self.patch, ww // self.patch), image_hw)
    y = self.output_conv1(self.fusion(*lv)[-1])
    y = resize_bilinear_align_corners(y, image_hw)
    if self.images_merger is not None:
      if images is None:
        raise ValueError("this DPT head merges image features: pass `images` (N, H, W, 3)")
      z = images
      for c in self.images_merger:
        z = layers.gelu(c(z))
      y = y + z
    if self.pos_embed:
      y = add_uv_pos_embed(y, image_hw)
    logits = self.output_conv2(y)
    out = {}
    if self.output_dim > 1:
      out["pred"] = activate(logits[..., :-1], self.activation)
      out["conf"] = activate(logits[..., -1], self.conf_activation)
    else:
      out["pred"] = activate(logits[..., 0], self.activation)
    if self.sky_output_conv2 is not None:
      out["sky"] = activate(self.sky_output_conv2(y)[..., 0], self.sky_activation)
    return out


class DualDPTHead(nnx.Module):
  """DA3 DualDPT: a depth chain at (H, W) and a ray chain at (8h, 8w) on shared reassembly.

  The ray chain's output stacks exist for four pyramid levels (as in the checkpoints) but only
  the finest is used; their ``LayerNorm`` is one shared module.
  """

  def __init__(self, dim_in: int, *, rngs: nnx.Rngs, out_channels=(256, 512, 1024, 1024),
               features: int = 256, output_dim: int = 2, aux_dim: int = 7, aux_levels: int = 4,
               patch: int = 14):
    f, f2 = features, features // 2
    self.patch = patch
    self.reassemble = Reassemble(dim_in, out_channels, features, rngs=rngs, norm=True,
                                 pos_embed=True)
    self.fusion = FusionChain(features, rngs=rngs)
    self.fusion_aux = FusionChain(features, rngs=rngs)
    self.output_conv1 = layers.conv(f, f2, 3, rngs=rngs)
    self.output_conv2 = OutputConv2(f2, output_dim, rngs=rngs)
    self.aux_norm = layers.layer_norm(32, 1e-5, rngs=rngs, axis_name=None)
    chans = [(f, f2), (f2, f), (f, f2), (f2, f), (f, f2)]
    self.output_conv1_aux = nnx.List([
        nnx.List([layers.conv(a, b, 3, rngs=rngs) for a, b in chans]) for _ in range(aux_levels)])
    self.output_conv2_aux = nnx.List([
        OutputConv2(f2, aux_dim, rngs=rngs) for _ in range(aux_levels)])

  def __call__(self, feats, image_hw: tuple[int, int]) -> dict[str, jax.Array]:
    hh, ww = image_hw
    lv = self.reassemble(feats, (hh // self.patch, ww // self.patch), image_hw)
    main = self.output_conv1(self.fusion(*lv)[-1])
    main = add_uv_pos_embed(resize_bilinear_align_corners(main, image_hw), image_hw)
    logits = self.output_conv2(main)
    aux = self.fusion_aux(*lv)[-1]
    for c in self.output_conv1_aux[-1]:
      aux = c(aux)
    aux_logits = self.output_conv2_aux[-1](add_uv_pos_embed(aux, image_hw), norm=self.aux_norm)
    return {"depth": jnp.exp(logits[..., 0]), "depth_conf": jnp.exp(logits[..., 1]) + 1,
            "ray": aux_logits[..., :6], "ray_conf": jnp.exp(aux_logits[..., 6]) + 1}
