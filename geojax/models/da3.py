"""Depth Anything 3: DINOv2 with alternating view attention, camera token, DualDPT and cameras.

Presets mirror the official ``depth-anything-3`` configs (``da3-small`` ... ``da3-giant``,
``da3metric-large``, ``da3mono-large``, ``da3nested-giant-large``). Inputs are ImageNet-normalised
images ``(B, S, H, W, 3)`` with H, W multiples of 14; outputs follow the official conventions
(OpenCV axes, world-to-camera 3x4 extrinsics, pixel intrinsics).

Layer schedule: block ``i`` attends across views iff ``i >= alt_start`` and ``i`` is odd; RoPE
and QK-norm are on from ``alt_start``. Before block ``alt_start - 1`` a reference view may be
selected (S >= 3, no poses) and moved first; at ``alt_start`` token 0 of every view is replaced by
the camera token (learned, or encoded from given poses).

View parallelism: under a mesh with a ``"view"`` axis (``geojax.parallel.sharding.
make_view_mesh``) the views are split over devices from the images on: patch embedding, local
blocks and the DPT heads run on each device's own views, global blocks gather keys/values only
(``geojax.nn.attention.attend``). ``head_chunk`` bounds the heads' activation memory: they run
over the flattened ``B*S`` views a few at a time in a ``lax.scan``
(:func:`geojax.nn.views.map_in_view_chunks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.geometry import camera
from geojax.geometry.alignment import masked_quantile
from geojax.geometry.ray_pose import pose_from_rays
from geojax.nn import layers, rope, views
from geojax.nn.alternating import GLOBAL, LOCAL, run_schedule
from geojax.nn.dpt import DPTHead, DualDPTHead
from geojax.nn.stack import LayerStack
from geojax.nn.vit import Block, BlockConfig, DinoV2, Mlp
from geojax.parallel.sharding import create, creation_context, shard_views

PATCH = 14
VIT = {  # name: (dim, depth, heads, ffn)
    "vitt": (192, 12, 3, "mlp"), "vits": (384, 12, 6, "mlp"), "vitb": (768, 12, 12, "mlp"),
    "vitl": (1024, 24, 16, "mlp"), "vitg": (1536, 40, 24, "swiglu")}
MIN_VIEWS_FOR_REF_SELECTION = 3


@dataclasses.dataclass(frozen=True)
class DA3Config:
  """One DA3 network. Runtime fields (``attn_impl`` onwards) can be overridden in ``from_preset``.

  Attributes:
    vit: backbone size, one of ``vitt`` (geojax-only), ``vits``, ``vitb``, ``vitl``, ``vitg``.
    out_layers: the four blocks whose outputs feed the head.
    alt_start: first block with RoPE/QK-norm/alternation; -1 for a plain monocular ViT.
    head: ``"dualdpt"`` (depth + rays) or ``"dpt"`` (depth + sky).
    features, out_channels: DPT widths.
    cameras: build the camera encoder/decoder.
    gs_head: build the Gaussian-splatting DPT (giant).
    attn_impl: ``"xla"``, ``"cudnn"`` (bf16/fp16 only) or ``"chunked"`` (blockwise, memory
      linear in the tokens; see ``geojax.nn.attention.attend``).
    remat: remat policy name for the block stacks (see ``geojax.nn.stack.REMAT_POLICIES``).
    scan: scan the block stacks (``False``: unrolled loop).
    dtype: compute dtype of the backbone (heads and camera maths stay float32).
    head_chunk: number of views the DPT heads process at a time (0 = all at once). The heads
      are the largest activations at full resolution; chunking makes their memory independent
      of the view count at the cost of a sequential loop. Same outputs up to float rounding.
      With views split over ``n`` devices it is rounded up to a multiple of ``n`` (each device
      then processes ``head_chunk / n`` of its own views per step).
  """
  vit: str
  out_layers: tuple[int, int, int, int]
  alt_start: int
  head: str
  features: int
  out_channels: tuple[int, int, int, int]
  cameras: bool
  gs_head: bool = False
  attn_impl: str = "xla"
  remat: str = "none"
  scan: bool = True
  dtype: Any = None
  head_chunk: int = 0

  def __post_init__(self):
    if self.head_chunk < 0:
      raise ValueError(f"head_chunk must be >= 0 (0 = all views at once); got {self.head_chunk}")

  @property
  def dim(self) -> int:
    return VIT[self.vit][0]

  @property
  def depth(self) -> int:
    return VIT[self.vit][1]

  @property
  def cat_token(self) -> bool:
    return self.alt_start != -1

  def is_global(self, i: int) -> bool:
    return self.alt_start != -1 and i >= self.alt_start and i % 2 == 1


_ANY = dict(head="dualdpt", cameras=True)
_MONO = DA3Config("vitl", (4, 11, 17, 23), -1, "dpt", 256, (256, 512, 1024, 1024), False)
PRESETS: dict[str, DA3Config] = {
    "da3-small": DA3Config("vits", (5, 7, 9, 11), 4, features=64, out_channels=(48, 96, 192, 384),
                           **_ANY),
    "da3-base": DA3Config("vitb", (5, 7, 9, 11), 4, features=128,
                          out_channels=(96, 192, 384, 768), **_ANY),
    "da3-large": DA3Config("vitl", (11, 15, 19, 23), 8, features=256,
                           out_channels=(256, 512, 1024, 1024), **_ANY),
    "da3-giant": DA3Config("vitg", (19, 27, 33, 39), 13, features=256,
                           out_channels=(256, 512, 1024, 1024), gs_head=True, **_ANY),
    # geojax-only (no official weights): a ViT-Ti/14 DA3 for CPU demos and tests.
    "da3-tiny": DA3Config("vitt", (5, 7, 9, 11), 4, features=32, out_channels=(24, 48, 96, 192),
                          **_ANY),
    "da3metric-large": _MONO,
    "da3mono-large": _MONO,
}
NESTED = {"da3nested-giant-large": ("da3-giant", "da3metric-large")}
PRESET_NAMES = tuple(PRESETS) + tuple(NESTED)
OFFICIAL_PRESETS = tuple(p for p in PRESET_NAMES if p != "da3-tiny")  # with released weights


def get_config(name: str, **overrides) -> DA3Config:
  if name not in PRESETS:
    raise ValueError(f"unknown DA3 preset {name!r}; expected one of {PRESET_NAMES}")
  return dataclasses.replace(PRESETS[name], **overrides)


class DA3Backbone(nnx.Module):
  """DINOv2 trunk with DA3's alternating schedule, camera token and feature taps."""

  def __init__(self, cfg: DA3Config, *, rngs: nnx.Rngs):
    dim, depth, heads, ffn = VIT[cfg.vit]
    alt = cfg.alt_start
    groups = ((alt, False), (depth - alt, True)) if alt > 0 else ((depth, False),)
    self.cfg = cfg
    self.vit = DinoV2(dim=dim, depth=depth, num_heads=heads, ffn=ffn, final_norm_eps=1e-5,
                      groups=groups, attn_impl=cfg.attn_impl, scan=cfg.scan, remat=cfg.remat,
                      dtype=cfg.dtype, rngs=rngs)
    self.camera_token = (nnx.Param(jax.random.normal(rngs.params(), (1, 2, dim)))
                         if alt != -1 else None)

  def placeholder_token(self, b: int, s: int) -> jax.Array:
    """The learned camera token used without poses: one for view 0, one for the others."""
    ct = self.camera_token[...]
    c = ct.shape[-1]
    return jnp.concatenate([jnp.broadcast_to(ct[:, :1], (b, 1, c)),
                            jnp.broadcast_to(ct[:, 1:], (b, s - 1, c))], 1)

  def _segments(self, export: Sequence[int]):
    cfg = self.cfg
    cuts = {0, cfg.depth} | {i + 1 for i in (*cfg.out_layers, *export)}
    if cfg.alt_start > 0:
      cuts |= {cfg.alt_start - 1, cfg.alt_start}
    cuts = sorted(cuts)
    return list(zip(cuts[:-1], cuts[1:]))

  def __call__(self, images: jax.Array, cam_token: jax.Array | None = None,
               ref_view_strategy: str = "saddle_balanced", export_layers: Sequence[int] = ()):
    """Returns ``(feats, cam_tokens, aux)``: four ``(B, S, h*w, D)`` maps, four ``(B, S, D)``
    camera tokens (un-normalised), and ``{"feat_layer_j": (B, S, h, w, C)}``."""
    cfg, vit = self.cfg, self.vit
    b, s, hh, ww, _ = images.shape
    h, w = hh // PATCH, ww // PATCH
    x = vit.tokens(images.reshape(b * s, hh, ww, 3))
    n, c = x.shape[1], x.shape[2]
    x = shard_views(x.reshape(b, s, n, c), 1)
    local_x = x
    pos_local = jnp.asarray(rope.with_special_tokens(rope.grid_positions(h, w, 1.0), 1))[None]
    pos_global = np.ones((s, n, 2), np.float32)
    pos_global[:, 0] = 0
    pos_global = jnp.asarray(pos_global.reshape(1, s * n, 2))
    reorder = cfg.alt_start > 0 and s >= MIN_VIEWS_FOR_REF_SELECTION and cam_token is None
    ref = None
    feats, toks, aux = [], [], {}
    for a, z in self._segments(export_layers):
      if reorder and a == cfg.alt_start - 1:
        ref = views.select_reference_view(x, ref_view_strategy)
        x, local_x = views.reorder_views(x, ref), views.reorder_views(local_x, ref)
      if cfg.alt_start != -1 and a == cfg.alt_start:
        if cam_token is None:
          cam_token = self.placeholder_token(b, s)
        x = x.at[:, :, 0].set(cam_token.astype(x.dtype))
      stack, start = vit.stack_of(a)
      use_rope = cfg.alt_start != -1 and a >= cfg.alt_start
      x, local_x = run_schedule(
          stack, x, local_x, start=start, stop=start + z - a,
          kinds=[GLOBAL if cfg.is_global(i) else LOCAL for i in range(a, z)],
          pos_local=pos_local if use_rope else None, pos_global=pos_global if use_rope else None)
      last = z - 1
      if last in cfg.out_layers:
        out = jnp.concatenate([local_x, x], -1) if cfg.cat_token else x
        out = out.astype(jnp.float32)
        if ref is not None:
          out = views.restore_views(out, ref)
        toks.append(out[:, :, 0])
        if cfg.cat_token:
          out = jnp.concatenate([out[..., :c], vit.norm(out[..., c:])], -1)
        else:
          out = vit.norm(out)
        feats.append(out[:, :, 1:])
      if last in export_layers:
        f = vit.norm(x.astype(jnp.float32))[:, :, 1:]
        if ref is not None:
          f = views.restore_views(f, ref)
        aux[f"feat_layer_{last}"] = f.reshape(b, s, h, w, c)
    return feats, toks, aux


class CameraEncoder(nnx.Module):
  """Known poses -> per-view camera tokens: 9-D encoding, MLP, 4 cross-view blocks (16 heads)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, depth: int = 4, heads: int = 16,
               attn_impl: str = "xla", scan: bool = True):
    self.pose_branch = Mlp(9, dim // 2, out_dim=dim, rngs=rngs)
    self.token_norm = layers.layer_norm(dim, 1e-5, rngs=rngs)
    bc = BlockConfig(dim=dim, num_heads=heads, ln_eps=1e-5, layerscale=0.01, attn_impl=attn_impl)
    self.trunk = LayerStack(lambda r: Block(bc, rngs=r), depth, rngs=rngs, scan=scan)
    self.trunk_norm = layers.layer_norm(dim, 1e-5, rngs=rngs)

  def __call__(self, extrinsics, intrinsics, image_hw):
    enc = camera.encode_pose(camera.rigid_inverse(extrinsics), intrinsics, image_hw)
    t = self.token_norm(self.pose_branch(enc.astype(jnp.float32)))
    t = self.trunk.run(t, lambda x, blk: blk(x))  # attention over the view axis
    return self.trunk_norm(t)


class CameraDecoder(nnx.Module):
  """Camera token ``(B, S, 2C)`` -> 9-D pose encoding ``[t, q_xyzw, fov_h, fov_w]`` (c2w)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.backbone = nnx.List([layers.linear(dim, dim, rngs=rngs), layers.linear(dim, dim, rngs=rngs)])
    self.fc_t = layers.linear(dim, 3, rngs=rngs)
    self.fc_qvec = layers.linear(dim, 4, rngs=rngs)
    self.fc_fov = layers.linear(dim, 2, rngs=rngs)

  def __call__(self, tok):
    for lin in self.backbone:
      tok = jax.nn.relu(lin(tok))
    return jnp.concatenate([self.fc_t(tok), self.fc_qvec(tok), jax.nn.relu(self.fc_fov(tok))], -1)


def _check_inputs(images, extrinsics, intrinsics):
  layers.check_image_batch(images, "images", multiple=PATCH)
  b, s = images.shape[:2]
  if (extrinsics is None) != (intrinsics is None):
    raise ValueError("pass extrinsics and intrinsics together (or neither)")
  if extrinsics is not None:
    if tuple(extrinsics.shape) not in ((b, s, 4, 4), (b, s, 3, 4)):
      raise ValueError(f"extrinsics must be world-to-camera (B, S, 4, 4) or (B, S, 3, 4) = "
                       f"({b}, {s}, ...); got {tuple(extrinsics.shape)}")
    if tuple(intrinsics.shape) != (b, s, 3, 3):
      raise ValueError(f"intrinsics must be (B, S, 3, 3) = ({b}, {s}, 3, 3) pixels; got "
                       f"{tuple(intrinsics.shape)}")


class DA3(nnx.Module):
  """A DA3 network (any-view or monocular/metric). Build with :meth:`from_preset`."""

  def __init__(self, cfg: DA3Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d_head = cfg.dim * (2 if cfg.cat_token else 1)
    self.backbone = DA3Backbone(cfg, rngs=rngs)
    if cfg.head == "dualdpt":
      self.head = DualDPTHead(d_head, features=cfg.features, out_channels=cfg.out_channels,
                              rngs=rngs)
    else:
      self.head = DPTHead(d_head, features=cfg.features, out_channels=cfg.out_channels, sky=True,
                          rngs=rngs)
    self.cam_enc = CameraEncoder(cfg.dim, attn_impl=cfg.attn_impl, rngs=rngs) if cfg.cameras else None
    self.cam_dec = CameraDecoder(d_head, rngs=rngs) if cfg.cameras else None
    self.gs_head = (DPTHead(d_head, features=cfg.features, out_channels=cfg.out_channels,
                            output_dim=38, pos_embed=True, image_merger=True, activation="linear",
                            conf_activation="sigmoid", rngs=rngs) if cfg.gs_head else None)

  @classmethod
  def from_preset(cls, name: str, *, rngs: nnx.Rngs, **overrides) -> "DA3 | NestedDA3":
    """Randomly initialised model for an official preset name (``PRESET_NAMES``)."""
    if name in NESTED:
      cfgs = [get_config(p, **overrides) for p in NESTED[name]]
      return create(lambda r: NestedDA3(*cfgs, rngs=r), rngs)
    cfg = get_config(name, **overrides)
    return create(lambda r: cls(cfg, rngs=r), rngs)

  def __call__(self, images: jax.Array, extrinsics: jax.Array | None = None,
               intrinsics: jax.Array | None = None, *, ref_view_strategy: str = "saddle_balanced",
               export_feat_layers: Sequence[int] = (), use_ray_pose: bool = False,
               normalize_poses: bool = True, infer_gs: bool = False, ray_pose_seed: int = 0,
               return_backbone: bool = False, pose_mask: jax.Array | None = None
               ) -> dict[str, Any]:
    """Run the network.

    Args:
      images: ImageNet-normalised ``(B, S, H, W, 3)``, H and W multiples of 14.
      extrinsics, intrinsics: optional known cameras, world-to-camera ``(B, S, 4|3, 4)`` and
        pixel ``(B, S, 3, 3)``; they condition the camera token (any-view presets).
      ref_view_strategy: ``saddle_balanced`` (default), ``first``, ``middle`` or
        ``saddle_sim_range``; used only for S >= 3 without poses.
      export_feat_layers: blocks whose normalised outputs are returned in ``aux``.
      use_ray_pose: cameras from the ray map (seeded RANSAC) instead of the camera decoder.
      normalize_poses: express given poses relative to view 0 with median-distance scale, as
        the official API does before encoding them.
      infer_gs: also return raw per-pixel Gaussian parameters from the GS head (giant).
      return_backbone: also return the four head inputs as ``backbone``: a list of
        ``(features (B, S, h*w, D), camera_token (B, S, D))``.
      pose_mask: optional ``(B,)`` bool with given cameras: samples where it is False use the
        learned placeholder token instead of the encoded poses (training's random pose
        conditioning). No reference view is selected when cameras are given.

    Returns:
      ``depth``, ``depth_conf`` ``(B, S, H, W)``; ``ray`` ``(B, S, 8h, 8w, 6)``, ``ray_conf``;
      ``extrinsics`` ``(B, S, 3, 4)`` w2c and ``intrinsics`` ``(B, S, 3, 3)`` (any-view presets);
      ``sky`` (metric/mono); ``aux`` with exported features; ``gs_raw``/``gs_conf`` if requested.
    """
    cfg = self.cfg
    _check_inputs(images, extrinsics, intrinsics)
    if ref_view_strategy not in views.STRATEGIES:
      raise ValueError(f"ref_view_strategy must be one of {views.STRATEGIES}; got "
                       f"{ref_view_strategy!r}")
    bad = [j for j in export_feat_layers if not 0 <= j < cfg.depth]
    if bad:
      raise ValueError(f"export_feat_layers {bad} out of range for a {cfg.depth}-block backbone")
    if extrinsics is not None and self.cam_enc is None:
      raise ValueError("this preset takes no camera input (monocular/metric model)")
    if infer_gs and self.gs_head is None:
      raise ValueError("infer_gs needs a preset with a GS head (da3-giant)")
    b, s, hh, ww, _ = images.shape
    image_hw = (hh, ww)
    images = shard_views(images, 1)
    cam_token = None
    if extrinsics is not None:
      ext = camera.to_homogeneous(extrinsics.astype(jnp.float32))
      if normalize_poses:
        ext = camera.normalize_extrinsics(ext)
      cam_token = self.cam_enc(ext, intrinsics.astype(jnp.float32), image_hw)
      if pose_mask is not None:
        if tuple(jnp.shape(pose_mask)) != (b,):
          raise ValueError(f"pose_mask must be ({b},) bool; got shape {tuple(jnp.shape(pose_mask))}")
        cam_token = jnp.where(jnp.asarray(pose_mask)[:, None, None], cam_token,
                              self.backbone.placeholder_token(b, s).astype(cam_token.dtype))
    elif pose_mask is not None:
      raise ValueError("pose_mask needs extrinsics and intrinsics")
    feats, toks, aux = self.backbone(images, cam_token, ref_view_strategy, export_feat_layers)
    flat = [shard_views(f.reshape(b * s, *f.shape[2:]), 0) for f in feats]
    head = self._run_head(self.head, lambda m, xs: m(xs, image_hw), flat)
    unflat = lambda t: shard_views(shard_views(t, 0).reshape(b, s, *t.shape[1:]), 1)
    out: dict[str, Any] = {}
    if cfg.head == "dualdpt":
      out = {k: unflat(v) for k, v in head.items()}
      if use_ray_pose:
        out["extrinsics"], out["intrinsics"] = pose_from_rays(
            out["ray"], out["ray_conf"], image_hw, seed=ray_pose_seed)
      else:
        c2w, k = camera.decode_pose(self.cam_dec(toks[-1]), image_hw)
        out["extrinsics"], out["intrinsics"] = camera.rigid_inverse(c2w), k
    else:
      out["depth"], out["sky"] = unflat(head["pred"]), unflat(head["sky"])
      out["depth"] = self._fill_sky(out["depth"], out["sky"])
    if infer_gs:
      gs = self._run_head(self.gs_head, lambda m, xs: m(xs[:-1], image_hw, images=xs[-1]),
                          [*flat, shard_views(images.reshape(b * s, hh, ww, 3), 0)])
      out["gs_raw"], out["gs_conf"] = unflat(gs["pred"]), unflat(gs["conf"])
    out["aux"] = aux
    if return_backbone:
      out["backbone"] = list(zip(feats, toks))
    return out

  def _run_head(self, head: nnx.Module, call: Callable[[nnx.Module, list], Any],
                inputs: list[jax.Array]) -> Any:
    """``call(head, inputs)`` on flattened ``(B*S, ...)`` views, in ``cfg.head_chunk`` chunks
    when that is smaller than the view count (rounded up to a multiple of the view devices)."""
    return views.map_in_view_chunks(head, call, inputs, self.cfg.head_chunk)

  @staticmethod
  def _fill_sky(depth, sky, threshold: float = 0.3):
    """Monocular sky handling: sky pixels get the 99th percentile of non-sky depth (if both
    regions have more than 10 pixels). Exact quantile over all pixels of the batch."""
    non_sky = sky < threshold
    q = masked_quantile(depth, non_sky, 0.99)
    ok = (non_sky.sum() > 10) & ((~non_sky).sum() > 10)
    return jnp.where(ok & ~non_sky, q, depth)


class NestedDA3(nnx.Module):
  """Any-view giant + metric-large: any-view depth and poses rescaled to metres."""

  def __init__(self, anyview: DA3Config, metric: DA3Config, *, rngs: nnx.Rngs):
    with creation_context():
      self.da3 = DA3(anyview, rngs=rngs)
      self.da3_metric = DA3(metric, rngs=rngs)

  def __call__(self, images, extrinsics=None, intrinsics=None, **kwargs) -> dict[str, Any]:
    out = self.da3(images, extrinsics, intrinsics, **kwargs)
    met = self.da3_metric(images)
    k = out["intrinsics"]
    focal = (k[..., 0, 0] + k[..., 1, 1]) / 2
    metric = met["depth"] * (focal[..., None, None] / 300.0)
    non_sky = met["sky"] < 0.3
    median_conf = masked_quantile(out["depth_conf"], non_sky, 0.5)
    mask = ((out["depth_conf"] >= median_conf) & non_sky & (metric > 1e-2)
            & (out["depth"] > 1e-3))
    d = jnp.where(mask, out["depth"], 0.0)
    num = jnp.sum(d * jnp.where(mask, metric, 0.0))
    den = jnp.maximum(jnp.sum(d * d), 1e-12)
    scale = jnp.where(mask.any(), num / den, 1.0)
    depth = out["depth"] * scale
    ext = out["extrinsics"].at[..., :3, 3].multiply(scale)
    sky_depth = jnp.minimum(masked_quantile(depth, non_sky, 0.99), 200.0)
    out.update(depth=jnp.where(non_sky, depth, sky_depth),
               depth_conf=jnp.where(non_sky, out["depth_conf"], 1.0),
               extrinsics=ext, sky=met["sky"], scale_factor=scale, is_metric=True)
    return out
