"""URGT: one high-resolution image cut into crops that a VGGT-style network treats as views.

``Dreamaker-MrC/Any-Resolution-Any-Geometry`` (``URGTModel`` around ``VGGT_Joint``):

* **Patch embedding**: a DINOv2 ViT-L/14 with 4 registers whose patch tokens are the sum of three
  14x14 conv embeddings: the ImageNet-normalised RGB crop, the 1-channel depth prior and the
  3-channel normal prior (priors not normalised); its normalised patch tokens go on.
* **Aggregator**: per crop ``[camera, 4 registers, patches]`` (crop 0 takes the first of two
  learned camera / register tokens, every other crop the second), then 24 (frame, global) block
  pairs with QK-norm before 2D RoPE, LayerScale and LayerNorm eps 1e-5: frame blocks attend
  within a crop (intra-patch), global blocks across all crops (cross-patch). RoPE positions put
  every crop's tokens on one global grid (:func:`rope_positions`).
* **Heads**: two VGGT DPT heads read ``[frame || global]`` features of 4 block pairs: depth (an
  offset + a ``1 + exp`` confidence) and normals (3 offsets + confidence), at the crop size.

Network conventions: crops ``(B, S, P, P, 3)`` RGB in [0, 1], priors ``(B, S, P, P, 1)`` (depth,
min-max normalised) and ``(B, S, P, P, 3)`` (unit normals); outputs at ``P x P``.
:func:`refine` is the image-level entry point (crops, priors, offsets, stitching).

Scale: under a mesh with a ``"view"`` axis (:func:`geojax.parallel.sharding.make_view_mesh`) the
crops are split over devices as DA3's views are - patch embedding, frame blocks and heads on
each device's own crops, global blocks gathering keys and values - when the device count
divides the crop count (an 8 x 8 grid: 64 crops; the 8 x 8 overlap split: 121 = 11 x 11).
``head_chunk`` runs the heads a few crops at a time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.nn import layers, resize, rope, views
from geojax.nn.alternating import run_frame_global
from geojax.nn.dpt import DPTHead
from geojax.nn.stack import LayerStack
from geojax.nn.vit import Block, BlockConfig, DinoV2, PatchEmbed
from geojax.parallel.sharding import create, shard_views

PATCH = 14
NUM_SPECIAL = 5  # camera token + 4 registers per crop


@dataclasses.dataclass(frozen=True)
class URGTConfig:
  """One URGT network (defaults = the released ``VGGT_Joint(518, 14, 1024)``).

  ``enc_*``: the DINOv2-reg patch embedding (``img_size`` sets its stored position grid);
  ``agg_*``: the aggregator (``agg_depth`` frame and as many global blocks);
  ``head_layers``: the block pairs the DPT heads read; ``head_features`` /
  ``head_out_channels``: their widths. Runtime: ``attn_impl`` (global blocks see
  ``S * (5 + t*t)`` tokens: ``"chunked"`` on CPU/TPU, ``"cudnn"`` on GPU), ``head_chunk``
  (crops the DPT heads process at a time, 0 = all at once: the heads' activations at ``P x P``
  dominate memory at many crops), ``remat``, ``scan``, ``dtype``."""
  dim: int = 1024
  img_size: int = 518
  enc_depth: int = 24
  enc_heads: int = 16
  agg_depth: int = 24
  agg_heads: int = 16
  head_layers: tuple[int, ...] = (4, 11, 17, 23)
  head_features: int = 256
  head_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
  attn_impl: str = "xla"
  head_chunk: int = 0
  remat: str = "none"
  scan: bool = True
  dtype: Any = None

  def __post_init__(self):
    if self.head_chunk < 0:
      raise ValueError(f"head_chunk must be >= 0 (0 = all crops at once); got {self.head_chunk}")
    if len(self.head_layers) != 4 or max(self.head_layers) >= self.agg_depth:
      raise ValueError(f"head_layers must be 4 block indices below agg_depth={self.agg_depth}; "
                       f"got {self.head_layers}")


PRESETS: dict[str, URGTConfig] = {
    "urgt": URGTConfig(),
    # geojax-only (no official weights): the parity fixture's sizes, for CPU demos and tests.
    "urgt-tiny": URGTConfig(dim=32, img_size=70, enc_depth=2, enc_heads=2, agg_depth=5,
                            agg_heads=2, head_layers=(0, 2, 3, 4), head_features=16,
                            head_out_channels=(8, 16, 24, 24)),
}
PRESET_NAMES = tuple(PRESETS)
OFFICIAL_PRESETS = ("urgt",)


def get_config(name: str, **overrides) -> URGTConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown URGT preset {name!r}; expected one of {PRESET_NAMES}")
  return dataclasses.replace(PRESETS[name], **overrides)


def rope_positions(origins: np.ndarray, tokens: int) -> np.ndarray:
  """``(S, 5 + t*t, 2)`` RoPE positions ``(y, x)`` of the crops' tokens: the 5 special tokens
  at (0, 0), patch token ``(r, c)`` of crop ``k`` at ``origins[k] + (r, c) + 1``. ``origins``
  ``(S, 2)`` in token units may be fractional (true positions of overlapping crops)."""
  grid = rope.grid_positions(tokens, tokens).astype(np.float64)
  out = np.zeros((len(origins), NUM_SPECIAL + tokens * tokens, 2), np.float32)
  for k, o in enumerate(np.asarray(origins, np.float64)):
    out[k, NUM_SPECIAL:] = grid + o + 1.0
  return out


def official_origins(num_crops: int, tokens: int) -> np.ndarray:
  """The official layout: ``n x n`` crops (``n = sqrt(S)``) abutting on an ``n*t`` token grid,
  crop ``k`` at block ``(k // n, k % n)``, whatever the crops' real overlap."""
  n = math.isqrt(num_crops)
  if n * n != num_crops:
    raise ValueError(f"the official RoPE layout needs a square number of crops; got "
                     f"{num_crops} (use rope_positions='true')")
  k = np.arange(num_crops)
  return np.stack([(k // n) * tokens, (k % n) * tokens], -1).astype(np.float64)


class URGT(nnx.Module):
  """The URGT network (module docstring). Build with :meth:`from_preset`."""

  def __init__(self, cfg: URGTConfig, *, rngs: nnx.Rngs):
    c = cfg
    self.cfg = cfg
    rt = dict(attn_impl=c.attn_impl, scan=c.scan, remat=c.remat, dtype=c.dtype)
    self.patch_embed = DinoV2(dim=c.dim, depth=c.enc_depth, num_heads=c.enc_heads, rngs=rngs,
                              img_size=c.img_size, num_registers=4, pos_resize="antialias",
                              mask_token=True, **rt)
    self.patch_embed_depth = PatchEmbed(PATCH, c.dim, rngs=rngs, in_chans=1, dtype=c.dtype)
    self.patch_embed_normal = PatchEmbed(PATCH, c.dim, rngs=rngs, in_chans=3, dtype=c.dtype)
    normal = nnx.initializers.normal(1e-6)
    self.camera_token = nnx.Param(normal(rngs.params(), (1, 2, 1, c.dim)))
    self.register_token = nnx.Param(normal(rngs.params(), (1, 2, 4, c.dim)))
    blk = BlockConfig(dim=c.dim, num_heads=c.agg_heads, qk_norm=True, ln_eps=1e-5,
                      layerscale=0.01, attn_impl=c.attn_impl, dtype=c.dtype)
    mk = lambda: LayerStack(lambda r: Block(blk, rngs=r), c.agg_depth, rngs=rngs, scan=c.scan,
                            remat=c.remat)
    self.frame_blocks, self.global_blocks = mk(), mk()
    head = dict(out_channels=c.head_out_channels, features=c.head_features, norm=True,
                pos_embed=True, activation="linear", conf_activation="expp1",
                relu_inplace=True, rngs=rngs)
    self.depth_head = DPTHead(2 * c.dim, output_dim=2, **head)
    self.normal_head = DPTHead(2 * c.dim, output_dim=4, **head)

  @classmethod
  def from_preset(cls, name: str, *, rngs: nnx.Rngs, **overrides) -> "URGT":
    """Randomly initialised model for a preset (``"urgt"``: the released configuration)."""
    return cls.from_config(get_config(name, **overrides), rngs=rngs)

  @classmethod
  def from_config(cls, cfg: URGTConfig, *, rngs: nnx.Rngs) -> "URGT":
    return create(lambda r: cls(cfg, rngs=r), rngs)

  def embed(self, crops: jax.Array, depth_prior: jax.Array, normal_prior: jax.Array
            ) -> jax.Array:
    """``(M, P, P, ...)`` crops and priors -> normalised patch tokens ``(M, t*t, C)``."""
    x = (crops.astype(jnp.float32) - layers.IMAGENET_MEAN) / layers.IMAGENET_STD
    extra = (self.patch_embed_depth(depth_prior.astype(jnp.float32))
             + self.patch_embed_normal(normal_prior.astype(jnp.float32)))
    enc = self.patch_embed
    t = enc.norm(enc.run_layers(enc.tokens(x, extra), 0, enc.depth))
    return t[:, 1 + enc.num_registers:]

  def aggregate(self, tokens: jax.Array, pos: jax.Array) -> list[jax.Array]:
    """Patch tokens ``(B, S, T, C)`` and positions ``(S | B, S, 5 + T, 2)`` -> the
    ``[frame || global]`` features ``(B, S, 5 + T, 2C)`` of every pair in ``head_layers``."""
    b, s, _, c = tokens.shape
    if pos.ndim == 3:
      pos = pos[None]
    idx = np.minimum(np.arange(s), 1)  # crop 0 -> token 0, the others -> token 1
    special = jnp.concatenate([self.camera_token[...][0, idx], self.register_token[...][0, idx]],
                              axis=1)  # (S, 5, C)
    x = jnp.concatenate([jnp.broadcast_to(special.astype(tokens.dtype), (b, s, NUM_SPECIAL, c)),
                         tokens], axis=2)
    pos_local = jnp.broadcast_to(pos, (b,) + pos.shape[1:]).reshape(b * s, -1, 2)
    pos_global = pos.reshape(pos.shape[0], -1, 2)
    out, start = [], 0
    for layer in self.cfg.head_layers:
      x, frame = run_frame_global(self.frame_blocks, self.global_blocks, x, start=start,
                                  stop=layer + 1, pos_local=pos_local, pos_global=pos_global)
      start = layer + 1
      out.append(jnp.concatenate([frame, x], -1))
    return out

  def __call__(self, crops: jax.Array, depth_prior: jax.Array, normal_prior: jax.Array, *,
               positions: np.ndarray | None = None) -> dict[str, jax.Array]:
    """Offsets and confidences for crops (module docstring for the shapes).

    ``positions``: ``(S, 5 + t*t, 2)`` RoPE positions, or ``(B, S, 5 + t*t, 2)`` per sample
    (a NumPy or traced array; default: the official abutting square layout,
    :func:`official_origins`). Returns ``depth`` ``(B, S, P, P)`` and ``normal``
    ``(B, S, P, P, 3)`` offsets, ``depth_conf`` / ``normal_conf`` ``(B, S, P, P)``.
    """
    _check("crops", crops, 3)
    _check("depth_prior", depth_prior, 1)
    _check("normal_prior", normal_prior, 3)
    b, s, p, p2, _ = crops.shape
    if p != p2 or p % PATCH:
      raise ValueError(f"crops must be square with a side that is a multiple of {PATCH}; got "
                       f"{p}x{p2}")
    for name, a in (("depth_prior", depth_prior), ("normal_prior", normal_prior)):
      if a.shape[:4] != crops.shape[:4]:
        raise ValueError(f"{name} has shape {tuple(a.shape)}; it must match the crops' "
                         f"{tuple(crops.shape[:4])} (B, S, P, P)")
    t = p // PATCH
    if positions is None:
      positions = rope_positions(official_origins(s, t), t)
    if tuple(positions.shape) not in ((s, NUM_SPECIAL + t * t, 2),
                                      (b, s, NUM_SPECIAL + t * t, 2)):
      raise ValueError(f"positions must have shape {(s, NUM_SPECIAL + t * t, 2)} or "
                       f"{(b, s, NUM_SPECIAL + t * t, 2)}; got {tuple(positions.shape)}")
    positions = jnp.asarray(positions, jnp.float32)
    flat = lambda a: shard_views(a.reshape(b * s, *a.shape[2:]), 0)
    tokens = self.embed(flat(crops), flat(depth_prior), flat(normal_prior))
    feats = self.aggregate(shard_views(tokens.reshape(b, s, t * t, -1), 1), positions)
    feats = [flat(f)[:, NUM_SPECIAL:] for f in feats]
    heads = lambda m, fs: (m.depth_head(fs, (p, p)), m.normal_head(fs, (p, p)))
    d, n = views.map_in_view_chunks(self, heads, feats, self.cfg.head_chunk)
    unflat = lambda a: shard_views(a.reshape(b, s, *a.shape[1:]), 1)
    return dict(depth=unflat(d["pred"][..., 0]), depth_conf=unflat(d["conf"]),
                normal=unflat(n["pred"]), normal_conf=unflat(n["conf"]))


def init_training_start(model: URGT, *, seed: int = 0, std: float = 1e-4) -> URGT:
  """The paper's training start, in place: the depth and normal prior embeddings and the last
  conv of both heads get weights N(0, ``std``) and zero biases, so that the prior tokens start
  almost silent and the offsets almost zero (refined = prior). Call it after loading VGGT-1B
  (or other) weights into the rest; returns ``model``. (The official ``URGTModel`` re-draws only
  the depth head's last conv and leaves the normal head's at its default initialisation; geojax
  starts both heads at the prior.)"""
  key = jax.random.key(seed)
  convs = (model.patch_embed_depth.proj, model.patch_embed_normal.proj,
           model.depth_head.output_conv2.conv2, model.normal_head.output_conv2.conv2)
  def put(new, old):  # keep the parameter's placement (sharded models)
    return jax.device_put(new.astype(old.dtype), old.sharding) if hasattr(
        old, "sharding") else new.astype(old.dtype)

  for i, conv in enumerate(convs):
    w, bias = conv.kernel[...], conv.bias[...]
    conv.kernel[...] = put(std * jax.random.normal(jax.random.fold_in(key, i), w.shape), w)
    conv.bias[...] = put(jnp.zeros(bias.shape), bias)
  return model


def _check(name: str, x, channels: int) -> None:
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 5 or shape[-1] != channels:
    raise ValueError(f"{name} must be a float array (B, S, P, P, {channels}) (channels last); "
                     f"got {None if shape is None else tuple(shape)}")


# ------------------------------------------------------------------------------ image level


@dataclasses.dataclass(frozen=True)
class Layout:
  """How an image of ``image_hw`` is cut: crops of ``patch_hw`` at ``starts`` ``(S, 2)``
  ``(y, x)`` in row-major order (y outer); ``boxes`` ``(S, 4)`` ``(x0, y0, x1, y1)``, x1 / y1
  exclusive; ``grid`` the number of crops per axis."""
  image_hw: tuple[int, int]
  patch_hw: tuple[int, int]
  starts: np.ndarray
  grid: tuple[int, int]
  overlap: bool

  @property
  def boxes(self) -> np.ndarray:
    ph, pw = self.patch_hw
    y, x = self.starts[:, 0], self.starts[:, 1]
    return np.stack([x, y, x + pw, y + ph], -1)


def _axis_starts(size: int, patch: int, overlap: bool) -> list[int]:
  if not overlap:
    return list(range(0, size, patch))
  stride = patch - int(patch * 0.3)
  starts = list(range(0, size - patch + 1, stride))
  if starts[-1] + patch < size:
    starts.append(size - patch)
  return starts


def crop_layout(image_hw: tuple[int, int], patch_split: tuple[int, int] = (8, 8), *,
                overlap: bool = True) -> Layout:
  """The official crops of an ``image_hw`` image (already at its aligned size, a multiple of
  ``patch_split``): native patches ``(H / n_h, W / n_w)``; ``overlap=True`` (the official
  default): 30 % overlap per axis, stride ``patch - int(0.3 patch)``, the last crop flush with the
  border (an 8 x 8 split typically gives 11 x 11 crops); ``overlap=False``: the ``n_h x n_w``
  grid."""
  h, w = image_hw
  nh, nw = (int(v) for v in patch_split)
  if nh < 1 or nw < 1:
    raise ValueError(f"patch_split must be positive (n_h, n_w); got {tuple(patch_split)}")
  if h % nh or w % nw:
    raise ValueError(f"a {w}x{h} image does not split into {nh}x{nw} equal patches; resize it to "
                     f"{w // nw * nw}x{h // nh * nh} (aligned_size)")
  ph, pw = h // nh, w // nw
  ys, xs = _axis_starts(h, ph, overlap), _axis_starts(w, pw, overlap)
  starts = np.array([(y, x) for y in ys for x in xs], np.int64)
  return Layout((h, w), (ph, pw), starts, (len(ys), len(xs)), overlap)


def aligned_size(h: int, w: int, patch_split: tuple[int, int] = (8, 8)) -> tuple[int, int]:
  """The official ``tools/infer.py`` size: each side floored to a multiple of its split."""
  nh, nw = patch_split
  return h // nh * nh, w // nw * nw


def layout_positions(layout: Layout, tokens: int, mode: str = "official") -> np.ndarray:
  """RoPE positions ``(S, 5 + t*t, 2)`` for a layout. ``"official"``: the released weights'
  abutting square grid (needs a square crop count; overlapping crops get positions as if they
  did not overlap); ``"true"``: each crop at its real pixel origin in token units
  (``y0 * t / ph``, ``x0 * t / pw``), fractional for overlapping crops, any ``n_h x n_w``."""
  if mode == "official":
    origins = official_origins(len(layout.starts), tokens)
  elif mode == "true":
    ph, pw = layout.patch_hw
    origins = layout.starts.astype(np.float64) * np.array([tokens / ph, tokens / pw])
  else:
    raise ValueError(f"rope_positions must be 'official' or 'true'; got {mode!r}")
  return rope_positions(origins, tokens)


def refine(model: URGT, image: jax.Array, coarse_depth: jax.Array, coarse_normal: jax.Array, *,
           patch_split: tuple[int, int] = (8, 8), overlap: bool = True, crop_size: int = 518,
           rope_positions: str = "official", return_patches: bool = False,
           origin: jax.Array | None = None) -> dict[str, jax.Array]:
  """Refine coarse depth and normals of whole images, as the official ``URGTModel.forward``.

  Args:
    image: ``(B, H, W, 3)`` RGB in [0, 1]; ``H``, ``W`` multiples of ``patch_split``
      (:func:`aligned_size`).
    coarse_depth: ``(B, H, W)`` depth prior, min-max normalised to [0, 1] (relative,
      disparity-like, as the official pipeline's Depth-Anything-V2 output).
    coarse_normal: ``(B, H, W, 3)`` unit normals (camera frame, the prior network's axes).
    patch_split: ``(n_h, n_w)`` native patches; overlap: 30 % overlapping crops (official
      default) or the plain grid; crop_size: side the crops are resized to (518 for the
      released weights; a multiple of 14).
    rope_positions: ``"official"`` or ``"true"`` (:func:`layout_positions`).
    return_patches: also return ``depth_patches`` ``(B, S, ph, pw)``, every crop's refined depth
      at its native size before stitching (what a seam metric compares).
    origin: optional ``(B, 2)`` ``(y, x)`` offsets in token units added to every crop's RoPE
      position (traced values are fine): where the image lies on a larger global grid, as
      GridMix's sub-blocks do in training.

  Returns ``depth`` ``(B, H, W)`` and ``normal`` ``(B, H, W, 3)`` (prior + offset, stitched by a
  uniform average; normals not re-normalised, channels in the prior's order), and the
  ``layout``.
  """
  b, h, w, _ = _image_check(image, coarse_depth, coarse_normal)
  p = int(crop_size)
  if p < PATCH or p % PATCH:
    raise ValueError(f"crop_size must be a positive multiple of {PATCH}; got {crop_size}")
  layout = crop_layout((h, w), patch_split, overlap=overlap)
  ph, pw = layout.patch_hw
  boxes = layout.boxes
  img = image.astype(jnp.float32)
  crops = jnp.stack([resize.resize_bilinear_align_corners(img[:, y0:y1, x0:x1], (p, p))
                     for x0, y0, x1, y1 in boxes], 1)
  roi = jax.vmap(lambda x: resize.roi_align(x, boxes, (p, p)))
  dprior = roi(coarse_depth.astype(jnp.float32)[..., None])
  nprior = roi(coarse_normal.astype(jnp.float32))
  pos = layout_positions(layout, p // PATCH, rope_positions)
  if origin is not None:
    is_patch = (np.arange(pos.shape[1]) >= NUM_SPECIAL)[None, :, None]
    pos = jnp.asarray(pos)[None] + jnp.where(
        is_patch, jnp.asarray(origin, jnp.float32)[:, None, None, :], 0.0)
  out = model(crops, dprior, nprior, positions=pos)
  back = lambda x: resize.resize_bilinear_align_corners(x, (ph, pw))
  depth_patches = back(dprior + out["depth"][..., None])
  normal_patches = back(nprior + out["normal"])
  depth = jnp.zeros((b, h, w, 1), jnp.float32)
  normal = jnp.zeros((b, h, w, 3), jnp.float32)
  count = np.zeros((h, w, 1), np.float32)
  for k, (x0, y0, x1, y1) in enumerate(boxes):
    depth = depth.at[:, y0:y1, x0:x1].add(depth_patches[:, k])
    normal = normal.at[:, y0:y1, x0:x1].add(normal_patches[:, k])
    count[y0:y1, x0:x1] += 1.0
  if overlap:  # the official uniform average, sum / (count + 1e-8)
    inv = jnp.asarray(1.0 / (count + np.float32(1e-8)))
    depth, normal = depth * inv, normal * inv
  out = dict(depth=depth[..., 0], normal=normal, layout=layout)
  if return_patches:
    out["depth_patches"] = depth_patches[..., 0]
  return out


def _image_check(image, coarse_depth, coarse_normal):
  shape = getattr(image, "shape", None)
  if shape is None or len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"image must be a float array (B, H, W, 3) of RGB in [0, 1]; got "
                     f"{None if shape is None else tuple(shape)}")
  b, h, w, _ = shape
  if getattr(coarse_depth, "shape", None) != (b, h, w):
    raise ValueError(f"coarse_depth must have shape {(b, h, w)} (B, H, W) like the image; got "
                     f"{getattr(coarse_depth, 'shape', None)}")
  if getattr(coarse_normal, "shape", None) != (b, h, w, 3):
    raise ValueError(f"coarse_normal must have shape {(b, h, w, 3)} (B, H, W, 3); got "
                     f"{getattr(coarse_normal, 'shape', None)}")
  return shape
