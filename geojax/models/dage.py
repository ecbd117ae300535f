"""DAGE: a low-resolution multi-frame stream and a high-resolution per-frame stream, fused.

``DAGE(hr_video)`` follows ``ngoductuanlhp/DAGE`` (``dage/models/dage.py``):

* **LR stream** (all frames at once, = Pi3's backbone): the video resized to at most
  ``lr_max_size`` (antialiased bilinear, then clamped to [0, 1]), a DINOv2-reg encoder, 5
  shared register tokens and :class:`~geojax.nn.pi3.AlternatingDecoder` (frame / global
  attention with 2D RoPE on real positions). Its ``[frame || global]`` features drive the
  camera decoder and head (camera-to-world poses).
* **HR stream** (each frame alone, = frozen MoGe-2 encoder): the frame resized to a token grid
  of at most ``hr_num_tokens`` tokens, a DINOv2 (no registers) whose tapped layers are
  projected and summed.
* **Adapter** (:class:`~geojax.nn.cross_attention.ContextDecoder`): HR tokens cross-attend to
  their frame's LR tokens (HR positions snapped onto the LR grid) and self-attend (positions
  interpolated to the trained 32 x 32 range); ``fused = hr + adapter(hr, lr)``.
* **Heads**: MoGe-2 ``ConvStack`` neck, points head (``exp`` remap) and mask head at 16x the
  HR token grid, resized to the input; a cls-token decoder for one metric scale per clip.

Conventions (the official ones): ``hr_video`` ``(B, N, H, W, 3)`` RGB in [0, 1]; outputs
``local_points`` ``(B, N, H, W, 3)`` in each camera's frame, OpenCV axes (x right, y down, z
forward), relative units (multiply by ``metric_scale`` for metres); ``conf`` ``(B, N, H, W)``
logits; ``camera_poses`` ``(B, N, 4, 4)`` **camera-to-world** in the same relative units, not
re-anchored to view 0; ``metric_scale`` ``(B, 1)``. The world point of pixel ``(i, j)`` is
``camera_poses @ [local_points, 1]``.

Every size rule is computed on the host from static shapes, so one compilation serves one
input shape. The fp32 path is the parity target (the official ``hr_head`` runs under fp16
autocast at inference; geojax does not).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.nn import pi3, resize, rope
from geojax.nn.cross_attention import ClsDecoder, ContextDecoder
from geojax.nn.moge import MLP, ConvStack, DinoV2Encoder
from geojax.nn.pi3 import (AlternatingDecoder, CameraHead, LinearPts3d, TokenSplitter,
                           TransformerDecoder)
from geojax.nn.vit import DinoV2
from geojax.geometry.alignment import intrinsics_from_points, normalized_view_plane_uv
from geojax.parallel.sharding import create

PATCH = 14


@dataclasses.dataclass(frozen=True)
class DAGEConfig:
  """One DAGE network (official defaults = the released ``dage`` configuration).

  LR stream: ``lr_*`` (DINOv2-reg encoder), ``dec_*`` (alternating decoder with
  ``num_registers`` register tokens), ``cam_*`` (camera decoder; head width ``cam_out``),
  ``point_*`` (Pi3's point decoder and ``LinearPts3d``: in the checkpoints, unused by the
  forward). HR stream: ``hr_*`` (DINOv2 without registers, ``hr_taps`` projected to
  ``hr_out``), ``neck_widths`` / ``neck_res_blocks`` / ``head_res_blocks`` (ConvStacks),
  ``scale_hidden`` (metric-scale MLP). Fusion: ``adapter_*`` (``adapter_rope``: RoPE in
  cross-attention with snapped positions; ``adapter_rope_interp``: interpolated RoPE in
  self-attention), ``cls_*`` (metric-scale decoder). ``token_splitter``: build the stage-1
  distillation projector.

  Runtime fields: ``attn_impl`` (``"xla"``, ``"cudnn"``, ``"chunked"``: the LR decoder's global
  layers see ``N * (5 + h*w)`` tokens), ``remat``, ``scan``, ``dtype``.
  """
  lr_dim: int = 1024
  lr_depth: int = 24
  lr_heads: int = 16
  dec_dim: int = 1024
  dec_depth: int = 36
  dec_heads: int = 16
  num_registers: int = 5
  cam_dim: int = 1024
  cam_depth: int = 5
  cam_heads: int = 16
  cam_out: int = 512
  point_dim: int = 1024
  point_depth: int = 5
  point_heads: int = 16
  point_out: int = 1024
  hr_dim: int = 1024
  hr_depth: int = 24
  hr_heads: int = 16
  hr_taps: tuple[int, ...] = (5, 11, 17, 23)
  hr_out: int = 1024
  neck_widths: tuple[int, ...] = (1024, 256, 128, 64, 32)
  neck_res_blocks: tuple[int, ...] = (0, 2, 2, 2, 0)
  head_res_blocks: tuple[int, ...] = (0, 1, 1, 1, 0)
  resamplers: tuple[str, ...] = ("conv_transpose",) * 3 + ("bilinear",)
  scale_hidden: tuple[int, ...] = (1024, 1024)
  adapter_dim: int = 1024
  adapter_depth: int = 3
  adapter_heads: int = 16
  adapter_rope: bool = True
  adapter_rope_interp: bool = True
  adapter_rope_max: tuple[int, int] = (32, 32)
  cls_dim: int = 1024
  cls_depth: int = 3
  cls_heads: int = 16
  token_splitter: bool = True
  attn_impl: str = "xla"
  remat: str = "none"
  scan: bool = True
  dtype: Any = None

  def __post_init__(self):
    if self.adapter_rope_interp and not self.adapter_rope:
      raise ValueError("adapter_rope_interp needs adapter_rope (the official adapter passes "
                       "no positions at all without it)")
    if len(self.neck_widths) != len(self.neck_res_blocks) or len(self.neck_widths) != len(
        self.head_res_blocks) or len(self.resamplers) != len(self.neck_widths) - 1:
      raise ValueError("neck_widths, neck_res_blocks, head_res_blocks need one entry per "
                       "level and resamplers one fewer")


PRESETS: dict[str, DAGEConfig] = {
    "dage": DAGEConfig(),
    # geojax-only (no official weights): every part at toy width, for CPU demos and tests.
    "dage-tiny": DAGEConfig(
        lr_dim=64, lr_depth=4, lr_heads=4, dec_dim=64, dec_depth=4, dec_heads=4,
        cam_dim=64, cam_depth=1, cam_heads=4, cam_out=64, point_dim=32, point_depth=1,
        point_heads=2, point_out=32, hr_dim=64, hr_depth=4, hr_heads=4, hr_taps=(1, 3),
        hr_out=64, neck_widths=(64, 32, 16, 16, 8), scale_hidden=(64, 64), adapter_dim=64,
        adapter_depth=1, adapter_heads=4, cls_dim=64, cls_depth=1, cls_heads=4),
}
PRESET_NAMES = tuple(PRESETS)
OFFICIAL_PRESETS = ("dage",)
# Official defaults of ``DAGE.forward`` and of the inference script.
LR_MAX_SIZE = 518
HR_NUM_TOKENS = 3600


def get_config(name: str, **overrides) -> DAGEConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown DAGE preset {name!r}; expected one of {PRESET_NAMES}")
  return dataclasses.replace(PRESETS[name], **overrides)


def lr_size(h: int, w: int, lr_max_size: int | None = None,
            lr_resolution: tuple[int, int] | None = None, *,
            multiple: int = PATCH) -> tuple[int, int]:
  """The LR stream's image size for an ``h x w`` video (official ``downsample_input``): the
  long side at most ``lr_max_size`` (floored to ``multiple``), both sides multiples of
  ``multiple`` (14; the stage-1 teacher uses 28 with ``lr_max_size`` 672)."""
  m = int(multiple)
  if lr_resolution is not None:
    lh, lw = (int(v) for v in lr_resolution)
    if lh <= 0 or lw <= 0 or lh % m or lw % m:
      raise ValueError(f"lr_resolution must be positive multiples of {m}; got "
                       f"{tuple(lr_resolution)}")
    return lh, lw
  s = LR_MAX_SIZE if lr_max_size is None else (int(lr_max_size) // m) * m
  aspect = w / h
  if w > h:
    lw = min(s, w // m * m)
    lh = int((lw / aspect) // m * m)
  else:
    lh = min(s, h // m * m)
    lw = int((lh * aspect) // m * m)
  if lh < m or lw < m:
    raise ValueError(f"a {w}x{h} video with lr_max_size={lr_max_size} gives an LR image of "
                     f"{lw}x{lh}, smaller than {m}px; use a larger lr_max_size or a less "
                     "elongated video")
  return lh, lw


def hr_grid(h: int, w: int, hr_num_tokens: int = HR_NUM_TOKENS) -> tuple[int, int]:
  """The HR token grid ``(rows, cols)`` with at most ``hr_num_tokens`` tokens (truncating)."""
  if int(hr_num_tokens) < 1:
    raise ValueError(f"hr_num_tokens must be >= 1; got {hr_num_tokens}")
  a = w / h
  rows, cols = int((hr_num_tokens / a) ** 0.5), int((hr_num_tokens * a) ** 0.5)
  if rows < 1 or cols < 1:
    raise ValueError(f"hr_num_tokens={hr_num_tokens} gives an empty {rows}x{cols} token grid "
                     f"for a {w}x{h} video")
  return rows, cols


class DAGE(nnx.Module):
  """The DAGE network (module docstring). Build with :meth:`from_preset`."""

  def __init__(self, cfg: DAGEConfig, *, rngs: nnx.Rngs):
    c = cfg
    self.cfg = cfg
    rt = dict(attn_impl=c.attn_impl, scan=c.scan, remat=c.remat, dtype=c.dtype)
    self.encoder = DinoV2(dim=c.lr_dim, depth=c.lr_depth, num_heads=c.lr_heads, rngs=rngs,
                          num_registers=4, pos_resize="antialias", **rt)
    self.register_token = nnx.Param(
        jax.random.normal(rngs.params(), (1, 1, c.num_registers, c.dec_dim)) * 1e-6)
    if c.lr_dim != c.dec_dim:
      raise ValueError(f"DAGE: lr_dim ({c.lr_dim}) must equal dec_dim ({c.dec_dim})")
    self.decoder = AlternatingDecoder(dim=c.dec_dim, depth=c.dec_depth, num_heads=c.dec_heads,
                                      rngs=rngs, **rt)
    self.point_decoder = TransformerDecoder(in_dim=2 * c.dec_dim, dim=c.point_dim,
                                            out_dim=c.point_out, depth=c.point_depth,
                                            num_heads=c.point_heads, rngs=rngs, **rt)
    self.point_head = LinearPts3d(PATCH, c.point_out, 3, rngs=rngs)
    self.camera_decoder = TransformerDecoder(in_dim=2 * c.dec_dim, dim=c.cam_dim,
                                             out_dim=c.cam_out, depth=c.cam_depth,
                                             num_heads=c.cam_heads, rngs=rngs, **rt)
    self.camera_head = CameraHead(c.cam_out, rngs=rngs)
    self.hr_encoder = DinoV2Encoder(dim=c.hr_dim, depth=c.hr_depth, num_heads=c.hr_heads,
                                    taps=c.hr_taps, dim_out=c.hr_out, rngs=rngs, **rt)
    widths = list(c.neck_widths)
    head_io = dict(dim_in=widths, dim_res_blocks=widths, resamplers=c.resamplers,
                   num_res_blocks=c.head_res_blocks, rngs=rngs)
    self.hr_neck = ConvStack(dim_in=[c.hr_out + 2] + [2] * (len(widths) - 1),
                             dim_res_blocks=widths, dim_out=[None] * len(widths),
                             resamplers=c.resamplers, num_res_blocks=c.neck_res_blocks,
                             rngs=rngs)
    self.hr_points_head = ConvStack(dim_out=[None] * (len(widths) - 1) + [3], **head_io)
    self.hr_mask_head = ConvStack(dim_out=[None] * (len(widths) - 1) + [1], **head_io)
    self.hr_scale_head = MLP((c.hr_dim, *c.scale_hidden, 1), rngs=rngs)
    self.token_splitter = TokenSplitter(c.dec_dim, rngs=rngs) if c.token_splitter else None
    self.adapter = ContextDecoder(in_dim=c.hr_out, out_dim=c.hr_out, dim=c.adapter_dim,
                                  depth=c.adapter_depth, num_heads=c.adapter_heads,
                                  context_dim=2 * c.dec_dim, rngs=rngs, **rt)
    self.cls_decoder = ClsDecoder(in_dim=c.hr_dim, out_dim=c.hr_dim, dim=c.cls_dim,
                                  depth=c.cls_depth, num_heads=c.cls_heads,
                                  context_dim=c.hr_out, rngs=rngs, attn_impl=c.attn_impl,
                                  dtype=c.dtype)

  @classmethod
  def from_preset(cls, name: str, *, rngs: nnx.Rngs, **overrides) -> "DAGE":
    """Randomly initialised model for a preset (``"dage"``: the released configuration)."""
    return cls.from_config(get_config(name, **overrides), rngs=rngs)

  @classmethod
  def from_config(cls, cfg: DAGEConfig, *, rngs: nnx.Rngs) -> "DAGE":
    """Randomly initialised model for ``cfg`` (one compilation for the whole init)."""
    return create(lambda r: cls(cfg, rngs=r), rngs)

  # ---------------------------------------------------------------------------- LR stream

  def lr_positions(self, grid: tuple[int, int]) -> np.ndarray:
    """``(R + h*w, 2)`` decoder positions: registers at (0, 0), patch (r, c) at (r+1, c+1)."""
    return pi3.decoder_positions(grid, self.cfg.num_registers)

  def lr_encode(self, lr_images: jax.Array) -> jax.Array:
    """``(M, h*14, w*14, 3)`` in [0, 1] -> normalised patch tokens ``(M, h*w, C)``."""
    return pi3.encode_patches(self.encoder, lr_images)

  def lr_decode(self, tokens: jax.Array, batch: int, grid: tuple[int, int], *,
                distill: bool = False, collect: list | None = None):
    """Patch tokens ``(B*N, h*w, C)`` -> ``(lr_hidden (B*N, R + h*w, 2C), distill_feature)``.

    ``distill``: also return the :class:`~geojax.nn.pi3.TokenSplitter` output of block
    ``depth - 3`` (stage-1 training), else ``None``."""
    if distill and self.token_splitter is None:
      raise ValueError("this DAGE was built without its token splitter (token_splitter=False)")
    tap = self.cfg.dec_depth - 3 if distill else None
    hidden, tapped = pi3.decode_frames(self.decoder, self.register_token[...], tokens, batch,
                                       grid, tap=tap, collect=collect)
    feat = None
    if distill:
      bn, t = hidden.shape[:2]
      feat = self.token_splitter(tapped.reshape(bn, t, -1),
                                 num_registers=self.cfg.num_registers, hw=grid, batch=batch)
    return hidden, feat

  def cameras(self, lr_hidden: jax.Array, grid: tuple[int, int]):
    """``lr_hidden`` -> ``(camera-to-world (B*N, 4, 4), (t, rot9) raw head outputs)``."""
    h = self.camera_decoder(lr_hidden, jnp.asarray(self.lr_positions(grid))[None])
    return self.camera_head(h[:, self.cfg.num_registers:])

  # ---------------------------------------------------------------------------- HR stream

  def fuse(self, hr_tokens: jax.Array, hr_hw: tuple[int, int], lr_hidden: jax.Array,
           lr_hw: tuple[int, int], collect: list | None = None) -> jax.Array:
    """``hr_tokens + adapter(hr_tokens, lr_hidden)`` (per frame)."""
    c = self.cfg
    kw = {}
    if c.adapter_rope:
      real = rope.grid_positions(*hr_hw, offset=1.0)
      kw = dict(
          pos=jnp.asarray(rope.interpolated_positions(real, c.adapter_rope_max)
                          if c.adapter_rope_interp else real)[None],
          q_pos=jnp.asarray(rope.snapped_positions(lr_hw, hr_hw, offset=1.0))[None],
          k_pos=jnp.asarray(self.lr_positions(lr_hw))[None])
    return hr_tokens + self.adapter(hr_tokens, lr_hidden, collect=collect, **kw)

  def heads(self, fused: jax.Array, hr_hw: tuple[int, int], out_hw: tuple[int, int],
            aspect: float, collect: dict | None = None):
    """Fused tokens ``(M, rows*cols, C)`` -> ``(points (M, H, W, 3) remapped, conf (M, H, W))``."""
    m = fused.shape[0]
    rows, cols = hr_hw
    feats = []
    for lvl in range(len(self.cfg.neck_widths)):
      uv = normalized_view_plane_uv(cols << lvl, rows << lvl, aspect).astype(np.float32)
      uv = jnp.broadcast_to(jnp.asarray(uv), (m, rows << lvl, cols << lvl, 2))
      feats.append(jnp.concatenate([fused.reshape(m, rows, cols, -1).astype(jnp.float32), uv],
                                   -1) if lvl == 0 else uv)
    neck = self.hr_neck(feats)
    raw_points = self.hr_points_head(neck)[-1]
    raw_conf = self.hr_mask_head(neck)[-1]
    if collect is not None:
      collect.update(neck=neck, raw_points=raw_points, raw_conf=raw_conf)
    pts = resize.resize_bilinear(raw_points, out_hw)
    conf = resize.resize_bilinear(raw_conf, out_hw)[..., 0]
    z = jnp.exp(pts[..., 2:])
    return jnp.concatenate([pts[..., :2] * z, z], -1), conf

  def metric_scale(self, fused: jax.Array, cls: jax.Array, batch: int) -> jax.Array:
    """One metric scale per clip ``(B, 1)`` (no gradient into the streams)."""
    fused, cls = jax.lax.stop_gradient(fused), jax.lax.stop_gradient(cls)[:, None]
    n = cls.shape[0] // batch
    tok = self.cls_decoder(cls, fused, num_frames=n) + cls
    return jnp.exp(self.hr_scale_head(jnp.mean(tok.reshape(batch, n, -1), axis=1)))

  # ---------------------------------------------------------------------------- forward

  def __call__(self, hr_video: jax.Array, lr_video: jax.Array | None = None, *,
               lr_max_size: int | None = None, lr_resolution: tuple[int, int] | None = None,
               hr_num_tokens: int | None = HR_NUM_TOKENS, hr_max_size: int | None = None,
               distill: bool = False, chunk: int | None = None) -> dict[str, jax.Array]:
    """Run DAGE (module docstring for the conventions).

    Args:
      hr_video: ``(B, N, H, W, 3)`` RGB in [0, 1]; sets the output resolution.
      lr_video: optional ``(B, N, h, w, 3)`` input of the LR stream (default: ``hr_video``,
        resized here with antialiasing).
      lr_max_size: longest LR side, floored to a multiple of 14 (default 518; the official
        inference script uses 252).
      lr_resolution: explicit ``(h, w)`` of the LR stream, multiples of 14.
      hr_num_tokens: HR token budget (default 3600): ``rows = int(sqrt(T / a))``,
        ``cols = int(sqrt(T * a))`` with ``a = W / H``.
      hr_max_size: not supported (the official branch swaps the aspect ratio); rejected.
      distill: also return ``student_feat`` for stage-1 feature distillation.
      chunk: run the HR encoder, adapter and heads ``chunk`` frames at a time (the LR stream
        always sees every frame), like the official ``forward_chunk``: memory stops growing
        with the frame count. The metric-scale decoder then attends within each chunk and the
        clip's scale is the mean over all frames, as officially; other outputs are unchanged.
    """
    if hr_max_size is not None:
      raise ValueError("hr_max_size is not supported: the official DAGE branch inverts the "
                       "aspect ratio (a 112x168 video gets an 18x12 token grid); choose the HR "
                       "resolution with hr_num_tokens instead")
    _check_video(hr_video, "hr_video")
    b, n, h, w, _ = hr_video.shape
    if lr_video is None:
      lr_video = hr_video
    else:
      _check_video(lr_video, "lr_video")
      if lr_video.shape[:2] != (b, n):
        raise ValueError(f"lr_video has {lr_video.shape[:2]} (batch, frames); hr_video has "
                         f"{(b, n)}")
    lh, lw = lr_size(lr_video.shape[2], lr_video.shape[3], lr_max_size, lr_resolution)
    lr = lr_video.reshape(b * n, *lr_video.shape[2:]).astype(jnp.float32)
    if lr.shape[1:3] != (lh, lw):
      lr = jnp.clip(resize.resize_bilinear(lr, (lh, lw), antialias=True), 0.0, 1.0)
    lr_hw = (lh // PATCH, lw // PATCH)
    lr_hidden, feat = self.lr_decode(self.lr_encode(lr), b, lr_hw, distill=distill)
    poses, _ = self.cameras(lr_hidden, lr_hw)

    hr_hw = hr_grid(h, w, HR_NUM_TOKENS if hr_num_tokens is None else hr_num_tokens)
    if chunk is not None and int(chunk) < 1:
      raise ValueError(f"chunk must be a positive number of frames; got {chunk}")
    k = n if chunk is None else min(int(chunk), n)

    def hr_part(hr_c, lr_c):
      """``(B, k, H, W, 3)`` frames and their LR features -> points, conf, cls tokens."""
      kk = hr_c.shape[1]
      hr_tokens, cls = self.hr_encoder(hr_c.reshape(b * kk, h, w, 3).astype(jnp.float32),
                                       *hr_hw)
      fused = self.fuse(hr_tokens, hr_hw, lr_c.reshape(b * kk, *lr_c.shape[2:]), lr_hw)
      points, conf = self.heads(fused, hr_hw, (h, w), w / h)
      fused_s, cls_s = jax.lax.stop_gradient(fused), jax.lax.stop_gradient(cls)[:, None]
      tok = self.cls_decoder(cls_s, fused_s, num_frames=kk) + cls_s
      return (points.reshape(b, kk, h, w, 3), conf.reshape(b, kk, h, w),
              tok.reshape(b, kk, -1))

    lr_frames = lr_hidden.reshape(b, n, *lr_hidden.shape[1:])
    full, rest = divmod(n, k)
    parts = []
    if full == 1:
      parts.append(hr_part(hr_video[:, :k], lr_frames[:, :k]))
    elif full > 1:
      split = lambda x: jnp.moveaxis(x[:, :full * k].reshape(b, full, k, *x.shape[2:]), 1, 0)
      mapped = jax.lax.map(lambda a: hr_part(*a), (split(hr_video), split(lr_frames)))
      parts.append(tuple(jnp.moveaxis(m, 0, 1).reshape(b, full * k, *m.shape[3:])
                         for m in mapped))
    if rest:
      parts.append(hr_part(hr_video[:, full * k:], lr_frames[:, full * k:]))
    points, conf, tok = (jnp.concatenate(x, 1) if len(parts) > 1 else x[0]
                         for x in zip(*parts))
    out = dict(local_points=points, conf=conf, camera_poses=poses.reshape(b, n, 4, 4),
               metric_scale=jnp.exp(self.hr_scale_head(jnp.mean(tok, axis=1))))
    if distill:
      out["student_feat"] = feat
    return out


def _check_video(x, name: str) -> None:
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 5 or shape[-1] != 3:
    raise ValueError(f"{name} must be a float array (B, N, H, W, 3) of RGB in [0, 1] "
                     f"(channels last); got {None if shape is None else tuple(shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point RGB in [0, 1]; got {x.dtype}")
  if min(shape[:4]) < 1:
    raise ValueError(f"{name} has an empty dimension: {tuple(shape)}")


def infer(model: DAGE, hr_video: jax.Array, lr_video: jax.Array | None = None, *,
          lr_max_size: int | None = None, lr_resolution: tuple[int, int] | None = None,
          hr_num_tokens: int = HR_NUM_TOKENS, chunk: int | None = None,
          conf_threshold: float = 0.2, focal_iterations: int = 100,
          metric: bool = True) -> dict[str, jax.Array]:
  """DAGE with the official ``infer()`` post-processing (no refinement).

  Returns ``local_points`` and ``camera_poses`` (camera-to-world) in metres (times
  ``metric_scale``; with ``metric=False`` they stay in the network's relative units),
  ``global_points`` ``(B, N, H, W, 3)``, ``intrinsics`` ``(B, N, 3, 3)``
  normalised by the image size (``fx / W``, ``fy / H``, ``cx = cy = 0.5``; from MoGe's focal /
  shift solver on the masked point map), ``mask`` (``sigmoid(conf) > conf_threshold``),
  ``conf`` logits and ``metric_scale`` ``(B, 1)``.
  """
  out = model(hr_video, lr_video, lr_max_size=lr_max_size, lr_resolution=lr_resolution,
              hr_num_tokens=hr_num_tokens, chunk=chunk)
  scale = out["metric_scale"]
  s = scale if metric else jnp.ones_like(scale)
  points = out["local_points"] * s[:, :, None, None, None]
  poses = out["camera_poses"].at[..., :3, 3].multiply(s[:, :, None])
  mask = jax.nn.sigmoid(out["conf"]) > conf_threshold
  k = intrinsics_from_points(points, mask, iterations=focal_iterations)
  world = jnp.einsum("bnij,bnhwj->bnhwi", poses[..., :3, :3], points) + poses[
      ..., None, None, :3, 3]
  return dict(local_points=points, camera_poses=poses, global_points=world, intrinsics=k,
              mask=mask, conf=out["conf"], metric_scale=scale)
